"""The paper's audio encoder, BEATs (e.g. BEATs_iter3_plus_AS2M.pt), read into `CompositeBeatsEncoder`.

A BEATs checkpoint is one pickled dict: `cfg` (BEATs' config fields) and `model` (its state dict). It is read only
with `torch.load(weights_only=True)`. Key map (checkpoint -> ours):

- every key of the encoder keeps its name (`patch_embedding.*`, `layer_norm.*`, `post_extract_proj.*`,
  `encoder.layer_norm.*`, `encoder.pos_conv.0.bias`, `encoder.layers.N.*`), except:
- `encoder.pos_conv.0.weight_g` / `weight_v` (weight norm's magnitude and direction; a copy re-saved through the
  paper's code names them `encoder.pos_conv.0.parametrizations.weight.original0` / `original1`) ->
  `encoder.pos_conv.0.parametrizations.weight.original0` / `original1`: stored as they are, the weight is computed
  from them at each forward as BEATs does;
- `encoder.layers.N.self_attn.relative_attention_bias.weight` for N > 0: copies of layer 0's table (BEATs shares one
  module between all layers); checked equal to layer 0's, then dropped;
- `predictor.weight` / `predictor.bias` (the AudioSet classifier of the AS2M fine-tune): dropped, the paper's audio
  projector reads the encoder output before it.
"""

import logging
import re
from pathlib import Path

import torch

from modeling_composite.configuration_beats import CompositeBeatsConfig
from modeling_composite.feature_extraction_beats import CompositeBeatsFeatureExtractor
from modeling_composite.modeling_beats import CompositeBeatsEncoder

from .encoders import Encoder, require_encoder_reference
from .errors import ConversionError
from .locate import locate_checkpoint_file
from .tensors import Lazy, TensorStore, load_pickle


logger = logging.getLogger(__name__)

# BEATs config field -> ours.
_CONFIG_FIELDS = {
    "input_patch_size": "patch_size",
    "embed_dim": "patch_embedding_dim",
    "conv_bias": "patch_embedding_bias",
    "encoder_layers": "num_hidden_layers",
    "encoder_embed_dim": "hidden_size",
    "encoder_ffn_embed_dim": "intermediate_size",
    "encoder_attention_heads": "num_attention_heads",
    "activation_fn": "hidden_act",
    "deep_norm": "deep_norm",
    "conv_pos": "num_conv_pos_embeddings",
    "conv_pos_groups": "num_conv_pos_embedding_groups",
    "relative_position_embedding": "relative_position_embedding",
    "num_buckets": "num_relative_buckets",
    "max_distance": "max_relative_distance",
    "gru_rel_pos": "gated_relative_position",
}
# What BEATs' own config class assumes for a field its checkpoint leaves out.
_BEATS_DEFAULTS = {
    "input_patch_size": -1,
    "embed_dim": 512,
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "deep_norm": False,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": False,
    "num_buckets": 320,
    "max_distance": 1280,
    "gru_rel_pos": False,
    "layer_norm_first": False,
}
# Fields that only matter for training (dropouts, layer drop, gradient scaling) or for the classifier head.
_TRAINING_ONLY_FIELDS = {
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "encoder_layerdrop",
    "dropout_input",
    "layer_wise_gradient_decay_ratio",
    "finetuned_model",
    "predictor_dropout",
    "predictor_class",
}
# Checkpoint tensors the encoder does not use.
DROPPED_KEYS = ("predictor.weight", "predictor.bias")
_WEIGHT_NORM_KEYS = {
    "encoder.pos_conv.0.weight_g": "encoder.pos_conv.0.parametrizations.weight.original0",
    "encoder.pos_conv.0.weight_v": "encoder.pos_conv.0.parametrizations.weight.original1",
}
_SHARED_TABLE_COPY = re.compile(r"^encoder\.layers\.([1-9]\d*)\.self_attn\.relative_attention_bias\.weight$")
_SHARED_TABLE = "encoder.layers.0.self_attn.relative_attention_bias.weight"


def beats_config(cfg: object, label: str) -> CompositeBeatsConfig:
    """`CompositeBeatsConfig` from a BEATs checkpoint's `cfg` dict."""
    if not isinstance(cfg, dict):
        raise ConversionError(f"{label}: the checkpoint's 'cfg' is not a dict of BEATs config fields.")
    values = {**_BEATS_DEFAULTS, **cfg}
    if values["layer_norm_first"]:
        raise ConversionError(
            f"{label}: layer_norm_first=True (pre-norm BEATs) is not supported; BEATs' released checkpoints are "
            "post-norm."
        )
    unknown = sorted(set(cfg) - set(_BEATS_DEFAULTS) - _TRAINING_ONLY_FIELDS)
    if unknown:
        logger.warning("%s: ignoring BEATs config fields this reader does not know: %s", label, unknown)
    try:
        return CompositeBeatsConfig(**{ours: values[theirs] for theirs, ours in _CONFIG_FIELDS.items()})
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{label}: the checkpoint's cfg gives an unusable BEATs config ({error}).") from None


def _load_checkpoint(path: Path, label: str) -> dict:
    checkpoint = load_pickle(path, label)
    if not isinstance(checkpoint, dict) or "cfg" not in checkpoint or "model" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConversionError(
            f"{label}: {path.name} is not a BEATs checkpoint (a dict with 'cfg' and 'model'); found {found}."
        )
    return checkpoint


def map_beats_keys(store: TensorStore, config: CompositeBeatsConfig, label: str) -> dict[str, Lazy]:
    """Our parameter name -> lazy checkpoint tensor, for every parameter of `CompositeBeatsEncoder(config)`. A
    checkpoint tensor that is neither mapped nor dropped on purpose, a missing one, or a wrong shape is an error."""
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in CompositeBeatsEncoder(config).state_dict().items()}
    weights: dict[str, Lazy] = {}
    unknown, dropped = [], []
    for key in store.keys():
        name = _WEIGHT_NORM_KEYS.get(key, key)
        if name in expected:
            if name in weights:
                raise ConversionError(f"{label}: {key!r} and {weights[name].key!r} both map to {name!r}.")
            if store.shape(key) != expected[name]:
                raise ConversionError(
                    f"{label}: tensor {key!r} has shape {store.shape(key)}, but the config in the checkpoint needs "
                    f"{expected[name]}."
                )
            weights[name] = Lazy(store, key)
        elif key in DROPPED_KEYS:
            dropped.append(key)
        elif _SHARED_TABLE_COPY.match(key) and _SHARED_TABLE in store:
            if not torch.equal(store.get(key), store.get(_SHARED_TABLE)):
                raise ConversionError(
                    f"{label}: {key!r} differs from {_SHARED_TABLE!r}; BEATs shares one relative position table "
                    "between all layers, so this checkpoint is not a BEATs model this reader can place."
                )
            dropped.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{label}: {len(unknown)} tensor(s) BEATs' encoder does not have, e.g. {unknown[:3]}; the file is not a "
            "BEATs checkpoint or its cfg does not match its tensors."
        )
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ConversionError(
            f"{label}: the checkpoint lacks {len(missing)} tensor(s) of the encoder, e.g. {missing[:3]}."
        )
    if dropped:
        logger.info("%s: dropped %d tensor(s) the encoder does not use: %s", label, len(dropped), dropped)
    return weights


def read_beats_encoder(reference: str | None, label: str) -> Encoder:
    """BEATs from its `.pt` checkpoint: a file path, or a folder (local or Hub) holding exactly one `.pt` / `.bin`.
    The feature extractor (BEATs' fbank front end) travels in the `image_processor` field."""
    encoder_label = require_encoder_reference(
        reference,
        label,
        "audio",
        "the BEATs checkpoint it was trained with (e.g. a folder holding BEATs_iter3_plus_AS2M.pt)",
    )
    location, path = locate_checkpoint_file(reference, encoder_label, "BEATs", "BEATs_iter3_plus_AS2M.pt")
    checkpoint = _load_checkpoint(path, encoder_label)
    config = beats_config(checkpoint["cfg"], encoder_label)
    store = TensorStore.from_state_dict(checkpoint["model"], path, encoder_label)
    weights = map_beats_keys(store, config, encoder_label)
    return Encoder(location=location, config=config, weights=weights, image_processor=CompositeBeatsFeatureExtractor())
