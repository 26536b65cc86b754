"""The baselines the benchmarks time must do the work they stand for: the routing benchmark's re-implementation of
the reference scheme, built from the composite's own weights, has to compute what the routed composite computes."""

import torch
from transformers import DynamicCache

from benchmarks.routing_overhead import ReferenceLinear, Shape, _workload, build, run_text_model
from modeling_composite.modeling_composite import CACHE_NAME


SHAPE = Shape(hidden=64, layers=2, tokens=24, modalities=3, rank=4, intermediate=128, head_dim=16)


def _last_hidden(model, embeds, index=None, **kwargs) -> torch.Tensor:
    return run_text_model(model, index, inputs_embeds=embeds, **kwargs).last_hidden_state


def test_reference_scheme_computes_the_routed_composite_on_every_workload():
    models, names, masks = build(SHAPE, torch.float32, torch.device("cpu"))
    embeds = torch.randn(1, SHAPE.tokens, SHAPE.hidden, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for fraction in (0.0, 0.5, 0.9):
            index = _workload(fraction, SHAPE.tokens, names, masks, torch.float32, torch.device("cpu"))
            ours = _last_hidden(models["composite"], embeds, index)
            torch.testing.assert_close(_last_hidden(models["reference"], embeds), ours, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                _last_hidden(models["composite_dense"], embeds, index), ours, rtol=1e-4, atol=1e-5
            )
            if fraction:
                # The modality rows really take their own deltas: the plain LLM gives something else there.
                assert not torch.allclose(_last_hidden(models["plain"], embeds), ours, rtol=1e-3, atol=1e-4)
            else:
                torch.testing.assert_close(_last_hidden(models["plain"], embeds), ours, rtol=1e-4, atol=1e-5)

        # A decode step: the reference, like the paper's code, drops the modality mask once there is a cache.
        masks.value = None
        step = torch.randn(1, 1, SHAPE.hidden, generator=torch.Generator().manual_seed(1))
        steps = {}
        for label in ("composite", "reference"):
            cache = DynamicCache()
            run_text_model(models[label], None, inputs_embeds=embeds, use_cache=True, **{CACHE_NAME: cache})
            steps[label] = _last_hidden(models[label], step, use_cache=True, **{CACHE_NAME: cache})
        torch.testing.assert_close(steps["reference"], steps["composite"], rtol=1e-4, atol=1e-5)


def test_reference_scheme_runs_every_adapter_only_when_the_prompt_has_modality_tokens():
    models, names, masks = build(SHAPE, torch.float32, torch.device("cpu"))
    projection = next(module for module in models["reference"].modules() if isinstance(module, ReferenceLinear))
    hidden = torch.randn(SHAPE.tokens, SHAPE.hidden)
    _workload(0.5, SHAPE.tokens, names, masks, torch.float32, torch.device("cpu"))
    assert len(projection.outputs(hidden)) == len(names) + 1
    _workload(0.0, SHAPE.tokens, names, masks, torch.float32, torch.device("cpu"))
    assert masks.value is None and len(projection.outputs(hidden)) == 1
