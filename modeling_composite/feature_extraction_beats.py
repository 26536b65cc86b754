"""The BEATs front end as the paper runs it: 16 kHz mono waveform scaled to 16-bit range, Kaldi-compatible 128-bin
log-mel fbank (25 ms povey windows every 10 ms, DC removal, pre-emphasis 0.97, 512-point FFT, power spectrum, Kaldi
mel banks from 20 Hz to Nyquist, natural log floored at float32 epsilon), normalised as `(x - 15.41663) / (2 *
6.55582)`, then cut or zero-padded (in normalised space) to 1024 frames.

The paper's audio processor always runs in its training mode, at evaluation too: it keeps the first 1024 frames
(about 10.24 s) and pads shorter clips with zeros after normalisation. That is deterministic (no random crop), and
is what this extractor does with its defaults (`padding="max_length"`, `truncation=True`)."""

import logging
import math

import numpy as np
import torch
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature


logger = logging.getLogger(__name__)

FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms at 16 kHz
FFT_LENGTH = 512  # the frame length rounded up to a power of two, as Kaldi does
PREEMPHASIS = 0.97
LOWEST_MEL_FREQUENCY = 20.0  # Kaldi's default low-freq
WAVEFORM_SCALE = 2.0**15  # Kaldi features are computed on 16-bit integer sample values
LOG_FLOOR = float(np.finfo(np.float32).eps)


def kaldi_mel_scale(frequency: float | torch.Tensor) -> float | torch.Tensor:
    """Kaldi's mel scale, `1127 ln(1 + f / 700)`."""
    if isinstance(frequency, torch.Tensor):
        return 1127.0 * torch.log(1.0 + frequency / 700.0)
    return 1127.0 * math.log(1.0 + frequency / 700.0)


def kaldi_mel_banks(num_mel_bins: int, sampling_rate: int, low_frequency: float) -> torch.Tensor:
    """Kaldi's triangular mel filters `(FFT_LENGTH // 2 + 1, num_mel_bins)`, up to Nyquist, triangles in mel space.

    Evaluated in float32 in Kaldi's order of operations: filter edges fall between FFT bins at the 1e-5 level, and a
    float64 bank differs from the reference there by enough to move the log energy of near-silent bins."""
    low_mel, high_mel = kaldi_mel_scale(low_frequency), kaldi_mel_scale(sampling_rate / 2)
    step = (high_mel - low_mel) / (num_mel_bins + 1)  # num_mel_bins + 1 steps: each triangle spans two
    index = torch.arange(num_mel_bins).unsqueeze(1)
    left, centre, right = low_mel + index * step, low_mel + (index + 1.0) * step, low_mel + (index + 2.0) * step
    # FFT bins below Nyquist; Kaldi gives the Nyquist bin no weight (the zero row appended below).
    bin_mel = kaldi_mel_scale(sampling_rate / FFT_LENGTH * torch.arange(float(FFT_LENGTH // 2))).unsqueeze(0)
    rising, falling = (bin_mel - left) / (centre - left), (right - bin_mel) / (right - centre)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1)).T.contiguous()


class CompositeBeatsFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Feature extractor of [`CompositeBeatsEncoder`]: mono 16 kHz waveforms -> `input_features` `(clips, frames,
    num_mel_bins)`.

    Args:
        num_mel_bins (`int`, default 128): mel bins per frame.
        sampling_rate (`int`, default 16000): the only rate accepted; the frame sizes are fixed for it.
        max_length (`int`, default 1024): frames per clip after truncation / padding to `"max_length"`.
        fbank_mean (`float`, default 15.41663), fbank_std (`float`, default 6.55582): BEATs' normalisation,
            `(fbank - mean) / (2 * std)`.
        padding_value (`float`, default 0.0): value of padded frames, in normalised space.
    """

    model_input_names = ["input_features"]

    def __init__(
        self,
        num_mel_bins: int = 128,
        sampling_rate: int = 16000,
        max_length: int = 1024,
        fbank_mean: float = 15.41663,
        fbank_std: float = 6.55582,
        padding_value: float = 0.0,
        **kwargs,
    ):
        kwargs.setdefault("return_attention_mask", False)
        kwargs.pop("feature_size", None)  # always num_mel_bins; present in saved configs
        super().__init__(feature_size=num_mel_bins, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs)
        if sampling_rate != 16000:
            raise ValueError(
                f"sampling_rate must be 16000 (BEATs' 25 ms / 10 ms frames are fixed for it), got {sampling_rate}."
            )
        if num_mel_bins < 4 or max_length < 1:
            raise ValueError(f"num_mel_bins must be >= 4 and max_length >= 1, got {num_mel_bins} and {max_length}.")
        if fbank_std <= 0:
            raise ValueError(f"fbank_std must be positive, got {fbank_std}.")
        self.num_mel_bins = num_mel_bins
        self.max_length = max_length
        self.fbank_mean = fbank_mean
        self.fbank_std = fbank_std
        # `mel_filters` and `window` are left out of the saved JSON by transformers; they are rebuilt here.
        self.mel_filters = kaldi_mel_banks(num_mel_bins, sampling_rate, LOWEST_MEL_FREQUENCY).numpy()
        # Povey's window: a symmetric Hann window to the power 0.85 (zero at both ends).
        self.window = torch.hann_window(FRAME_LENGTH, periodic=False).pow(0.85).numpy()

    @property
    def n_samples(self) -> int:
        """The longest waveform whose frames all fit in `max_length` (named as Whisper's extractor names it)."""
        return FRAME_LENGTH + (self.max_length - 1) * FRAME_SHIFT

    def log_mel_fbank(self, waveform: np.ndarray) -> np.ndarray:
        """Kaldi fbank `(frames, num_mel_bins)` of one waveform in [-1, 1] (before normalisation). Only whole frames
        count, as Kaldi's snip-edges default: a clip shorter than one frame (25 ms) has none."""
        samples = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)) * WAVEFORM_SCALE
        if samples.numel() < FRAME_LENGTH:
            return np.zeros((0, self.num_mel_bins), dtype=np.float32)
        frames = samples.unfold(0, FRAME_LENGTH, FRAME_SHIFT)
        frames = frames - frames.mean(dim=1, keepdim=True)
        # Pre-emphasis within each frame; the first sample is emphasised against itself.
        previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
        frames = (frames - PREEMPHASIS * previous) * torch.from_numpy(self.window)
        power = torch.fft.rfft(frames, n=FFT_LENGTH).abs().pow(2.0)
        mel = torch.mm(power, torch.from_numpy(self.mel_filters))
        return mel.clamp_min(LOG_FLOOR).log().numpy()

    def normalize(self, fbank: np.ndarray) -> np.ndarray:
        return (fbank - np.float32(self.fbank_mean)) / np.float32(2 * self.fbank_std)

    def __call__(
        self,
        raw_speech: np.ndarray | list[float] | list[np.ndarray],
        sampling_rate: int | None = None,
        padding: bool | str = "max_length",
        truncation: bool = True,
        max_length: int | None = None,
        return_tensors: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Featurize one clip (a 1-D array) or several (a list of them).

        Args:
            raw_speech: mono waveform(s) in [-1, 1] at `sampling_rate`.
            sampling_rate: the rate of `raw_speech`; anything but the extractor's own is refused (resample first).
            padding: `"max_length"` pads every clip to `max_length` frames; `True` / `"longest"` to the longest clip;
                `False` / `"do_not_pad"` leaves the lengths (then `return_tensors` needs clips of one length).
            truncation: keep at most `max_length` frames (the first ones).
            max_length: frames per clip; defaults to `self.max_length` (1024).
            return_tensors: `"np"` or `"pt"`, or None for a list of arrays.

        Returns:
            `BatchFeature` with `input_features`: `(clips, frames, num_mel_bins)` float32.
        """
        if sampling_rate is None:
            logger.warning(
                "No sampling_rate was passed to %s; assuming %d Hz. Pass it to catch audio at another rate.",
                type(self).__name__,
                self.sampling_rate,
            )
        elif sampling_rate != self.sampling_rate:
            raise ValueError(
                f"Audio at {sampling_rate} Hz was given, but {type(self).__name__} needs {self.sampling_rate} Hz "
                "(BEATs' frames are defined at that rate); resample the audio first."
            )
        if kwargs:
            logger.debug("%s ignores the arguments %s", type(self).__name__, sorted(kwargs))
        clips = self._as_clips(raw_speech)
        max_length = self.max_length if max_length is None else max_length
        features = [self.normalize(self.log_mel_fbank(clip)) for clip in clips]
        if truncation:
            features = [fbank[:max_length] for fbank in features]
        if padding in ("max_length", True, "longest"):
            target = max_length if padding == "max_length" else max(len(fbank) for fbank in features)
            features = [self._pad(fbank, target) for fbank in features]
        elif padding not in (False, "do_not_pad"):
            raise ValueError(f"padding must be 'max_length', 'longest', True, False or 'do_not_pad', got {padding!r}.")
        if return_tensors is not None:
            if len({len(fbank) for fbank in features}) > 1:
                raise ValueError(
                    "Clips of different lengths cannot be stacked into one tensor; use padding='max_length' or "
                    "'longest'."
                )
            features = np.stack(features)
        return BatchFeature({"input_features": features}, tensor_type=return_tensors)

    def _pad(self, fbank: np.ndarray, frames: int) -> np.ndarray:
        missing = frames - len(fbank)
        if missing <= 0:
            return fbank
        # Padding is appended after normalisation, as the paper's processor does (value 0 = the data mean).
        return np.pad(fbank, ((0, missing), (0, 0)), constant_values=self.padding_value)

    @staticmethod
    def _as_clips(raw_speech) -> list[np.ndarray]:
        is_batch = isinstance(raw_speech, (list, tuple)) and len(raw_speech) > 0 and not np.isscalar(raw_speech[0])
        clips = [np.asarray(clip, dtype=np.float32) for clip in (raw_speech if is_batch else [raw_speech])]
        for clip in clips:
            if clip.ndim != 1 or clip.size == 0:
                raise ValueError(
                    f"Each audio clip must be a non-empty mono waveform (1-D array), got shape {clip.shape}; pass "
                    "several clips as a list, and mix stereo down to mono first (the paper averages the channels)."
                )
        return clips


__all__ = ["CompositeBeatsFeatureExtractor"]
