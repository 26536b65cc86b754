"""Tensor-parallel plans for the low-rank factors of DAMC's routed projections (no vLLM import).

vLLM's Transformers backend gives every `nn.Linear` the style of the first `tp_plan` pattern that `re.match`es its
qualified name. A routed projection `q_proj` holds `q_proj.base_layer`, `q_proj.lora_A` (`(R, in)`) and `q_proj.lora_B`
(`(out, R)`), and the text model's pattern for `q_proj` matches all three, which would split both factors like the
projection. The delta `((x @ A.T) * mask) @ B.T` needs:

- column-parallel projection (input whole, output split): A replicated (the low-rank hidden whole on every rank, as
  the mask is), B split by output rows like the base weight;
- row-parallel projection (input split, output reduced): A split by input columns (its partial products are reduced
  into the whole low-rank hidden), B replicated (every rank adds the whole delta to the reduced output).
"""

import re


FACTOR_STYLES = {
    "colwise": {"lora_A": "replicate", "lora_B": "colwise"},
    "rowwise": {"lora_A": "rowwise", "lora_B": "replicate"},
}


def routed_factor_tp_plan(tp_plan: dict[str, str], routed_projections: list[str]) -> dict[str, str]:
    """`tp_plan` with a pattern for each factor of the `routed_projections` (qualified names as in the plan, e.g.
    `model.language_model.layers.0.self_attn.q_proj`), placed before the plan's own patterns so that they match
    first. Raises ValueError naming the projection when its style has no known factor split (or no pattern matches
    it: it would be replicated while its neighbours are split)."""
    factor_plan: dict[str, str] = {}
    for name in routed_projections:
        pattern = next((pattern for pattern in tp_plan if re.match(pattern, name)), None)
        style = tp_plan.get(pattern)
        if style not in FACTOR_STYLES:
            raise ValueError(
                f"Tensor parallelism: the routed projection {name} has tensor-parallel style {style!r} in the text "
                f"model's tp_plan, and DAMC's low-rank factors are split only for {sorted(FACTOR_STYLES)}; serve this "
                "composite with tensor_parallel_size=1."
            )
        for factor, factor_style in FACTOR_STYLES[style].items():
            factor_plan[re.escape(f"{name}.{factor}")] = factor_style
    return {**factor_plan, **tp_plan}
