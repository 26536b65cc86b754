"""Encoders that live in a folder of their own (the recipe's `encoder:`), for source formats that only name them: the
paper's checkpoints and PEFT adapters. This file reads vision towers of CLIP and SigLIP checkpoints; the paper's
encoders that transformers lacks have readers of their own (`encoder_beats.py`, `encoder_languagebind.py`,
`encoder_pointbert.py`)."""

import copy
from dataclasses import dataclass
from typing import Any

from transformers import AutoImageProcessor, PreTrainedConfig

from .errors import ConversionError
from .locate import Location, locate
from .sources import load_config, map_keys
from .tensors import Lazy, open_model_weights


# Vision checkpoints: the full two-tower model (CLIPModel, SiglipModel) or the vision tower alone.
_VISION_MODEL_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
_VISION_TOWER_TYPES = ("clip_vision_model", "siglip_vision_model")
# Parts of a two-tower checkpoint that a vision encoder does not use.
_TEXT_TOWER_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")
@dataclass
class Encoder:
    location: Location
    config: PreTrainedConfig
    weights: dict[str, Lazy]
    image_processor: Any


def require_encoder_reference(reference: str | None, label: str, modality: str, checkpoint_hint: str) -> str:
    """For a source format that holds no encoder of its own: refuse a missing `encoder:` reference, saying which
    checkpoint (`checkpoint_hint`) to name; return the label that errors about that encoder use."""
    if reference is None:
        raise ConversionError(
            f"{label}: this format does not include its {modality} encoder; set `encoder:` on the source to "
            f"{checkpoint_hint}."
        )
    return f"{label} encoder ({reference})"


def read_vision_encoder(reference: str | None, label: str) -> Encoder:
    """A CLIP / SigLIP vision tower (and its image processor) from a local folder or Hub id."""
    encoder_label = require_encoder_reference(
        reference, label, "vision", "the vision tower it was trained with (e.g. openai/clip-vit-large-patch14-336)"
    )
    location = locate(reference, f"{label} encoder")
    config = load_config(location.folder, encoder_label)
    tower_alone = config.model_type in _VISION_TOWER_TYPES
    if config.model_type in _VISION_MODEL_TYPES:
        config = copy.deepcopy(config.vision_config)
    if config.model_type not in _VISION_TOWER_TYPES:
        raise ConversionError(
            f"{encoder_label}: model_type {config.model_type!r} is not a supported vision encoder (CLIP or SigLIP)."
        )
    store = open_model_weights(location.folder, encoder_label)
    # A tower saved alone by current transformers has no `vision_model.` level; two-tower models and older saves do.
    nested = not tower_alone or any(key.startswith("vision_model.") for key in store.keys())
    prefix = "vision_model." if nested else ""
    groups = map_keys(store, [(prefix, "vision")], encoder_label, dropped=_TEXT_TOWER_PREFIXES)
    try:
        image_processor = AutoImageProcessor.from_pretrained(location.folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise ConversionError(f"{encoder_label}: cannot load its image processor ({error}).") from None
    weights = {f"vision_model.{name}": Lazy(store, key) for name, key in groups["vision"].items()}
    return Encoder(location=location, config=config, weights=weights, image_processor=image_processor)
