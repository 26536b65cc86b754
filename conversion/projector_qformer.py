"""The paper's audio Q-Former projector (`qformer_{Q}N_{L}L`, stored under `model.modal_projectors.audio.`) mapped onto
`QFormerProjector`'s state dict.

The paper's tensors, relative to `model.modal_projectors.audio.`:

- `audio_query_tokens` (1, Q, hidden) -> `query_tokens`;
- `audio_position_embedding.weight` (positions, encoder width) -> `position_embedding.weight`;
- `audio_llama_proj.{weight,bias}` (LLM width x hidden) -> `projection.*`;
- `audio_Qformer.bert.embeddings.LayerNorm.*` (the LayerNorm on the queries) -> `qformer.layernorm.*`;
- `audio_Qformer.bert.encoder.layer.{i}.{attention,crossattention}.self.{query,key,value}.*` ->
  `qformer.encoder.layer.{i}.{attention,crossattention}.attention.{query,key,value}.*`, and the attention outputs,
  `intermediate_query` and `output_query` under the same names.

`audio_Qformer.bert.embeddings.position_ids` (a constant `arange` buffer of the text embeddings the paper deletes) is
only in checkpoints saved from a state dict, never in the released ones (they hold parameters only); it is accepted
and dropped.
"""

import re
from dataclasses import dataclass

from modeling_composite.modeling_qformer_projector import parse_qformer_spec

from .errors import ConversionError
from .tensors import Lazy, TensorStore


_QFORMER = "audio_Qformer.bert."
_TOP_LEVEL = {
    "audio_query_tokens": "query_tokens",
    "audio_position_embedding.weight": "position_embedding.weight",
    "audio_llama_proj.weight": "projection.weight",
    "audio_llama_proj.bias": "projection.bias",
    f"{_QFORMER}embeddings.LayerNorm.weight": "qformer.layernorm.weight",
    f"{_QFORMER}embeddings.LayerNorm.bias": "qformer.layernorm.bias",
}
# The modules of one layer: the paper's name -> ours (BLIP-2's `attention.attention` is BERT's `attention.self`).
_LAYER_MODULES = {
    f"{block}.{paper}": f"{block}.{ours}"
    for block in ("attention", "crossattention")
    for paper, ours in (
        ("self.query", "attention.query"),
        ("self.key", "attention.key"),
        ("self.value", "attention.value"),
        ("output.dense", "output.dense"),
        ("output.LayerNorm", "output.LayerNorm"),
    )
} | {name: name for name in ("intermediate_query.dense", "output_query.dense", "output_query.LayerNorm")}
_DROPPED = {f"{_QFORMER}embeddings.position_ids"}
_LAYER_KEY = re.compile(rf"^{re.escape(_QFORMER)}encoder\.layer\.(\d+)\.")


def _expected_names(num_layers: int) -> dict[str, str]:
    """The paper's relative keys of a Q-Former projector with `num_layers` layers -> our state-dict names."""
    names = dict(_TOP_LEVEL)
    for layer in range(num_layers):
        for paper, ours in _LAYER_MODULES.items():
            for tensor in ("weight", "bias"):
                paper_key = f"{_QFORMER}encoder.layer.{layer}.{paper}.{tensor}"
                names[paper_key] = f"qformer.encoder.layer.{layer}.{ours}.{tensor}"
    return names


def _checked_names(keys: dict[str, str], label: str) -> dict[str, str]:
    """The expected names for the layer count the keys show, after checking that the keys are exactly those."""
    layer_indices = [int(match.group(1)) for key in keys if (match := _LAYER_KEY.match(key))]
    if not layer_indices:
        raise ConversionError(f"{label}: the audio Q-Former projector has no layers ({_QFORMER}encoder.layer.*).")
    expected = _expected_names(max(layer_indices) + 1)
    unknown = sorted(set(keys) - set(expected) - _DROPPED)
    missing = sorted(set(expected) - set(keys))
    if unknown or missing:
        raise ConversionError(
            f"{label}: the audio Q-Former projector's tensors do not match the paper's layout "
            f"(model.modal_projectors.audio.*): unknown {unknown[:4]}, missing {missing[:4]}"
            f"{' (and more)' if len(unknown) > 4 or len(missing) > 4 else ''}."
        )
    return expected


def qformer_projector_weights(store: TensorStore, keys: dict[str, str], label: str) -> dict[str, Lazy]:
    """`QFormerProjector` state-dict names -> lazy tensors, from the paper's audio Q-Former projector.

    `keys` maps each key relative to `model.modal_projectors.audio.` to its full key in `store`. Every tensor of the
    paper's layout must be there and nothing else (ConversionError names what is unknown or missing).
    """
    expected = _checked_names(keys, label)
    return {ours: Lazy(store, keys[paper]) for paper, ours in expected.items()}


@dataclass(frozen=True)
class QFormerShape:
    """The sizes of a Q-Former projector, read from its tensors."""

    num_queries: int
    num_layers: int
    num_positions: int
    encoder_width: int
    out_features: int
    hidden_size: int
    intermediate_size: int

    @property
    def spec(self) -> str:
        """The paper's projector spec for these sizes (`qformer_{Q}N_{L}L`)."""
        return f"qformer_{self.num_queries}N_{self.num_layers}L"


def infer_qformer_shape(store: TensorStore, keys: dict[str, str], label: str) -> QFormerShape:
    """Sizes of the paper's audio Q-Former projector from its tensors' shapes (same `keys` as
    `qformer_projector_weights`), after checking that the tensors agree with each other. Compare them with the
    config's `mm_audio_projector_type` (`check_qformer_spec`); the number of attention heads cannot be read from
    shapes (the paper's is 12)."""
    expected = _checked_names(keys, label)
    num_layers = len({match.group(1) for key in expected if (match := _LAYER_KEY.match(key))})

    def shape(relative_key: str) -> tuple[int, ...]:
        return tuple(store.shape(keys[relative_key]))

    queries = shape("audio_query_tokens")
    positions = shape("audio_position_embedding.weight")
    projection = shape("audio_llama_proj.weight")
    if len(queries) != 3 or queries[0] != 1:
        raise ConversionError(f"{label}: audio_query_tokens has shape {queries}, expected (1, queries, hidden).")
    layer_0 = f"{_QFORMER}encoder.layer.0."
    result = QFormerShape(
        num_queries=queries[1],
        num_layers=num_layers,
        num_positions=positions[0],
        encoder_width=positions[1],
        out_features=projection[0],
        hidden_size=queries[2],
        intermediate_size=shape(f"{layer_0}intermediate_query.dense.weight")[0],
    )
    # Widths that must agree, so that a damaged or mixed-up checkpoint fails here with names, not in load_state_dict.
    agreements = {
        f"{_QFORMER}embeddings.LayerNorm.weight": (result.hidden_size,),
        f"{layer_0}crossattention.self.key.weight": (result.hidden_size, result.encoder_width),
        f"{layer_0}attention.self.query.weight": (result.hidden_size, result.hidden_size),
        "audio_llama_proj.weight": (result.out_features, result.hidden_size),
    }
    for relative_key, wanted in agreements.items():
        if shape(relative_key) != wanted:
            raise ConversionError(
                f"{label}: {relative_key} has shape {shape(relative_key)} but the other Q-Former tensors imply "
                f"{wanted}."
            )
    return result


def check_qformer_spec(shape: QFormerShape, spec: str, label: str) -> None:
    """Fail if the config's projector spec disagrees with the sizes read from the tensors."""
    try:
        sizes = parse_qformer_spec(spec)
    except ValueError as error:
        raise ConversionError(f"{label}: {error}") from None
    if sizes != (shape.num_queries, shape.num_layers):
        raise ConversionError(
            f"{label}: the config says the audio projector is {spec!r} but its tensors are a {shape.spec!r} "
            f"({shape.num_queries} queries, {shape.num_layers} layers); fix mm_audio_projector_type in config.json."
        )
