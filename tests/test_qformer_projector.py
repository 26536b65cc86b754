"""The paper's audio Q-Former projector (`qformer_{Q}N_{L}L`): spec parsing, the module, and the key map from the
paper's published layout (`model.modal_projectors.audio.*`)."""

import pytest
import torch
from safetensors.torch import save_file

from conversion.errors import ConversionError
from conversion.projector_qformer import check_qformer_spec, infer_qformer_shape, qformer_projector_weights
from conversion.tensors import TensorStore
from fixtures.tiny_sources import qformer_projector_shapes
from modeling_composite.modeling_qformer_projector import QFormerProjector, parse_qformer_spec


PREFIX = "model.modal_projectors.audio."
# Tiny sizes: encoder width 24, Q-Former width 32 (4 heads), FFN 64, 2 layers, 4 queries, 16 positions, LLM width 40.
TINY = dict(
    encoder_width=24,
    out_features=40,
    num_queries=4,
    num_layers=2,
    num_positions=16,
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
)


def tiny_projector() -> QFormerProjector:
    return QFormerProjector(**TINY).eval()


def published_layout(layers: int = 2) -> dict[str, tuple[int, ...]]:
    """The paper's audio projector tensors (relative to PREFIX) and their shapes, at the tiny sizes."""
    return qformer_projector_shapes(
        TINY["encoder_width"],
        TINY["out_features"],
        TINY["num_queries"],
        layers,
        TINY["num_positions"],
        TINY["hidden_size"],
        TINY["intermediate_size"],
    )


def store_of(
    tmp_path, shapes: dict[str, tuple[int, ...]]
) -> tuple[TensorStore, dict[str, str], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    tensors = {f"{PREFIX}{key}": torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    path = tmp_path / "adapter_model.safetensors"
    save_file(tensors, str(path))
    return TensorStore([path], "paper audio"), {key[len(PREFIX) :]: key for key in tensors}, tensors


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("qformer_32N_2L", (32, 2)),
        ("qformer_8N_12L", (8, 12)),
        ("linear", None),
        ("mlp2x_gelu", None),
        ("identity", None),
    ],
)
def test_spec_parsing(spec, expected):
    assert parse_qformer_spec(spec) == expected


@pytest.mark.parametrize(
    "spec", ["qformer", "qformer_32N", "qformer_32N_2L_x", "qformer_32_2", "qformer_0N_2L", "qformer_32N_0L"]
)
def test_malformed_qformer_spec_is_refused(spec):
    with pytest.raises(ValueError, match="qformer_"):
        parse_qformer_spec(spec)


def test_output_shape_and_dependence_on_features_and_positions():
    projector = tiny_projector()
    features = torch.randn(3, 10, TINY["encoder_width"])
    with torch.no_grad():
        output = projector(features)
        shuffled = projector(features.flip(1))
    assert output.shape == (3, TINY["num_queries"], TINY["out_features"])
    assert output.dtype == torch.float32
    # The position embedding makes token order matter (cross-attention alone would be order-blind).
    assert not torch.allclose(output, shuffled)
    assert not torch.allclose(output[0], output[1])


def test_bf16_forward_keeps_bf16():
    projector = tiny_projector().to(torch.bfloat16)
    with torch.no_grad():
        output = projector(torch.randn(2, 16, TINY["encoder_width"], dtype=torch.bfloat16))
    assert output.dtype == torch.bfloat16 and output.shape == (2, TINY["num_queries"], TINY["out_features"])


def test_more_tokens_than_positions_is_refused_clearly():
    projector = tiny_projector()
    with pytest.raises(ValueError, match=r"position embeddings for 16 encoder tokens but got 17"):
        projector(torch.randn(1, 17, TINY["encoder_width"]))
    with pytest.raises(ValueError, match=r"features of shape \(items, tokens, 24\)"):
        projector(torch.randn(1, 8, 25))


def test_query_init_follows_the_paper():
    projector = QFormerProjector(**{**TINY, "num_queries": 64})
    projector.init_query_tokens()
    assert abs(projector.query_tokens.std().item() - 0.02) < 0.004
    assert abs(projector.query_tokens.mean().item()) < 0.004


def test_published_layout_loads_strictly_with_every_tensor_in_place(tmp_path):
    store, keys, tensors = store_of(tmp_path, published_layout())
    weights = qformer_projector_weights(store, keys, "paper audio")
    projector = tiny_projector()
    projector.load_state_dict({name: lazy.load() for name, lazy in weights.items()}, strict=True)
    state = projector.state_dict()
    assert set(weights) == set(state) and len(weights) == len(tensors)
    moved = {
        "audio_query_tokens": "query_tokens",
        "audio_llama_proj.weight": "projection.weight",
        "audio_Qformer.bert.embeddings.LayerNorm.bias": "qformer.layernorm.bias",
        "audio_Qformer.bert.encoder.layer.1.crossattention.self.key.weight": (
            "qformer.encoder.layer.1.crossattention.attention.key.weight"
        ),
        "audio_Qformer.bert.encoder.layer.0.attention.self.value.bias": (
            "qformer.encoder.layer.0.attention.attention.value.bias"
        ),
        "audio_Qformer.bert.encoder.layer.1.output_query.LayerNorm.weight": (
            "qformer.encoder.layer.1.output_query.LayerNorm.weight"
        ),
    }
    for paper, ours in moved.items():
        torch.testing.assert_close(state[ours], tensors[PREFIX + paper], rtol=0, atol=0)


def test_state_dict_buffer_position_ids_is_accepted_and_dropped(tmp_path):
    shapes = {**published_layout(), "audio_Qformer.bert.embeddings.position_ids": (1, 512)}
    store, keys, _ = store_of(tmp_path, shapes)
    assert "qformer.embeddings.position_ids" not in qformer_projector_weights(store, keys, "paper audio")


def test_unknown_or_missing_tensors_are_named(tmp_path):
    extra = {**published_layout(), "audio_Qformer.bert.encoder.layer.0.intermediate.dense.weight": (64, 32)}
    store, keys, _ = store_of(tmp_path, extra)
    unknown = r"unknown \['audio_Qformer\.bert\.encoder\.layer\.0\.intermediate\.dense"
    with pytest.raises(ConversionError, match=unknown):
        qformer_projector_weights(store, keys, "paper audio")
    lacking = published_layout()
    del lacking["audio_Qformer.bert.encoder.layer.1.crossattention.output.dense.bias"]
    store, keys, _ = store_of(tmp_path, lacking)
    missing = r"missing \['audio_Qformer\.bert\.encoder\.layer\.1\.crossattention\.output"
    with pytest.raises(ConversionError, match=missing):
        qformer_projector_weights(store, keys, "paper audio")


def test_shapes_give_the_sizes_and_cross_check_the_spec(tmp_path):
    store, keys, _ = store_of(tmp_path, published_layout(layers=3))
    shape = infer_qformer_shape(store, keys, "paper audio")
    sizes = (shape.num_queries, shape.num_layers, shape.num_positions, shape.encoder_width, shape.out_features)
    assert sizes == (4, 3, 16, 24, 40)
    assert (shape.hidden_size, shape.intermediate_size, shape.spec) == (32, 64, "qformer_4N_3L")
    check_qformer_spec(shape, "qformer_4N_3L", "paper audio")
    with pytest.raises(ConversionError, match=r"config says the audio projector is 'qformer_32N_2L'.*'qformer_4N_3L'"):
        check_qformer_spec(shape, "qformer_32N_2L", "paper audio")
    with pytest.raises(ConversionError, match="Malformed"):
        check_qformer_spec(shape, "qformer_4N", "paper audio")


def test_inconsistent_widths_are_named(tmp_path):
    shapes = published_layout()
    shapes["audio_Qformer.bert.encoder.layer.0.crossattention.self.key.weight"] = (32, 20)
    store, keys, _ = store_of(tmp_path, shapes)
    with pytest.raises(ConversionError, match=r"crossattention\.self\.key\.weight has shape \(32, 20\)"):
        infer_qformer_shape(store, keys, "paper audio")
