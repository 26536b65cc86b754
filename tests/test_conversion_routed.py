"""`method: routed`: each modality's tokens use their own source's whole delta, text tokens the merged one. Checked
against plain transformers LLMs built here from the source files: exact for LoRA sources, and for full fine-tunes an
error that shrinks with `rank` and vanishes at full rank."""

import collections
import json
import logging
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conversion import ConversionError, compose
from conversion.low_rank import truncated_svd
from conversion.tensors import TensorStore
from modeling_composite import CompositeMLLMForCausalLM, CompositeMLLMProcessor


def _adapter(folder) -> dict[str, torch.Tensor]:
    return torch.load(folder / "adapter_model.bin", weights_only=True)


def _lora_deltas(folder, adapter: str, weight: float) -> dict[str, torch.Tensor]:
    """`weight * s B A` per module of a paper-format (modelcompose) source's adapter."""
    state = _adapter(folder)
    config = json.loads((folder / "config.json").read_text())
    scale = config["lora_alpha"] / config["lora_r"]
    modules = {key.split(".lora_")[0] for key in state if f".lora_A.{adapter}." in key}
    return {
        m: weight * scale * state[f"{m}.lora_B.{adapter}.weight"] @ state[f"{m}.lora_A.{adapter}.weight"]
        for m in modules
    }


def _plain_llm(base, state_changes: dict[str, torch.Tensor], add: bool = True) -> torch.nn.Module:
    """The base LLM (plain transformers) with tensors changed: `key.weight += delta` (`add`), or replaced."""
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    state = model.state_dict()
    for key, value in state_changes.items():
        name = key if key.endswith(".weight") or key in state else f"{key}.weight"
        state[name] = state[name] + value if add else value.clone()
    model.load_state_dict(state)
    return model


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))


def _modality_hidden_states(model, processor, placeholder: str, reference) -> tuple[torch.Tensor, torch.Tensor]:
    """The composite's and `reference`'s last hidden states on the positions of one input placed first in the
    prompt: they attend only to each other, so they must be what an LLM with that modality's weights makes of the
    same input embeddings (taken from the composite, so that only the LLM's weights are compared)."""
    batch = processor(text=f"{placeholder} What is it?", images=[_image()], add_special_tokens=False)
    captured = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        got = model(**batch, output_hidden_states=True).hidden_states[-1]
    hook.remove()
    name = placeholder.strip("<>")
    positions = int((batch["input_ids"][0] == model.config.modalities[name].placeholder_id).sum())
    assert batch["input_ids"][0, :positions].eq(model.config.modalities[name].placeholder_id).all()
    with torch.no_grad():
        expected = reference.model(inputs_embeds=captured["embeds"][:, :positions]).last_hidden_state
    return got[:, :positions], expected


def _text_logits(model, processor, reference) -> tuple[torch.Tensor, torch.Tensor]:
    batch = processor(text="USER: Which colour is the sky? ASSISTANT:")
    with torch.no_grad():
        expected = reference(**batch).logits
        got = model(**batch).logits
    # The base vocabulary: placeholder rows come from their own sources.
    vocab = min(entry.placeholder_id for entry in model.config.modalities.values())
    return got[..., :vocab], expected[..., :vocab]


def _load(output):
    model = CompositeMLLMForCausalLM.from_pretrained(output).eval()
    return model, CompositeMLLMProcessor.from_pretrained(output), output


@pytest.fixture(scope="module")
def lora_routed(tiny_sources, tmp_path_factory):
    """A LoRA source without modality parameters (paper NaiveMC: image) and a decoupled one (paper DAMC: chart)."""
    sources = (tiny_sources["paper_naive"], tiny_sources["paper_damc_a"])
    recipe = {
        "method": "routed",
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
    output = compose(recipe, tmp_path_factory.mktemp("routed") / "out", verify=False)
    return _load(output)


def test_lora_sources_route_exactly(lora_routed, tiny_sources):
    model, processor, output = lora_routed
    naive, damc = tiny_sources["paper_naive"], tiny_sources["paper_damc_a"]
    # Text tokens: the merged text deltas.
    merged = _lora_deltas(naive, "default", 0.5)
    for key, delta in _lora_deltas(damc, "default", 0.25).items():
        merged[key] = merged[key] + delta
    torch.testing.assert_close(
        *_text_logits(model, processor, _plain_llm(tiny_sources["base"], merged)), rtol=1e-4, atol=1e-5
    )
    # Image tokens: the NaiveMC source's whole delta (λ does not apply), as in that source.
    got, expected = _modality_hidden_states(
        model, processor, "<image>", _plain_llm(tiny_sources["base"], _lora_deltas(naive, "default", 1.0))
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # Chart tokens: the decoupled source's own modality LoRA, as DAMC gives them.
    got, expected = _modality_hidden_states(
        model, processor, "<chart>", _plain_llm(tiny_sources["base"], _lora_deltas(damc, "vision", 1.0))
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    composition = json.loads((output / "config.json").read_text())["composition"]
    assert composition["method"] == "routed"
    assert composition["routing"]["modalities"] == {
        "image": {"source": 0, "delta": "source_lora", "rank": 4},
        "chart": {"source": 1, "delta": "modality_lora", "rank": 4},
    }
    assert composition["routing"]["text"] == {"rank": 8, "energy_kept": 1.0}
    assert [(s["rank"], s["energy_kept"]) for s in composition["sources"]] == [(4, 1.0), (None, None)]


def _llava_llm(folder) -> dict[str, torch.Tensor]:
    """The LLM tensors of a transformers-v5 LLaVA checkpoint, named as in the base causal LM."""
    state = load_file(str(folder / "model.safetensors"))
    llm = {
        f"model.{key[len('model.language_model.') :]}": value
        for key, value in state.items()
        if key.startswith("model.language_model.")
    }
    llm["lm_head.weight"] = state["lm_head.weight"]
    return llm


def _routed_llavas(tiny_sources, folder, rank: int):
    recipe = {
        "method": "routed",
        "base": str(tiny_sources["base"]),
        "rank": rank,
        "sources": [
            {"path": str(tiny_sources["llava"]), "weight": 0.5},
            {"path": str(tiny_sources["llava_2"]), "weight": 0.5, "rename": {"image": "chart"}},
        ],
    }
    return _load(compose(recipe, folder, verify=False))


def test_full_fine_tunes_converge_to_their_source_as_rank_grows(tiny_sources, tmp_path):
    """Two LLaVA full fine-tunes: image tokens must see the first source's projections (`W0 + T_1`) beside the merged
    norms, embeddings and LM head (those are not routed); text tokens see the NaiveMC merge exactly at every rank."""
    first, second = _llava_llm(tiny_sources["llava"]), _llava_llm(tiny_sources["llava_2"])
    base = AutoModelForCausalLM.from_pretrained(tiny_sources["base"]).state_dict()
    merged = {key: (first[key][: value.shape[0]] + second[key][: value.shape[0]]) / 2 for key, value in base.items()}
    text_reference = _plain_llm(tiny_sources["base"], merged, add=False)
    projections = {key: first[key] for key in base if key.endswith("_proj.weight")}
    image_reference = _plain_llm(tiny_sources["base"], {**merged, **projections}, add=False)
    errors, energies = [], []
    for rank in (1, 4, 16, 64):
        model, processor, output = _routed_llavas(tiny_sources, tmp_path / f"rank-{rank}", rank)
        torch.testing.assert_close(*_text_logits(model, processor, text_reference), rtol=1e-4, atol=1e-5)
        got, expected = _modality_hidden_states(model, processor, "<image>", image_reference)
        errors.append(float((got - expected).norm() / expected.norm()))
        composition = json.loads((output / "config.json").read_text())["composition"]
        energies.append(
            [source["energy_kept"] for source in composition["sources"]]
            + [composition["routing"]["text"]["energy_kept"]]
        )
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[3] < 1e-5, errors  # full rank (64, the width): the source itself
    for column in zip(*energies):
        assert all(a < b for a, b in zip(column[:3], column[1:3])) and column[3] == pytest.approx(1.0, abs=1e-6)
    card = (output / "README.md").read_text()
    assert "**routing**" in card and "## Routing" in card and "| 64 | 100.0% |" in card


@pytest.mark.parametrize("rule", ["linear", "ties"])
def test_a_projection_is_merged_once_for_its_weight_and_its_factors(tiny_sources, tmp_path, rule):
    """The routed factors of full fine-tunes need each projection's merge (the text block's energy, or its SVD under
    ties): it is the one the base weight was written from, so each source's tensor is read twice, for the merge and
    for its own SVD, not a third time; and the base weights are the NaiveMC composite's, bit for bit, in bfloat16."""
    sources = [
        {"path": str(tiny_sources["llava"])},
        {"path": str(tiny_sources["llava_2"]), "rename": {"image": "chart"}},
    ]
    merge = {"rule": rule, "density": 0.5} if rule == "ties" else {"rule": rule}
    recipe = {"base": str(tiny_sources["base"]), "dtype": "bfloat16", "merge": merge, "sources": sources}
    naive = load_file(compose(recipe, tmp_path / "naive", verify=False) / "model.safetensors")
    reads = collections.Counter()
    original_get = TensorStore.get

    def counted_get(store, key, record=True):
        reads[store.label, key] += 1
        return original_get(store, key, record)

    with mock.patch.object(TensorStore, "get", counted_get):
        output = compose({**recipe, "method": "routed", "rank": 8}, tmp_path / "routed", verify=False)
    routed = load_file(output / "model.safetensors")
    projections = [key for key in routed if ".base_layer." in key]
    assert projections
    for key in projections:
        plain = key.replace(".base_layer.", ".")
        assert routed[key].dtype == torch.bfloat16 and torch.equal(routed[key], naive[plain]), key
    source_reads = {(label, key): count for (label, key), count in reads.items() if key.endswith("_proj.weight")}
    assert source_reads and max(source_reads.values()) == 2, source_reads


def test_a_ties_merge_routes_through_the_svd_of_the_merged_delta(tiny_sources, tmp_path):
    """ties is no combination of the deltas: the text block is the truncated SVD of the merged delta. At full rank,
    text tokens match the NaiveMC ties composite and image tokens the first source's projections."""
    sources = [
        {"path": str(tiny_sources["llava"])},
        {"path": str(tiny_sources["llava_2"]), "rename": {"image": "chart"}},
    ]
    recipe = {"base": str(tiny_sources["base"]), "merge": {"rule": "ties", "density": 0.5}, "sources": sources}
    naive = CompositeMLLMForCausalLM.from_pretrained(compose(recipe, tmp_path / "naive", verify=False)).eval()
    model, processor, output = _load(
        compose({**recipe, "method": "routed", "rank": 64}, tmp_path / "routed", verify=False)
    )
    batch = processor(text="USER: Which colour is the sky? ASSISTANT:")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, naive(**batch).logits, rtol=1e-4, atol=1e-5)
    merged = {
        f"model.{key}": value
        for key, value in naive.model.language_model.state_dict().items()
        if "embed_tokens" not in key
    }
    first = _llava_llm(tiny_sources["llava"])
    projections = {key: value for key, value in first.items() if key.endswith("_proj.weight")}
    got, expected = _modality_hidden_states(
        model, processor, "<image>", _plain_llm(tiny_sources["base"], {**merged, **projections}, add=False)
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    composition = json.loads((output / "config.json").read_text())["composition"]
    assert composition["routing"]["text"]["rank"] == 64  # 64 + 64, capped at the layers' full rank
    assert composition["routing"]["text"]["energy_kept"] == pytest.approx(1.0, abs=1e-6)


def test_truncated_svd_is_optimal_and_exact_at_full_rank():
    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(96, 48, generator=generator))[0]
    right = torch.randn(48, 80, generator=generator)
    spectrum = 0.7 ** torch.arange(48, dtype=torch.float32)
    matrix = (left * spectrum) @ torch.linalg.qr(right.T)[0].T  # singular values 0.7^k
    exact = torch.linalg.svdvals(matrix)
    for rank in (2, 5):  # the randomized path (rank + 8 < 48 / 4 is false for 5: the full SVD)
        factors = truncated_svd(matrix, rank)
        best = float(exact[:rank].square().sum())
        assert factors.kept == pytest.approx(best, rel=1e-4)
        residual = float((matrix - factors.lora_b @ factors.lora_a).square().sum())
        assert residual == pytest.approx(factors.total - factors.kept, rel=1e-3, abs=1e-6)
    factors = truncated_svd(matrix, 64)  # beyond full rank: zero-padded
    assert factors.lora_a.shape == (64, 80) and factors.lora_b.shape == (96, 64)
    torch.testing.assert_close(factors.lora_b @ factors.lora_a, matrix, rtol=0, atol=1e-5)


def test_truncated_svd_takes_the_randomized_path_reproducibly():
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(200, 8, generator=generator) @ torch.randn(8, 160, generator=generator)
    matrix += 1e-3 * torch.randn(200, 160, generator=generator)
    first, again = truncated_svd(matrix, 8, seed=3), truncated_svd(matrix, 8, seed=3)
    assert torch.equal(first.lora_a, again.lora_a)
    # The full SVD ignores the seed: another seed draws another sketch, so other rounding.
    assert not torch.equal(first.lora_a, truncated_svd(matrix, 8, seed=4).lora_a)
    assert first.kept == pytest.approx(float(torch.linalg.svdvals(matrix)[:8].square().sum()), rel=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rank": None}, "is a full fine-tune (llava): method routed gives its modality tokens a rank-r truncated"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": "8"}, "rank must be a positive integer"),
        ({"rank": True}, "rank must be a positive integer"),
        ({"method": "naive"}, "`rank` only applies to method routed"),
        ({"method": "damc"}, "`rank` only applies to method routed"),
    ],
)
def test_routed_recipes_are_refused_with_the_fix(tiny_sources, tmp_path, change, message):
    recipe = {
        "method": "routed",
        "base": str(tiny_sources["base"]),
        "rank": 8,
        "sources": [str(tiny_sources["llava"])],
    }
    recipe.update(change)
    recipe = {key: value for key, value in recipe.items() if value is not None}
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compose(recipe, tmp_path / "out", verify=False)
    assert not (tmp_path / "out").exists()


def test_a_rank_on_a_lora_is_refused_and_an_unused_default_is_said(tiny_sources, tmp_path, caplog):
    lora = {"path": str(tiny_sources["paper_naive"]), "encoder": str(tiny_sources["clip"])}
    base = {"method": "routed", "base": str(tiny_sources["base"])}
    with pytest.raises(ConversionError, match=r"sources\[0\]\.rank: .* is a LoRA \(rank 4\).*remove it"):
        compose({**base, "sources": [{**lora, "rank": 4}]}, tmp_path / "a", verify=False)
    # The recipe's `rank` is a default for full fine-tunes: with none among the sources it is unused, and said so.
    with caplog.at_level(logging.WARNING, logger="conversion.routed"):
        compose({**base, "rank": 4, "sources": [lora]}, tmp_path / "b", verify=False)
    assert "the recipe's `rank` (4) applies to full fine-tunes" in caplog.text
    assert (tmp_path / "b" / "config.json").is_file()


def test_every_source_format_routes(tiny_sources, tmp_path, lora_routed):
    """Video-LLaVA (two modalities share one delta), Qwen2-Audio, PEFT and a composite of ours are accepted; the
    composite loads in a fresh process through the auto classes (verify)."""
    video = compose(
        {
            "method": "routed",
            "base": str(tiny_sources["base"]),
            "sources": [
                {"path": str(tiny_sources["video_llava"]), "rank": 8},
                {
                    "path": str(tiny_sources["peft"]),
                    "encoder": str(tiny_sources["clip"]),
                    "kind": "image",
                    "rename": {"image": "photo"},
                },
            ],
        },
        tmp_path / "video",
        verify=True,
    )
    config = json.loads((video / "config.json").read_text())
    assert {name: entry["lora"]["r"] for name, entry in config["modalities"].items()} == {
        "image": 8,
        "video": 8,
        "photo": 4,
    }
    assert config["text_lora"]["r"] == 8 + 4 and config["lora_layout"] == "stacked"
    state = load_file(str(video / "model.safetensors"))
    factor = state["model.language_model.layers.0.self_attn.q_proj.lora_A.weight"]
    # Stacked: text (12), image (8), photo (4), video (8); image and video hold the same factors.
    assert torch.equal(factor[12:20], factor[24:32]) and factor[12:20].abs().sum() > 0
    audio = compose(
        {
            "method": "routed",
            "base": str(tiny_sources["qwen2_base"]),
            "rank": 4,
            "sources": [str(tiny_sources["qwen2_audio"])],
        },
        tmp_path / "audio",
        verify=False,
    )
    assert json.loads((audio / "config.json").read_text())["modalities"]["audio"]["lora"] == {"r": 4, "alpha": 4.0}
    _, _, routed = lora_routed
    again = compose(
        {"method": "routed", "base": str(tiny_sources["base"]), "sources": [{"path": str(routed), "weight": 1.0}]},
        tmp_path / "again",
        verify=False,
    )
    config = json.loads((again / "config.json").read_text())
    assert [entry["delta"] for entry in config["composition"]["routing"]["modalities"].values()] == [
        "modality_lora",
        "modality_lora",
    ]


def test_a_composite_whose_text_factors_approximate_its_delta_counts_as_a_full_fine_tune(tiny_sources, tmp_path):
    """A routed composite of a full fine-tune holds factors that keep only part of its merged delta: routed again, it
    is read through its weights (and so needs `rank`), never as if its factors were its delta."""
    first = tmp_path / "first"
    compose(
        {"method": "routed", "base": str(tiny_sources["base"]), "rank": 2, "sources": [str(tiny_sources["llava"])]},
        first,
        verify=False,
    )
    assert json.loads((first / "config.json").read_text())["composition"]["routing"]["text"]["energy_kept"] < 1
    with pytest.raises(ConversionError, match=r"is a full fine-tune \(composite\).*set `rank:`"):
        compose(
            {"method": "routed", "base": str(tiny_sources["base"]), "sources": [str(first)]},
            tmp_path / "again",
            verify=False,
        )
