"""The paper's point-cloud encoder: PointBERT v1.2 as trained in PointLLM (`point_bert_v1.2.pt`), read into
`CompositePointEncoder`.

The published file is a flat state dict of the paper's `PointTransformer` (loaded there with a strict
`load_state_dict`), so every tensor maps to exactly one of ours. Our names are the paper's, except that the paper nests
its transformer blocks one level deeper (`blocks.blocks.{i}.` -> `blocks.{i}.`). No tensor of the file is unused at
inference (BatchNorm's `num_batches_tracked` is kept: our BatchNorm holds it too), so none is dropped.
"""

import re

import torch

from modeling_composite.configuration_point_encoder import CompositePointEncoderConfig
from modeling_composite.modeling_point_encoder import CompositePointEncoder

from .encoders import Encoder, require_encoder_reference
from .errors import ConversionError
from .locate import locate_checkpoint_file
from .tensors import Lazy, TensorStore


_BATCH_NORM = r"(?:weight|bias|running_mean|running_var|num_batches_tracked)"
# The paper's key layout, one pattern per tensor family; the replacement gives our name. Anything else is an error.
_KEY_MAP: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        # mini-PointNet: Conv1d, BatchNorm (SyncBatchNorm in the paper, identical in eval), ReLU, Conv1d
        (r"encoder\.(first_conv|second_conv)\.([03])\.(weight|bias)", r"encoder.\1.\2.\3"),
        (rf"encoder\.(first_conv|second_conv)\.1\.({_BATCH_NORM})", r"encoder.\1.1.\2"),
        (r"reduce_dim\.(weight|bias)", r"reduce_dim.\1"),
        (r"(cls_token|cls_pos)", r"\1"),
        (r"pos_embed\.([02])\.(weight|bias)", r"pos_embed.\1.\2"),
        (r"blocks\.blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"blocks.\1.\2.\3"),
        (r"blocks\.blocks\.(\d+)\.attn\.qkv\.weight", r"blocks.\1.attn.qkv.weight"),
        (r"blocks\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (r"blocks\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
        (r"norm\.(weight|bias)", r"norm.\1"),
    )
)
_BLOCK_INDEX = re.compile(r"blocks\.blocks\.(\d+)\.")
# Tensors whose shapes give the config; all must be present.
_SHAPE_KEYS = (
    "encoder.first_conv.0.weight",
    "encoder.second_conv.3.weight",
    "cls_token",
    "blocks.blocks.0.mlp.fc1.weight",
)


def _our_name(key: str) -> str | None:
    for pattern, replacement in _KEY_MAP:
        if pattern.fullmatch(key):
            return pattern.sub(replacement, key)
    return None


def _config_from_shapes(store: TensorStore, label: str) -> CompositePointEncoderConfig:
    """Widths, depth and point_dims from the tensors; what shapes do not tell (heads, groups, group size, points per
    cloud) takes PointLLM v1.2's values (the config defaults)."""
    missing = [key for key in _SHAPE_KEYS if key not in store]
    if missing:
        raise ConversionError(f"{label}: not a PointBERT checkpoint: it lacks {missing}.")
    block_indices = {int(match.group(1)) for key in store.keys() if (match := _BLOCK_INDEX.match(key))}
    depth = len(block_indices)
    if block_indices != set(range(depth)):
        raise ConversionError(f"{label}: transformer blocks {sorted(block_indices)} are not numbered 0..{depth - 1}.")
    hidden_size = store.shape("cls_token")[-1]
    try:
        return CompositePointEncoderConfig(
            point_dims=store.shape("encoder.first_conv.0.weight")[1],
            encoder_dims=store.shape("encoder.second_conv.3.weight")[0],
            hidden_size=hidden_size,
            num_hidden_layers=depth,
            mlp_ratio=store.shape("blocks.blocks.0.mlp.fc1.weight")[0] / hidden_size,
        )
    except ValueError as error:
        raise ConversionError(f"{label}: the checkpoint's shapes give an invalid encoder config ({error}).") from None


def read_pointbert_encoder(reference: str | None, label: str) -> Encoder:
    """PointBERT v1.2 (PointLLM's `point_bert_v1.2.pt`) as a `CompositePointEncoder`: its config and lazily read
    weights under our names. `reference` is the `.pt` file, or a folder (local or Hub) holding exactly one `.pt` /
    `.bin`; `label` names the source in errors. Every tensor of the file must map to one of ours and every one of ours
    must be there, with the same shape; otherwise `ConversionError` names the tensors."""
    encoder_label = require_encoder_reference(
        reference, label, "point-cloud", "PointLLM's PointBERT checkpoint (point_bert_v1.2.pt, or a folder holding it)"
    )
    location, checkpoint = locate_checkpoint_file(reference, encoder_label, "PointBERT", "point_bert_v1.2.pt")
    store = TensorStore([checkpoint], encoder_label)
    config = _config_from_shapes(store, encoder_label)

    names = {key: _our_name(key) for key in store.keys()}
    unknown = sorted(key for key, name in names.items() if name is None)
    if unknown:
        raise ConversionError(
            f"{encoder_label}: {len(unknown)} tensor(s) PointBERT v1.2 does not have: {unknown[:5]}; this is not a "
            "plain PointTransformer state dict (a PointBERT training checkpoint nests it under "
            "`state_dict` / `module.point_encoder.`: save that part alone)."
        )
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in CompositePointEncoder(config).state_dict().items()}
    missing = sorted(set(expected) - set(names.values()))
    extra = sorted(key for key, name in names.items() if name not in expected)
    if missing or extra:
        raise ConversionError(
            f"{encoder_label}: the checkpoint does not match a PointBERT with {config.num_hidden_layers} layers of "
            f"width {config.hidden_size}: missing {missing[:5]}, unexpected {extra[:5]}."
        )
    wrong_shapes = [
        f"{key} {store.shape(key)} (expected {expected[name]})"
        for key, name in names.items()
        if store.shape(key) != expected[name]
    ]
    if wrong_shapes:
        raise ConversionError(f"{encoder_label}: tensors with unexpected shapes: {wrong_shapes[:5]}.")
    weights = {name: Lazy(store, key) for key, name in names.items()}
    return Encoder(location=location, config=config, weights=weights, image_processor=None)
