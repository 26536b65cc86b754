"""DAMC routing: text tokens use the base (merged text) weights, tokens of modality m use W0 + M_m."""

import copy

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from safetensors import safe_open
from transformers import BitsAndBytesConfig

from composition.saving import save_composite
from fixtures.tiny_composite import build_tiny_composite, tiny_llm
from modeling_composite import state_dict_keys as keys
from modeling_composite.modeling_composite import CompositeMLLMForCausalLM
from modeling_composite.routing import DeltaLayout, RoutedLinear, RoutingChannel, UnquantizedFactor, plan_routing


NAMES = ["image", "video", "audio", "point"]


def _layer(
    lora_layout: str = "stacked",
    folded: bool = True,
    text_rank: int = 8,
    without: tuple[str, ...] = ("video",),
    dropout: float = 0.0,
    seed: int = 0,
) -> RoutedLinear:
    """A routed 64 -> 96 projection with random factors: a text delta and a delta for each of NAMES but `without`
    (those modalities use the text weights)."""
    torch.manual_seed(seed)
    ranks = {name: (4 + 2 * index, 3.0 + index) for index, name in enumerate(NAMES) if name not in without}
    layout = DeltaLayout.build(text_rank, 2.0 * text_rank, ranks, folded)
    layer = RoutedLinear(torch.nn.Linear(64, 96), RoutingChannel(), layout, lora_layout, dropout)
    with torch.no_grad():
        for factor in layer.factor_parameters():
            factor.normal_(0, 0.3)
    return layer


def _naive_routed_output(layer: RoutedLinear, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The reference scheme: every delta computed for every token as a dense matrix, then the right one picked per
    token (text: the base, plus the text delta when it is not folded; modality m: W0 + M_m)."""
    base = layer.base_layer(hidden)
    text = hidden @ layer.delta_weight("text").t() if layer.layout.text is not None else torch.zeros_like(base)
    output = base + (0 if layer.text_folded else text)
    for slot, name in enumerate(NAMES, start=1):
        if not any(block.name == name for block in layer.layout.blocks):
            continue
        own = base + hidden @ layer.delta_weight(name).t() - (text if layer.text_folded else 0)
        output = torch.where((index == slot).unsqueeze(-1), own, output)
    return output


def _route(layer: RoutedLinear, index: torch.Tensor, static_shapes: bool = False, dense: bool = False) -> None:
    layer.channel.plan = plan_routing(index, layer.layout, NAMES, torch.float32, static_shapes, dense)


def _interleaved_index(generator: torch.Generator) -> torch.Tensor:
    """A `(2, 40)` index: text, and runs of every modality (one without a delta) interleaved in both rows."""
    return torch.randint(0, len(NAMES) + 1, (2, 40), generator=generator)


@pytest.mark.parametrize("static_shapes", [False, True], ids=["span", "static"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("lora_layout", ["stacked", "per_delta"])
@pytest.mark.parametrize("folded", [True, False], ids=["folded", "unfolded"])
def test_routed_layer_equals_the_naive_reference(folded, lora_layout, grad, static_shapes):
    layer = _layer(lora_layout, folded)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 40, 64, generator=generator)
    index = _interleaved_index(generator)
    _route(layer, index, static_shapes)
    with torch.no_grad():
        expected = _naive_routed_output(layer, hidden, index)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(layer(hidden), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("present", [("image",), ("audio",), ("image", "point"), ("video",)])
def test_the_plan_covers_only_the_routed_span_and_the_columns_of_the_modalities_present(present):
    """Text before and after the modality runs is outside the span; columns stop after the last modality present;
    a prompt whose only modality has no delta of its own needs no plan at all."""
    layer = _layer()
    index = torch.zeros(1, 30, dtype=torch.long)
    for offset, name in enumerate(present):
        index[0, 5 + 8 * offset : 11 + 8 * offset] = NAMES.index(name) + 1
    plan = plan_routing(index, layer.layout, NAMES, torch.float32)
    routed = [name for name in present if name != "video"]
    if not routed:
        assert plan is None
        return
    first = 5 + 8 * present.index(routed[0])
    last = 11 + 8 * present.index(routed[-1])
    assert plan.rows == (first, last)
    assert plan.columns == max(layer.layout.block(name).stop for name in routed)
    assert plan.mask.shape == (last - first, plan.columns)
    hidden = torch.randn(1, 30, 64)
    layer.channel.plan = plan
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden), _naive_routed_output(layer, hidden, index), rtol=1e-5, atol=1e-5)


def test_zero_deltas_give_exactly_the_plain_llm(batch_all):
    model, _ = build_tiny_composite(randomize_deltas=False)
    plain = tiny_llm()
    with torch.no_grad():
        text_only = torch.tensor([[1, 70, 80, 90, 100]])
        torch.testing.assert_close(
            model(input_ids=text_only).logits, plain(input_ids=text_only).logits, rtol=0, atol=0
        )
        # With modality inputs: the plain LLM fed the same spliced embeddings.
        embeds = model.get_input_embeddings()(batch_all["input_ids"])
        index = model.model.modality_index(batch_all["input_ids"], embeds)
        inputs = {
            "image": "pixel_values",
            "video": "pixel_values_videos",
            "audio": "input_features",
            "point": "point_clouds",
        }
        for slot, name in enumerate(model.model.modality_names, start=1):
            features = model.model.get_modality_features(name, batch_all[inputs[name]])
            embeds = embeds.masked_scatter((index == slot).unsqueeze(-1), features)
        expected = plain(inputs_embeds=embeds).logits
        torch.testing.assert_close(model(**batch_all).logits, expected, rtol=0, atol=0)


def _first_layer_outputs(model, batch):
    """Outputs of the first routed projection (q_proj) and of the first decoder layer."""
    captured = {}
    layer = model.model.language_model.layers[0]
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, output: captured.setdefault("q_proj", output)),
        layer.register_forward_hook(
            lambda m, a, output: captured.setdefault("layer", output[0] if isinstance(output, tuple) else output)
        ),
    ]
    with torch.no_grad():
        index = model(**batch).modality_index
    for hook in hooks:
        hook.remove()
    return captured["q_proj"], captured["layer"], index


def test_changing_one_modality_delta_leaves_text_and_other_modalities_unchanged(composite, batch_all):
    model, _ = composite
    q_before, layer_before, index = _first_layer_outputs(model, batch_all)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for layer in changed.model.routed_layers():
            _, factor_b = layer.delta_factors("audio")  # a view into the stacked factors
            factor_b.add_(torch.randn_like(factor_b))
    q_after, layer_after, _ = _first_layer_outputs(changed, batch_all)
    is_audio = index == model.model.modality_names.index("audio") + 1
    assert not torch.allclose(q_after[is_audio], q_before[is_audio])
    # Projections are per token: every non-audio token is untouched.
    torch.testing.assert_close(q_after[~is_audio], q_before[~is_audio], rtol=0, atol=0)
    # After attention, tokens see earlier tokens only: everything before the first audio token is untouched.
    first_audio = int(is_audio[0].nonzero()[0])
    assert first_audio > 0 and not is_audio[0, :first_audio].any()
    torch.testing.assert_close(layer_after[:, :first_audio], layer_before[:, :first_audio], rtol=0, atol=0)


def test_stacked_and_per_delta_storage_give_the_same_composite(composite, batch_all):
    """The same deltas stored per delta (as sources train them) and stacked (as converted composites hold them)."""
    model, _ = composite
    config = copy.deepcopy(model.config)
    config.lora_layout = "per_delta"
    per_delta = CompositeMLLMForCausalLM(config).eval()
    state = {}
    for key, value in model.state_dict().items():
        state[key] = value
    for name, layer in model.named_modules():
        if isinstance(layer, RoutedLinear):
            for key in ("lora_A.weight", "lora_B.weight"):
                del state[f"{name}.{key}"]
            for block in layer.layout.blocks:
                factor_a, factor_b = layer.delta_factors(block.name)
                prefix = f"{name}.text_lora_" if block.name == "text" else f"{name}.lora_"
                suffix = ".weight" if block.name == "text" else f".{block.name}.weight"
                state[f"{prefix}A{suffix}"], state[f"{prefix}B{suffix}"] = factor_a, factor_b
    per_delta.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(per_delta(**batch_all).logits, model(**batch_all).logits, rtol=1e-5, atol=1e-5)


def test_naive_composite_has_no_wrappers():
    model, _ = build_tiny_composite(lora_rank=None)
    assert model.model.routed_layers() == []
    assert type(model.model.language_model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_gradient_checkpointing_gives_the_same_gradients(composite, batch_all):
    model, _ = composite
    labels = batch_all["input_ids"].clone()

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        copy_ = copy.deepcopy(model).train()
        if checkpointing:
            copy_.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        copy_.zero_grad()
        copy_(**batch_all, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in copy_.named_parameters() if "lora" in name and p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recompute_uses_its_own_forwards_routing(composite, batch_all, use_reentrant):
    """Two forwards before one backward (as with chosen/rejected pairs): the recomputation of the first forward must
    route like the first forward, not like the last one."""
    model, _ = composite
    labels = batch_all["input_ids"].clone()
    text_only = {"input_ids": torch.tensor([[1, 70, 80, 90, 100, 110]])}

    def gradient(checkpointing: bool) -> torch.Tensor:
        copy_ = copy.deepcopy(model).train()
        if checkpointing:
            copy_.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
            copy_.enable_input_require_grads()
        loss = copy_(**batch_all, labels=labels).loss
        copy_(**text_only).logits.sum()  # a second forward, routed differently, before the backward
        loss.backward()
        layer = copy_.model.routed_layers()[0]
        block = layer.layout.block("image")
        return layer.lora_B.weight.grad[:, block.start : block.stop].clone()

    torch.testing.assert_close(gradient(True), gradient(False))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("present", ["all", "some"])
def test_dense_original_weights_route_like_the_low_rank_correction(present, grad):
    """materialize_original_weight(): rows outside the span through W_text, the span through the dense W0 plus the
    text delta on its text rows and each routed row's own delta; the naive reference's outputs, also for a modality
    without a delta of its own."""
    layer = _layer()
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 40, 64, generator=generator)
    index = _interleaved_index(generator)
    if present == "some":
        index = torch.where(index > 2, 0, index)
    index[:, :3] = 0  # text before the span
    with torch.no_grad():
        _route(layer, index)
        expected = _naive_routed_output(layer, hidden, index)
        layer.materialize_original_weight()
        assert "original_weight" not in layer.state_dict()
        torch.testing.assert_close(layer.original_weight + layer.delta_weight("text"), layer.base_layer.weight)
    _route(layer, index, dense=True)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(layer(hidden), expected, rtol=1e-5, atol=1e-5)
    # Text-only forwards (decode steps) never touch the copy.
    layer.channel.plan = None
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden), layer.base_layer(hidden), rtol=0, atol=0)


def test_materialized_original_weights_keep_the_model_outputs_and_are_never_saved(composite, batch_all, tmp_path):
    model, _ = composite
    dense = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(**batch_all).logits
        added = dense.materialize_original_weights()
        routed = dense.model.routed_layers()
        assert added == sum(layer.base_layer.weight.numel() * 4 for layer in routed)
        torch.testing.assert_close(dense(**batch_all).logits, expected, rtol=1e-4, atol=1e-4)
        greedy = dict(max_new_tokens=4, do_sample=False)
        torch.testing.assert_close(
            dense.generate(**batch_all, **greedy), model.generate(**batch_all, **greedy), rtol=0, atol=0
        )
        dense.save_pretrained(tmp_path / "saved")
        dense.release_original_weights()
        assert all(layer.original_weight is None for layer in routed)
        torch.testing.assert_close(dense(**batch_all).logits, expected, rtol=0, atol=0)
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as saved:
        assert not any("original_weight" in key for key in saved.keys())


def test_original_weights_need_the_folded_text_delta_and_weights_in_memory():
    layer = _layer(folded=False)
    with pytest.raises(ValueError, match="folded"):
        layer.materialize_original_weight()
    layer = _layer()
    layer.base_layer.to("meta")
    with pytest.raises(ValueError, match="offloaded"):
        layer.materialize_original_weight()


def _dequantized_copy(model, quantized):
    """`model` with every weight that `quantized` holds in 4-bit replaced by its dequantized value."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if type(module).__name__ == "Linear4bit":
                weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
                copied.get_submodule(name).weight.copy_(weight)
    return copied


def test_factors_are_quantized_in_4bit_where_their_rank_fits_the_kernels(raw_inputs, tmp_path):
    """A 4-bit composite quantizes stacked factors whose shapes fit the kernels with the base weights (at scale they
    are a third of its weights) and routes as the same composite holding the dequantized weights;
    `llm_int8_skip_modules` keeps them in full precision; small stacked ranks (`UnquantizedFactor`) always stay."""
    model, processor = build_tiny_composite(kinds=("image", "audio"), lora_rank=64, text_rank=128)
    save_composite(model, processor, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        keys = set(saved.keys())
    prefix = "model.language_model.layers.0.self_attn.q_proj"
    assert {f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"} <= keys
    assert not any(".text_lora_" in key or ".lora_A.image" in key for key in keys)
    batch = processor(
        text="USER: <image> <audio> Same? ASSISTANT:", images=[raw_inputs["image"]], audio=[raw_inputs["audio"]]
    )
    settings = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32}
    quantized = CompositeMLLMForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(**settings))
    skipped = BitsAndBytesConfig(**settings, llm_int8_skip_modules=[r".*lora_[AB]", "lm_head"])
    kept = CompositeMLLMForCausalLM.from_pretrained(tmp_path, quantization_config=skipped)
    for loaded, expected in ((quantized, "Linear4bit"), (kept, "Linear")):
        layer = loaded.model.routed_layers()[0]
        assert type(layer.base_layer).__name__ == "Linear4bit"
        assert [type(factor).__name__ for factor in (layer.lora_A, layer.lora_B)] == [expected] * 2
        with torch.no_grad():
            expected_logits = _dequantized_copy(model, loaded)(**batch).logits
            error = (loaded(**batch).logits - expected_logits).norm() / expected_logits.norm()
        # bitsandbytes' CPU kernel differs from dequantize-then-matmul by ~0.5% per layer; against the unquantized
        # composite the error is 44-64% here (random deltas larger than the weights).
        assert error < 0.05, error
    assert quantized.get_memory_footprint() < 0.8 * kept.get_memory_footprint()

    small, small_processor = build_tiny_composite(kinds=("image",), lora_rank=4, text_rank=4)
    save_composite(small, small_processor, tmp_path / "small")
    small_quantized = CompositeMLLMForCausalLM.from_pretrained(
        tmp_path / "small", quantization_config=BitsAndBytesConfig(**settings)
    )
    layer = small_quantized.model.routed_layers()[0]
    assert type(layer.lora_A) is UnquantizedFactor and layer.lora_A.weight.dtype == torch.float32


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_dropout_touches_only_the_trained_deltas_not_the_folded_text_delta(grad):
    """Training on a converted composite (text delta folded into the base) with lora_dropout: a modality row gets
    `W0 x + M(dropout(x))`, so with `M = 0` exactly `W0 x`, and text rows `W_text x`, whatever dropout draws."""
    layer = _layer(dropout=0.5, without=("video", "audio", "point"))
    with torch.no_grad():
        _, factor_b = layer.delta_factors("image")
        factor_b.zero_()
        original = layer.base_layer.weight - layer.delta_weight("text")
    index = torch.zeros(1, 96, dtype=torch.long)
    index[0, 2:80:3] = 1  # interleaved image rows
    _route(layer, index)
    hidden = torch.randn(1, 96, 64)
    layer.train()
    with torch.set_grad_enabled(grad):
        output = layer(hidden)[0]
    image = index[0] == 1
    bias = layer.base_layer.bias
    torch.testing.assert_close(output[image], hidden[0, image] @ original.t() + bias, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(output[~image], layer.base_layer(hidden[0, ~image]), rtol=1e-5, atol=1e-5)


def test_a_text_model_that_regroups_tokens_is_refused_not_misrouted():
    layer = _layer()
    _route(layer, torch.ones(1, 10, dtype=torch.long))
    with pytest.raises(RuntimeError, match="rows"):
        layer(torch.randn(1, 7, 64))


@pytest.mark.parametrize("lora_layout", ["stacked", "per_delta"])
def test_state_dict_keys_name_what_a_routed_projection_saves(lora_layout):
    """`state_dict_keys` (used by the converter, the composite reader, the builder and the trainer) names exactly the
    tensors a `RoutedLinear` holds, in either layout, and reads each back to its delta."""
    layer = _layer(lora_layout)
    module = "layers.0.self_attn.q_proj"
    saved = {f"{module}.{key}" for key in layer.state_dict()}
    if lora_layout == "stacked":
        factors = {keys.stacked_factor_key(module, side) for side in keys.FACTOR_SIDES}
    else:
        factors = {
            keys.per_delta_factor_key(module, side, block.name)
            for block in layer.layout.blocks
            for side in keys.FACTOR_SIDES
        }
    assert saved == {keys.base_layer_key(module, "weight"), keys.base_layer_key(module, "bias")} | factors
    for key in saved:
        routed = keys.parse_routed_key("model.language_model." + key, keys.TEXT_MODEL_PREFIX)
        assert routed.module == module
        assert routed.is_base_layer == (key in {f"{module}.base_layer.weight", f"{module}.base_layer.bias"})
        assert keys.is_factor_key(key) == (not routed.is_base_layer)
        if not routed.is_base_layer:
            assert routed.stacked == (lora_layout == "stacked")
            if not routed.stacked:
                assert keys.per_delta_factor_key(module, routed.side, routed.delta) == key
    assert keys.parse_routed_key(f"{module}.weight") is None
    assert keys.parse_routed_key(f"model.language_model.{module}.base_layer.weight", "model.encoders.") is None
