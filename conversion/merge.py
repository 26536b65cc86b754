"""Merge rules for the dense text deltas (task vectors) of several source models, one tensor at a time, with
mergekit's parameters and conventions (mergekit 0.1.5, `merge_methods/generalized_task_arithmetic.py`, `sparsify.py`).

Every source LLM was fine-tuned from the same base weight `W0`; source i changes one tensor by the dense delta
`d_i = W_i - W0` (for a LoRA source, the product `B_i @ A_i` times its scaling: merging must happen on products, since
averaging the factors separately gives a different, wrong, matrix). `merge_deltas` combines the `d_i` of one tensor
with per-source weights `w_i` (the recipe's `λ_i`) into the single delta added to `W0`, in four steps:

1. sparsify each delta (not ``linear``), giving `t_i`:

   - ``ties`` (TIES-merging, Yadav et al. 2023) trims: `d_i` keeps its `k = floor(density * numel)` entries of largest
     magnitude (exactly `k`, chosen by `torch.topk`; at least 1), the others become 0;
   - ``dare_linear`` / ``dare_ties`` (DARE, Yu et al. 2024) drop: each entry is kept with probability `density`;
   - with ``rescale`` the kept entries are scaled so that `t_i` has the L1 norm of `d_i` (DARE's paper scales by
     `1 / density`, which this equals in expectation); nothing is sparsified or rescaled at density 1;

2. ``ties`` / ``dare_ties`` elect a sign per entry, ``γ = +1 if Σ_i w_i t_i >= 0 else -1`` (an exact tie, a sum of
   0, elects +1), and keep from each source only the entries that agree with it: `sign(w_i t_i) = γ`;
3. sum: ``merged = Σ_i w_i t_i [agree_i]``; with ``normalize``, divide by the weights that contributed,
   ``Σ_i w_i [agree_i]`` (``Σ_i w_i`` without a sign election), where that is not 0;
4. multiply by ``lambda``.

``linear`` is task arithmetic (Ilharco et al. 2023), ``Σ_i w_i d_i``, the paper's NaiveMC merge, mergekit's
``task_arithmetic``. Per-rule defaults are mergekit's: ``normalize`` true for ``ties`` (TIES' disjoint mean) and false
for ``linear``, ``dare_linear`` and ``dare_ties``; ``rescale`` true for the DARE rules and false for ``ties``;
``lambda`` 1. Weights may be negative (task negation), except in a sign election with ``normalize`` (a sum of
agreeing weights would no longer be a positive divisor); ``linear`` and ``dare_linear`` with ``normalize`` need
weights that do not sum to 0.

A source that does not change the tensor passes ``None``: a zero delta (it never agrees in a sign election, and its
weight counts in ``normalize``'s sum only for the rules without one, as in mergekit). Everything is computed in float32
and the result is float32, whatever the inputs' dtype.

DARE's randomness is reproducible and independent of call order: source `i`'s drop mask comes from its own
`torch.Generator` (on the CPU, whatever the tensor's device) seeded with ``zlib.crc32(f"{seed}:{name}:{i}")``, a
stable hash (Python's `hash()` of a string changes with `PYTHONHASHSEED`). `i` is the source's position in the list,
`None` entries included, so the mask of a source does not change when another source changes or is absent. Same
inputs, same output, bit for bit.
"""

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ConversionError
from .weighted_sum import WeightedSum


@dataclass(frozen=True)
class MergeRule:
    """One merge rule of the registry `MERGE_RULES`: the steps it takes (see the module docstring) and mergekit's
    defaults for its parameters (its `default_normalize` / `default_rescale` per method).

    - `sparsify`: None (every entry counts), `"trim"` (TIES: the `density` fraction of largest magnitude) or `"drop"`
      (DARE: each entry kept with probability `density`, seeded by `seed`).
    - `elects_sign`: TIES' sign election (only the entries that agree with it are summed).
    - `aliases`: mergekit's other names for the same rule.
    """

    name: str
    sparsify: str | None
    elects_sign: bool
    default_normalize: bool
    default_rescale: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def is_weighted_sum(self) -> bool:
        """Whether the merged delta is `Σ_i w_i d_i`, normalize and lambda folded into the weights (no entry dropped,
        trimmed or sign-elected): a combination of the deltas, so the sources' low-rank factors stacked side by side
        give it exactly (method routed's text block) and the weights can be applied in weight space."""
        return self.sparsify is None and not self.elects_sign

    @property
    def parameters(self) -> tuple[str, ...]:
        """The recipe's `merge:` keys the rule reads besides `rule` (`int8_mask` is accepted and changes nothing)."""
        sparsifying = ("density", "rescale") + (("seed",) if self.sparsify == "drop" else ())
        return (sparsifying if self.sparsify else ()) + ("normalize", "lambda")


MERGE_RULES: dict[str, MergeRule] = {
    rule.name: rule
    for rule in (
        # Task arithmetic: `Σ_i w_i d_i`, the paper's NaiveMC merge (the converter takes it in weight space, one pass
        # over the sources' tensors: `plan._linear_merge`, with normalize and lambda folded into the weights).
        MergeRule("linear", sparsify=None, elects_sign=False, default_normalize=False, aliases=("task_arithmetic",)),
        MergeRule("ties", sparsify="trim", elects_sign=True, default_normalize=True, default_rescale=False),
        MergeRule("dare_linear", sparsify="drop", elects_sign=False, default_normalize=False, default_rescale=True),
        MergeRule("dare_ties", sparsify="drop", elects_sign=True, default_normalize=False, default_rescale=True),
    )
}


def merge_rule(name: str) -> MergeRule | None:
    """The rule of this name or of one of its aliases, or None."""
    for rule in MERGE_RULES.values():
        if name == rule.name or name in rule.aliases:
            return rule
    return None


# Below this, mergekit treats a sum of weights as 0 (and a norm as too small to rescale by).
_EPSILON_SUM = 1e-8
_EPSILON_NORM = 1e-7


def merge_deltas(
    deltas: Sequence[torch.Tensor | None],
    weights: Sequence[float],
    rule: str = "linear",
    *,
    density: float = 1.0,
    seed: int = 0,
    name: str = "",
    normalize: bool | None = None,
    lambda_: float = 1.0,
    rescale: bool | None = None,
) -> torch.Tensor | None:
    """Merge the dense deltas of one tensor from several sources with a rule of `MERGE_RULES` (see the module
    docstring).

    Args:
        deltas: one per source; None when that source does not change the tensor (a zero delta). All the tensors must
            have the same shape.
        weights: the weight `λ_i` of each source, same length as `deltas`.
        rule: one of `MERGE_RULES`.
        density: for ``ties``, the fraction of entries each delta keeps after trimming; for ``dare_*``, the probability
            of keeping each entry. 0 < density <= 1; ignored by ``linear``.
        seed: DARE's seed (with `name` and the source's index, it seeds that source's drop mask).
        name: the tensor's name, used in error messages and mixed into DARE's per-tensor seed so that tensors of the
            same shape do not share one mask.
        normalize: divide by the sum of the weights that contributed (None: the rule's `default_normalize`).
        lambda_: multiplies the merged delta (mergekit's `lambda`).
        rescale: after trimming or dropping, scale each delta back to its L1 norm (None: `default_rescale`; ignored
            by ``linear``).

    Returns:
        The merged delta as a new float32 tensor (never one of the inputs), or None when every delta is None.

    Raises:
        ConversionError (a ValueError): an unknown rule, a bad density, seed, weight or option, a length mismatch
            between `deltas` and `weights`, no sources at all, or deltas of different shapes.
    """
    spec = _check_rule(rule)
    if spec.sparsify:
        _check_density(density, rule)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConversionError(f"merge seed must be an integer, got {seed!r}")
    normalize = spec.default_normalize if normalize is None else normalize
    rescale = spec.default_rescale if rescale is None else rescale
    for option, value in (("normalize", normalize), ("rescale", rescale)):
        if not isinstance(value, bool):
            raise ConversionError(f"merge option {option} must be true or false, got {value!r}")
    if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)) or not math.isfinite(lambda_):
        raise ConversionError(f"merge option lambda must be a finite number, got {lambda_!r}")
    if len(deltas) != len(weights):
        raise ConversionError(
            f"tensor {name!r}: {len(deltas)} deltas but {len(weights)} weights; give exactly one weight per source"
        )
    if not deltas:
        raise ConversionError(f"tensor {name!r}: no sources to merge; give at least one delta (None for no change)")
    weights = [_check_weight(weight, index, spec, normalize, name) for index, weight in enumerate(weights)]

    present = [(index, delta) for index, delta in enumerate(deltas) if delta is not None]
    if not present:
        return None
    shapes = {tuple(delta.shape) for _, delta in present}
    if len(shapes) > 1:
        listed = ", ".join(f"source {index}: {tuple(delta.shape)}" for index, delta in present)
        raise ConversionError(
            f"tensor {name!r}: the sources' deltas have different shapes ({listed}); all sources must be fine-tuned "
            "from the same base model"
        )

    # Detach so that merging never records an autograd graph (and never aliases a source's parameter).
    sources = [(index, weights[index], delta.detach().to(torch.float32)) for index, delta in present]
    if spec.sparsify == "trim" and density < 1.0:
        sources = [(index, weight, _trim_to_top_k(delta, density, rescale)) for index, weight, delta in sources]
    elif spec.sparsify == "drop" and density < 1.0:
        sources = [
            (index, weight, _drop(delta, density, rescale, _dare_generator(seed, name, index)))
            for index, weight, delta in sources
        ]

    if spec.elects_sign:
        merged, divisor = _elect_sign_and_sum(sources)
    else:
        total = WeightedSum(sources[0][2].shape)
        for _, weight, delta in sources:
            total.add(delta, weight)
        merged = total.result(torch.float32)
        # Every source counts, also those that leave this tensor unchanged (mergekit's task vectors of zero).
        divisor = math.fsum(weights)
        if normalize and abs(divisor) < _EPSILON_SUM:
            raise ConversionError(
                f"tensor {name!r}: merge option normalize divides by the sum of the weights, which is 0 "
                f"({weights}); give weights with a non-zero sum or set normalize: false"
            )
    if normalize:
        merged = merged / divisor
    if lambda_ != 1:
        merged = merged * lambda_
    return merged


def _check_rule(rule: str) -> MergeRule:
    if rule not in MERGE_RULES:
        raise ConversionError(f"unknown merge rule {rule!r}; use one of {', '.join(MERGE_RULES)}")
    return MERGE_RULES[rule]


def _check_density(density: float, rule: str) -> None:
    # `not 0 < density` also rejects NaN.
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConversionError(
            f"merge rule {rule!r}: density must be a number with 0 < density <= 1 (the fraction of entries kept), "
            f"got {density!r}"
        )


def _check_weight(weight: float, index: int, rule: MergeRule, normalize: bool, name: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ConversionError(f"tensor {name!r}: the weight of source {index} must be a finite number, got {weight!r}")
    if rule.elects_sign and normalize and weight < 0:
        raise ConversionError(
            f"tensor {name!r}: merge rule {rule.name!r} with normalize divides by the weights of the agreeing "
            f"sources, which must be >= 0, but source {index} has weight {weight!r}; set normalize: false to subtract "
            "a task vector"
        )
    return float(weight)


def _rescaled(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`kept` (the sparsified `delta`) scaled to `delta`'s L1 norm, unless either norm is too small to divide by."""
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < _EPSILON_NORM or after < _EPSILON_NORM:
        return kept
    return kept * (before / after)


def _trim_to_top_k(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """TIES' trim: keep exactly the `max(1, floor(density * numel))` entries of largest magnitude, zero the rest."""
    flat = delta.reshape(-1)
    if flat.numel() == 0:
        return delta.clone()
    keep = max(1, math.floor(density * flat.numel()))
    # topk keeps exactly `keep` entries even when magnitudes tie, unlike a threshold on the k-th value.
    indices = flat.abs().topk(keep, sorted=False).indices
    trimmed = torch.zeros_like(flat)
    trimmed[indices] = flat[indices]
    trimmed = trimmed.reshape(delta.shape)
    return _rescaled(delta, trimmed) if rescale else trimmed


def _dare_generator(seed: int, name: str, index: int) -> torch.Generator:
    """The generator of source `index`'s drop mask for tensor `name`: a stable hash, not Python's salted `hash()`."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(zlib.crc32(f"{seed}:{name}:{index}".encode()))
    return generator


def _drop(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop: keep each entry with probability `density` (then, with `rescale`, restore the L1 norm)."""
    # The mask is drawn on the CPU so that it is the same whatever device the delta lives on.
    kept = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    dropped = torch.where(kept.to(delta.device), delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    return _rescaled(delta, dropped) if rescale else dropped


def _elect_sign_and_sum(sources: list[tuple[int, float, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES' sign election over the weighted (already trimmed or dropped) deltas: the sum of the entries that agree
    with the elected sign, and the sum of their weights (1 where none agrees, so that dividing leaves the 0)."""
    total = torch.zeros_like(sources[0][2])
    for _, weight, delta in sources:
        total.add_(delta, alpha=weight)
    # mergekit's convention: a sum of exactly 0 elects +1 (the sign function would give 0 and keep the base).
    elected = torch.where(total >= 0, 1.0, -1.0)
    merged = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for _, weight, delta in sources:
        # A zero entry (trimmed, dropped or never changed) has sign 0 and never agrees; a negative weight votes with
        # the opposite of its delta's sign.
        agrees = torch.sign(delta * weight) == elected
        merged.add_(torch.where(agrees, delta, 0.0), alpha=weight)
        divisor.add_(agrees.to(divisor.dtype), alpha=weight)
    return merged, torch.where(divisor == 0, torch.ones_like(divisor), divisor)
