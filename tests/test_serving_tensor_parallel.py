"""The tensor-parallel plan the vLLM plugin gives DAMC's low-rank factors (`serving.tensor_parallel`), checked without
vLLM: which style each module gets (first matching pattern, as vLLM's Transformers backend picks it), and that two
simulated ranks computing a routed projection with those splits reproduce the unsplit projection."""

import re
from types import SimpleNamespace

import pytest
import torch

from fixtures.tiny_composite import build_tiny_composite
from serving.modalities import modality_keys
from serving.tensor_parallel import routed_factor_tp_plan


def _style(plan: dict[str, str], name: str) -> str:
    """The style vLLM's Transformers backend gives the linear `name`: the first pattern that `re.match`es."""
    pattern = next((pattern for pattern in plan if re.match(pattern, name)), None)
    return plan.get(pattern, "replicate")


@pytest.fixture(scope="module")
def damc():
    model, _ = build_tiny_composite(kinds=("image", "audio"))
    return model


def _routed_names(model) -> list[str]:
    """The routed projections, named relative to the composite's base model (as the plugin names them)."""
    return [name for name, module in model.model.named_modules() if hasattr(module, "delta_factors")]


def test_factor_styles_follow_their_projection(damc):
    # As the plugin does: the base model's plan and names; the backend then prefixes every pattern and name with
    # "model." before matching.
    routed = _routed_names(damc)
    plan = {f"model.{pattern}": style for pattern, style in damc.model.tp_plan.items()}
    factored = routed_factor_tp_plan(damc.model.tp_plan, routed)
    factored = {f"model.{pattern}": style for pattern, style in factored.items()}
    for name in (f"model.{name}" for name in routed):
        projection_style = _style(plan, name)
        styles = {part: _style(factored, f"{name}.{part}") for part in ("base_layer", "lora_A", "lora_B")}
        if projection_style == "colwise":
            assert styles == {"base_layer": "colwise", "lora_A": "replicate", "lora_B": "colwise"}, name
        else:
            assert projection_style == "rowwise", name
            assert styles == {"base_layer": "rowwise", "lora_A": "rowwise", "lora_B": "replicate"}, name
    # A layer's factor patterns match that layer only (layer 1's would otherwise catch layer 10's and replicate it).
    assert _style(factored, "model.language_model.layers.10.self_attn.q_proj.lora_A") == "colwise"
    # Without the factor patterns, the projection's pattern would split both factors like the projection.
    assert _style(plan, f"model.{routed[0]}.lora_A") == _style(plan, f"model.{routed[0]}")


def test_unplannable_projection_is_refused(damc):
    routed = _routed_names(damc)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=1"):
        routed_factor_tp_plan({}, routed)
    with pytest.raises(ValueError, match=re.escape(routed[0])):
        routed_factor_tp_plan({".*": "colwise_gather_output"}, routed)


def _split(weight: torch.Tensor, style: str, rank: int, dim_out: bool) -> torch.Tensor:
    return weight.chunk(2, dim=0 if dim_out else 1)[rank] if style != "replicate" else weight


@pytest.mark.parametrize("projection_style", ["colwise", "rowwise"])
def test_two_ranks_reproduce_the_routed_projection(projection_style):
    """`base(x) + ((x @ A.T) * mask) @ B.T` with the weights split across two ranks as the plan says (colwise: split
    outputs, gathered; rowwise: split inputs, partial outputs summed), equal to the unsplit computation."""
    generator = torch.Generator().manual_seed(0)
    rows, width_in, width_out, rank = 5, 16, 12, 6
    x = torch.randn(rows, width_in, generator=generator)
    base = torch.randn(width_out, width_in, generator=generator)
    factor_a = torch.randn(rank, width_in, generator=generator)
    factor_b = torch.randn(width_out, rank, generator=generator)
    mask = torch.randn(rows, rank, generator=generator)
    expected = x @ base.T + ((x @ factor_a.T) * mask) @ factor_b.T

    name = "model.language_model.layers.0.proj"
    plan = routed_factor_tp_plan({"model.language_model.layers.*.proj": projection_style}, [name])
    style_a, style_b = _style(plan, f"{name}.lora_A"), _style(plan, f"{name}.lora_B")
    if projection_style == "colwise":
        # Column-parallel: every rank has the whole input and computes its slice of the outputs.
        slices = []
        for shard in range(2):
            hidden = x @ _split(factor_a, style_a, shard, dim_out=True).T
            output = x @ base.chunk(2, dim=0)[shard].T + (hidden * mask) @ _split(factor_b, style_b, shard, True).T
            slices.append(output)
        result = torch.cat(slices, dim=1)
    else:
        # Row-parallel: every rank has a slice of the inputs; the outputs (and A's partial products) are all-reduced.
        inputs = x.chunk(2, dim=1)
        hidden = sum(inputs[shard] @ _split(factor_a, style_a, shard, dim_out=False).T for shard in range(2))
        base_output = sum(inputs[shard] @ base.chunk(2, dim=1)[shard].T for shard in range(2))
        result = base_output + (hidden * mask) @ _split(factor_b, style_b, 0, dim_out=False).T
    torch.testing.assert_close(result, expected)


def test_modality_keys():
    entry = lambda kind: SimpleNamespace(kind=kind)  # noqa: E731
    assert modality_keys({"vision": entry("image"), "audio": entry("audio"), "point": entry("point")}) == {
        "image": "vision",
        "audio": "audio",
        "point": "point",
    }
    assert modality_keys({"image": entry("image"), "chart": entry("image"), "clip": entry("video")}) == {
        "image": "image",
        "chart": "chart",
        "video": "clip",
    }
    with pytest.raises(ValueError, match="rename one of them"):
        modality_keys({"image": entry("point"), "photo": entry("image")})
