"""The paper's video encoder, LanguageBind (`LanguageBind/LanguageBind_Video_merge`), read into our
`CompositeLanguageBindVideoEncoder`, with the image processor that reproduces its frame transform.

The folder is a transformers-style two-tower checkpoint: `config.json` (model_type `LanguageBindVideo`, with
`text_config` and `vision_config`) and weights of both towers. transformers does not know that model type, so the
JSON is read here. Every `vision_model.*` tensor maps onto the encoder (the prefix dropped); the text tower and the
projection heads are dropped by name; anything else is an error.
"""

import logging
from typing import Any

import torch

from composition.image_processor import clip_image_processor
from modeling_composite.configuration_languagebind_video import CompositeLanguageBindVideoConfig
from modeling_composite.modeling_languagebind_video import CompositeLanguageBindVideoEncoder

from .encoders import Encoder, require_encoder_reference
from .errors import ConversionError
from .locate import locate
from .sources import map_keys, read_json
from .tensors import Lazy, open_model_weights


logger = logging.getLogger(__name__)

LANGUAGEBIND_VIDEO_MODEL_TYPE = "LanguageBindVideo"
_VISION_PREFIX = "vision_model."
# The parts of the checkpoint a video encoder does not use: the text tower and both towers' projection heads.
_DROPPED_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
# Saved by transformers before 4.31 as a persistent buffer; it only holds 0..N-1, which the encoder rebuilds.
_DROPPED_VISION_KEYS = ("embeddings.position_ids",)
# vision_config fields that fix the encoder's shape or arithmetic: a checkpoint must state them.
_REQUIRED_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "num_frames",
    "add_time_attn",
)
# Fields LanguageBind's own config class gives defaults to (its defaults, used when a config leaves them out).
_OPTIONAL_VISION_FIELDS = {
    "num_channels": 3,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}
# LanguageBind's video transform: OpenAI CLIP's normalisation, short side scaled to the tower's size (224),
# centre crop.
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_BILINEAR = 2  # PIL.Image.BILINEAR: pytorchvideo's ShortSideScale interpolates bilinearly


def read_languagebind_video_encoder(reference: str | None, label: str) -> Encoder:
    """LanguageBind's video tower (our `CompositeLanguageBindVideoConfig` and its weights, lazily read) and the image
    processor for its frames, from a local folder or Hub id such as `LanguageBind/LanguageBind_Video_merge`."""
    encoder_label = require_encoder_reference(
        reference,
        label,
        "video",
        "the LanguageBind video model it was trained with (LanguageBind/LanguageBind_Video_merge)",
    )
    location = locate(reference, f"{label} encoder")
    config = languagebind_video_config(_read_vision_config(location.folder, encoder_label), encoder_label)
    store = open_model_weights(location.folder, encoder_label)
    groups = map_keys(store, [(_VISION_PREFIX, "vision")], encoder_label, dropped=_DROPPED_PREFIXES)
    vision_keys = {name: key for name, key in groups["vision"].items() if name not in _DROPPED_VISION_KEYS}
    _check_against_encoder(config, {name: store.shape(key) for name, key in vision_keys.items()}, encoder_label)
    weights = {name: Lazy(store, key) for name, key in vision_keys.items()}
    processor = languagebind_frame_processor(config.image_size)
    return Encoder(location=location, config=config, weights=weights, image_processor=processor)


def languagebind_video_config(vision_config: dict[str, Any], label: str) -> CompositeLanguageBindVideoConfig:
    """Our encoder config from a LanguageBindVideo checkpoint's `vision_config` dict."""
    missing = [name for name in _REQUIRED_VISION_FIELDS if name not in vision_config]
    if missing:
        raise ConversionError(
            f"{label}: config.json's vision_config lacks {missing}; it is not a LanguageBind video config."
        )
    if vision_config.get("force_patch_dropout"):
        logger.info(
            "%s: force_patch_dropout=%s is a training-time augmentation; the encoder keeps every patch.",
            label,
            vision_config["force_patch_dropout"],
        )
    fields = {name: vision_config[name] for name in _REQUIRED_VISION_FIELDS}
    fields.update({name: vision_config.get(name, default) for name, default in _OPTIONAL_VISION_FIELDS.items()})
    try:
        return CompositeLanguageBindVideoConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{label}: its vision_config is not usable ({error}).") from None


def languagebind_frame_processor(image_size: int = 224) -> Any:
    """A CLIP image processor set up as LanguageBind's video transform for each frame: short side to `image_size`
    (224, bilinear), centre crop, scale to [0, 1], OpenAI CLIP mean/std. (LanguageBind also flips frames horizontally
    at random, at inference too; a deterministic processor leaves that out.)"""
    return clip_image_processor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=_BILINEAR,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


def _read_vision_config(folder, label: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{label}: {folder} has no config.json.")
    raw = read_json(path, label)
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != LANGUAGEBIND_VIDEO_MODEL_TYPE:
        raise ConversionError(
            f"{label}: config.json has model_type {model_type!r}, not {LANGUAGEBIND_VIDEO_MODEL_TYPE!r}; "
            "`encoder:` of a video source must be a LanguageBind video model (LanguageBind/LanguageBind_Video_merge)."
        )
    vision_config = raw.get("vision_config")
    if not isinstance(vision_config, dict):
        raise ConversionError(f"{label}: config.json has no vision_config object.")
    return vision_config


def _check_against_encoder(
    config: CompositeLanguageBindVideoConfig, shapes: dict[str, tuple[int, ...]], label: str
) -> None:
    """Every encoder parameter present with its shape, and nothing else."""
    with torch.device("meta"):
        expected = {
            name: tuple(tensor.shape)
            for name, tensor in CompositeLanguageBindVideoEncoder(config).state_dict().items()
        }
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise ConversionError(
            f"{label}: {len(missing)} encoder tensor(s) missing from the checkpoint, e.g. "
            f"{[_VISION_PREFIX + name for name in missing[:3]]}; the weights do not match its config.json."
        )
    unknown = sorted(set(shapes) - set(expected))
    if unknown:
        raise ConversionError(
            f"{label}: {len(unknown)} vision tensor(s) the LanguageBind video encoder does not have, e.g. "
            f"{[_VISION_PREFIX + name for name in unknown[:3]]} (unmerged LoRA weights? use the _merge checkpoint)."
        )
    wrong = [(name, shapes[name], shape) for name, shape in expected.items() if shapes[name] != shape]
    if wrong:
        name, found, wanted = wrong[0]
        raise ConversionError(
            f"{label}: {len(wrong)} tensor(s) have the wrong shape for its config.json, e.g. {_VISION_PREFIX + name} "
            f"is {found}, expected {wanted}."
        )
