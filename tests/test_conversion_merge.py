"""What conversion does to the parameters: NaiveMC averages full fine-tunes and keeps every encoder and projector;
LoRA sources merge on products; DAMC keeps text and modality paths apart, checked against independent references
built from the source files with plain transformers classes."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

from conversion import compose
from conversion.merge import merge_deltas
from modeling_composite import CompositeMLLMForCausalLM, CompositeMLLMProcessor


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _state(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _llava_parts(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A transformers-v5 LLaVA checkpoint split into its LLM, vision tower and projector."""
    parts = {"llm": {}, "vision": {}, "projector": {}}
    for key, value in state.items():
        for prefix, part in (
            ("model.language_model.", "llm"),
            ("model.vision_tower.", "vision"),
            ("model.multi_modal_projector.", "projector"),
        ):
            if key.startswith(prefix):
                parts[part][key[len(prefix) :]] = value
        if key == "lm_head.weight":
            parts["llm"]["lm_head.weight"] = value
    return parts


def _adapter(folder) -> dict[str, torch.Tensor]:
    return torch.load(folder / "adapter_model.bin", weights_only=True)


def _scaling(folder) -> float:
    config = json.loads((folder / "config.json").read_text())
    return config["lora_alpha"] / config["lora_r"]


def test_naive_mean_of_two_llavas_keeps_each_encoder_and_projector(tiny_sources, tmp_path):
    recipe = {
        "base": str(tiny_sources["base"]),
        "sources": [
            {"path": str(tiny_sources["llava"]), "weight": 0.5},
            {"path": str(tiny_sources["llava_2"]), "weight": 0.5, "rename": {"image": "chart"}},
        ],
    }
    output = compose(recipe, tmp_path / "out", verify=False)
    state = _state(output)
    first, second = (_llava_parts(_state(tiny_sources[name])) for name in ("llava", "llava_2"))
    placeholder_rows = {
        json.loads((output / "config.json").read_text())["modalities"][name]["placeholder_id"]: source
        for name, source in (("image", first), ("chart", second))
    }
    for key, value in first["llm"].items():
        ours = state[key if key == "lm_head.weight" else f"model.language_model.{key}"]
        expected = (value + second["llm"][key]) / 2
        if key in ("embed_tokens.weight", "lm_head.weight"):
            # Each placeholder row is its own source's row for `<image>` (id 260 in both).
            for row, source in placeholder_rows.items():
                torch.testing.assert_close(ours[row], source["llm"][key][260])
            keep = [row for row in range(expected.shape[0]) if row not in placeholder_rows]
            ours, expected = ours[keep], expected[keep]
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    for name, source in (("image", first), ("chart", second)):
        for key, value in source["vision"].items():
            assert torch.equal(state[f"model.encoders.{name}.{key}"], value)
        for key, value in source["projector"].items():
            assert torch.equal(state[f"model.projectors.{name}.{key}"], value)


def test_lora_sources_merge_on_products_not_on_factors(tiny_sources, tmp_path):
    first, second = tiny_sources["paper_naive"], tiny_sources["paper_damc_a"]
    recipe = {
        "base": str(tiny_sources["base"]),
        "sources": [
            {"path": str(first), "encoder": str(tiny_sources["clip"])},
            {"path": str(second), "encoder": str(tiny_sources["clip"]), "rename": {"image": "chart"}},
        ],
    }
    output = compose(recipe, tmp_path / "out", verify=False)
    state, base = _state(output), load_file(str(tiny_sources["base"] / "model.safetensors"))
    key = "model.layers.1.self_attn.q_proj"
    factors = [(_adapter(folder), _scaling(folder)) for folder in (first, second)]
    products = [
        scale * adapter[f"{key}.lora_B.default.weight"] @ adapter[f"{key}.lora_A.default.weight"]
        for adapter, scale in factors
    ]
    ours = state["model.language_model.layers.1.self_attn.q_proj.weight"]
    torch.testing.assert_close(ours, base[f"{key}.weight"] + 0.5 * products[0] + 0.5 * products[1], rtol=0, atol=1e-6)
    mean_b = sum(adapter[f"{key}.lora_B.default.weight"] for adapter, _ in factors) / 2
    mean_a = sum(adapter[f"{key}.lora_A.default.weight"] for adapter, _ in factors) / 2
    factor_average = base[f"{key}.weight"] + factors[0][1] * mean_b @ mean_a
    assert (ours - factor_average).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("merge", "options"),
    [
        ({"rule": "ties", "density": 0.3}, {"normalize": True, "lambda_": 1.0, "rescale": False}),
        (
            {"rule": "dare_ties", "density": 0.5, "seed": 3, "lambda": 0.5, "normalize": True, "int8_mask": True},
            {"normalize": True, "lambda_": 0.5, "rescale": True},
        ),
    ],
)
def test_ties_and_dare_rules_reach_every_llm_tensor_with_their_options(tiny_sources, tmp_path, merge, options):
    recipe = {
        "base": str(tiny_sources["base"]),
        "merge": merge,
        "sources": [
            {"path": str(tiny_sources["llava"])},
            {"path": str(tiny_sources["llava_2"]), "rename": {"image": "chart"}},
        ],
    }
    output = compose(recipe, tmp_path / "out", verify=False)
    state = _state(output)
    base = load_file(str(tiny_sources["base"] / "model.safetensors"))
    sources = [_llava_parts(_state(tiny_sources[name]))["llm"] for name in ("llava", "llava_2")]
    for key in ("layers.0.mlp.down_proj.weight", "norm.weight"):
        deltas = [source[key] - base[f"model.{key}"] for source in sources]
        merged = merge_deltas(
            deltas,
            [0.5, 0.5],
            merge["rule"],
            density=merge["density"],
            seed=merge.get("seed", 0),
            name=f"model.{key}",
            **options,
        )
        torch.testing.assert_close(
            state[f"model.language_model.{key}"], base[f"model.{key}"] + merged, rtol=0, atol=1e-6
        )
    # The conventions used are recorded with the composite and stated on its card.
    composition = json.loads((output / "config.json").read_text())["composition"]
    recorded = {"normalize": options["normalize"], "lambda": options["lambda_"], "rescale": options["rescale"]}
    assert {key: composition[key] for key in recorded} == recorded
    card = (output / "README.md").read_text()
    for key in ("normalize", "rescale"):
        assert f"{key} `{str(options[key]).lower()}`" in card


def test_linear_with_normalize_is_mergekits_weighted_mean_of_the_models(tiny_sources, tmp_path):
    """mergekit's `linear` (normalize: true): `Σ w_i W_i / Σ w_i`; with weights 1 and 3, a quarter and three quarters
    of each source's LLM tensor. The base's weight cancels out."""
    recipe = {
        "base": str(tiny_sources["base"]),
        "merge": {"rule": "linear", "normalize": True},
        "sources": [
            {"path": str(tiny_sources["llava"]), "weight": 1.0},
            {"path": str(tiny_sources["llava_2"]), "weight": 3.0, "rename": {"image": "chart"}},
        ],
    }
    output = compose(recipe, tmp_path / "out", verify=False)
    state = _state(output)
    first, second = (_llava_parts(_state(tiny_sources[name]))["llm"] for name in ("llava", "llava_2"))
    for key in ("layers.0.mlp.down_proj.weight", "layers.1.self_attn.q_proj.weight", "norm.weight"):
        torch.testing.assert_close(
            state[f"model.language_model.{key}"], 0.25 * first[key] + 0.75 * second[key], rtol=0, atol=1e-6
        )
    composition = json.loads((output / "config.json").read_text())["composition"]
    assert [source["weight"] for source in composition["sources"]] == [0.25, 0.75]


@pytest.fixture(scope="module")
def damc(tiny_sources, tmp_path_factory):
    """A DAMC composite of two paper-format DAMC sources (image and, renamed, chart), λ = 0.5 / 0.25."""
    sources = (tiny_sources["paper_damc_a"], tiny_sources["paper_damc_b"])
    recipe = {
        "method": "damc",
        "base": str(tiny_sources["base"]),
        "sources": [
            {"path": str(sources[0]), "encoder": str(tiny_sources["clip"]), "weight": 0.5},
            {
                "path": str(sources[1]),
                "encoder": str(tiny_sources["clip"]),
                "weight": 0.25,
                "rename": {"image": "chart"},
            },
        ],
    }
    output = compose(recipe, tmp_path_factory.mktemp("damc") / "out", verify=False)
    return (
        CompositeMLLMForCausalLM.from_pretrained(output).eval(),
        CompositeMLLMProcessor.from_pretrained(output),
        sources,
    )


def _plain_llm(tiny_sources, deltas: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The base LLM with dense deltas added to its projections: an independent reference (plain transformers)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_sources["base"]).eval()
    state = model.state_dict()
    with torch.no_grad():
        for key, delta in deltas.items():
            state[f"{key}.weight"] += delta
    model.load_state_dict(state)
    return model


def _lora_deltas(folder, adapter: str, weight: float) -> dict[str, torch.Tensor]:
    state, scale = _adapter(folder), _scaling(folder)
    modules = {key.split(".lora_")[0] for key in state if f".lora_A.{adapter}." in key}
    return {
        m: weight * scale * state[f"{m}.lora_B.{adapter}.weight"] @ state[f"{m}.lora_A.{adapter}.weight"]
        for m in modules
    }


def test_damc_text_tokens_see_the_merged_text_deltas(damc, tiny_sources):
    model, processor, sources = damc
    deltas = _lora_deltas(sources[0], "default", 0.5)
    for key, delta in _lora_deltas(sources[1], "default", 0.25).items():
        deltas[key] = deltas[key] + delta
    reference = _plain_llm(tiny_sources, deltas)
    batch = processor(text="USER: Which colour is the sky? ASSISTANT:")
    with torch.no_grad():
        expected = reference(**batch).logits
        got = model(**batch).logits
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected, rtol=1e-4, atol=1e-5)


def test_damc_modality_tokens_see_only_their_own_delta(damc, tiny_sources):
    """With the image first in the prompt its positions attend only to each other, so at the first layer (and
    every later one) they must equal the source alone: base + that source's vision LoRA, fed the features computed
    here from the CLIP folder and the source's projector and prefix/suffix tokens."""
    model, processor, sources = damc
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    batch = processor(text="<image> What is it?", images=[image], add_special_tokens=False)
    adapter = _adapter(sources[0])
    vision = AutoModel.from_pretrained(tiny_sources["clip"]).vision_model.eval()
    with torch.no_grad():
        features = vision(batch["modality_inputs"]["image"], output_hidden_states=True).hidden_states[-2][:, 1:]
        hidden = torch.nn.functional.gelu(
            features @ adapter["model.modal_projectors.vision.0.weight"].T
            + adapter["model.modal_projectors.vision.0.bias"]
        )
        projected = (
            hidden @ adapter["model.modal_projectors.vision.2.weight"].T
            + adapter["model.modal_projectors.vision.2.bias"]
        )
        span = torch.cat([adapter["prefix_tokens.vision"], projected, adapter["suffix_tokens.vision"]], dim=1)
        reference = _plain_llm(tiny_sources, _lora_deltas(sources[0], "vision", 1.0))
        expected = reference(inputs_embeds=span, output_hidden_states=True).hidden_states
        got = model(**batch, output_hidden_states=True).hidden_states
    positions = span.shape[1]
    assert (
        int((batch["input_ids"][0, :positions] == model.config.modalities["image"].placeholder_id).sum()) == positions
    )
    for layer in (1, len(expected) - 1):
        torch.testing.assert_close(got[layer][:, :positions], expected[layer], rtol=1e-4, atol=1e-5)


def test_a_source_from_another_base_is_flagged_and_a_real_fine_tune_is_not(tiny_sources, tmp_path, caplog):
    from fixtures.tiny_sources import save_tiny_base, save_tiny_llava

    stranger = save_tiny_llava(tmp_path / "stranger", save_tiny_base(tmp_path / "other_base", seed=7))
    base = str(tiny_sources["base"])
    with caplog.at_level(logging.WARNING, logger="conversion"):
        compose({"base": base, "sources": [str(tiny_sources["llava"])]}, tmp_path / "fine", verify=False)
        assert "really fine-tuned from this base" not in caplog.text
        compose({"base": base, "sources": [str(stranger)]}, tmp_path / "stranger_out", verify=False)
    assert "sources[0]" in caplog.text and "really fine-tuned from this base" in caplog.text


def test_naive_composition_of_a_damc_source_says_it_drops_the_modality_lora(tiny_sources, tmp_path, caplog):
    recipe = {
        "base": str(tiny_sources["base"]),
        "sources": [{"path": str(tiny_sources["paper_damc_a"]), "encoder": str(tiny_sources["clip"])}],
    }
    with caplog.at_level(logging.WARNING, logger="conversion"):
        output = compose(recipe, tmp_path / "out", verify=False)
    assert "method naive does not use its separate image LoRA" in caplog.text
    assert json.loads((output / "config.json").read_text())["modalities"]["image"]["lora"] is None
