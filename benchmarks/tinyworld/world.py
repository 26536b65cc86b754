"""The concepts of the tiny world and their attributes.

24 concepts: every (colour, shape) pair, each with a size, a sound (pitch, timbre, rhythm) and a motion drawn from a
seed. Every modality identifies a concept on its own: images and point clouds show colour and shape (images also
size), videos show colour, shape, size and motion, and sounds are unique per concept in (pitch, timbre, rhythm). What a
modality does not show (the sound of a picture, the colour of a sound) is knowledge that lives in the LLM.
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
    "blick", "dax", "wug", "fep", "toma", "zib", "kiki", "bouba", "lorp", "mib", "nup", "quor",
    "rilk", "sapo", "tev", "ulm", "vosk", "yark", "zorn", "gimp", "hask", "jolt", "krel", "plim",
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


def make_concepts(seed: int = 0) -> list[Concept]:
    """The world's concepts: one per (colour, shape) pair; size and motion drawn at random, sounds drawn without
    replacement so that no two concepts sound alike."""
    rng = random.Random(seed)
    names = list(NAMES)
    rng.shuffle(names)
    sounds = list(itertools.product(ATTRIBUTES["pitch"], ATTRIBUTES["timbre"], ATTRIBUTES["rhythm"]))
    rng.shuffle(sounds)
    concepts = []
    for index, (colour, shape) in enumerate(itertools.product(ATTRIBUTES["colour"], ATTRIBUTES["shape"])):
        pitch, timbre, rhythm = sounds[index]
        concepts.append(
            Concept(
                name=names[index],
                colour=colour,
                shape=shape,
                size=rng.choice(ATTRIBUTES["size"]),
                pitch=pitch,
                timbre=timbre,
                rhythm=rhythm,
                motion=rng.choice(ATTRIBUTES["motion"]),
            )
        )
    for modality in MODALITIES:
        rendered = [concept.rendered(modality) for concept in concepts]
        if len(set(rendered)) != len(rendered):
            raise RuntimeError(f"two concepts look alike in {modality}; the world is not identifiable")
    return concepts


def attribute_of_value(value: str) -> str:
    return next(attribute for attribute, values in ATTRIBUTES.items() if value in values)
