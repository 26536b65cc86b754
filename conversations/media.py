"""Read the media files a training sample names: images, videos, audio clips and point clouds.

Only formats readable with the standard library, numpy and Pillow: no video decoder is required (store videos as
`.npy` frame arrays or GIFs), and `.npy` files are read with `allow_pickle=False`.
"""

import wave
from pathlib import Path
from typing import Any

import numpy as np


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SUFFIXES_BY_KIND = {
    "image": IMAGE_SUFFIXES + (".npy",),
    "video": (".npy", ".gif"),
    "audio": (".wav", ".npy"),
    "point": (".npy",),
}


class MediaError(ValueError):
    """A media file that cannot be read as the modality it is given for."""


def _existing_media_file(path: Path, kind: str) -> str:
    """The suffix of `path`, refusing a suffix `kind` does not take and a file that does not exist."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES_BY_KIND[kind]:
        raise MediaError(
            f"{path}: a {kind} input must be one of {list(SUFFIXES_BY_KIND[kind])}, not {suffix or 'no suffix'!r}."
        )
    if not path.is_file():
        raise MediaError(f"{path}: no such file (relative paths start from --media_root).")
    return suffix


def load_media(path: str | Path, kind: str) -> Any:
    """The raw input the processor takes for one item of `kind`: a PIL image, a `(frames, h, w, 3)` uint8 array, a
    float32 mono waveform, or a `(points, dims)` float array."""
    path = Path(path)
    suffix = _existing_media_file(path, kind)
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".wav":
        return read_wav(path)
    from PIL import Image, ImageSequence

    with Image.open(path) as image:
        if suffix == ".gif":
            return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)])
        return image.convert("RGB")


# Dimensions of a `.npy` item per kind: an image (h, w[, c]), a video (frames, h, w, c), a waveform, a point cloud.
_NPY_DIMENSIONS = {"image": (2, 3), "video": (4,), "audio": (1,), "point": (2,)}


def check_media(path: str | Path, kind: str) -> None:
    """Check, without decoding it whole, that `path` can be read as an item of `kind`: it exists, is not empty, and
    its structure is sound (an image's chunks and checksums as Pillow verifies them, a `.npy` header with a numeric
    array of the right dimensions, finite for audio and point clouds, a WAV header with samples). Raises `MediaError`.
    A JPEG truncated inside its compressed data can pass: Pillow's verification does not decode it."""
    path = Path(path)
    suffix = _existing_media_file(path, kind)
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: the file is empty.")
    try:
        if suffix == ".npy":
            _check_npy(path, kind)
        elif suffix == ".wav":
            with wave.open(str(path), "rb") as reader:
                if reader.getnframes() == 0:
                    raise MediaError(f"{path}: the WAV file holds no samples.")
                if reader.getsampwidth() not in (1, 2, 4):
                    bits = 8 * reader.getsampwidth()
                    raise MediaError(f"{path}: {bits}-bit WAV is not supported; use 8, 16 or 32-bit PCM.")
        else:
            from PIL import Image

            with Image.open(path) as image:
                image.verify()
    except MediaError:
        raise
    except Exception as error:  # whatever a reader raises on a damaged file (Pillow, wave, numpy)
        raise MediaError(f"{path}: not a readable {kind} file ({type(error).__name__}: {error}).") from error


def _check_npy(path: Path, kind: str) -> None:
    array = np.load(path, mmap_mode="r", allow_pickle=False)  # reads the header; the data stays on disk
    if array.dtype.kind not in "biuf" or array.ndim not in _NPY_DIMENSIONS[kind] or array.size == 0:
        raise MediaError(
            f"{path}: an .npy {kind} input must hold a non-empty numeric array with {_NPY_DIMENSIONS[kind]} "
            f"dimensions, got {array.dtype} of shape {array.shape}."
        )
    if kind in ("audio", "point") and not np.isfinite(array).all():
        raise MediaError(f"{path}: the {kind} holds NaN or infinite values.")


def read_wav(path: str | Path) -> np.ndarray:
    """A PCM WAV file as a float32 waveform in [-1, 1], channels averaged to mono."""
    with wave.open(str(path), "rb") as reader:
        width, channels, frames = reader.getsampwidth(), reader.getnchannels(), reader.getnframes()
        raw = reader.readframes(frames)
    dtypes = {1: np.uint8, 2: np.int16, 4: np.int32}
    if width not in dtypes:
        raise MediaError(f"{path}: {8 * width}-bit WAV is not supported; use 8, 16 or 32-bit PCM.")
    samples = np.frombuffer(raw, dtype=dtypes[width]).astype(np.float32)
    samples = (samples - 128.0) / 128.0 if width == 1 else samples / float(2 ** (8 * width - 1))
    return samples.reshape(-1, channels).mean(axis=1)


def write_wav(path: str | Path, waveform: np.ndarray, sampling_rate: int) -> Path:
    """Write a mono float waveform in [-1, 1] as 16-bit PCM."""
    samples = np.clip(np.asarray(waveform, dtype=np.float32), -1.0, 1.0)
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(sampling_rate)
        writer.writeframes((samples * 32767.0).round().astype("<i2").tobytes())
    return Path(path)
