"""Processor of a composite multimodal LLM: tokenizer, image processor (also used for video frames), audio feature
extractor and point-cloud normalisation. Each placeholder (`<image>`, `<video>`, `<audio>`, `<point>`) is expanded
into exactly the number of positions the model fills for one item (prefix + features + suffix)."""

import re
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.utils import logging


logger = logging.get_logger(__name__)


# The keyword of `__call__` that carries the raw inputs of each modality kind, and the tensor it becomes.
CALL_ARGUMENT_BY_KIND = {"image": "images", "video": "videos", "audio": "audio", "point": "point_clouds"}
_OUTPUT_NAME_BY_KIND = {
    "image": "pixel_values",
    "video": "pixel_values_videos",
    "audio": "input_features",
    "point": "point_clouds",
}


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """Indices of `num_frames` frames spread evenly over a clip, first and last frame included and rounded down, as
    Video-LLaVA and LanguageBind (the paper's video encoder) sample them; clips shorter than `num_frames` repeat
    frames."""
    if total_frames < 1:
        raise ValueError("A video must have at least one frame.")
    return np.linspace(0, total_frames - 1, num_frames, dtype=int).tolist()


def normalize_point_cloud(points: Any, num_points: int, point_dims: int) -> np.ndarray:
    """Centre xyz at the origin and scale it into the unit sphere (colours untouched), then take `num_points`
    points spread evenly over the cloud (repeating points of smaller clouds)."""
    array = np.asarray(points, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != point_dims:
        raise ValueError(
            f"Modality point: a point cloud must be an array of shape (num_points > 0, {point_dims}), got "
            f"{tuple(array.shape)}."
        )
    if not np.isfinite(array).all():
        raise ValueError("Modality point: the point cloud contains NaN or infinite values.")
    xyz = array[:, :3] - array[:, :3].mean(axis=0)
    radius = float(np.sqrt((xyz**2).sum(axis=1)).max())
    array = np.concatenate([xyz / radius if radius > 0 else xyz, array[:, 3:]], axis=1)
    indices = np.linspace(0, array.shape[0], num_points, endpoint=False).astype(np.int64) % array.shape[0]
    return array[indices]


class CompositeBatchFeature(BatchFeature):
    """A [`BatchFeature`] whose `to()` also moves and casts the tensors inside dict values (`modality_inputs`):
    `BatchFeature.to` leaves dict values as they are."""

    def to(self, *args, **kwargs) -> "CompositeBatchFeature":
        super().to(*args, **kwargs)
        for key, value in self.data.items():
            if isinstance(value, dict):
                # A plain BatchFeature of the inner tensors applies transformers' own rules (cast floating tensors
                # only, move the others) to them.
                self.data[key] = dict(BatchFeature(data=value).to(*args, **kwargs))
        return self


class CompositeMLLMProcessor(ProcessorMixin):
    r"""
    Processor of [`CompositeMLLMForCausalLM`].

    Inputs given under one kind's argument (`images`, `videos`, `audio`, `point_clouds`) fill the placeholders of
    every modality of that kind in the order the placeholders appear in the text (left to right, sample after sample).
    A kind with one modality gives its standard output (`pixel_values`, `pixel_values_videos`, `input_features`,
    `point_clouds`); the modalities of a kind that the composite has several of give
    `modality_inputs={name: tensor}` instead (only those that got inputs).

    Args:
        image_processor: image processor for images and video frames (e.g. `CLIPImageProcessor`).
        feature_extractor: audio feature extractor (e.g. `WhisperFeatureExtractor`).
        tokenizer: the text tokenizer, with every placeholder token added as a special token.
        modalities (`dict[str, dict]`): modality name -> `{"kind", "placeholder", "positions_per_item"}`, plus
            `num_frames` for video and `num_points` / `point_dims` for point clouds, as the model config gives them
            (`CompositeMLLMConfig.processor_modalities`) so that both agree. Image and video entries may also carry
            `image_processor_kwargs`, passed to the image processor for that modality's images or frames (e.g.
            `size`, `crop_size`, `image_mean`, `image_std`), for composed sources that were trained at different
            resolutions or normalisations.
        chat_template (`str`, *optional*): renders messages whose content items may be of every modality.
    """

    def __init__(
        self,
        image_processor=None,
        feature_extractor=None,
        tokenizer=None,
        modalities=None,
        chat_template=None,
        **kwargs,
    ):
        self.modalities = dict(modalities or {})
        _check_modalities(self.modalities)
        super().__init__(image_processor, feature_extractor, tokenizer, chat_template=chat_template, **kwargs)

    def update_modalities(self, config) -> None:
        """Take the modalities again from the model's `config` (a `CompositeMLLMConfig`), after the model changed what
        its items fill (`add_modality_tokens`); each modality keeps its own image-processor settings."""
        settings = {
            name: entry["image_processor_kwargs"]
            for name, entry in self.modalities.items()
            if entry.get("image_processor_kwargs") is not None
        }
        modalities = config.processor_modalities(settings)
        _check_modalities(modalities)
        self.modalities = modalities

    @property
    def model_input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask"]
        shared = False
        for kind, output_name in _OUTPUT_NAME_BY_KIND.items():
            owners = self._modalities_of_kind(kind)
            names += [output_name] if len(owners) == 1 else []
            shared = shared or len(owners) > 1
        return names + (["modality_inputs"] if shared else [])

    def _modalities_of_kind(self, kind: str) -> list[str]:
        return [name for name, entry in self.modalities.items() if entry["kind"] == kind]

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        point_clouds: Any = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Expand placeholders in `text`, tokenize it, and turn each modality's raw inputs into model inputs.

        The inputs of one kind are matched to the placeholders of that kind's modalities in order of appearance
        across the batch. Text keyword arguments (`padding`, `truncation`, ...) go to the tokenizer; `sampling_rate`
        is checked against the feature extractor.
        """
        if text is None:
            raise ValueError("The composite processor needs `text` (with one placeholder per modality input).")
        texts = [text] if isinstance(text, str) else list(text)
        raw_inputs = {"image": images, "video": videos, "audio": audio, "point": point_clouds}
        sampling_rate = kwargs.pop("sampling_rate", None)
        # Of the per-kind keyword groups, only the layout of image arrays is taken (to settle an ambiguous one).
        layouts = {
            kind: (kwargs.pop(group, None) or {}).get("input_data_format")
            for kind, group in (("image", "images_kwargs"), ("video", "videos_kwargs"))
        }
        kwargs.pop("audio_kwargs", None)
        # Built per call rather than kept on the instance: ProcessorMixin saves instance attributes, and `modalities`
        # may be edited after construction.
        placeholders, pattern = self._placeholder_pattern()
        slots = [placeholders[token] for sample in texts for token in pattern.findall(sample)] if placeholders else []
        data: dict[str, Any] = {}
        by_name: dict[str, Any] = {}
        for kind, value in raw_inputs.items():
            items = _video_list(value) if kind == "video" else _flat_list(value)
            owners = self._modalities_of_kind(kind)
            if not owners:
                if items:
                    raise ValueError(
                        f"Got {CALL_ARGUMENT_BY_KIND[kind]} but this composite has no {kind} modality "
                        f"(it has: { {name: entry['kind'] for name, entry in self.modalities.items()} })."
                    )
                continue
            kind_slots = [name for name in slots if name in owners]
            if len(kind_slots) != len(items):
                raise ValueError(self._count_message(kind, owners, len(kind_slots), len(items)))
            grouped: dict[str, list] = {name: [] for name in owners}
            for name, item in zip(kind_slots, items):
                grouped[name].append(item)
            for name, group in grouped.items():
                if not group:
                    continue
                processed = self._process_items(name, self.modalities[name], group, sampling_rate, layouts.get(kind))
                if len(owners) == 1:
                    data[_OUTPUT_NAME_BY_KIND[kind]] = processed
                else:
                    by_name[name] = processed
        texts = [self.expand_placeholders(sample) for sample in texts]
        text_inputs = self.tokenizer(texts, return_tensors=return_tensors, **kwargs)
        batch = CompositeBatchFeature(data={**text_inputs, **data}, tensor_type=return_tensors)
        if by_name:
            # BatchFeature skips dict values when it converts to tensors, so the inner arrays are converted here.
            batch["modality_inputs"] = dict(BatchFeature(data=by_name, tensor_type=return_tensors))
        return batch

    def _placeholder_pattern(self) -> tuple[dict[str, str], "re.Pattern | None"]:
        """Placeholder -> modality name, and a pattern matching any placeholder (None when there are none)."""
        placeholders = {entry["placeholder"]: name for name, entry in self.modalities.items()}
        if not placeholders:
            return placeholders, None
        # Longest first, so that a placeholder which is a prefix of another never matches inside it (the tokenizer's
        # special-token split also takes the longest match).
        return placeholders, re.compile(
            "|".join(re.escape(token) for token in sorted(placeholders, key=len, reverse=True))
        )

    def expand_placeholders(self, text: str) -> str:
        """`text` with every placeholder repeated once per position the model fills for one item (prefix + features +
        suffix): the token sequence the model expects, for callers that tokenize text themselves."""
        placeholders, pattern = self._placeholder_pattern()
        if pattern is None:
            return text

        def expand(match: re.Match) -> str:
            entry = self.modalities[placeholders[match.group(0)]]
            return entry["placeholder"] * entry["positions_per_item"]

        return pattern.sub(expand, text)

    def _count_message(self, kind: str, owners: list[str], found: int, given: int) -> str:
        if len(owners) == 1:
            name = owners[0]
            return (
                f"Modality {name!r}: the text has {found} {self.modalities[name]['placeholder']} placeholder(s) but "
                f"{given} {kind} input(s) were given; use one placeholder per input."
            )
        tokens = ", ".join(self.modalities[name]["placeholder"] for name in owners)
        return (
            f"The {kind} modalities {owners} share `{CALL_ARGUMENT_BY_KIND[kind]}=`: the text has {found} of their "
            f"placeholders ({tokens}) but {given} {kind} input(s) were given; use one placeholder per input (inputs "
            "fill the placeholders in order of appearance)."
        )

    def _process_items(
        self, name: str, entry: dict, items: list, sampling_rate: int | None, layout: str | None = None
    ) -> np.ndarray:
        kind = entry["kind"]
        settings = dict(entry.get("image_processor_kwargs") or {})
        if layout is not None:
            settings["input_data_format"] = layout
        if kind == "image":
            return self._process_images(name, items, settings)
        if kind == "video":
            frames = [_sample_frames(name, video, entry["num_frames"]) for video in items]
            return np.stack([self._process_images(name, video_frames, settings) for video_frames in frames])
        if kind == "audio":
            return self._process_audio(name, items, sampling_rate)
        return np.stack([normalize_point_cloud(cloud, entry["num_points"], entry["point_dims"]) for cloud in items])

    def _process_images(self, name: str, images: list, settings: dict[str, Any]) -> np.ndarray:
        for image in images:
            if _is_malformed_image(image):
                raise ValueError(
                    f"Modality {name!r}: got an empty or malformed image ({_describe(image)}); pass PIL images or "
                    "arrays of shape (height, width[, channels])."
                )
            if "input_data_format" not in settings:
                _check_image_layout(name, image)
        # The modality's own settings win over the image processor's defaults; the arrays are always numpy here.
        outputs = self.image_processor(images, **{**settings, "return_tensors": "np"})
        # Video-LLaVA's image processor still names its image output `pixel_values_images` by default.
        return np.asarray(outputs["pixel_values"] if "pixel_values" in outputs else outputs["pixel_values_images"])

    def _process_audio(self, name: str, clips: list, sampling_rate: int | None) -> np.ndarray:
        expected_rate = self.feature_extractor.sampling_rate
        if sampling_rate is not None and sampling_rate != expected_rate:
            raise ValueError(
                f"Modality {name!r}: audio was given at {sampling_rate} Hz but the feature extractor expects "
                f"{expected_rate} Hz; resample it first."
            )
        arrays = []
        for clip in clips:
            array = np.asarray(clip, dtype=np.float32)
            if array.ndim != 1 or array.size == 0 or not np.isfinite(array).all():
                raise ValueError(
                    f"Modality {name!r}: an audio clip must be a non-empty, finite mono waveform (1-D array), got "
                    f"{_describe(clip)}."
                )
            arrays.append(array)
        _warn_if_cut(name, arrays, expected_rate, _window_samples(self.feature_extractor))
        features = self.feature_extractor(
            arrays, sampling_rate=expected_rate, padding="max_length", truncation=True, return_tensors="np"
        )
        return np.asarray(features["input_features"])


def _window_samples(feature_extractor: Any) -> int | None:
    """The longest waveform the feature extractor keeps (`n_samples`, as Whisper's names it), if it has a window."""
    samples = getattr(feature_extractor, "n_samples", None)
    return samples if isinstance(samples, int) and samples > 0 else None


def _warn_if_cut(name: str, clips: list[np.ndarray], sampling_rate: int, window: int | None) -> None:
    """The composite reads audio through a fixed window: say so when a clip is longer and its end is dropped."""
    if window is None:
        return
    for index, clip in enumerate(clips):
        if clip.shape[0] > window:
            logger.warning(
                f"Modality {name!r}: audio clip {index} is {clip.shape[0] / sampling_rate:.1f} s long but the "
                f"composite reads a fixed window of {window / sampling_rate:.1f} s; everything after that is cut off. "
                "Split long audio into clips of at most that length."
            )


# Channel counts an image array may have (grayscale, RGB), as transformers infers them.
_CHANNEL_COUNTS = (1, 3)


def _check_image_layout(name: str, image: Any) -> None:
    """An image array `(height, width, channels)` or `(channels, height, width)` must say which one it is: refuse
    arrays whose first and last dimensions could both be the channels (e.g. `(3, 224, 3)`), or neither can."""
    if not _is_array(image) or image.ndim != 3:
        return
    first, last = image.shape[0] in _CHANNEL_COUNTS, image.shape[-1] in _CHANNEL_COUNTS
    if first and last:
        raise ValueError(
            f"Modality {name!r}: the image array of shape {tuple(image.shape)} could be channels-first or "
            "channels-last; pass images_kwargs={'input_data_format': 'channels_last'} (or 'channels_first'; "
            "videos_kwargs for video frames), or a PIL image."
        )
    if not first and not last:
        raise ValueError(
            f"Modality {name!r}: the image array of shape {tuple(image.shape)} has no channel dimension of size 1 or "
            "3 first or last; pass (height, width, 3) RGB or (height, width) grayscale arrays (drop an alpha channel)."
        )


def _check_modalities(modalities: dict[str, Any]) -> None:
    """Refuse processor modality entries that cannot work: unknown kinds, missing or shared placeholders, and
    `image_processor_kwargs` that are not a dict or sit on a kind that has no images."""
    for name, entry in modalities.items():
        if not isinstance(entry, dict) or entry.get("kind") not in _OUTPUT_NAME_BY_KIND:
            raise ValueError(
                f"Modality {name!r}: the entry must be a dict with a kind in {list(_OUTPUT_NAME_BY_KIND)}, "
                f"got {entry!r}."
            )
        if not isinstance(entry.get("placeholder"), str) or not entry["placeholder"]:
            raise ValueError(f"Modality {name!r}: the entry needs a non-empty placeholder string.")
        settings = entry.get("image_processor_kwargs")
        if settings is not None and (not isinstance(settings, dict) or entry["kind"] not in ("image", "video")):
            raise ValueError(
                f"Modality {name!r}: image_processor_kwargs must be a dict and only applies to image and video "
                f"modalities, got {type(settings).__name__} on a {entry['kind']} modality."
            )
    placeholders = [entry["placeholder"] for entry in modalities.values()]
    shared = sorted({token for token in placeholders if placeholders.count(token) > 1})
    if shared:
        raise ValueError(f"Modalities must use distinct placeholders; {shared} belong to more than one modality.")


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} of shape {tuple(shape)}" if shape is not None else type(value).__name__


def _flat_list(value: Any) -> list:
    """Items in order, whether given alone, as a list, or as per-sample lists (as `apply_chat_template` passes
    them)."""
    items = []
    for item in _as_list(value):
        items.extend(item if isinstance(item, (list, tuple)) else [item])
    return items


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, torch.Tensor))


def _is_malformed_image(image: Any) -> bool:
    """Empty, or an array that is not `(height, width[, channels])` / `(channels, height, width)`."""
    if _is_array(image):
        elements = image.numel() if isinstance(image, torch.Tensor) else image.size
        return elements == 0 or image.ndim not in (2, 3)
    size = getattr(image, "size", None)  # PIL: (width, height)
    return size is not None and 0 in tuple(size)


def _is_video(value: Any) -> bool:
    """A video is an array or tensor `(frames, height, width, channels)` or a non-empty list of frames (PIL images
    or 2/3-D arrays). An empty list is a sample without videos (a batched chat template gives `[[video], []]`)."""
    if _is_array(value):
        return value.ndim == 4
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(not isinstance(frame, (list, tuple)) and not (_is_array(frame) and frame.ndim == 4) for frame in value)
    )


def _video_list(value: Any) -> list:
    """Videos in order, whether given alone, as a list, or as per-sample lists of videos."""
    if value is None:
        return []
    if _is_video(value):
        return [value]
    videos = []
    for item in value:
        videos.extend([item] if _is_video(item) else _video_list(item))
    return videos


def _sample_frames(name: str, video: Any, num_frames: int) -> list:
    frames = list(video)
    if not frames:
        raise ValueError(f"Modality {name!r}: got a video with no frames.")
    return [frames[index] for index in sample_frame_indices(len(frames), num_frames)]


__all__ = ["CompositeBatchFeature", "CompositeMLLMProcessor"]
