"""Merge rules for the dense text deltas (task vectors) of several source models, one tensor at a time.

Every source LLM was fine-tuned from the same base weight `W0`; source i changes one tensor by the dense delta
`d_i = W_i - W0` (for a LoRA source, the product `B_i @ A_i` times its scaling: merging must happen on products, since
averaging the factors separately gives a different, wrong, matrix). `merge_deltas` combines the `d_i` of one tensor
with per-source weights `w_i` (the recipe's `λ_i`) into the single delta added to `W0`:

- ``linear`` (task arithmetic, Ilharco et al. 2023): ``merged = Σ_i w_i d_i``. Weights are absolute and may be
  negative (task negation).
- ``ties`` (TIES-merging, Yadav et al. 2023):

  1. trim: each `d_i` keeps its `k = max(1, round(density * numel))` entries of largest magnitude (exactly `k`,
     chosen by `torch.topk`; Python's `round`), the others become 0, giving `t_i`;
  2. elect a sign per entry: ``γ = sign(Σ_i w_i t_i)``;
  3. disjoint weighted mean over the sources that agree with it, i.e. whose `t_i` entry is non-zero and has sign `γ`:
     ``merged = Σ_i w_i t_i [agree_i] / Σ_i w_i [agree_i]``, and 0 where no source agrees (including `γ = 0`).

  With equal weights this is TIES' disjoint mean. Because of the division, the weights act as *relative* weights
  (like mergekit with ``normalize: true``): scaling them all by one factor does not change the result. They must be
  >= 0 (a negative weight would flip the meaning of the sign election and can make the denominator vanish).
- ``dare_linear`` (DARE, Yu et al. 2024): each source independently drops every entry with probability
  `1 - density` and multiplies the kept entries by `1 / density` (so the expected delta is unchanged), then
  ``linear``.
- ``dare_ties``: DARE drop and rescale (instead of the magnitude trim), then TIES' sign election and disjoint weighted
  mean (steps 2 and 3 above); weights are relative and >= 0 as in ``ties``.

A source that does not change the tensor passes ``None``: it counts as a zero delta (in TIES it never agrees, so it
does not pull the mean towards 0). Everything is computed in float32 and the result is float32, whatever the
inputs' dtype.

DARE's randomness is reproducible and independent of call order: source `i`'s drop mask comes from its own
`torch.Generator` (on the CPU, whatever the tensor's device) seeded with ``zlib.crc32(f"{seed}:{name}:{i}")``, a
stable hash (Python's `hash()` of a string changes with `PYTHONHASHSEED`). `i` is the source's position in the list,
`None` entries included, so the mask of a source does not change when another source changes or is absent. Same
inputs, same output, bit for bit.
"""

import math
import zlib
from collections.abc import Sequence

import torch

from .errors import ConversionError


MERGE_RULES = ("linear", "ties", "dare_linear", "dare_ties")
_RULES_WITH_DENSITY = ("ties", "dare_linear", "dare_ties")
_SIGN_ELECTION_RULES = ("ties", "dare_ties")


def merge_deltas(
    deltas: Sequence[torch.Tensor | None],
    weights: Sequence[float],
    rule: str = "linear",
    *,
    density: float = 1.0,
    seed: int = 0,
    name: str = "",
) -> torch.Tensor | None:
    """Merge the dense deltas of one tensor from several sources with one of `MERGE_RULES` (see the module docstring).

    Args:
        deltas: one per source; None when that source does not change the tensor (a zero delta). All the tensors must
            have the same shape.
        weights: the weight `λ_i` of each source, same length as `deltas`. Absolute for ``linear``/``dare_linear``;
            relative and >= 0 for ``ties``/``dare_ties``.
        rule: one of `MERGE_RULES`.
        density: for ``ties``, the fraction of entries each delta keeps after trimming; for ``dare_*``, the probability
            of keeping each entry. 0 < density <= 1; ignored by ``linear``.
        seed: DARE's seed (with `name` and the source's index, it seeds that source's drop mask).
        name: the tensor's name, used in error messages and mixed into DARE's per-tensor seed so that tensors of the
            same shape do not share one mask.

    Returns:
        The merged delta as a new float32 tensor (never one of the inputs), or None when every delta is None.

    Raises:
        ConversionError (a ValueError): an unknown rule, a bad density, seed or weight, a length mismatch between
            `deltas` and `weights`, no sources at all, or deltas of different shapes.
    """
    _check_rule(rule)
    if rule in _RULES_WITH_DENSITY:
        _check_density(density, rule)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConversionError(f"merge seed must be an integer, got {seed!r}")
    if len(deltas) != len(weights):
        raise ConversionError(
            f"tensor {name!r}: {len(deltas)} deltas but {len(weights)} weights; give exactly one weight per source"
        )
    if not deltas:
        raise ConversionError(f"tensor {name!r}: no sources to merge; give at least one delta (None for no change)")
    weights = [_check_weight(weight, index, rule, name) for index, weight in enumerate(weights)]

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
    if rule == "ties" and density < 1.0:
        sources = [(index, weight, _trim_to_top_k(delta, density)) for index, weight, delta in sources]
    elif rule in ("dare_linear", "dare_ties") and density < 1.0:
        sources = [
            (index, weight, _drop_and_rescale(delta, density, _dare_generator(seed, name, index)))
            for index, weight, delta in sources
        ]

    if rule in _SIGN_ELECTION_RULES:
        return _elect_sign_and_disjoint_mean(sources)
    merged = torch.zeros_like(sources[0][2])
    for _, weight, delta in sources:
        merged.add_(delta, alpha=weight)
    return merged


def _check_rule(rule: str) -> None:
    if rule not in MERGE_RULES:
        raise ConversionError(f"unknown merge rule {rule!r}; use one of {', '.join(MERGE_RULES)}")


def _check_density(density: float, rule: str) -> None:
    # `not 0 < density` also rejects NaN.
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConversionError(
            f"merge rule {rule!r}: density must be a number with 0 < density <= 1 (the fraction of entries kept), "
            f"got {density!r}"
        )


def _check_weight(weight: float, index: int, rule: str, name: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ConversionError(f"tensor {name!r}: the weight of source {index} must be a finite number, got {weight!r}")
    if rule in _SIGN_ELECTION_RULES and weight < 0:
        raise ConversionError(
            f"tensor {name!r}: merge rule {rule!r} takes relative weights >= 0, but source {index} has weight "
            f"{weight!r}; use 'linear' or 'dare_linear' to subtract a task vector"
        )
    return float(weight)


def _trim_to_top_k(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep exactly the `max(1, round(density * numel))` entries of largest magnitude, zero the rest."""
    flat = delta.reshape(-1)
    if flat.numel() == 0:
        return delta.clone()
    keep = min(flat.numel(), max(1, round(density * flat.numel())))
    # topk keeps exactly `keep` entries even when magnitudes tie, unlike a threshold on the k-th value.
    indices = flat.abs().topk(keep, sorted=False).indices
    trimmed = torch.zeros_like(flat)
    trimmed[indices] = flat[indices]
    return trimmed.reshape(delta.shape)


def _dare_generator(seed: int, name: str, index: int) -> torch.Generator:
    """The generator of source `index`'s drop mask for tensor `name`: a stable hash, not Python's salted `hash()`."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(zlib.crc32(f"{seed}:{name}:{index}".encode()))
    return generator


def _drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, scaled by `1 / density` so that the expectation is kept."""
    # The mask is drawn on the CPU so that it is the same whatever device the delta lives on.
    kept = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    return torch.where(kept.to(delta.device), delta / density, torch.zeros((), dtype=delta.dtype, device=delta.device))


def _elect_sign_and_disjoint_mean(sources: list[tuple[int, float, torch.Tensor]]) -> torch.Tensor:
    """TIES' sign election and disjoint weighted mean over the (already trimmed or dropped) deltas."""
    elected = torch.zeros_like(sources[0][2])
    for _, weight, delta in sources:
        elected.add_(delta, alpha=weight)
    elected = torch.sign(elected)
    numerator = torch.zeros_like(elected)
    denominator = torch.zeros_like(elected)
    for _, weight, delta in sources:
        # A zero entry (trimmed, dropped or never changed) never agrees, even where the elected sign is 0.
        agrees = (torch.sign(delta) == elected) & (delta != 0)
        numerator.add_(torch.where(agrees, delta, 0.0), alpha=weight)
        denominator.add_(agrees.to(denominator.dtype), alpha=weight)
    # Where no source agrees the numerator is 0 too; dividing by 1 there gives the documented 0 (and no 0/0 NaN).
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
