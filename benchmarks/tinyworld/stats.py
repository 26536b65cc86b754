"""Statistics for the tiny world's figures: chi-square tests (are the questions' surface features independent of their
answers?) and bootstrap intervals (how much of a figure is noise?). numpy only; every draw is seeded."""

import math
from collections.abc import Callable, Sequence

import numpy as np


def _regularized_upper_gamma(a: float, x: float) -> float:
    """Q(a, x) = Γ(a, x) / Γ(a): a series below a + 1, a continued fraction above (both converge fast there)."""
    if x <= 0:
        return 1.0
    log_prefactor = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        denominator = a
        while abs(term) > abs(total) * 1e-15:
            denominator += 1
            term *= x / denominator
            total += term
        return max(0.0, 1.0 - total * math.exp(log_prefactor))
    # Lentz's method for the continued fraction of Γ(a, x).
    tiny = 1e-300
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    fraction = d
    for index in range(1, 10_000):
        an = -index * (index - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        step = d * c
        fraction *= step
        if abs(step - 1) < 1e-15:
            break
    return math.exp(log_prefactor) * fraction


def chi_square_p_value(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X chi-square distributed with `dof` degrees of freedom."""
    if dof < 1:
        raise ValueError(f"a chi-square test needs at least one degree of freedom, got {dof}")
    return _regularized_upper_gamma(dof / 2, statistic / 2)


def chi_square_uniform(counts: Sequence[int]) -> tuple[float, int, float]:
    """Goodness of fit of `counts` to equal frequencies: (statistic, degrees of freedom, p-value)."""
    observed = np.asarray(counts, dtype=float)
    expected = observed.sum() / len(observed)
    statistic = float(((observed - expected) ** 2 / expected).sum())
    return statistic, len(observed) - 1, chi_square_p_value(statistic, len(observed) - 1)


def chi_square_independence(table: Sequence[Sequence[int]]) -> tuple[float, int, float]:
    """Pearson's test of independence of a contingency table's rows and columns: (statistic, dof, p-value)."""
    observed = np.asarray(table, dtype=float)
    if (observed.sum(axis=0) == 0).any() or (observed.sum(axis=1) == 0).any():
        raise ValueError("every row and column of a contingency table needs at least one count")
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = (observed.shape[0] - 1) * (observed.shape[1] - 1)
    return statistic, dof, chi_square_p_value(statistic, dof)


def bootstrap(
    groups: Sequence[np.ndarray],
    statistic: Callable[[list[np.ndarray]], float],
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(estimate, low, high): `statistic` of the data and its percentile interval under a two-level bootstrap.

    `groups` are independent runs (seeds), each an array whose first axis is questions. A resample draws as many
    groups as there are with replacement, then within each drawn group as many questions with replacement; with one
    group it is the plain bootstrap over questions. Rows of a group are resampled together (a row may hold several
    paired results about one question, such as a composite's and its source's)."""
    if not groups or any(len(group) == 0 for group in groups):
        raise ValueError("bootstrap needs at least one group, each with at least one question")
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for draw in range(resamples):
        chosen = rng.integers(len(groups), size=len(groups)) if len(groups) > 1 else [0]
        values[draw] = statistic([groups[g][rng.integers(len(groups[g]), size=len(groups[g]))] for g in chosen])
    if np.isnan(values).all():  # an undefined statistic (a retention over sources that answered nothing)
        return statistic(list(groups)), math.nan, math.nan
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return statistic(list(groups)), float(low), float(high)


def mean_accuracy(groups: list[np.ndarray]) -> float:
    """The mean over groups of each group's accuracy (rows: questions, values: 1 right, 0 wrong)."""
    return float(np.mean([group.mean() for group in groups]))


def mean_retention(groups: list[np.ndarray]) -> float:
    """The mean over groups of a composite's unimodal retention: each group is (questions, modalities, 2) with the
    composite's result then its source's; retention is, per modality, the composite's correct answers over the
    source's, averaged over modalities (NaN where a source answered none)."""
    per_group = []
    for group in groups:
        composite, source = group[..., 0].sum(axis=0), group[..., 1].sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(source > 0, composite / np.where(source > 0, source, 1), np.nan)
        per_group.append(np.nan if np.isnan(ratio).any() else ratio.mean())
    return float(np.mean(per_group))


def mean_difference(groups: list[np.ndarray]) -> float:
    """The mean over groups of one model's accuracy minus another's on the same questions: each group is
    (questions, 2), the first model's result then the second's. Resampling the pairs together (see `bootstrap`)
    leaves out the noise both models share, so the interval is narrower than the two accuracies' intervals suggest."""
    return float(np.mean([group[:, 0].mean() - group[:, 1].mean() for group in groups]))
