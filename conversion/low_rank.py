"""Rank-r factors of a dense delta (a full fine-tune's `W_i - W0`), for the routed layers of `method: routed`.

`truncated_svd(delta, rank)` gives `A` `(rank, in)` and `B` `(out, rank)` with `B @ A` the best rank-r approximation
of `delta` in Frobenius norm (Eckart-Young), the singular values folded into `B`, and the energy it keeps. Where
`rank` is small next to the matrix, a randomized SVD (a seeded Gaussian range finder with power iterations, Halko,
Martinsson and Tropp 2011) replaces the full one: it costs a few `rank`-wide products with the matrix instead of a
cubic factorization (measured in `benchmarks/README.md`). Both return `B @ A = P delta` for an orthogonal projection
`P` onto `rank` directions, so the energy kept, `|B A|^2 / |delta|^2`, is also `1 - |delta - B A|^2 / |delta|^2`. At
`rank >= min(out, in)` the full SVD is used and `B @ A` equals `delta` up to float rounding.
"""

from dataclasses import dataclass

import torch


# The randomized SVD samples this many directions beyond the rank, and refines them this many times.
_OVERSAMPLE = 8
_POWER_ITERATIONS = 2
# Below this fraction of the smaller side the randomized SVD is used; above it the full SVD costs about as much.
_RANDOMIZED_BELOW = 0.25


@dataclass
class Factors:
    """`B @ A` approximates a delta; `kept` and `total` are the squared Frobenius norms of `B @ A` and of the delta."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    kept: float
    total: float


def truncated_svd(delta: torch.Tensor, rank: int, seed: int = 0) -> Factors:
    """The rank-`rank` factors of `delta` (float32), zero-padded to `rank` rows of `A` / columns of `B` where the
    matrix has fewer; deterministic for a given `seed`."""
    delta = delta.float()
    out_features, in_features = delta.shape
    total = float(delta.square().sum())
    kept_rank = min(rank, out_features, in_features)
    if kept_rank + _OVERSAMPLE < _RANDOMIZED_BELOW * min(out_features, in_features):
        left, values, right = _randomized_svd(delta, kept_rank, seed)
    else:
        left, values, right = torch.linalg.svd(delta, full_matrices=False)
    left, values, right = left[:, :kept_rank], values[:kept_rank], right[:kept_rank]
    lora_a = torch.zeros(rank, in_features)
    lora_b = torch.zeros(out_features, rank)
    lora_a[:kept_rank] = right
    lora_b[:, :kept_rank] = left * values
    return Factors(lora_a, lora_b, float(values.square().sum()), total)


def _randomized_svd(matrix: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`U, S, Vh` of `Q Q^T matrix` for an orthonormal `Q` spanning `rank + oversampling` directions of the matrix's
    range (so the best rank-r part of it is an orthogonal projection of `matrix`)."""
    generator = torch.Generator().manual_seed(seed)
    sketch = torch.randn(matrix.shape[1], rank + _OVERSAMPLE, generator=generator)
    basis, _ = torch.linalg.qr(matrix @ sketch)
    for _ in range(_POWER_ITERATIONS):
        # Re-orthonormalized each time: plain powers of the matrix would lose the smaller directions to rounding.
        basis, _ = torch.linalg.qr(matrix.T @ basis)
        basis, _ = torch.linalg.qr(matrix @ basis)
    small_left, values, right = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ small_left, values, right
