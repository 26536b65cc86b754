"""Merge rules for dense text deltas: expected values are worked out by hand in comments, not by the code tested."""

import math
import re

import pytest
import torch

from conversion.errors import ConversionError
from conversion.merge import MERGE_RULES, merge_deltas, merge_rule
from conversion.recipe import load_recipe


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
    # floor(0.01 * 6) = 0, so k = max(1, 0) = 1: only D1's largest magnitude (4.0) stays (mergekit refuses k = 0).
    merged = merge_deltas([D1], [1.0], "ties", density=0.01)
    torch.testing.assert_close(merged, torch.tensor([[0.0, 0.0, 0.0], [0.0, 4.0, 0.0]]), rtol=0, atol=0)


def test_dare_linear_with_density_one_equals_linear():
    weights = [0.3, -0.7, 1.2]
    assert torch.equal(
        merge_deltas([D1, D2, D3], weights, "dare_linear", density=1.0, seed=5, name="w"),
        merge_deltas([D1, D2, D3], weights, "linear"),
    )


def test_dare_ties_with_density_one_equals_ties_with_density_one_and_the_same_normalize():
    weights = [1.0, 1.0, 2.0]
    for normalize in (True, False):
        assert torch.equal(
            merge_deltas([D1, D2, D3], weights, "dare_ties", density=1.0, seed=3, name="w", normalize=normalize),
            merge_deltas([D1, D2, D3], weights, "ties", density=1.0, normalize=normalize),
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
    assert torch.equal(
        merge_deltas([ones, ones], [1.0, 0.0], "dare_linear", density=0.5, seed=0, name="x"),
        merge_deltas([ones, None], [1.0, 0.0], "dare_linear", density=0.5, seed=0, name="x"),
    )


def test_dare_drops_with_probability_one_minus_density_and_rescales_to_the_l1_norm():
    density = 0.3
    ones = torch.ones(200_000)
    merged = merge_deltas([ones], [1.0], "dare_linear", density=density, name="big")
    kept = merged != 0
    # The fraction of zeros is ~0.7 (standard error ~0.001); the kept entries share the L1 norm of the delta, 200000,
    # so each is 200000 / (number kept): close to 1 / density, and the mean is 1 exactly (up to float rounding).
    assert math.isclose((~kept).float().mean().item(), 1 - density, abs_tol=0.01)
    torch.testing.assert_close(merged[kept], torch.full_like(merged[kept], 200_000 / int(kept.sum())))
    assert math.isclose(merged.sum().item(), 200_000, rel_tol=1e-6)
    # rescale: false keeps the surviving entries as they are (same seed and name: same mask).
    plain = merge_deltas([ones], [1.0], "dare_linear", density=density, name="big", rescale=False)
    assert torch.equal(plain != 0, kept) and torch.equal(plain[kept], ones[kept])


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
        ({"rule": "ties", "weights": [1.0, -1.0]}, "which must be >= 0, but source 1 has weight -1.0"),
        ({"weights": [1.0, -1.0], "normalize": True}, "the sum of the weights, which is 0"),
        ({"normalize": "yes"}, "normalize must be true or false"),
        ({"rule": "ties", "lambda_": float("nan")}, "lambda must be a finite number"),
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


# mergekit's conventions (mergekit 0.1.5: `generalized_task_arithmetic.py`, `sparsify.py`), each on a 1-D tensor worked
# out by hand.


def test_trimming_keeps_the_floor_of_density_times_entries():
    # 5 entries at density 0.7: floor(3.5) = 3 keep (rounding would keep 4): 5, -4, 3. One source with weight 1, so
    # the disjoint mean is the trimmed delta itself.
    delta = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0])
    merged = merge_deltas([delta], [1.0], "ties", density=0.7)
    assert torch.equal(merged, torch.tensor([0.0, 0.0, 3.0, -4.0, 5.0]))


def test_an_exact_sign_tie_elects_plus():
    # Weighted sums: 1 - 1 = 0, -2 + 2 = 0, 0.5 + 0.5 = 1. A sum of 0 elects +1, so the positive entry wins: 1 (from
    # the first source), 2 (from the second); the last entry is the mean of both, 0.5. (Electing 0 would keep the
    # base, [0, 0, 0.5].)
    first, second = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-1.0, 2.0, 0.5])
    assert torch.equal(merge_deltas([first, second], [1.0, 1.0], "ties", density=1.0), torch.tensor([1.0, 2.0, 0.5]))


# Two sources, weights 0.5 and 0.25: weighted deltas [1, -0.5] and [1, 0.25].
FIRST, SECOND, WEIGHTS = torch.tensor([2.0, -1.0]), torch.tensor([4.0, 1.0]), [0.5, 0.25]


@pytest.mark.parametrize(
    ("rule", "options", "expected"),
    [
        # Sign sums 2 > 0 and -0.25 < 0: entry 0 takes both (1 + 1), entry 1 only the first source (-0.5).
        ("ties", {}, [2.0 / 0.75, -0.5 / 0.5]),  # normalize by default: / (0.5 + 0.25) and / 0.5
        ("ties", {"normalize": False}, [2.0, -0.5]),
        ("ties", {"lambda_": 0.5}, [2.0 / 0.75 * 0.5, -0.5]),
        ("dare_ties", {}, [2.0, -0.5]),  # no normalize by default
        ("dare_ties", {"normalize": True}, [2.0 / 0.75, -1.0]),
        # No sign election: the weighted sum [2, -0.25] ...
        ("dare_linear", {}, [2.0, -0.25]),
        ("dare_linear", {"normalize": True}, [2.0 / 0.75, -0.25 / 0.75]),  # ... over the sum of all weights
        ("linear", {}, [2.0, -0.25]),
        ("linear", {"normalize": True, "lambda_": 3.0}, [3 * 2.0 / 0.75, 3 * -0.25 / 0.75]),
    ],
)
def test_normalize_and_lambda_per_rule(rule, options, expected):
    merged = merge_deltas([FIRST, SECOND], WEIGHTS, rule, density=1.0, **options)
    torch.testing.assert_close(merged, torch.tensor(expected), rtol=1e-6, atol=0)


def test_without_normalize_a_negative_weight_votes_against_its_delta():
    # Weighted deltas [1, 1] and -1 * [1, -1] = [-1, 1]; sums [0, 2] elect + twice: entry 0 keeps the first source
    # only, entry 1 both (1 + 1).
    merged = merge_deltas(
        [torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0])], [1.0, -1.0], "ties", density=1.0, normalize=False
    )
    assert torch.equal(merged, torch.tensor([1.0, 2.0]))


def test_ties_rescale_restores_the_l1_norm_of_the_trimmed_delta():
    # density 0.5 of 4 entries keeps -4 and 3: L1 norm 7 of the original 10, so both are scaled by 10 / 7.
    delta = torch.tensor([1.0, -2.0, 3.0, -4.0])
    merged = merge_deltas([delta], [1.0], "ties", density=0.5, rescale=True)
    torch.testing.assert_close(merged, torch.tensor([0.0, 0.0, 30.0 / 7.0, -40.0 / 7.0]))
    assert torch.equal(merge_deltas([delta], [1.0], "ties", density=0.5), torch.tensor([0.0, 0.0, 3.0, -4.0]))


def test_dare_rescale_scales_the_kept_entries_by_the_l1_ratio():
    # Whatever entries the seed keeps, they are multiplied by |d|_1 / |kept|_1 = 10 / (sum of their magnitudes).
    # With none kept there is nothing to scale: the delta is dropped whole, as in mergekit.
    delta = torch.tensor([1.0, -2.0, 3.0, -4.0])
    kept_counts = set()
    for seed in range(8):
        merged = merge_deltas([delta], [1.0], "dare_linear", density=0.5, seed=seed, name="w")
        kept = merged != 0
        kept_counts.add(int(kept.sum()))
        if kept.any():
            torch.testing.assert_close(merged[kept], delta[kept] * 10.0 / float(delta[kept].abs().sum()))
    assert len(kept_counts - {0, 4}) > 0  # some seed kept a strict subset


# The recipe's `merge:` takes mergekit's parameter names, with mergekit's defaults per rule.

RECIPE = {"base": "base-folder", "sources": [{"path": "a", "weight": 1.0}, {"path": "b", "weight": 3.0}]}


@pytest.mark.parametrize(
    ("merge", "normalizes", "rescales"),
    [
        ({"rule": "linear"}, False, False),
        ({"rule": "task_arithmetic"}, False, False),
        ({"rule": "ties", "density": 0.5}, True, False),
        ({"rule": "dare_linear", "density": 0.5}, False, True),
        ({"rule": "dare_ties", "density": 0.5}, False, True),
        ({"rule": "dare_ties", "density": 0.5, "normalize": True, "rescale": False}, True, False),
    ],
)
def test_recipe_defaults_are_mergekits_per_rule(merge, normalizes, rescales):
    settings = load_recipe({**RECIPE, "merge": merge}).merge
    assert (settings.normalizes, settings.rescales) == (normalizes, rescales)


def test_task_arithmetic_is_linear_and_linear_normalize_and_lambda_go_into_the_weights():
    assert load_recipe({**RECIPE, "merge": {"rule": "task_arithmetic"}}).merge.rule == "linear"
    assert load_recipe(RECIPE).weights() == [1.0, 3.0]
    # mergekit's linear (normalize: true): a weighted mean of the models, weights 1 / 4 and 3 / 4.
    assert load_recipe({**RECIPE, "merge": {"rule": "linear", "normalize": True}}).weights() == [0.25, 0.75]
    assert load_recipe({**RECIPE, "merge": {"rule": "linear", "lambda": 0.5}}).weights() == [0.5, 1.5]
    # The other rules take the weights as given; normalize and lambda act per entry.
    assert load_recipe({**RECIPE, "merge": {"rule": "ties", "density": 0.5, "lambda": 2}}).weights() == [1.0, 3.0]


def test_int8_mask_is_accepted_and_changes_nothing():
    plain = load_recipe({**RECIPE, "merge": {"rule": "ties", "density": 0.5}}).merge
    masked = load_recipe({**RECIPE, "merge": {"rule": "ties", "density": 0.5, "int8_mask": True}}).merge
    assert masked.int8_mask and masked.options() == plain.options()


def test_negative_weights_need_normalize_off_in_sign_elections():
    negative = {**RECIPE, "sources": [{"path": "a", "weight": 1.0}, {"path": "b", "weight": -0.5}]}
    with pytest.raises(ConversionError, match="needs weights >= 0; set `normalize: false`"):
        load_recipe({**negative, "merge": {"rule": "ties", "density": 0.5}})
    unnormalized = {"rule": "ties", "density": 0.5, "normalize": False}
    assert load_recipe({**negative, "merge": unnormalized}).weights() == [1.0, -0.5]


@pytest.mark.parametrize(
    ("merge", "sources", "message"),
    [
        ({"rule": "linear", "rescale": True}, None, "merge.rescale only applies to the ties and dare rules"),
        ({"rule": "ties", "density": 0.5, "normalize": "yes"}, None, "merge.normalize must be true or false"),
        ({"rule": "ties", "density": 0.5, "lambda": "big"}, None, "merge.lambda must be a finite number"),
        ({"rule": "dare_ties", "density": 0.5, "int8_mask": 1}, None, "merge.int8_mask must be true or false"),
        (
            {"rule": "linear", "normalize": True},
            [{"path": "a", "weight": 1.0}, {"path": "b", "weight": -1.0}],
            "sum of the sources' weights, which is 0",
        ),
        ({"rule": "slerp"}, None, "use one of ['linear', 'ties', 'dare_linear', 'dare_ties'] (or task_arithmetic"),
    ],
)
def test_bad_merge_settings_are_refused_by_name(merge, sources, message):
    with pytest.raises(ConversionError, match=re.escape(message)):
        load_recipe({**RECIPE, "merge": merge, **({"sources": sources} if sources else {})})


@pytest.mark.parametrize(
    "merge",
    [{"rule": "ties", "density": 0.5}, {"rule": "linear", "normalize": True}, {"rule": "linear", "lambda": 2.0}],
)
def test_weight_search_refuses_settings_that_make_its_candidates_meaningless(merge):
    search = {"grid": [0.5, 1.0], "data": "val.json"}
    sources = [{"path": "a"}, {"path": "b"}]
    with pytest.raises(ConversionError, match="weight_search gives every source the same λ"):
        load_recipe({**RECIPE, "sources": sources, "merge": merge, "weight_search": search})


@pytest.mark.parametrize("rule", sorted(MERGE_RULES))
def test_each_rule_entry_declares_what_the_recipe_takes(rule, tmp_path):
    """The registry entry is what a recipe is checked against: a sparsifying rule needs its density and takes
    rescale, the others refuse both; every alias names its rule; the defaults apply when the recipe says nothing."""
    spec = MERGE_RULES[rule]
    recipe_file = tmp_path / "recipe.yaml"

    def parse(merge: str):
        recipe_file.write_text(f"base: base\nsources: [a, b]\nmerge: {merge}\n")
        return load_recipe(recipe_file).merge

    if spec.sparsify:
        assert {"density", "rescale"} <= set(spec.parameters)
        with pytest.raises(ConversionError, match="needs merge.density"):
            parse(f"{{rule: {rule}}}")
        settings = parse(f"{{rule: {rule}, density: 0.5}}")
        assert settings.rescales is spec.default_rescale
    else:
        assert "density" not in spec.parameters
        with pytest.raises(ConversionError, match="only applies to the ties and dare rules"):
            parse(f"{{rule: {rule}, density: 0.5}}")
        settings = parse(f"{{rule: {rule}}}")
    assert settings.rule == rule and settings.normalizes is spec.default_normalize
    for alias in spec.aliases:
        assert merge_rule(alias) is spec and parse(f"{{rule: {alias}}}").rule == rule


@pytest.mark.parametrize("rule", sorted(MERGE_RULES))
def test_a_rule_that_declares_a_weighted_sum_merges_as_one(rule):
    """`is_weighted_sum` is what method routed (stacking the sources' factors) and the converter's weight-space merge
    rely on: such a rule's merge is `Σ w_i d_i`; every other rule's is not, on deltas whose signs disagree."""
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(8, 8, generator=generator) for _ in range(2)]
    weights = [0.75, 0.5]
    merged = merge_deltas(deltas, weights, rule, density=0.5, normalize=False)
    weighted_sum = weights[0] * deltas[0] + weights[1] * deltas[1]
    assert torch.allclose(merged, weighted_sum) is MERGE_RULES[rule].is_weighted_sum
