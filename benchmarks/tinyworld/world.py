"""The concepts of the tiny world and their attributes.

24 concepts: every (colour, shape) pair, each with a size, a sound (pitch, timbre, rhythm) and a motion drawn from a
seed, every value of an attribute held by equally many concepts. Every modality identifies a concept on its own:
images and point clouds show colour and shape (images also size), videos show colour, shape, size and motion, and
sounds are unique per concept in (pitch, timbre, rhythm). What a modality does not show (the sound of a picture, the
colour of a sound) is knowledge that lives in the LLM.
"""

import itertools
import random
from dataclasses import dataclass


# Attribute type -> its values. Every value is one word, and no word is the value of two types.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue", "yellow", "purple", "cyan"),
    "shape": ("round", "boxy", "pointy", "ringed"),
    "size": ("small", "medium", "big"),
    "pitch": ("deep", "low", "high", "shrill"),
    "timbre": ("pure", "buzzy", "brassy"),
    "rhythm": ("steady", "pulsing", "rapid"),
    "motion": ("rising", "falling", "leftward", "rightward"),
}
# What each modality renders (the rest of a concept must be recalled by the LLM).
RENDERED: dict[str, tuple[str, ...]] = {
    "image": ("colour", "shape", "size"),
    "video": ("colour", "shape", "size", "motion"),
    "audio": ("pitch", "timbre", "rhythm"),
    "point": ("colour", "shape"),
}
MODALITIES = tuple(RENDERED)
NAMES = (
    "blick",
    "dax",
    "wug",
    "fep",
    "toma",
    "zib",
    "kiki",
    "bouba",
    "lorp",
    "mib",
    "nup",
    "quor",
    "rilk",
    "sapo",
    "tev",
    "ulm",
    "vosk",
    "yark",
    "zorn",
    "gimp",
    "hask",
    "jolt",
    "krel",
    "plim",
)


@dataclass(frozen=True)
class Concept:
    name: str
    colour: str
    shape: str
    size: str
    pitch: str
    timbre: str
    rhythm: str
    motion: str

    @property
    def attributes(self) -> dict[str, str]:
        return {attribute: getattr(self, attribute) for attribute in ATTRIBUTES}

    def rendered(self, modality: str) -> tuple[str, ...]:
        return tuple(getattr(self, attribute) for attribute in RENDERED[modality])


def _balanced(rng: random.Random, values: tuple[str, ...], count: int) -> list[str]:
    """`count` values, each of `values` equally often, in random order."""
    drawn = [values[index % len(values)] for index in range(count)]
    rng.shuffle(drawn)
    return drawn


def make_concepts(seed: int = 0) -> list[Concept]:
    """The world's concepts: one per (colour, shape) pair; every value of every attribute held by equally many concepts
    (so that no value is a likelier answer than another of its type), drawn at random, and no two concepts alike in
    sound: each pitch goes with six of the nine (timbre, rhythm) pairs, all but a random one per timbre and rhythm."""
    rng = random.Random(seed)
    names = list(NAMES)
    rng.shuffle(names)
    pairs = list(itertools.product(ATTRIBUTES["colour"], ATTRIBUTES["shape"]))
    timbres, rhythms = ATTRIBUTES["timbre"], ATTRIBUTES["rhythm"]
    sounds = []
    for pitch in ATTRIBUTES["pitch"]:
        left_out = dict(zip(timbres, rng.sample(rhythms, len(rhythms))))
        sounds += [(pitch, timbre, rhythm) for timbre in timbres for rhythm in rhythms if left_out[timbre] != rhythm]
    rng.shuffle(sounds)
    sizes = _balanced(rng, ATTRIBUTES["size"], len(pairs))
    motions = _balanced(rng, ATTRIBUTES["motion"], len(pairs))
    concepts = [
        Concept(
            name=names[index],
            colour=colour,
            shape=shape,
            size=sizes[index],
            pitch=sounds[index][0],
            timbre=sounds[index][1],
            rhythm=sounds[index][2],
            motion=motions[index],
        )
        for index, (colour, shape) in enumerate(pairs)
    ]
    for modality in MODALITIES:
        rendered = [concept.rendered(modality) for concept in concepts]
        if len(set(rendered)) != len(rendered):
            raise RuntimeError(f"two concepts look alike in {modality}; the world is not identifiable")
    return concepts


def attribute_of_value(value: str) -> str:
    return next(attribute for attribute, values in ATTRIBUTES.items() if value in values)
