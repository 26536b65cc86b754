"""Questions about the tiny world: multiple choice (four options, the answer is a letter) and open answers.

- `mcub`: 2 to 4 inputs from different modalities, each a different concept, that share exactly one attribute;
  "which fits all ?" over four attribute values (the tiny MCUB).
- `attribute`: the same question about one input (what the sources are trained and tested on alone).
- `identify`: "what is it ?", answered by the concept's name.
- `caption` / `recall` (open answers, for training): the concept's name; one attribute's value.

A question lists its items as (modality, concept); its prompt shows each item as the modality's placeholder, or, for
the text-only version the base LLM is trained on, as the concept's name.
"""

import hashlib
import random
from dataclasses import dataclass, field

from .world import ATTRIBUTES, Concept, MODALITIES


# Attribute types that multiple-choice questions ask about, one option each in this order. The others (size, timbre,
# rhythm) tell concepts apart but are never the answer.
ASKED = ("colour", "shape", "pitch", "motion")


LETTERS = "ABCD"
PLACEHOLDERS = {modality: f"<{modality}>" for modality in MODALITIES}
TEXT = "text"  # the "modality" of an item shown by its name


@dataclass(frozen=True)
class Question:
    id: str
    task: str
    items: tuple[tuple[str, str], ...]  # (modality or "text", concept name), in prompt order
    options: tuple[str, ...] = ()
    answer: str = ""  # a letter for multiple choice, else the open answer
    asks: str = ""  # the attribute type a recall question asks about
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def prompt(self) -> str:
        slots = " ".join(name if modality == TEXT else PLACEHOLDERS[modality] for modality, name in self.items)
        if self.task in ("mcub", "attribute"):
            return f"{slots} which fits all ? " + " ".join(f"{letter} {option}" for letter, option in zip(LETTERS, self.options))
        if self.task == "identify":
            return f"{slots} what is it ?"
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


def _shared(concepts: list[Concept]) -> list[str]:
    """Attribute types on which all the concepts agree."""
    return [attribute for attribute in ATTRIBUTES if len({getattr(c, attribute) for c in concepts}) == 1]


def _options(rng: random.Random, correct: str, concepts: list[Concept]) -> tuple[tuple[str, ...], str]:
    """One option per asked attribute type, always in the order of `ASKED` (so a letter always names a type): the
    correct value for its type, and for every other type a value that not all the concepts have, preferably one
    that some of them have (the hard distractor)."""
    held = [set(c.attributes.values()) for c in concepts]
    common = set.intersection(*held)
    some = set.union(*held) - common
    options = []
    for attribute in ASKED:
        if correct in ATTRIBUTES[attribute]:
            options.append(correct)
            continue
        candidates = [value for value in ATTRIBUTES[attribute] if value not in common]
        hard = [value for value in candidates if value in some]
        options.append(rng.choice(hard if hard and rng.random() < 0.7 else candidates))
    return tuple(options), LETTERS[options.index(correct)]


def held_out(key: frozenset) -> bool:
    """Whether a set of concepts belongs to the test side: half of all sets, by a fixed hash. Test questions use only
    those sets, training and validation questions only the others, so no test set is ever seen in training."""
    digest = hashlib.sha256(" ".join(sorted(key)).encode()).digest()
    return digest[0] % 2 == 0


def mcub_question(
    rng: random.Random, concepts: list[Concept], modalities: tuple[str, ...], qid: str, test_side: bool | None = None
) -> Question:
    """Inputs of the given modalities (in that order), different concepts, sharing exactly one attribute; with
    `test_side`, only concept sets on that side of `held_out`."""
    k = len(modalities)
    while True:
        attribute = rng.choice(ASKED)
        value = rng.choice(ATTRIBUTES[attribute])
        pool = [c for c in concepts if getattr(c, attribute) == value]
        if len(pool) < k:
            continue
        chosen = rng.sample(pool, k)
        if _shared(chosen) != [attribute]:
            continue
        if test_side is None or held_out(frozenset(c.name for c in chosen)) == test_side:
            break
    options, answer = _options(rng, value, chosen)
    items = tuple(zip(modalities, (c.name for c in chosen)))
    return Question(qid, "mcub", items, options, answer, meta={"shared": attribute})


def attribute_question(rng: random.Random, concept: Concept, modality: str, qid: str) -> Question:
    attribute = rng.choice(ASKED)
    options, answer = _options(rng, getattr(concept, attribute), [concept])
    return Question(qid, "attribute", ((modality, concept.name),), options, answer, meta={"shared": attribute})


def identify_question(concept: Concept, modality: str, qid: str) -> Question:
    return Question(qid, "identify", ((modality, concept.name),), answer=concept.name)


def recall_question(rng: random.Random, concept: Concept, modality: str, qid: str) -> Question:
    attribute = rng.choice(list(ATTRIBUTES))
    return Question(qid, "recall", ((modality, concept.name),), answer=getattr(concept, attribute), asks=attribute)


def caption_question(concept: Concept, modality: str, qid: str) -> Question:
    return Question(qid, "caption", ((modality, concept.name),), answer=concept.name)


def mcub_split(concepts: list[Concept], k: int, count: int, seed: int, split: str) -> list[Question]:
    """`count` tiny-MCUB-k questions: each shows k of the four modalities (a random subset, in random order). The
    `test` split draws its concept sets from the held-out half, any other split from the rest."""
    rng = random.Random(f"mcub-{k}-{split}-{seed}")
    questions: list[Question] = []
    # Only a few dozen pairs of concepts share exactly one attribute: items may repeat (in other modalities, other
    # renderings and other distractors), so no uniqueness is asked of them.
    while len(questions) < count:
        modalities = tuple(rng.sample(MODALITIES, k))
        questions.append(mcub_question(rng, concepts, modalities, f"{split}-mcub{k}-{len(questions)}", split == "test"))
    return questions


def unimodal_split(concepts: list[Concept], modality: str, count: int, seed: int, split: str) -> list[Question]:
    """`count` single-input questions about one modality, half `identify` and half `attribute`."""
    rng = random.Random(f"unimodal-{modality}-{split}-{seed}")
    questions = []
    for index in range(count):
        concept = rng.choice(concepts)
        qid = f"{split}-{modality}-{index}"
        if index % 2 == 0:
            questions.append(identify_question(concept, modality, qid))
        else:
            questions.append(attribute_question(rng, concept, modality, qid))
    return questions


def as_text(question: Question) -> Question:
    """The text-only version: every item shown by its concept's name."""
    items = tuple((TEXT, name) for _, name in question.items)
    return Question(question.id + "-text", question.task, items, question.options, question.answer, question.asks, question.meta)
