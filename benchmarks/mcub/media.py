"""Read the media files of the paper's benchmark question files as the raw inputs a composite's processor takes.

- images: `.jpg`, `.png` (and `.jpeg`, `.bmp`, `.webp`) with Pillow; optionally padded to a square as the paper's
  evaluation does (LLaVA's "pad" aspect ratio);
- audio: `.wav` with the standard library, `.npy` waveforms, and `.flac`, `.mp3`, `.mp4`, ... through PyAV (`av`, an
  optional dependency); channels averaged to mono, at most the first 30 s, resampled to the processor's rate;
- video: `.mp4` and other containers through PyAV (the frames at `linspace(0, frames - 1, num_frames)`, as the paper's
  video processor samples them), `.npy` frame arrays, `.gif`, and an image given as a video (one frame, which the
  processor repeats to the composite's frame count);
- point clouds: `.npy` arrays (`allow_pickle=False`).
"""

import importlib.util
import logging
import math
import wave
from pathlib import Path
from typing import Any

import numpy as np

from conversations.media import read_wav


logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Containers PyAV (FFmpeg) decodes; the paper's files use .mp4 for video and .wav / .flac / .mp4 for audio.
PYAV_VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".flv", ".mpg", ".mpeg")
PYAV_AUDIO_SUFFIXES = (".flac", ".mp3", ".m4a", ".ogg", ".opus", ".aac") + PYAV_VIDEO_SUFFIXES
SUFFIXES_BY_KIND = {
    "image": IMAGE_SUFFIXES,
    "video": (".npy", ".gif") + IMAGE_SUFFIXES + PYAV_VIDEO_SUFFIXES,
    "audio": (".wav", ".npy") + PYAV_AUDIO_SUFFIXES,
    "point": (".npy",),
}
# The paper's audio processor keeps at most the first 30 seconds of a clip.
MAX_AUDIO_SECONDS = 30
# Above this many kernel coefficients (rates with a tiny common divisor), resampling interpolates linearly instead.
_MAX_RESAMPLE_KERNEL = 20_000_000


class MediaError(ValueError):
    """A media file that cannot be read as the modality it is given for; the message names the file."""


def needs_pyav(path: str | Path, kind: str) -> bool:
    """Whether reading `path` as `kind` takes PyAV."""
    suffix = Path(path).suffix.lower()
    return (kind == "video" and suffix in PYAV_VIDEO_SUFFIXES) or (kind == "audio" and suffix in PYAV_AUDIO_SUFFIXES)


def pyav_available() -> bool:
    """Whether PyAV (`av`) can be imported."""
    return importlib.util.find_spec("av") is not None


def _import_pyav(path: Path) -> Any:
    try:
        import av
    except ImportError:
        raise MediaError(
            f"{path}: reading {path.suffix} files needs PyAV; install it with `pip install av`."
        ) from None
    return av


def load_image(path: str | Path, pad_fill: tuple[int, int, int] | None = None) -> Any:
    """An RGB PIL image; with `pad_fill`, padded to a square of that colour (the image centred)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    return image if pad_fill is None else pad_to_square(image, pad_fill)


def pad_to_square(image: Any, fill: tuple[int, int, int]) -> Any:
    """`image` centred on a square canvas of colour `fill` whose side is its longer side (LLaVA's "pad" mode: the
    whole image survives the image processor's centre crop)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_video(path: str | Path, num_frames: int) -> np.ndarray:
    """A `(frames, height, width, 3)` uint8 array. Containers give `num_frames` frames spread evenly over the clip;
    `.npy` and `.gif` give all their frames and an image one frame (the processor samples or repeats them)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        frames = np.load(path, allow_pickle=False)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise MediaError(f"{path}: a .npy video must have shape (frames, height, width, 3), got {frames.shape}.")
        return frames
    if suffix in IMAGE_SUFFIXES:
        return np.asarray(load_image(path))[None]
    if suffix == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as image:
            return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)])
    return _decode_video(path, num_frames)


def _decode_video(path: Path, num_frames: int) -> np.ndarray:
    """The frames of a video container at `linspace(0, frames - 1, num_frames)`; only those are converted to arrays,
    and decoding stops after the last one."""
    av = _import_pyav(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: the file has no video stream.")
            total = container.streams.video[0].frames
            if total <= 0:  # the container does not record it: count the packets
                total = sum(1 for packet in container.demux(video=0) if packet.size)
        if total <= 0:
            raise MediaError(f"{path}: the video has no frames.")
        wanted = np.linspace(0, total - 1, num_frames).astype(np.int64).tolist()
        arrays: dict[int, np.ndarray] = {}
        last = None
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                last = frame
                if index in wanted:
                    arrays[index] = frame.to_ndarray(format="rgb24")
                if index >= wanted[-1]:
                    break
    except av.error.FFmpegError as error:
        raise MediaError(f"{path}: cannot decode the video ({error}).") from None
    if last is None:
        raise MediaError(f"{path}: the video has no decodable frames.")
    # A container may record more frames than it decodes: the missing tail repeats the last decoded frame.
    fallback = arrays.get(max(arrays)) if arrays else last.to_ndarray(format="rgb24")
    return np.stack([arrays.get(index, fallback) for index in wanted])


def load_audio(path: str | Path, sampling_rate: int) -> np.ndarray:
    """A float32 mono waveform at `sampling_rate` (`.npy` files are taken to be at that rate already), at most
    `MAX_AUDIO_SECONDS` long."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        waveform = np.load(path, allow_pickle=False).astype(np.float32)
        if waveform.ndim != 1:
            raise MediaError(f"{path}: a .npy audio clip must be a 1-D waveform, got shape {waveform.shape}.")
        return waveform[: MAX_AUDIO_SECONDS * sampling_rate]
    waveform, rate = None, None
    if suffix == ".wav":
        try:
            with wave.open(str(path), "rb") as reader:
                rate = reader.getframerate()
            waveform = read_wav(path)
        except (wave.Error, ValueError, EOFError) as error:
            # Float or 24-bit WAV files, which the standard library cannot read, go through PyAV when it is there.
            if not pyav_available():
                raise MediaError(
                    f"{path}: cannot read this WAV file with the standard library ({error}); install PyAV "
                    "(`pip install av`) to read it, or convert it to 16-bit PCM."
                ) from None
    if waveform is None:
        waveform, rate = _decode_audio(path)
    waveform = waveform[: MAX_AUDIO_SECONDS * rate]
    return resample(waveform, rate, sampling_rate)


def _decode_audio(path: Path) -> tuple[np.ndarray, int]:
    """The first audio stream of a file, as a float32 mono waveform at its own rate."""
    av = _import_pyav(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: the file has no audio stream.")
            stream = container.streams.audio[0]
            rate = stream.rate or stream.codec_context.sample_rate
            # FFmpeg's resampler only converts the sample format to planar float here (rate and channels stay):
            # its own downmix would scale the sum of the channels by 1/sqrt(2), where the paper averages them.
            converter = av.AudioResampler(format="fltp", rate=rate)
            chunks = []
            for frame in container.decode(audio=0):
                chunks += [converted.to_ndarray().mean(axis=0) for converted in converter.resample(frame)]
                if sum(chunk.size for chunk in chunks) >= MAX_AUDIO_SECONDS * rate:
                    break
            chunks += [converted.to_ndarray().mean(axis=0) for converted in converter.resample(None)]
    except av.error.FFmpegError as error:
        raise MediaError(f"{path}: cannot decode the audio ({error}).") from None
    if not chunks:
        raise MediaError(f"{path}: the audio stream is empty.")
    return np.concatenate(chunks).astype(np.float32), int(rate)


def resample(waveform: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """`waveform` resampled from `from_rate` to `to_rate` Hz by band-limited (Hann-windowed sinc) interpolation, the
    method of torchaudio's default `Resample` (low-pass width 6 zero crossings, roll-off 0.99), which the paper
    uses."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if from_rate == to_rate:
        return waveform
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"Sampling rates must be positive, got {from_rate} -> {to_rate}.")
    divisor = math.gcd(int(from_rate), int(to_rate))
    orig, new = from_rate // divisor, to_rate // divisor
    zero_crossings, rolloff = 6, 0.99
    cutoff = min(orig, new) * rolloff
    width = math.ceil(zero_crossings * orig / cutoff)
    taps = 2 * width + orig
    target = math.ceil(new * waveform.size / orig)
    if new * taps > _MAX_RESAMPLE_KERNEL:
        logger.warning(
            "resampling %d -> %d Hz by linear interpolation (the rates share no useful divisor)", from_rate, to_rate
        )
        times = np.arange(target) * (from_rate / to_rate)
        return np.interp(times, np.arange(waveform.size), waveform).astype(np.float32)
    # Kernel of output phase j at input offset k: time (k - width) / orig - j / new, in units of input samples / orig.
    offsets = np.arange(-width, width + orig, dtype=np.float64) / orig
    times = (offsets[None, :] - np.arange(new, dtype=np.float64)[:, None] / new) * cutoff
    times = np.clip(times, -zero_crossings, zero_crossings)
    window = np.cos(times * math.pi / zero_crossings / 2) ** 2
    times *= math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        sinc = np.where(times == 0, 1.0, np.sin(times) / times)
    kernels = (sinc * window * cutoff / orig).astype(np.float32)  # (new, taps)
    padded = np.pad(waveform, (width, width + orig))
    windows = np.lib.stride_tricks.sliding_window_view(padded, taps)[::orig]  # (frames, taps)
    return (windows @ kernels.T).reshape(-1)[:target].astype(np.float32)


def load_point_cloud(path: str | Path) -> np.ndarray:
    """A `(points, dims)` float32 array from a `.npy` file."""
    path = Path(path)
    points = np.load(path, allow_pickle=False)
    if points.ndim != 2:
        raise MediaError(f"{path}: a point cloud must have shape (points, dims), got {points.shape}.")
    return points.astype(np.float32)


def load_item(
    path: str | Path,
    kind: str,
    *,
    num_frames: int | None = None,
    sampling_rate: int | None = None,
    pad_fill: tuple[int, int, int] | None = None,
) -> Any:
    """The raw processor input for one file given for a modality of `kind`."""
    path = Path(path)
    try:
        if kind == "image":
            return load_image(path, pad_fill)
        if kind == "video":
            return load_video(path, num_frames or 1)
        if kind == "audio":
            if sampling_rate is None:
                raise ValueError("sampling_rate is required for audio.")
            return load_audio(path, sampling_rate)
        if kind == "point":
            return load_point_cloud(path)
    except MediaError:
        raise
    except (OSError, ValueError) as error:
        raise MediaError(f"{path}: cannot read it as {kind} ({error}).") from None
    raise ValueError(f"Unknown modality kind {kind!r}; expected one of {list(SUFFIXES_BY_KIND)}.")
