"""Questions about the tiny world: multiple choice (four options, the answer is a letter) and open answers.

- `mcub`: 2 to 4 inputs from different modalities, each a different concept, that share exactly one attribute;
  "which fits all ?" over four attribute values (the tiny MCUB).
- `mcub_open`: the same inputs, "what do all share ?", answered with the shared value (one word): the open tiny MCUB.
  No option order can give its answer away, and a 4-layer base LLM that never learns to bind letters to values (see
  benchmarks/README.md) still answers it, so it measures whether a model composes its inputs.
- `attribute`: the same question about one input (what the sources are trained and tested on alone).
- `identify`: "what is it ?", answered by the concept's name.
- `caption` / `recall` (open answers, for training): the concept's name; one attribute's value.

A question lists its items as (modality, concept); its prompt shows each item as the modality's placeholder, or, for
the text-only version the base LLM is trained on, as the concept's name.

No surface feature gives a multiple-choice answer away. A question offers one value of each asked attribute type, in
a random order of types, so the answer's letter is uniform and independent of the type the inputs share (and the
shared type itself is drawn uniformly). Questions come in several wordings (a phrase, a way of writing the options,
a place for the inputs); training text (the base LLM's corpus, the sources' data) uses some wordings and some orders
of types, validation and test questions only the others: new combinations of words that training used, so a model
must read the inputs and the options rather than recognise a template. `tests/test_tinyworld.py` checks both.
"""

import functools
import hashlib
import itertools
import random
from dataclasses import dataclass, field

from .world import ATTRIBUTES, Concept, MODALITIES, attribute_of_value


# Attribute types that multiple-choice questions ask about, one option each. The others (size, timbre, rhythm) tell
# concepts apart but are never the answer.
ASKED = ("colour", "shape", "pitch", "motion")


LETTERS = "ABCD"
PLACEHOLDERS = {modality: f"<{modality}>" for modality in MODALITIES}
TEXT = "text"  # the "modality" of an item shown by its name

# A wording is (phrase, option layout, placement), indices into these. Every token is one word of the world's
# word-level tokenizer (`base.world_tokenizer`).
CHOICE_PHRASES = ("which fits all ?", "what do all share ?", "which is true of all ?", "which one holds for all ?")
IDENTIFY_PHRASES = ("what is it ?", "which one is this ?", "name it ?")
OPEN_PHRASES = (
    "what do all share ?",
    "which value do all have ?",
    "what is true of all ?",
    "which value holds for all ?",
)
# How an option is written, and what separates two options; the third names the option's attribute type.
OPTION_LAYOUTS = (
    ("{letter} {value}", " "),
    ("( {letter} ) {value}", " "),
    ("{letter} : {attribute} {value}", " , "),
    ("{value} = {letter}", " , "),
)
CHOICE_PLACEMENTS = ("{inputs} {phrase} {options}", "{phrase} {inputs} {options}", "{inputs} {options} {phrase}")
# Questions without options (identify, mcub_open): the inputs before or after the phrase.
IDENTIFY_PLACEMENTS = ("{inputs} {phrase}", "{phrase} {inputs}")
DEFAULT_WORDING = (0, 0, 0)


def _held_out_wording(task: str, wording: tuple[int, int, int]) -> bool:
    """Which wordings only validation and test questions use: a quarter of the multiple-choice ones (a third of the
    "what is it" ones, a quarter of the open MCUB ones), chosen so that every phrase, layout and placement, and every
    pair of them but one, also occurs in training."""
    phrase, layout, placement = wording
    if task == "identify":
        return (phrase + placement) % 3 == 0
    if task == "mcub_open":
        return (phrase + placement) % 4 == 0
    return (phrase + layout + placement) % 4 == 0


def wordings(task: str, held_out: bool) -> tuple[tuple[int, int, int], ...]:
    """The wordings of a task on one side: training (`held_out=False`) or validation and test."""
    if task == "identify":
        every = [
            (phrase, 0, place) for phrase in range(len(IDENTIFY_PHRASES)) for place in range(len(IDENTIFY_PLACEMENTS))
        ]
    elif task == "mcub_open":
        every = [
            (phrase, 0, place) for phrase in range(len(OPEN_PHRASES)) for place in range(len(IDENTIFY_PLACEMENTS))
        ]
    elif task in ("mcub", "attribute"):
        every = list(
            itertools.product(range(len(CHOICE_PHRASES)), range(len(OPTION_LAYOUTS)), range(len(CHOICE_PLACEMENTS)))
        )
    else:
        raise ValueError(f"task {task!r} has a single wording")
    return tuple(wording for wording in every if _held_out_wording(task, wording) == held_out)


def _rotations(order: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [order[shift:] + order[:shift] for shift in range(len(order))]


# Orders of the asked types over the letters. The four rotations of an order put every type at every letter once, so
# each side below is balanced: drawn uniformly, the letter of any type is uniform. Two rotation classes (8 orders) are
# held out for validation and test, the other four classes (16 orders) are for training.
HELD_OUT_ORDERS = tuple(
    sorted(
        rotation
        for order in (("colour", "pitch", "shape", "motion"), ("colour", "motion", "pitch", "shape"))
        for rotation in _rotations(order)
    )
)
TRAINING_ORDERS = tuple(sorted(set(itertools.permutations(ASKED)) - set(HELD_OUT_ORDERS)))


@dataclass(frozen=True)
class Question:
    id: str
    task: str
    items: tuple[tuple[str, str], ...]  # (modality or "text", concept name), in prompt order
    options: tuple[str, ...] = ()
    answer: str = ""  # a letter for multiple choice, else the open answer
    asks: str = ""  # the attribute type a recall question asks about
    wording: tuple[int, int, int] = DEFAULT_WORDING  # (phrase, option layout, placement), see `wordings`
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def prompt(self) -> str:
        slots = " ".join(name if modality == TEXT else PLACEHOLDERS[modality] for modality, name in self.items)
        phrase, layout, placement = self.wording
        if self.task in ("mcub", "attribute"):
            template, separator = OPTION_LAYOUTS[layout]
            options = separator.join(
                template.format(letter=letter, value=value, attribute=attribute_of_value(value))
                for letter, value in zip(LETTERS, self.options)
            )
            return CHOICE_PLACEMENTS[placement].format(inputs=slots, phrase=CHOICE_PHRASES[phrase], options=options)
        if self.task == "identify":
            return IDENTIFY_PLACEMENTS[placement].format(inputs=slots, phrase=IDENTIFY_PHRASES[phrase])
        if self.task == "mcub_open":
            return IDENTIFY_PLACEMENTS[placement].format(inputs=slots, phrase=OPEN_PHRASES[phrase])
        if self.task == "recall":
            return f"{slots} what {self.asks} ?"
        if self.task == "caption":
            return slots
        raise ValueError(f"unknown task {self.task!r}")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(modality for modality, _ in self.items)

    @property
    def key(self) -> frozenset:
        """The set of concepts asked about: a test question's set never appears in training."""
        return frozenset(name for _, name in self.items)


def template_words() -> list[str]:
    """Every word the prompts use besides names, values, letters and placeholders, in a fixed order."""
    texts = [
        *CHOICE_PHRASES,
        *IDENTIFY_PHRASES,
        *OPEN_PHRASES,
        *(template for template, _ in OPTION_LAYOUTS),
        *(separator for _, separator in OPTION_LAYOUTS),
        "what",
        *ATTRIBUTES,
    ]
    words = (word for text in texts for word in text.split() if not word.startswith("{"))
    return list(dict.fromkeys(words))


def _shared(concepts: list[Concept]) -> list[str]:
    """Attribute types on which all the concepts agree."""
    return [attribute for attribute in ATTRIBUTES if len({getattr(c, attribute) for c in concepts}) == 1]


def _options(rng: random.Random, correct: str, concepts: list[Concept], held_out: bool) -> tuple[tuple[str, ...], str]:
    """One option per asked attribute type, the types in an order drawn from one side's orders: the correct value
    for its type, and for every other type a value that not all the concepts have, preferably one that some of them
    have (the hard distractor)."""
    held = [set(c.attributes.values()) for c in concepts]
    common = set.intersection(*held)
    some = set.union(*held) - common
    by_type = {}
    for attribute in ASKED:
        if correct in ATTRIBUTES[attribute]:
            by_type[attribute] = correct
            continue
        candidates = [value for value in ATTRIBUTES[attribute] if value not in common]
        hard = [value for value in candidates if value in some]
        by_type[attribute] = rng.choice(hard if hard and rng.random() < 0.7 else candidates)
    order = rng.choice(HELD_OUT_ORDERS if held_out else TRAINING_ORDERS)
    options = tuple(by_type[attribute] for attribute in order)
    return options, LETTERS[options.index(correct)]


def held_out(key: frozenset) -> bool:
    """Whether a set of concepts belongs to the test side: half of all sets, by a fixed hash. Test questions use only
    those sets, training and validation questions only the others, so no test set is ever seen in training."""
    digest = hashlib.sha256(" ".join(sorted(key)).encode()).digest()
    return digest[0] % 2 == 0


@functools.lru_cache(maxsize=64)
def _sets_sharing_one(concepts: tuple[Concept, ...], k: int, test_side: bool | None) -> dict[str, dict[str, list]]:
    """Every set of k concepts (on one side of `held_out`, or either) that agrees on exactly one asked type, by that
    type and its value."""
    found: dict[str, dict[str, list]] = {}
    for chosen in itertools.combinations(concepts, k):
        shared = _shared(list(chosen))
        if len(shared) != 1 or shared[0] not in ASKED:
            continue
        if test_side is not None and held_out(frozenset(c.name for c in chosen)) != test_side:
            continue
        value = getattr(chosen[0], shared[0])
        found.setdefault(shared[0], {}).setdefault(value, []).append(chosen)
    return found


def _draw_sharing_one(
    rng: random.Random, concepts: list[Concept], k: int, test_side: bool | None
) -> tuple[str, str, list[Concept]]:
    """(shared type, its value, k concepts in random order) that share exactly that one attribute; with `test_side`,
    only concept sets on that side of `held_out`. The shared type is drawn first, uniformly, then its value, then a
    set: no type and no value of a type is the answer more often than another (a type or value that no set on this
    side shares is left out)."""
    sets = _sets_sharing_one(tuple(concepts), k, test_side)
    if not sets:
        raise ValueError(f"no {k} concepts of this world share exactly one attribute on the requested side")
    attribute = rng.choice([attribute for attribute in ASKED if attribute in sets])
    value = rng.choice([value for value in ATTRIBUTES[attribute] if value in sets[attribute]])
    chosen = list(rng.choice(sets[attribute][value]))
    rng.shuffle(chosen)
    return attribute, value, chosen


def mcub_question(
    rng: random.Random,
    concepts: list[Concept],
    modalities: tuple[str, ...],
    qid: str,
    test_side: bool | None = None,
    held_out_wording: bool = False,
) -> Question:
    """Inputs of the given modalities (in that order), different concepts, sharing exactly one attribute (drawn as in
    `_draw_sharing_one`), and one option per asked type."""
    attribute, value, chosen = _draw_sharing_one(rng, concepts, len(modalities), test_side)
    options, answer = _options(rng, value, chosen, held_out_wording)
    items = tuple(zip(modalities, (c.name for c in chosen)))
    wording = rng.choice(wordings("mcub", held_out_wording))
    return Question(qid, "mcub", items, options, answer, wording=wording, meta={"shared": attribute})


def mcub_open_question(
    rng: random.Random,
    concepts: list[Concept],
    modalities: tuple[str, ...],
    qid: str,
    test_side: bool | None = None,
    held_out_wording: bool = False,
) -> Question:
    """The open tiny MCUB: inputs drawn as for `mcub_question`, "what do all share ?", the shared value as answer."""
    attribute, value, chosen = _draw_sharing_one(rng, concepts, len(modalities), test_side)
    items = tuple(zip(modalities, (c.name for c in chosen)))
    wording = rng.choice(wordings("mcub_open", held_out_wording))
    return Question(qid, "mcub_open", items, answer=value, wording=wording, meta={"shared": attribute})


def attribute_question(
    rng: random.Random, concept: Concept, modality: str, qid: str, held_out_wording: bool = False
) -> Question:
    attribute = rng.choice(ASKED)
    options, answer = _options(rng, getattr(concept, attribute), [concept], held_out_wording)
    wording = rng.choice(wordings("attribute", held_out_wording))
    return Question(
        qid, "attribute", ((modality, concept.name),), options, answer, wording=wording, meta={"shared": attribute}
    )


def identify_question(
    rng: random.Random, concept: Concept, modality: str, qid: str, held_out_wording: bool = False
) -> Question:
    wording = rng.choice(wordings("identify", held_out_wording))
    return Question(qid, "identify", ((modality, concept.name),), answer=concept.name, wording=wording)


def recall_question(rng: random.Random, concept: Concept, modality: str, qid: str) -> Question:
    attribute = rng.choice(list(ATTRIBUTES))
    return Question(qid, "recall", ((modality, concept.name),), answer=getattr(concept, attribute), asks=attribute)


def caption_question(concept: Concept, modality: str, qid: str) -> Question:
    return Question(qid, "caption", ((modality, concept.name),), answer=concept.name)


def _evaluated(split: str) -> bool:
    """Validation and test questions use the held-out wordings; any other split is training text."""
    return split in ("test", "val")


def mcub_split(concepts: list[Concept], k: int, count: int, seed: int, split: str) -> list[Question]:
    """`count` tiny-MCUB-k questions: each shows k of the four modalities (a random subset, in random order). The
    `test` split draws its concept sets from the held-out half, any other split from the rest; `test` and `val` use
    the held-out wordings and orders."""
    rng = random.Random(f"mcub-{k}-{split}-{seed}")
    questions: list[Question] = []
    # Only a few dozen pairs of concepts share exactly one attribute: items may repeat (in other modalities, other
    # renderings and other distractors), so no uniqueness is asked of them.
    while len(questions) < count:
        modalities = tuple(rng.sample(MODALITIES, k))
        questions.append(
            mcub_question(
                rng, concepts, modalities, f"{split}-mcub{k}-{len(questions)}", split == "test", _evaluated(split)
            )
        )
    return questions


def mcub_open_split(concepts: list[Concept], k: int, count: int, seed: int, split: str) -> list[Question]:
    """`count` open tiny-MCUB-k questions, drawn like `mcub_split` (held-out sets for `test`, held-out wordings for
    `test` and `val`) from a generator of their own, so that adding them leaves the multiple-choice splits as they
    were."""
    rng = random.Random(f"mcub-open-{k}-{split}-{seed}")
    questions: list[Question] = []
    while len(questions) < count:
        modalities = tuple(rng.sample(MODALITIES, k))
        qid = f"{split}-open{k}-{len(questions)}"
        questions.append(mcub_open_question(rng, concepts, modalities, qid, split == "test", _evaluated(split)))
    return questions


def unimodal_split(concepts: list[Concept], modality: str, count: int, seed: int, split: str) -> list[Question]:
    """`count` single-input questions about one modality, half `identify` and half `attribute`."""
    rng = random.Random(f"unimodal-{modality}-{split}-{seed}")
    questions = []
    for index in range(count):
        concept = rng.choice(concepts)
        qid = f"{split}-{modality}-{index}"
        if index % 2 == 0:
            questions.append(identify_question(rng, concept, modality, qid, _evaluated(split)))
        else:
            questions.append(attribute_question(rng, concept, modality, qid, _evaluated(split)))
    return questions


def as_text(question: Question) -> Question:
    """The text-only version: every item shown by its concept's name."""
    items = tuple((TEXT, name) for _, name in question.items)
    return Question(
        question.id + "-text",
        question.task,
        items,
        question.options,
        question.answer,
        question.asks,
        question.wording,
        question.meta,
    )
