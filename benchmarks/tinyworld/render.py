"""Deterministic renderings of the tiny world's concepts, one per modality, and their files.

Every renderer takes a concept and a numpy Generator and returns a numpy array. The attribute signals are strong (a
small random-init frozen encoder plus a trained projector must tell concepts apart) and the nuisances are modest
(position, colour and pitch jitter, a little noise), so that two instances of a concept differ but look alike.
Use `instance_rng(...)` for a generator that is the same in every process.
"""

import hashlib
from pathlib import Path

import numpy as np

from conversations.media import write_wav

from .world import Concept


IMAGE_SIZE = 32
SAMPLING_RATE = 16000

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 40),
    "blue": (50, 80, 230),
    "yellow": (230, 220, 40),
    "purple": (160, 50, 200),
    "cyan": (40, 210, 220),
}
# Half-widths in pixels (radius of a disc or ring, half the side of a square or triangle) for a 32x32 frame.
HALF_WIDTHS: dict[str, float] = {"small": 5.0, "medium": 8.0, "big": 12.0}
# Fundamentals in Hz: Whisper's 16 slaney-mel bins over 0-8 kHz put them in bins 0, 2, 6-7 and 9, well apart.
# Shrill stays below 2.5 kHz so that a square wave keeps its 3rd harmonic under MAX_HARMONIC_HZ (at 4 kHz every
# timbre would be a bare sine); deep at 180 Hz lines its odd harmonics up with the mel bins below 1.3 kHz (bins 0, 2,
# 4, 6), so that a deep square wave leaves gaps in bins 1, 3 and 5 where a sawtooth does not.
PITCHES: dict[str, float] = {"deep": 180.0, "low": 500.0, "high": 1500.0, "shrill": 2400.0}
# On/off gating rate of the amplitude envelope in Hz (0: always on).
RHYTHMS: dict[str, float] = {"steady": 0.0, "pulsing": 2.0, "rapid": 6.0}
# Unit vector (row, column) of each motion; rows grow downwards, so rising is -1.
MOTIONS: dict[str, tuple[int, int]] = {"rising": (-1, 0), "falling": (1, 0), "leftward": (0, -1), "rightward": (0, 1)}

COLOUR_JITTER = 15  # +- per channel, in 0-255 units
BACKGROUND_MAX = 40  # background pixels are uniform in 0..BACKGROUND_MAX
CENTRE_JITTER = 3.0  # +- pixels
VIDEO_TRAVEL = 18.0  # pixels covered by the centre over a clip (+- 2): about 2.6 px a frame over 8 frames
PITCH_JITTER = 0.03
MAX_HARMONIC_HZ = 7500.0  # below Nyquist (8 kHz): additive synthesis without aliasing
RING_INNER = 0.5  # inner radius of a ring, as a fraction of the outer one
EDGE_SECONDS = 0.004  # gating ramps, so that the on/off edges do not click across the whole spectrum

MEDIA_SUFFIXES = {"image": ".png", "video": ".npy", "audio": ".wav", "point": ".npy"}


def instance_rng(*keys: object) -> np.random.Generator:
    """A generator seeded from a stable hash of `keys` (unlike `hash()`, the same in every process)."""
    digest = hashlib.sha256(repr(keys).encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# ---------------------------------------------------------------------------------------------------------- images


def _shape_mask(shape: str, centre: tuple[float, float], half: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """A boolean (size, size) mask of `shape` centred at (row, column); parts outside the frame are cut off."""
    rows, columns = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = rows - centre[0], columns - centre[1]
    if shape == "round":
        return dx**2 + dy**2 <= half**2
    if shape == "boxy":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "pointy":
        # Apex at the top (row centre - half), base of width 2 * half at the bottom.
        depth = dy + half  # 0 at the apex, 2 * half at the base
        return (depth >= 0) & (depth <= 2 * half) & (np.abs(dx) <= depth / 2)
    if shape == "ringed":
        squared = dx**2 + dy**2
        return (squared <= half**2) & (squared >= (RING_INNER * half) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def _jittered_colour(concept: Concept, rng: np.random.Generator) -> np.ndarray:
    base = np.array(COLOURS[concept.colour], dtype=np.int64)
    return np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)


def _draw(
    shape: str, colour: np.ndarray, centre: tuple[float, float], half: float, rng: np.random.Generator
) -> np.ndarray:
    """One frame: a dark noisy background with the filled shape painted over it (with a little pixel noise)."""
    frame = rng.integers(0, BACKGROUND_MAX + 1, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.int64)
    mask = _shape_mask(shape, centre, half)
    paint = colour[None, :] + rng.integers(-8, 9, (int(mask.sum()), 3))
    frame[mask] = np.clip(paint, 0, 255)
    return frame.astype(np.uint8)


def _centre_range(half: float) -> tuple[float, float]:
    """The centres (in either axis) that keep a shape of this half-width inside the frame, near the middle."""
    middle = (IMAGE_SIZE - 1) / 2
    low = max(half, middle - CENTRE_JITTER)
    high = min(IMAGE_SIZE - 1 - half, middle + CENTRE_JITTER)
    return (low, high) if low <= high else (middle, middle)


def render_image(concept: Concept, rng: np.random.Generator) -> np.ndarray:
    """A (32, 32, 3) uint8 image: the concept's shape, colour and size on a dark background."""
    half = HALF_WIDTHS[concept.size]
    low, high = _centre_range(half)
    centre = (rng.uniform(low, high), rng.uniform(low, high))
    return _draw(concept.shape, _jittered_colour(concept, rng), centre, half, rng)


def render_video(concept: Concept, rng: np.random.Generator, frames: int = 8) -> np.ndarray:
    """A (frames, 32, 32, 3) uint8 clip: the concept's image moving steadily in its motion direction.

    The centre covers about `VIDEO_TRAVEL` pixels over the clip, whatever the number of frames; a big shape is
    partly cut off by the frame at the ends of its path, which keeps the motion the same for every size.
    """
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    half = HALF_WIDTHS[concept.size]
    row_step, column_step = MOTIONS[concept.motion]
    middle = (IMAGE_SIZE - 1) / 2
    travel = VIDEO_TRAVEL + rng.uniform(-2.0, 2.0)
    # The path is centred near the middle of the frame along the motion; across it the shape stays inside.
    along_middle = middle + rng.uniform(-2.0, 2.0)
    low, high = _centre_range(half)
    across = rng.uniform(low, high)
    colour = _jittered_colour(concept, rng)
    clip = []
    for index in range(frames):
        progress = index / (frames - 1) - 0.5 if frames > 1 else 0.0  # -0.5 at the first frame, 0.5 at the last
        row = along_middle + row_step * progress * travel if row_step else across
        column = along_middle + column_step * progress * travel if column_step else across
        clip.append(_draw(concept.shape, colour, (row, column), half, rng))
    return np.stack(clip)


# ----------------------------------------------------------------------------------------------------------- audio


def _waveform(timbre: str, frequency: float, t: np.ndarray, phase: float) -> np.ndarray:
    """A band-limited periodic wave with peak 1: sine, square (odd harmonics at 1/n) or sawtooth (all, at 1/n)."""
    if timbre == "pure":
        harmonics = [1]
    elif timbre == "buzzy":
        harmonics = list(range(1, int(MAX_HARMONIC_HZ // frequency) + 1, 2))
    elif timbre == "brassy":
        harmonics = list(range(1, int(MAX_HARMONIC_HZ // frequency) + 1))
    else:
        raise ValueError(f"unknown timbre {timbre!r}")
    wave_ = np.zeros_like(t)
    for n in harmonics:
        wave_ += np.sin(2 * np.pi * n * frequency * t + n * phase) / n
    return wave_ / np.max(np.abs(wave_))


def _envelope(rhythm: str, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """1 when the tone is on, 0 when off (square gating at the rhythm's rate, random phase, short ramps)."""
    rate = RHYTHMS[rhythm]
    if rate == 0:
        return np.ones_like(t)
    period = 1.0 / rate
    position = (t + rng.uniform(0, period)) % period  # time since the start of the current on/off cycle
    half_period = period / 2
    # Linear ramps at both edges of the "on" half: min(rise, fall) clipped to [0, 1].
    rise = position / EDGE_SECONDS
    fall = (half_period - position) / EDGE_SECONDS
    return np.clip(np.minimum(rise, fall), 0.0, 1.0)


def render_audio(
    concept: Concept, rng: np.random.Generator, sampling_rate: int = SAMPLING_RATE, seconds: float = 1.0
) -> np.ndarray:
    """A float32 mono waveform in [-1, 1]: the concept's pitch, timbre and rhythm, with a little noise."""
    length = int(round(sampling_rate * seconds))
    t = np.arange(length, dtype=np.float64) / sampling_rate
    frequency = PITCHES[concept.pitch] * rng.uniform(1 - PITCH_JITTER, 1 + PITCH_JITTER)
    tone = _waveform(concept.timbre, frequency, t, rng.uniform(0, 2 * np.pi))
    signal = rng.uniform(0.3, 0.6) * tone * _envelope(concept.rhythm, t, rng)
    signal += 0.01 * rng.standard_normal(length)
    return np.clip(signal, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------- points


def _surface(shape: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` points spread uniformly over a unit-scale surface, z up."""
    if shape == "round":
        points = rng.standard_normal((count, 3))
        return points / np.linalg.norm(points, axis=1, keepdims=True)
    if shape == "boxy":
        points = rng.uniform(-1.0, 1.0, (count, 3))
        axis = rng.integers(0, 3, count)  # each point is pushed onto one of the six faces
        points[np.arange(count), axis] = rng.choice([-1.0, 1.0], count)
        return points
    if shape == "pointy":
        # Cone of radius 1 and height 2 (apex at z = 1) with its base disc; each part by its share of the area.
        lateral, base = np.pi * np.sqrt(5.0), np.pi
        on_base = rng.uniform(0, lateral + base, count) < base
        angle = rng.uniform(0, 2 * np.pi, count)
        # sqrt makes both the disc and the unrolled side uniform in area.
        radius = np.sqrt(rng.uniform(0, 1, count))
        z = np.where(on_base, -1.0, 1.0 - 2.0 * radius)
        return np.stack([radius * np.cos(angle), radius * np.sin(angle), z], axis=1)
    if shape == "ringed":
        # Torus (ring radius 1, tube 0.3) in the horizontal plane; rejection on the tube angle evens out the area.
        big, tube = 1.0, 0.3
        chosen = np.empty((0, 2))
        while len(chosen) < count:
            u, v = rng.uniform(0, 2 * np.pi, (2, 2 * count))
            keep = rng.uniform(0, 1, 2 * count) < (big + tube * np.cos(v)) / (big + tube)
            chosen = np.concatenate([chosen, np.stack([u[keep], v[keep]], axis=1)])
        u, v = chosen[:count].T
        ring = big + tube * np.cos(v)
        return np.stack([ring * np.cos(u), ring * np.sin(u), tube * np.sin(v)], axis=1)
    raise ValueError(f"unknown shape {shape!r}")


def render_points(concept: Concept, rng: np.random.Generator, num_points: int = 64) -> np.ndarray:
    """A (num_points, 6) float32 cloud: xyz on the concept's shape (z up, turned about z) and its rgb in [0, 1].

    Size is not rendered: the model's processor rescales xyz to the unit sphere anyway.
    """
    xyz = _surface(concept.shape, num_points, rng)
    angle = rng.uniform(0, 2 * np.pi)
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    xyz = xyz @ rotation.T + 0.02 * rng.standard_normal((num_points, 3))
    colour = _jittered_colour(concept, rng) / 255.0
    rgb = np.clip(colour[None, :] + 0.02 * rng.standard_normal((num_points, 3)), 0.0, 1.0)
    return np.concatenate([xyz, rgb], axis=1).astype(np.float32)


# -------------------------------------------------------------------------------------------------------- dispatch


def render(modality: str, concept: Concept, rng: np.random.Generator) -> np.ndarray:
    """The concept rendered in `modality` ("image", "video", "audio" or "point") with default settings."""
    renderers = {"image": render_image, "video": render_video, "audio": render_audio, "point": render_points}
    if modality not in renderers:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(renderers)}")
    return renderers[modality](concept, rng)


# ----------------------------------------------------------------------------------------------------------- files


def save_media(modality: str, array: np.ndarray, path_without_suffix: str | Path) -> Path:
    """Write a rendering to `path_without_suffix` + the modality's suffix (.png, .npy or .wav); return that path."""
    if modality not in MEDIA_SUFFIXES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(MEDIA_SUFFIXES)}")
    base = Path(path_without_suffix)
    # Append rather than `with_suffix`, which would eat a dotted name such as "q1.2".
    path = base.with_name(base.name + MEDIA_SUFFIXES[modality])
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    if modality == "image":
        from PIL import Image

        Image.fromarray(array.astype(np.uint8)).save(path)
    elif modality == "audio":
        write_wav(path, array, SAMPLING_RATE)
    else:
        np.save(path, array)
    return path
