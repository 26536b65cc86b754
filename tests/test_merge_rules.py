"""Merge rules for dense text deltas: expected values are worked out by hand in comments, not by the code tested."""

import math
import re

import pytest
import torch

from conversion.merge import merge_deltas


# Three sources of one 2x3 tensor, used by the TIES tests.
D1 = torch.tensor([[1.0, -2.0, 3.0], [-0.5, 4.0, 0.1]])
D2 = torch.tensor([[-3.0, 1.5, -0.2], [2.0, -1.0, 0.5]])
D3 = torch.tensor([[2.0, -0.1, -1.0], [0.3, 3.0, -0.2]])


def test_linear_is_the_weighted_sum_and_returns_float32():
    d1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    d2 = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.bfloat16)
    # 2 * d1 - 1 * d2 = [[2 - 0.5, 4 + 1], [6 - 2, 8 - 0]]
    expected = torch.tensor([[1.5, 5.0], [4.0, 8.0]])
    merged = merge_deltas([d1, d2], [2.0, -1.0])
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, expected, rtol=0, atol=0)


def test_ties_trims_elects_signs_and_takes_the_disjoint_weighted_mean():
    # density 0.5 of 6 entries: each delta keeps its k = 3 largest magnitudes.
    #   D1 |.|: 1, 2, 3, .5, 4, .1   -> keeps 4, 3, 2   -> T1 = [[ 0, -2,   3], [0, 4, 0]]
    #   D2 |.|: 3, 1.5, .2, 2, 1, .5 -> keeps 3, 2, 1.5 -> T2 = [[-3,  1.5, 0], [2, 0, 0]]
    #   D3 |.|: 2, .1, 1, .3, 3, .2  -> keeps 3, 2, 1   -> T3 = [[ 2,  0,  -1], [0, 3, 0]]
    # weights 1, 1, 2; elected sign = sign(T1 + T2 + 2 T3); mean over the agreeing sources:
    #   (0,0): 0 - 3 + 4 = 1 > 0    -> only T3 agrees: 2*2 / 2 = 2      (T2's -3 is a sign conflict, left out)
    #   (0,1): -2 + 1.5 + 0 < 0     -> only T1 agrees: -2               (T2's 1.5 left out)
    #   (0,2): 3 + 0 - 2 = 1 > 0    -> only T1 agrees: 3                (T3's -1 left out)
    #   (1,0): 0 + 2 + 0 > 0        -> only T2: 2                       (D1's -0.5 and D3's 0.3 were trimmed)
    #   (1,1): 4 + 0 + 6 > 0        -> T1 and T3: (1*4 + 2*3) / (1 + 2) = 10/3
    #   (1,2): all trimmed, sign 0  -> 0
    expected = torch.tensor([[2.0, -2.0, 3.0], [2.0, 10.0 / 3.0, 0.0]])
    inputs = [D1.clone(), D2.clone(), D3.clone()]
    merged = merge_deltas(inputs, [1.0, 1.0, 2.0], "ties", density=0.5, name="layer.q_proj.weight")
    torch.testing.assert_close(merged, expected)
    # The inputs are left as they were.
    assert all(torch.equal(given, original) for given, original in zip(inputs, (D1, D2, D3)))
    # The weights are relative: scaling them all changes nothing.
    torch.testing.assert_close(merge_deltas([D1, D2, D3], [0.5, 0.5, 1.0], "ties", density=0.5), expected)


def test_ties_keeps_at_least_one_entry():
    # 0.01 * 6 rounds to 0, so k = max(1, 0) = 1: only D1's largest magnitude (4.0) stays.
    merged = merge_deltas([D1], [1.0], "ties", density=0.01)
    torch.testing.assert_close(merged, torch.tensor([[0.0, 0.0, 0.0], [0.0, 4.0, 0.0]]), rtol=0, atol=0)


def test_dare_linear_with_density_one_equals_linear():
    weights = [0.3, -0.7, 1.2]
    assert torch.equal(
        merge_deltas([D1, D2, D3], weights, "dare_linear", density=1.0, seed=5, name="w"),
        merge_deltas([D1, D2, D3], weights, "linear"),
    )


def test_dare_ties_with_density_one_equals_ties_with_density_one():
    weights = [1.0, 1.0, 2.0]
    assert torch.equal(
        merge_deltas([D1, D2, D3], weights, "dare_ties", density=1.0, seed=3, name="w"),
        merge_deltas([D1, D2, D3], weights, "ties", density=1.0),
    )


def test_dare_is_reproducible_and_seeded_per_seed_and_tensor_name():
    ones = torch.ones(64, 64)

    def dare(seed: int, name: str) -> torch.Tensor:
        return merge_deltas([ones], [1.0], "dare_linear", density=0.5, seed=seed, name=name)

    first = dare(0, "model.layers.0.mlp.up_proj.weight")
    dare(0, "some.other.tensor")  # another call in between must not shift the random stream
    assert torch.equal(dare(0, "model.layers.0.mlp.up_proj.weight"), first)
    assert not torch.equal(dare(0, "model.layers.1.mlp.up_proj.weight") == 0, first == 0)
    assert not torch.equal(dare(1, "model.layers.0.mlp.up_proj.weight") == 0, first == 0)
    # A source's mask depends on its own index only, not on the other sources: with the second source's weight 0, the
    # merge is the first source's dropped delta alone, whether the second source is present or not.
    assert torch.equal(merge_deltas([ones, ones], [1.0, 0.0], "dare_linear", density=0.5, seed=0, name="x"),
                       merge_deltas([ones, None], [1.0, 0.0], "dare_linear", density=0.5, seed=0, name="x"))


def test_dare_keeps_the_expected_value():
    density = 0.3
    merged = merge_deltas([torch.ones(200_000)], [1.0], "dare_linear", density=density, name="big")
    # Kept entries are 1 / 0.3; the mean is ~1 (standard error ~0.0034), the fraction of zeros ~0.7 (s.e. ~0.001).
    assert math.isclose(merged.mean().item(), 1.0, abs_tol=0.02)
    assert math.isclose((merged == 0).float().mean().item(), 1 - density, abs_tol=0.01)
    torch.testing.assert_close(merged[merged != 0], torch.full_like(merged[merged != 0], 1 / density))


def test_none_means_no_change():
    assert merge_deltas([None, None], [0.5, 0.5]) is None
    assert merge_deltas([None, None], [0.5, 0.5], "ties", density=0.5) is None
    d = torch.tensor([[1.0, -3.0], [2.0, 0.5]])
    # linear: 0.5 * d, the None source adds nothing.
    torch.testing.assert_close(merge_deltas([None, d], [9.0, 0.5]), torch.tensor([[0.5, -1.5], [1.0, 0.25]]))
    # ties, density 0.5: d keeps its 2 largest magnitudes (-3, 2); the None source never agrees, so the disjoint mean
    # is d's trimmed entries themselves, not halved.
    torch.testing.assert_close(
        merge_deltas([d, None], [0.7, 0.3], "ties", density=0.5), torch.tensor([[0.0, -3.0], [2.0, 0.0]])
    )


def test_merging_lora_sources_must_use_the_products():
    # Two rank-1 LoRA sources of a 2x2 weight (delta = B @ A):
    a1, b1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])  # B1 A1 = [[1, 0], [0, 0]]
    a2, b2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]])  # B2 A2 = [[0, 0], [0, 1]]
    merged = merge_deltas([b1 @ a1, b2 @ a2], [0.5, 0.5])
    # 0.5 * (B1 A1 + B2 A2) = [[0.5, 0], [0, 0.5]]
    torch.testing.assert_close(merged, torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
    # Averaging the factors instead: [[.5], [.5]] @ [[.5, .5]] = [[.25, .25], [.25, .25]], a different matrix.
    factor_average = ((b1 + b2) / 2) @ ((a1 + a2) / 2)
    torch.testing.assert_close(factor_average, torch.full((2, 2), 0.25))
    assert not torch.allclose(merged, factor_average)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "slerp"}, "unknown merge rule 'slerp'; use one of linear, ties, dare_linear, dare_ties"),
        ({"rule": "ties", "density": 0.0}, "0 < density <= 1"),
        ({"rule": "dare_linear", "density": 1.5}, "0 < density <= 1"),
        ({"rule": "dare_ties", "density": float("nan")}, "0 < density <= 1"),
        ({"rule": "ties", "weights": [1.0, -1.0]}, "relative weights >= 0"),
        ({"weights": [1.0]}, "2 deltas but 1 weights"),
        ({"weights": [1.0, float("inf")]}, "finite number"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    arguments = {"deltas": [D1, D2], "weights": [1.0, 1.0], "name": "w", **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        merge_deltas(**arguments)


def test_shape_mismatch_names_the_tensor_and_the_shapes():
    with pytest.raises(ValueError, match=r"'layers\.0\.o_proj\.weight'.*source 0: \(2, 3\), source 2: \(3, 2\)"):
        merge_deltas([D1, None, D1.t()], [1.0, 1.0, 1.0], name="layers.0.o_proj.weight")


def test_no_sources_is_refused():
    with pytest.raises(ValueError, match="no sources"):
        merge_deltas([], [])
