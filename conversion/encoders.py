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
# A constant `arange` buffer that transformers before 4.31 saved in CLIP checkpoints (the Hub's openai/clip-* files
# hold it); current versions rebuild it and do not load it.
_STALE_BUFFERS = ("embeddings.position_ids",)
# What the vision reader accepts, for messages.
VISION_ENCODERS = "a CLIP or SigLIP checkpoint (the two-tower model or its vision tower)"
_WHOLE_MODEL_ARCHITECTURES = ("ForConditionalGeneration", "ForCausalLM")


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


def not_an_encoder(what: str, config: dict, expected: str) -> str:
    """Why the model whose config is `config` is not the encoder asked for, and what to pass instead. A whole
    multimodal model (an LLM with its own encoder and projector, such as a LLaVA) and a bare LLM are named as such:
    they are the usual mistakes, and the fix differs (its encoder's checkpoint; or the model as a source or base)."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    towers = sorted(
        {
            value["model_type"]
            for key, value in config.items()
            if key.endswith("_config") and key != "text_config" and isinstance(value, dict) and "model_type" in value
        }
    )
    whole = "modalities" in config or (
        "text_config" in config and any(name.endswith(_WHOLE_MODEL_ARCHITECTURES) for name in architectures)
    )
    if whole:
        own = f" whose encoder is a {' and a '.join(towers)}" if towers else ""
        return (
            f"{what} is a whole multimodal model ({model_type}: a language model with its own encoder and projector"
            f"{own}), where an encoder belongs; pass the encoder checkpoint it was built on instead ({expected}), or "
            "compose the model itself as a source of a conversion recipe"
        )
    if any(name.endswith("ForCausalLM") for name in architectures):
        return (
            f"{what} is a language model ({model_type}), where an encoder belongs; it is the base LLM, and the "
            f"encoder is {expected}"
        )
    return f"{what} has model_type {model_type!r}, which is not {expected}"


def read_vision_tower(location: Location, label: str) -> tuple[PreTrainedConfig, dict[str, Lazy]]:
    """The vision config and tensors of a CLIP / SigLIP checkpoint in `location`: a two-tower model (whose text
    tower is left out on purpose) or the vision tower alone. Tensors are named `vision_model.*`."""
    config = load_config(location.folder, label)
    tower_alone = config.model_type in _VISION_TOWER_TYPES
    if config.model_type in _VISION_MODEL_TYPES:
        config = copy.deepcopy(config.vision_config)
    if config.model_type not in _VISION_TOWER_TYPES:
        raise ConversionError(f"{not_an_encoder(label, config.to_dict(), VISION_ENCODERS)}.")
    store = open_model_weights(location.folder, label)
    # A tower saved alone by current transformers has no `vision_model.` level; two-tower models and older saves do.
    nested = not tower_alone or any(key.startswith("vision_model.") for key in store.keys())
    prefix = "vision_model." if nested else ""
    groups = map_keys(store, [(prefix, "vision")], label, dropped=_TEXT_TOWER_PREFIXES)
    return config, {
        f"vision_model.{name}": Lazy(store, key)
        for name, key in groups["vision"].items()
        if name not in _STALE_BUFFERS
    }


def read_vision_encoder(reference: str | None, label: str) -> Encoder:
    """A CLIP / SigLIP vision tower (and its image processor) from a local folder or Hub id."""
    encoder_label = require_encoder_reference(
        reference, label, "vision", "the vision tower it was trained with (e.g. openai/clip-vit-large-patch14-336)"
    )
    location = locate(reference, f"{label} encoder")
    config, weights = read_vision_tower(location, encoder_label)
    try:
        image_processor = AutoImageProcessor.from_pretrained(location.folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise ConversionError(f"{encoder_label}: cannot load its image processor ({error}).") from error
    return Encoder(location=location, config=config, weights=weights, image_processor=image_processor)
