"""DAMC routing: text tokens use the base (merged text) weights, tokens of modality m use W0 + M_m."""

import copy

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from safetensors import safe_open
from transformers import BitsAndBytesConfig

from modeling_composite.builder import save_composite
from modeling_composite.modeling_composite import CompositeMLLMForCausalLM
from modeling_composite.routing import ModalityRouting, RoutedLinear, RoutingState, UnquantizedFactor
from modeling_composite.tiny import build_tiny_composite, tiny_llm


def _naive_routed_output(layer: RoutedLinear, hidden: torch.Tensor, index: torch.Tensor, names: list[str]):
    """The reference scheme: every delta computed for every token, then the right one picked per token."""
    base = layer.base_layer(hidden)
    text = torch.zeros_like(base)
    if layer.text_lora_A is not None:
        text = hidden @ layer.text_lora_A.weight.t() @ layer.text_lora_B.weight.t() * layer.text_scaling
    output = base + (0 if layer.text_folded else text)
    for slot, name in enumerate(names, start=1):
        if name not in layer.lora_A:
            continue
        full = base + hidden @ layer.lora_A[name].weight.t() @ layer.lora_B[name].weight.t() * layer.scaling[name]
        full = full - (text if layer.text_folded else 0)
        output = torch.where((index == slot).unsqueeze(-1), full, output)
    return output


@pytest.mark.parametrize("folded", [True, False])
def test_routed_layer_equals_the_naive_reference(composite, folded):
    model, _ = composite
    layer = copy.deepcopy(model.model.routed_layers()[0])
    layer.text_folded = folded
    names = model.model.modality_names
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, layer.in_features, generator=generator)
    index = torch.randint(0, len(names) + 1, (2, 9), generator=generator)
    layer.state.routing = ModalityRouting.from_modality_index(index, names)
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden), _naive_routed_output(layer, hidden, index, names))


def test_zero_deltas_give_exactly_the_plain_llm(batch_all):
    model, _ = build_tiny_composite(randomize_deltas=False)
    plain = tiny_llm()
    with torch.no_grad():
        text_only = torch.tensor([[1, 70, 80, 90, 100]])
        torch.testing.assert_close(model(input_ids=text_only).logits, plain(input_ids=text_only).logits, rtol=0, atol=0)
        # With modality inputs: the plain LLM fed the same spliced embeddings.
        embeds = model.get_input_embeddings()(batch_all["input_ids"])
        index = model.model.modality_index(batch_all["input_ids"], embeds)
        inputs = {"image": "pixel_values", "video": "pixel_values_videos", "audio": "input_features", "point": "point_clouds"}
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
            layer.lora_B["audio"].weight.add_(torch.randn_like(layer.lora_B["audio"].weight))
    q_after, layer_after, _ = _first_layer_outputs(changed, batch_all)
    is_audio = index == model.model.modality_names.index("audio") + 1
    assert not torch.allclose(q_after[is_audio], q_before[is_audio])
    # Projections are per token: every non-audio token is untouched.
    torch.testing.assert_close(q_after[~is_audio], q_before[~is_audio], rtol=0, atol=0)
    # After attention, tokens see earlier tokens only: everything before the first audio token is untouched.
    first_audio = int(is_audio[0].nonzero()[0])
    assert first_audio > 0 and not is_audio[0, :first_audio].any()
    torch.testing.assert_close(layer_after[:, :first_audio], layer_before[:, :first_audio], rtol=0, atol=0)


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


def test_checkpoint_recompute_uses_its_own_forwards_routing(composite, batch_all):
    """Two forwards before one backward (as with chosen/rejected pairs): the recomputation of the first forward must
    route like the first forward, not like the last one."""
    model, _ = composite
    labels = batch_all["input_ids"].clone()
    text_only = {"input_ids": torch.tensor([[1, 70, 80, 90, 100, 110]])}

    def gradient(checkpointing: bool) -> torch.Tensor:
        copy_ = copy.deepcopy(model).train()
        if checkpointing:
            copy_.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        loss = copy_(**batch_all, labels=labels).loss
        copy_(**text_only).logits.sum()  # a second forward, routed differently, before the backward
        loss.backward()
        return copy_.model.routed_layers()[0].lora_B["image"].weight.grad.clone()

    torch.testing.assert_close(gradient(True), gradient(False))


def _block_index(names: list[str], generator: torch.Generator) -> torch.Tensor:
    """A `(2, 300)` modality index made of long runs (as placeholders expand), with text between modality blocks and
    two modalities back to back."""
    slots = [0, 1, 2, 0, len(names), 0, 3, 1]
    lengths = torch.randint(60, 90, (len(slots),), generator=generator).tolist()
    flat = torch.cat([torch.full((length,), slot) for slot, length in zip(slots, lengths)])
    return flat[:600].reshape(2, 300)


@pytest.mark.parametrize("dense", [False, True], ids=["low_rank", "dense_w0"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_long_runs_of_rows_are_corrected_in_place_like_gathered_rows(composite, dense, grad):
    """Without autograd, rows in long blocks are corrected in place (no gather/scatter); with autograd they are
    gathered. Both give the naive reference's output."""
    model, _ = composite
    layer = copy.deepcopy(model.model.routed_layers()[0])
    names = model.model.modality_names
    del layer.lora_A[names[1]], layer.lora_B[names[1]]  # this modality uses the text weights
    generator = torch.Generator().manual_seed(2)
    index = _block_index(names, generator)
    hidden = torch.randn(2, 300, layer.in_features, generator=generator)
    routing = ModalityRouting.from_modality_index(index, names)
    routed = tuple(name for name in routing.rows if name in layer.lora_A)
    assert len(routing.contiguous_blocks(600, routed)) >= 5  # the in-place path applies here
    layer.state.routing = routing
    with torch.no_grad():
        expected = _naive_routed_output(layer, hidden, index, names)
        if dense:
            layer.materialize_original_weight()
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(layer(hidden), expected)


@pytest.mark.parametrize("present", ["all", "some"])
def test_dense_original_weights_route_like_the_low_rank_correction(composite, present):
    """materialize_original_weight(): text rows through W_text, modality rows through the dense W0 + M_m; the same
    outputs as the naive reference, also when a modality has no delta of its own."""
    model, _ = composite
    layer = copy.deepcopy(model.model.routed_layers()[0])
    names = model.model.modality_names
    del layer.lora_A[names[0]], layer.lora_B[names[0]]  # this modality uses the text weights
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 11, layer.in_features, generator=generator)
    top = len(names) + 1 if present == "all" else 3
    index = torch.randint(0, top, (2, 11), generator=generator)
    layer.state.routing = ModalityRouting.from_modality_index(index, names)
    with torch.no_grad():
        expected = _naive_routed_output(layer, hidden, index, names)
        layer.materialize_original_weight()
        assert "original_weight" not in layer.state_dict()
        folded_text = layer.text_lora_B.weight @ layer.text_lora_A.weight * layer.text_scaling
        torch.testing.assert_close(layer.original_weight + folded_text, layer.base_layer.weight)
        torch.testing.assert_close(layer(hidden), expected)
        # Text-only forwards (decode steps) never touch the copy.
        layer.state.routing = None
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
        torch.testing.assert_close(dense.generate(**batch_all, **greedy), model.generate(**batch_all, **greedy),
                                   rtol=0, atol=0)
        dense.save_pretrained(tmp_path / "saved")
        dense.release_original_weights()
        assert all(layer.original_weight is None for layer in routed)
        torch.testing.assert_close(dense(**batch_all).logits, expected, rtol=0, atol=0)
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as saved:
        assert not any("original_weight" in key for key in saved.keys())


def test_original_weights_need_the_folded_text_delta_and_weights_in_memory(composite):
    model, _ = composite
    layer = copy.deepcopy(model.model.routed_layers()[0])
    layer.text_folded = False
    with pytest.raises(ValueError, match="folded"):
        layer.materialize_original_weight()
    layer.text_folded = True
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
    """A 4-bit composite quantizes rank-64 factors with the base weights (at scale they are a third of its weights)
    and routes as the same composite holding the dequantized weights; `llm_int8_skip_modules` keeps them in
    full precision; rank-4 factors (`UnquantizedFactor`) always stay."""
    model, processor = build_tiny_composite(kinds=("image", "audio"), lora_rank=64, text_rank=128)
    save_composite(model, processor, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        keys = set(saved.keys())
    prefix = "model.language_model.layers.0.self_attn.q_proj"
    assert {f"{prefix}.lora_A.image.weight", f"{prefix}.lora_B.audio.weight", f"{prefix}.text_lora_A.weight"} <= keys
    batch = processor(text="USER: <image> <audio> Same? ASSISTANT:", images=[raw_inputs["image"]],
                      audio=[raw_inputs["audio"]])
    settings = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32}
    quantized = CompositeMLLMForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(**settings))
    skipped = BitsAndBytesConfig(**settings, llm_int8_skip_modules=[r".*lora_[AB]", "lm_head"])
    kept = CompositeMLLMForCausalLM.from_pretrained(tmp_path, quantization_config=skipped)
    for loaded, expected in ((quantized, "Linear4bit"), (kept, "Linear")):
        layer = loaded.model.routed_layers()[0]
        assert type(layer.base_layer).__name__ == "Linear4bit"
        factors = [layer.lora_A["image"], layer.lora_B["audio"], layer.text_lora_A, layer.text_lora_B]
        assert [type(factor).__name__ for factor in factors] == [expected] * 4
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
    assert type(layer.lora_A["image"]) is UnquantizedFactor and layer.lora_A["image"].weight.dtype == torch.float32


@pytest.mark.parametrize("rows_in_blocks", [False, True])
def test_dropout_touches_only_the_trained_deltas_not_the_folded_text_delta(rows_in_blocks):
    """Training on a converted composite (text delta folded into the base) with lora_dropout: a modality row gets
    `W0 x + M(dropout(x))`, so with `M = 0` exactly `W0 x`, and text rows `W_text x`, whatever dropout draws."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 64, bias=False)
    layer = RoutedLinear(base, RoutingState(), {"image": (4, 8.0)}, text_rank=4, text_alpha=4.0, text_folded=True,
                         dropout=0.5)
    with torch.no_grad():
        layer.text_lora_A.weight.normal_()
        layer.text_lora_B.weight.normal_()
        original = base.weight - layer.text_lora_B.weight @ layer.text_lora_A.weight * layer.text_scaling
    rows = torch.arange(2, 80) if rows_in_blocks else torch.tensor([2, 5, 9])
    layer.state.routing = ModalityRouting({"image": rows})
    hidden = torch.randn(1, 96, 64)
    layer.train()
    with torch.set_grad_enabled(not rows_in_blocks):  # the in-place block path runs without autograd
        output = layer(hidden)[0]
    image = torch.zeros(96, dtype=torch.bool)
    image[rows] = True
    torch.testing.assert_close(output[image], hidden[0, image] @ original.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(output[~image], hidden[0, ~image] @ base.weight.t(), rtol=1e-5, atol=1e-5)
