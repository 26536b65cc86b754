"""vLLM's multimodal processing for composites: the composite's own processor turns each request's items into model
inputs, and every placeholder token in the prompt becomes the positions its item fills (learnable prefix + features
+ suffix, `positions_per_item`), all of them filled with the item's features.

Items arrive keyed by vLLM modality key (`serving.modalities.modality_keys`): `image`, `video`, `audio` for the
modality that is the only one of its kind, else the modality's name (`point`, or `chart` beside `image`).
"""

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import (
    ModalityDataItems,
    MultiModalDataItems,
    MultiModalDataParser,
    ProcessorBatchItems,
)
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)

from modeling_composite.configuration_modality import ModalityConfig
from modeling_composite.modeling_composite import INPUT_NAME_BY_KIND
from modeling_composite.processing_composite import CALL_ARGUMENT_BY_KIND

from .modalities import config_modalities, describe_keys, modality_keys


def input_field(name: str) -> str:
    """The name under which the processed items of modality `name` travel to the model (`embed_multimodal`)."""
    return f"composite_inputs_{name}"


class PointCloudItems(ProcessorBatchItems[Any]):
    """Point clouds, each an array `(points, 3 or 6)`."""

    def __init__(self, data: Sequence[Any], modality: str) -> None:
        super().__init__(data, modality)


class CompositeDataParser(MultiModalDataParser):
    """vLLM's parsers for the kinds it knows (audio resampled to the feature extractor's rate), under the composite's
    modality keys, plus point clouds."""

    def __init__(self, keys: dict[str, str], kinds: dict[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keys = keys
        self.kinds = kinds

    def _parse_point_data(self, key: str, data: Any) -> ModalityDataItems | None:
        if data is None:
            return None
        if isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim == 2:
            data = [data]
        elif isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim == 3:
            data = list(data)
        elif not isinstance(data, (list, tuple)):
            raise ValueError(
                f"Modality {key!r}: point clouds are arrays of shape (points, 3 or 6), one or a list of them; got "
                f"{type(data).__name__}."
            )
        return PointCloudItems([np.asarray(cloud, dtype=np.float32) for cloud in data], key)

    def _get_subparsers(self) -> Mapping[str, Any]:
        by_kind = {
            "image": self._parse_image_data,
            "video": self._parse_video_data,
            "audio": self._parse_audio_data,
        }
        return {
            key: by_kind.get(self.kinds[name], lambda data, key=key: self._parse_point_data(key, data))
            for key, name in self.keys.items()
        }

    def parse_mm_data(self, mm_data: Mapping[str, Any]) -> MultiModalDataItems:
        unknown = sorted(set(mm_data) - set(self.keys))
        if unknown:
            raise ValueError(
                f"This composite has no modality {unknown[0]!r} in vLLM requests; multi_modal_data takes "
                f"{describe_keys(self.keys)}."
            )
        return super().parse_mm_data(mm_data)


class CompositeProcessingInfo(BaseProcessingInfo):
    @cached_property
    def modalities(self) -> dict[str, ModalityConfig]:
        return config_modalities(self.get_hf_config())

    @cached_property
    def keys(self) -> dict[str, str]:
        """vLLM modality key -> composite modality name."""
        return modality_keys(self.modalities)

    def get_data_parser(self) -> MultiModalDataParser:
        feature_extractor = getattr(self.get_hf_processor(), "feature_extractor", None)
        return CompositeDataParser(
            self.keys,
            {name: entry.kind for name, entry in self.modalities.items()},
            target_sr=getattr(feature_extractor, "sampling_rate", None),
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return dict.fromkeys(self.keys)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        config = self.get_hf_config()
        return {key: config.positions_per_item(name) for key, name in self.keys.items()}

    def placeholder_id(self, key: str) -> int:
        return self.modalities[self.keys[key]].placeholder_id


class CompositeDummyInputsBuilder(BaseDummyInputsBuilder[CompositeProcessingInfo]):
    """Inputs of the largest size each modality takes, for vLLM's memory profiling."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        modalities = self.info.modalities
        return "".join(modalities[name].placeholder * mm_counts.get(key, 0) for key, name in self.info.keys.items())

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any = None) -> dict:
        processor = self.info.get_hf_processor()
        data = {}
        for key, name in self.info.keys.items():
            count = mm_counts.get(key, 0)
            if not count:
                continue
            # The processor's entries carry the input sizes (frames per video, points per cloud).
            entry = processor.modalities[name]
            kind = entry["kind"]
            if kind in ("image", "video"):
                side = _image_side(processor.image_processor)
                if kind == "image":
                    data[key] = self._get_dummy_images(width=side, height=side, num_images=count)
                else:
                    data[key] = self._get_dummy_videos(
                        width=side, height=side, num_frames=entry["num_frames"], num_videos=count
                    )
            elif kind == "audio":
                extractor = processor.feature_extractor
                length = int(extractor.chunk_length * extractor.sampling_rate)
                data[key] = self._get_dummy_audios(length=length, num_audios=count)
            else:
                data[key] = [np.zeros((entry["num_points"], entry["point_dims"]), dtype=np.float32)] * count
        return data


def _image_side(image_processor: Any) -> int:
    """The side of the square images the processor outputs (its crop, else its resize)."""
    for setting in (getattr(image_processor, "crop_size", None), getattr(image_processor, "size", None)):
        if isinstance(setting, dict):
            for size_key in ("height", "shortest_edge", "width"):
                if setting.get(size_key):
                    return int(setting[size_key])
    return 224


class CompositeMultiModalProcessor(BaseMultiModalProcessor[CompositeProcessingInfo]):
    """The composite processor on each modality's items (the prompt is tokenized by vLLM); each placeholder token is
    replaced by `positions_per_item` copies of itself, every one an embedding position."""

    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        processor = self.info.get_hf_processor()
        outputs = {}
        for key, items in mm_items.items():
            name = self.info.keys[key]
            outputs[input_field(name)] = self._process(processor, name, items.get_all())
        return BatchFeature(outputs)

    def _process(self, processor: Any, name: str, items: list) -> torch.Tensor:
        """The model inputs of one modality's items, through the composite processor's public call: one placeholder
        per item, the items under their kind's argument."""
        entry = self.info.modalities[name]
        kind = entry.kind
        extra = {}
        if kind == "audio":
            extra["sampling_rate"] = processor.feature_extractor.sampling_rate
        text = entry.placeholder * len(items)
        batch = processor(text=text, **{CALL_ARGUMENT_BY_KIND[kind]: items}, return_tensors="pt", **extra)
        # A kind the composite has one modality of gives its standard input name; several, `modality_inputs[name]`.
        by_name = batch.get("modality_inputs")
        return by_name[name] if by_name is not None else batch[INPUT_NAME_BY_KIND[kind]]

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            input_field(name): MultiModalFieldConfig.batched(key)
            for key, name in self.info.keys.items()
            if input_field(name) in hf_inputs
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        updates = []
        for key, name in self.info.keys.items():
            token_id = self.info.placeholder_id(key)
            expansion = PromptUpdateDetails.select_token_id([token_id] * config.positions_per_item(name), token_id)
            updates.append(PromptReplacement(modality=key, target=[token_id], replacement=expansion))
        return updates
