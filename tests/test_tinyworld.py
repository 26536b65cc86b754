"""The tiny world: deterministic concepts and questions, a benchmark that follows its own rules, a scorer checked on
hand-made answers, and the whole pipeline (train -> compose -> evaluate) wired end to end at a few steps."""

import json
from dataclasses import replace

import pytest

from benchmarks.tinyworld.evaluate import is_correct
from benchmarks.tinyworld.questions import (
    ASKED,
    LETTERS,
    Question,
    _shared,
    as_text,
    held_out,
    mcub_split,
    unimodal_split,
)
from benchmarks.tinyworld.base import base_corpus
from benchmarks.tinyworld.datasets import source_questions
from benchmarks.tinyworld.world import ATTRIBUTES, MODALITIES, RENDERED, make_concepts


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
        # A letter always names the same attribute type.
        assert [next(a for a in ASKED if option in ATTRIBUTES[a]) for option in question.options] == list(ASKED)


def test_test_concept_sets_never_appear_in_training(concepts):
    test_keys = {q.key for k in (2, 3, 4) for q in mcub_split(concepts, k, 200, 0, "test")}
    assert all(held_out(key) for key in test_keys)
    validation = {q.key for k in (2, 3, 4) for q in mcub_split(concepts, k, 100, 0, "val")}
    corpus = base_corpus(concepts, 3000, seed=0)
    training = {q.key for q in corpus if len(q.items) > 1}
    assert training and not (training & test_keys) and not (validation & test_keys)
    # Sources see one input at a time.
    for modality in MODALITIES:
        for question in source_questions(concepts, modality, 2, 200, 0):
            assert [m for m in question.modalities if m != "text"] == [modality]
            assert len(question.items) == 1 or not held_out(question.key)


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
    columns of the table are all there, and a rerun reuses every artifact."""
    from benchmarks.tinyworld.run import Settings, run

    settings = Settings(base_steps=2, base_corpus=300, stage1_steps=1, stage1_samples=8, stage2_steps=1,
                        stage2_samples=8, batch_size=4, mcub_questions=4, unimodal_questions=4)
    rows = run(tmp_path, settings)
    assert set(rows) == {f"{m} source ({f})" for m in MODALITIES for f in ("damc", "naive")} | {
        "damc composite", "naive composite"}
    assert set(rows["damc composite"]) == {*MODALITIES, "MCUB-2", "MCUB-3", "MCUB-4"}
    assert all(0.0 <= value <= 1.0 for row in rows.values() for value in row.values())
    damc = json.loads((tmp_path / "composites" / "damc-built" / "model" / "config.json").read_text())
    assert all(entry["lora"] for entry in damc["modalities"].values())
    naive = json.loads((tmp_path / "composites" / "naive-built" / "model" / "config.json").read_text())
    assert not any(entry["lora"] for entry in naive["modalities"].values())
    stamps = {path: path.stat().st_mtime for path in tmp_path.glob("**/.done")}
    assert run(tmp_path, settings) == rows
    assert {path: path.stat().st_mtime for path in tmp_path.glob("**/.done")} == stamps
    # A stage-2 setting retrains the stage-2 sources and what follows, and reuses the base and stage 1.
    run(tmp_path, replace(settings, text_distillation_weight=0.0))
    changed = {path.parent.name for path in tmp_path.glob("**/.done") if path.stat().st_mtime != stamps.get(path)}
    assert changed == {f"{m}-{f}" for m in MODALITIES for f in ("damc", "naive")} | {"damc-built", "naive-built"}
