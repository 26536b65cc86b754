"""The tiny world: deterministic concepts and questions, a benchmark that follows its own rules, a scorer checked on
hand-made answers, and the whole pipeline (train -> compose -> evaluate) wired end to end at a few steps."""

import json
from dataclasses import replace

import pytest

from benchmarks.tinyworld.base import base_corpus, world_tokenizer
from benchmarks.tinyworld.datasets import source_questions
from benchmarks.tinyworld.evaluate import is_correct
from benchmarks.tinyworld.questions import (
    ASKED,
    LETTERS,
    PLACEHOLDERS,
    Question,
    _shared,
    as_text,
    held_out,
    mcub_open_split,
    mcub_split,
    unimodal_split,
)
from benchmarks.tinyworld.stats import chi_square_independence, chi_square_uniform
from benchmarks.tinyworld.world import ATTRIBUTES, MODALITIES, NAMES, RENDERED, attribute_of_value, make_concepts


@pytest.fixture(scope="module")
def concepts():
    return make_concepts(0)


def test_world_is_deterministic_and_every_modality_identifies_a_concept(concepts):
    assert make_concepts(0) == concepts
    assert make_concepts(1) != concepts
    for modality in MODALITIES:
        rendered = [concept.rendered(modality) for concept in concepts]
        assert len(set(rendered)) == len(concepts), modality
    values = [value for values in ATTRIBUTES.values() for value in values]
    assert len(values) == len(set(values))  # no word is the value of two attribute types
    assert set(RENDERED) == set(MODALITIES)


def test_splits_are_deterministic_for_a_seed(concepts):
    first = mcub_split(concepts, 3, 50, seed=0, split="test")
    assert mcub_split(concepts, 3, 50, seed=0, split="test") == first
    assert mcub_split(concepts, 3, 50, seed=1, split="test") != first
    assert unimodal_split(concepts, "audio", 20, 0, "test") == unimodal_split(concepts, "audio", 20, 0, "test")
    first = mcub_open_split(concepts, 3, 50, seed=0, split="test")
    assert mcub_open_split(concepts, 3, 50, seed=0, split="test") == first
    assert mcub_open_split(concepts, 3, 50, seed=1, split="test") != first


@pytest.mark.parametrize("k", [2, 3, 4])
def test_mcub_questions_follow_the_rules(concepts, k):
    by_name = {concept.name: concept for concept in concepts}
    for question in mcub_split(concepts, k, 100, seed=0, split="test"):
        modalities = question.modalities
        assert len(modalities) == k and len(set(modalities)) == k  # k different modalities
        chosen = [by_name[name] for _, name in question.items]
        assert len({c.name for c in chosen}) == k  # each a different concept
        shared = _shared(chosen)
        assert shared == [question.meta["shared"]] and shared[0] in ASKED  # exactly one shared attribute
        assert len(question.options) == 4 and question.answer in LETTERS
        correct = question.options[LETTERS.index(question.answer)]
        assert all(correct == c.attributes[shared[0]] for c in chosen)
        for option in question.options:
            if option != correct:
                assert not all(option in c.attributes.values() for c in chosen)
        # One option of each asked type, in some order.
        assert sorted(attribute_of_value(option) for option in question.options) == sorted(ASKED)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_open_mcub_questions_follow_the_rules(concepts, k):
    by_name = {concept.name: concept for concept in concepts}
    vocabulary = world_tokenizer().get_vocab()
    for question in mcub_open_split(concepts, k, 100, seed=0, split="test"):
        assert question.task == "mcub_open" and not question.options
        assert len(set(question.modalities)) == k and "text" not in question.modalities
        chosen = [by_name[name] for _, name in question.items]
        assert len({c.name for c in chosen}) == k
        shared = _shared(chosen)
        assert shared == [question.meta["shared"]] and shared[0] in ASKED
        # The answer is the shared value, one word of the tokenizer, and the prompt names no value.
        assert all(c.attributes[shared[0]] == question.answer for c in chosen)
        assert question.answer in vocabulary
        assert not set(question.prompt().split()) & {v for values in ATTRIBUTES.values() for v in values}


def test_test_concept_sets_never_appear_in_training(concepts):
    test_keys = {
        q.key for k in (2, 3, 4) for split in (mcub_split, mcub_open_split) for q in split(concepts, k, 200, 0, "test")
    }
    assert all(held_out(key) for key in test_keys)
    validation = {
        q.key for k in (2, 3, 4) for split in (mcub_split, mcub_open_split) for q in split(concepts, k, 100, 0, "val")
    }
    corpus = base_corpus(concepts, 3000, seed=0)
    training = {q.key for q in corpus if len(q.items) > 1}
    assert {q.task for q in corpus if len(q.items) > 1} == {"mcub", "mcub_open"}
    assert training and not (training & test_keys) and not (validation & test_keys)
    # Sources see one input at a time.
    for modality in MODALITIES:
        for question in source_questions(concepts, modality, 2, 200, 0):
            assert [m for m in question.modalities if m != "text"] == [modality]
            assert len(question.items) == 1 or not held_out(question.key)


@pytest.fixture(scope="module")
def training_text(concepts):
    """Every multiple-choice and open question that the base LLM and the sources train on (smaller counts than the
    demo's, same generators)."""
    questions = base_corpus(concepts, 4000, seed=0)
    for modality in MODALITIES:
        questions += source_questions(concepts, modality, 1, 100, 0) + source_questions(concepts, modality, 2, 600, 0)
    return questions


@pytest.fixture(scope="module")
def evaluated(concepts):
    """The test split and the validation split (which chooses λ): both in the held-out wordings."""
    questions = []
    for split, count in (("test", 400), ("val", 100)):
        questions += [q for k in (2, 3, 4) for q in mcub_split(concepts, k, count, 0, split)]
        questions += [q for k in (2, 3, 4) for q in mcub_open_split(concepts, k, count, 0, split)]
        questions += [q for m in MODALITIES for q in unimodal_split(concepts, m, count, 0, split)]
    return questions


def _surface_p_values(questions: list[Question]) -> dict[str, float]:
    """p-values of chi-square tests: the answer's letter against the type the inputs share (independence), letters
    and shared types (uniform), and the type offered at each letter (uniform)."""
    by_answer = [[0] * len(LETTERS) for _ in ASKED]
    at_letter = [[0] * len(ASKED) for _ in LETTERS]
    for question in questions:
        by_answer[ASKED.index(question.meta["shared"])][LETTERS.index(question.answer)] += 1
        for letter, option in enumerate(question.options):
            at_letter[letter][ASKED.index(attribute_of_value(option))] += 1
    p_values = {
        "letter vs shared type": chi_square_independence(by_answer)[2],
        "letters": chi_square_uniform([sum(row[i] for row in by_answer) for i in range(len(LETTERS))])[2],
        "shared types": chi_square_uniform([sum(row) for row in by_answer])[2],
    }
    for letter, counts in zip(LETTERS, at_letter):
        p_values[f"types at {letter}"] = chi_square_uniform(counts)[2]
    return p_values


def _in_fixed_order(question: Question) -> Question:
    """The question with its options in the order of `ASKED`, as the benchmark wrote them before issue 23."""
    options = tuple(sorted(question.options, key=lambda option: ASKED.index(attribute_of_value(option))))
    correct = question.options[LETTERS.index(question.answer)]
    return replace(question, options=options, answer=LETTERS[options.index(correct)])


@pytest.mark.parametrize("side", ["training", "evaluated"])
def test_answer_letter_and_option_order_are_independent_of_the_attribute_type(side, training_text, evaluated):
    questions = [q for q in (training_text if side == "training" else evaluated) if q.options]
    assert len(questions) > 2000
    p_values = _surface_p_values(questions)
    # Seven tests at level 0.001: a fair generator fails one with probability under 1%, and the seeds are fixed, so
    # the outcome is deterministic; a biased one (as below) gives p-values far smaller.
    assert min(p_values.values()) > 1e-3, p_values
    # The test has power: the old layout (types always in the order of `ASKED`) fails it by far.
    fixed = _surface_p_values([_in_fixed_order(q) for q in questions])
    assert max(fixed["letter vs shared type"], *(fixed[f"types at {letter}"] for letter in LETTERS)) < 1e-12, fixed


def test_the_options_alone_do_not_give_the_answer_away(training_text, evaluated):
    """Readers that never look at the inputs, fit on the training text: how often each option value, each (letter,
    offered type) and each (wording, letter) is the answer. On test questions each scores within 3 standard errors
    of chance; on the training text the value prior does better, which shows the readers can find a shortcut."""
    training = [q for q in training_text if q.options]
    test = [q for q in evaluated if q.options and q.id.startswith("test-")]
    features = {
        "value": lambda q, i: q.options[i],
        "letter and type": lambda q, i: (i, attribute_of_value(q.options[i])),
        "wording and letter": lambda q, i: (q.task, q.wording, i),
    }
    bound = 0.25 + 3 * (0.25 * 0.75 / len(test)) ** 0.5
    for name, feature in features.items():
        hits, seen = {}, {}
        for question in training:
            for index in range(len(LETTERS)):
                key = feature(question, index)
                seen[key] = seen.get(key, 0) + 1
                hits[key] = hits.get(key, 0) + (LETTERS[index] == question.answer)

        def accuracy(questions: list[Question]) -> float:
            rate = lambda q, i: hits.get(feature(q, i), 0) / seen.get(feature(q, i), 1)  # noqa: E731
            picks = [max(range(len(LETTERS)), key=lambda i: rate(q, i)) for q in questions]
            return sum(LETTERS[i] == q.answer for i, q in zip(picks, questions)) / len(questions)

        assert accuracy(test) <= bound, (name, accuracy(test), bound)
        if name == "value":
            assert accuracy(training) > bound


@pytest.mark.parametrize("side", ["training", "evaluated"])
def test_open_answers_are_uniform_over_types_and_values(side, concepts, training_text, evaluated):
    """The shared type is uniform, and so is its value among those the side's sets can share (per number of inputs,
    as drawn); a reader that never looks at the inputs and answers the likeliest training answer is near 1/16 on the
    test questions."""
    questions = [q for q in (training_text if side == "training" else evaluated) if q.task == "mcub_open"]
    assert len(questions) > 900
    by_draw: dict = {}
    for question in questions:
        draw = (question.id.split("-")[0], len(question.items))  # split (or training text) and k
        by_draw.setdefault(draw, []).append(question)
    for draw, group in by_draw.items():
        types = [q.meta["shared"] for q in group]
        assert chi_square_uniform([types.count(t) for t in ASKED])[2] > 1e-3, draw
        for attribute in ASKED:
            values = [q.answer for q in group if q.meta["shared"] == attribute]
            counts = [values.count(v) for v in dict.fromkeys(values)]
            assert len(counts) == 1 or chi_square_uniform(counts)[2] > 1e-3, (draw, attribute, counts)
    if side == "evaluated":
        training = [q.answer for q in training_text if q.task == "mcub_open"]
        likeliest = max(set(training), key=training.count)
        test = [q for q in questions if q.id.startswith("test-")]
        rate = sum(q.answer == likeliest for q in test) / len(test)
        assert rate <= 1 / 12 + 3 * (1 / 12 * 11 / 12 / len(test)) ** 0.5, (likeliest, rate)


def _wording(prompt: str) -> str:
    """A prompt's wording: its words with every name, attribute value and placeholder written `_`."""
    fillers = {*NAMES, *(value for values in ATTRIBUTES.values() for value in values), *PLACEHOLDERS.values()}
    return " ".join("_" if word in fillers else word for word in prompt.split())


def test_test_wordings_and_orders_never_occur_in_training_text(training_text, evaluated):
    training = {_wording(q.prompt()) for q in training_text}
    tested = {_wording(q.prompt()) for q in evaluated}
    assert not training & tested
    # New combinations of words that training used: no evaluated word has an untrained embedding.
    assert {w for text in tested for w in text.split()} <= {w for text in training for w in text.split()}
    # Several wordings and layouts on each side (the options are written in more than one way).
    for questions in (training_text, evaluated):
        assert len({q.wording for q in questions if q.task == "mcub"}) >= 8
        assert len({q.wording[1] for q in questions if q.task == "mcub"}) == 4
        assert len({q.wording for q in questions if q.task == "mcub_open"}) >= 2
    order = lambda q: tuple(attribute_of_value(option) for option in q.options)  # noqa: E731
    assert not {order(q) for q in training_text if q.options} & {order(q) for q in evaluated if q.options}
    tokenizer = world_tokenizer()
    for question in [*training_text[::7], *evaluated]:
        assert tokenizer.unk_token not in tokenizer.tokenize(as_text(question).prompt()), question.prompt()


def test_a_wording_renders_every_part():
    question = Question(
        "q", "mcub", (("image", "dax"), ("audio", "wug")), ("deep", "red", "rising", "boxy"), "B", wording=(2, 2, 1)
    )
    assert question.prompt() == (
        "which is true of all ? <image> <audio> A : pitch deep , B : colour red , C : motion rising , D : shape boxy"
    )
    question = replace(question, wording=(3, 3, 2))
    assert question.prompt() == "<image> <audio> deep = A , red = B , rising = C , boxy = D which one holds for all ?"


def test_open_wordings_render():
    question = Question("q", "mcub_open", (("image", "dax"), ("audio", "wug")), answer="red", wording=(0, 0, 0))
    assert question.prompt() == "<image> <audio> what do all share ?"
    assert as_text(replace(question, wording=(1, 0, 1))).prompt() == "which value do all have ? dax wug"


def test_text_version_names_the_concepts():
    question = Question("q", "mcub", (("image", "dax"), ("audio", "wug")), ("red", "boxy", "deep", "rising"), "C")
    assert question.prompt() == "<image> <audio> which fits all ? A red B boxy C deep D rising"
    assert as_text(question).prompt() == "dax wug which fits all ? A red B boxy C deep D rising"


def test_scorer_on_hand_made_answers():
    choice = Question("q", "mcub", (("image", "dax"),), ("red", "boxy", "deep", "rising"), "B")
    assert is_correct(choice, "B")
    assert is_correct(choice, " B</s>") and is_correct(choice, "B because")
    assert not is_correct(choice, "b") and not is_correct(choice, "") and not is_correct(choice, "A")
    assert not is_correct(choice, "boxy")  # the value is not the letter
    name = Question("q", "identify", (("audio", "dax"),), answer="dax")
    assert is_correct(name, "dax") and is_correct(name, " dax is") and not is_correct(name, "daxy")


def test_pipeline_runs_end_to_end_at_a_few_steps(tmp_path):
    """Not a quality check (that is the demo): every step runs, composites are built by the converter, the rows and
    columns of the table are all there with a result per question, and a rerun reuses every artifact."""
    from benchmarks.tinyworld.run import BASE_ROW, Settings, run

    settings = Settings(
        base_steps=2,
        base_corpus=300,
        stage1_steps=1,
        stage1_samples=8,
        stage2_steps=1,
        stage2_samples=8,
        batch_size=4,
        mcub_questions=4,
        unimodal_questions=4,
    )
    rows = run(tmp_path, settings)
    assert set(rows) == {f"{m} source ({f})" for m in MODALITIES for f in ("damc", "naive")} | {
        "damc composite",
        "naive composite",
        "routed composite",
        BASE_ROW,
    }
    columns = {*MODALITIES, "MCUB-2", "MCUB-3", "MCUB-4", "open-2", "open-3", "open-4"}
    assert set(rows["damc composite"]) == set(rows[BASE_ROW]) == columns
    assert all(
        len(results) == 4 and all(isinstance(r, bool) for r in results)
        for row in rows.values()
        for results in row.values()
    )
    damc = json.loads((tmp_path / "composites" / "damc-built" / "model" / "config.json").read_text())
    assert all(entry["lora"] for entry in damc["modalities"].values())
    naive = json.loads((tmp_path / "composites" / "naive-built" / "model" / "config.json").read_text())
    assert not any(entry["lora"] for entry in naive["modalities"].values())
    routed = json.loads((tmp_path / "composites" / "routed-built" / "model" / "config.json").read_text())
    assert {entry["delta"] for entry in routed["composition"]["routing"]["modalities"].values()} == {"source_lora"}
    assert len(routed["composition"]["routing"]["modalities"]) == len(MODALITIES)
    stamps = {path: path.stat().st_mtime for path in tmp_path.glob("**/.done")}
    assert run(tmp_path, settings) == rows
    assert {path: path.stat().st_mtime for path in tmp_path.glob("**/.done")} == stamps

    def rebuilt() -> set[str]:
        changed = {path.parent.name for path in tmp_path.glob("**/.done") if path.stat().st_mtime != stamps.get(path)}
        stamps.update({path: path.stat().st_mtime for path in tmp_path.glob("**/.done")})
        return changed

    # A stage-2 setting of both families retrains the stage-2 sources and what follows, and reuses the base and
    # stage 1; one family's rate retrains that family only (and the composites made of it), and the number of
    # questions retrains nothing.
    run(tmp_path, replace(settings, text_distillation_weight=0.0))
    assert rebuilt() == {f"{m}-{f}" for m in MODALITIES for f in ("damc", "naive")} | {
        "damc-built",
        "naive-built",
        "routed-built",
        "evaluation",
        "evaluation-routed",
    }
    rows = run(
        tmp_path, replace(settings, text_distillation_weight=0.0, shared_lora_learning_rate=1e-3, mcub_questions=6)
    )
    assert rebuilt() == {f"{m}-naive" for m in MODALITIES} | {
        "naive-built",
        "routed-built",
        "evaluation",
        "evaluation-routed",
    }
    assert len(rows["damc composite"]["MCUB-4"]) == 6
