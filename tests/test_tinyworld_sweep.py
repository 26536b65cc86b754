"""The tiny world's statistics and the sweep's summary, on hand-made per-question results (no training: the sweep
itself runs for hours and is not part of the suite)."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from benchmarks.tinyworld.run import BASE_ROW, METHODS
from benchmarks.tinyworld.stats import (
    bootstrap,
    chi_square_independence,
    chi_square_p_value,
    chi_square_uniform,
    mean_accuracy,
    mean_difference,
    mean_retention,
)
from benchmarks.tinyworld.sweep import (
    cell_folder,
    cell_settings,
    format_differences,
    format_summary,
    plot_summary,
    summarize,
    text_delta_ratio,
)
from benchmarks.tinyworld.world import MODALITIES


def test_chi_square_p_values_match_closed_forms():
    # Two degrees of freedom: P(X >= x) = exp(-x / 2); four: exp(-x / 2) (1 + x / 2); one: erfc(sqrt(x / 2)).
    for x in (0.1, 1.0, 3.0, 12.0, 40.0):
        assert chi_square_p_value(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-9)
        assert chi_square_p_value(x, 4) == pytest.approx(math.exp(-x / 2) * (1 + x / 2), rel=1e-9)
        assert chi_square_p_value(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)
    assert chi_square_uniform([25, 25, 25, 25])[2] == pytest.approx(1.0)
    assert chi_square_uniform([100, 0, 0, 0])[2] < 1e-12
    assert chi_square_independence([[50, 0], [0, 50]])[2] < 1e-12
    assert chi_square_independence([[20, 30], [40, 60]])[2] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one count"):
        chi_square_independence([[1, 0], [2, 0]])


def _bernoulli(accuracy: float, count: int) -> np.ndarray:
    """`count` results with exactly `accuracy` of them right, in a fixed scattered order."""
    results = np.zeros(count)
    results[: round(accuracy * count)] = 1
    return np.random.default_rng(0).permutation(results)


def test_bootstrap_interval_covers_the_estimate_and_narrows_with_more_questions():
    few = bootstrap([_bernoulli(0.8, 50)], mean_accuracy)
    many = bootstrap([_bernoulli(0.8, 800)], mean_accuracy)
    for estimate, low, high in (few, many):
        assert estimate == pytest.approx(0.8) and low < 0.8 < high
    assert many[2] - many[1] < 0.5 * (few[2] - few[1])
    # About the normal approximation's 1.96 standard errors either side.
    assert (many[2] - many[1]) / 2 == pytest.approx(1.96 * (0.8 * 0.2 / 800) ** 0.5, rel=0.15)
    assert bootstrap([_bernoulli(0.8, 50)], mean_accuracy) == few  # seeded
    # Seeds that disagree widen the interval beyond the questions' own noise.
    split = bootstrap([_bernoulli(0.6, 400), _bernoulli(1.0, 400)], mean_accuracy)
    pooled = bootstrap([np.concatenate([_bernoulli(0.6, 400), _bernoulli(1.0, 400)])], mean_accuracy)
    assert split[0] == pooled[0] == pytest.approx(0.8)
    assert split[2] - split[1] > 3 * (pooled[2] - pooled[1])


def test_a_paired_difference_is_tighter_than_the_two_accuracies_it_compares():
    """Two models that agree on most questions: 60% and 70% right, the second right wherever the first is. Apart,
    their intervals overlap; paired, the 10-point difference is clear of 0."""
    first, second = _bernoulli(0.6, 200), _bernoulli(0.7, 200)
    assert (first <= second).all()
    apart = [bootstrap([model], mean_accuracy) for model in (second, first)]
    assert apart[0][1] < apart[1][2]
    estimate, low, high = bootstrap([np.stack([second, first], axis=-1)], mean_difference)
    assert estimate == pytest.approx(0.1) and 0 < low < estimate < high
    # Unpaired (the second model's answers shuffled across questions) the same accuracies give a wider interval.
    shuffled = np.random.default_rng(1).permutation(second)
    unpaired = bootstrap([np.stack([shuffled, first], axis=-1)], mean_difference)
    assert unpaired[0] == pytest.approx(0.1) and unpaired[2] - unpaired[1] > 1.5 * (high - low)


def test_retention_is_composite_over_source_averaged_over_modalities():
    # Two modalities: the composite gets 30 of the source's 40 right on one (75%), all 20 on the other (100%).
    composite = np.stack([_bernoulli(0.3, 100), _bernoulli(0.2, 100)], axis=1)
    source = np.stack([_bernoulli(0.4, 100), _bernoulli(0.2, 100)], axis=1)
    assert mean_retention([np.stack([composite, source], axis=-1)]) == pytest.approx(0.875)
    undefined = [np.stack([composite, np.zeros_like(source)], axis=-1)]
    assert math.isnan(mean_retention(undefined))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(math.isnan(value) for value in bootstrap(undefined, mean_retention, resamples=20))


def _cell_results(open4: dict[str, float], source: float = 0.8, retained: float = 0.9, count: int = 100) -> dict:
    """Per-question results of one cell: every source at `source`, every composite at `retained` of it on its
    modalities, at 0.25 on MCUB-2/3/4 and at `open4[method]` on open-2/3/4, the base LLM at 0.95."""
    rows = {
        BASE_ROW: {
            column: _bernoulli(0.95, count).astype(bool).tolist()
            for column in (*MODALITIES, "MCUB-2", "MCUB-3", "MCUB-4", "open-2", "open-3", "open-4")
        }
    }
    for family in {method.sources for method in METHODS.values()}:
        for modality in MODALITIES:
            rows[f"{modality} source ({family})"] = {modality: _bernoulli(source, count).astype(bool).tolist()}
    for method, accuracy in open4.items():
        rows[f"{method} composite"] = {
            **{modality: _bernoulli(source * retained, count).astype(bool).tolist() for modality in MODALITIES},
            **{f"MCUB-{k}": _bernoulli(0.25, count).astype(bool).tolist() for k in (2, 3, 4)},
            **{f"open-{k}": _bernoulli(accuracy, count).astype(bool).tolist() for k in (2, 3, 4)},
        }
    return rows


def test_sweep_summary_table_and_plot(tmp_path):
    results = {}
    for seed in (0, 1):
        for distillation in ("on", "off"):
            for scale in (0.5, 1.0, 2.0):
                accuracy = {
                    method: 0.25 + 0.1 * index + (0.2 if distillation == "on" else 0.0)
                    for index, method in enumerate(METHODS)
                }
                results[seed, distillation, scale] = _cell_results(accuracy)
    summary = summarize(results, resamples=200)
    assert summary["seeds"] == [0, 1] and len(summary["cells"]) == 6
    cell = summary["cells"]["distillation off, scale 2"]
    assert cell["seeds"] == 2
    for index, method in enumerate(METHODS):
        assert cell["methods"][method]["MCUB-4"][0] == pytest.approx(0.25)
        estimate, low, high = cell["methods"][method]["open-4"]
        assert estimate == pytest.approx(0.25 + 0.1 * index) and low <= estimate <= high
        assert cell["methods"][method]["retention"][0] == pytest.approx(0.9)
        assert cell["methods"][method]["sources"][0] == pytest.approx(0.8)
    assert summary["base"]["MCUB-4"][0] == summary["base"]["open-4"][0] == pytest.approx(0.95)
    # The composites' answers are nested (`_bernoulli`): paired, damc - naive is 10 points, tighter than either.
    difference = cell["differences"]["damc - naive"]["open-4"]
    assert difference[0] == pytest.approx(0.1) and 0 < difference[1] < difference[0] < difference[2]
    own = cell["methods"]["damc"]["open-4"]
    assert difference[2] - difference[1] < own[2] - own[1]
    assert cell["differences"]["routed - naive"]["open-2"][0] == pytest.approx(0.2)
    differences = format_differences(summary).splitlines()
    assert len(differences) == 2 + 6 * 2
    assert differences[2].split()[:5] == ["off", "0.5x", "damc", "-", "naive"] and "+10.0 [" in differences[2]
    table = format_summary(summary).splitlines()
    assert len(table) == 2 + 6 * len(METHODS) + 1
    assert table[2].split()[:3] == ["off", "0.5x", next(iter(METHODS))]
    assert "90% [" in table[2] and table[-1].split()[2:5] == ["base", "LLM,", "names"]
    # The merged deltas' size, per family, beside each method (routed composes the NaiveMC sources).
    assert table[2].split()[3] == "-"
    deltas = {(d, scale): {"naive": 0.5, "damc": 0.25} for d in ("on", "off") for scale in (0.5, 1.0, 2.0)}
    rows = format_summary(summarize(results, resamples=20, deltas=deltas)).splitlines()[2 : 2 + len(METHODS)]
    assert {row.split()[2]: row.split()[3] for row in rows} == {"naive": "0.50", "damc": "0.25", "routed": "0.50"}
    path = plot_summary(summary, tmp_path / "sweep.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1]


def test_sweep_cells_scale_both_families_text_rates_and_share_the_seed():
    settings = cell_settings(1, "off", 2.0)
    assert settings.seed == 1 and settings.text_distillation_weight == 0.0
    assert settings.text_lora_learning_rate == pytest.approx(2e-3)
    assert settings.shared_lora_learning_rate == pytest.approx(6e-3)
    assert cell_settings(1, "on", 0.5).text_distillation_weight > 0
    assert cell_folder(Path("w"), 1, "off", 0.5) == Path("w") / "seed-1" / "distillation-off-scale-0.5"


@pytest.mark.parametrize("folded", [False, True])
def test_text_delta_ratio_is_the_merged_deltas_norm_over_the_base_weights(tmp_path, folded):
    """Two adapted projections and one the text LoRA leaves alone: |s B A| over |W0| of the adapted ones only."""
    generator = torch.Generator().manual_seed(0)
    tensors, delta_squared, base_squared = {}, 0.0, 0.0
    scaling = 1.0 if folded else 4.0 / 2
    for module in ("model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.0.mlp.up_proj"):
        base = torch.randn(6, 4, generator=generator)
        factor_a, factor_b = torch.randn(2, 4, generator=generator), torch.randn(6, 2, generator=generator)
        tensors |= {
            f"{module}.base_layer.weight": base,
            f"{module}.text_lora_A.weight": factor_a,
            f"{module}.text_lora_B.weight": factor_b,
        }
        delta_squared += float((scaling * factor_b @ factor_a).square().sum())
        base_squared += float(base.square().sum())
    tensors["model.language_model.norm.weight"] = torch.ones(4)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"text_lora": {"r": 2, "alpha": 4.0, "folded": folded}}))
    assert text_delta_ratio(tmp_path) == pytest.approx(math.sqrt(delta_squared / base_squared), rel=1e-6)
