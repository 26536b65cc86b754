"""The tiny world over seeds, distillation and the strength of the sources' text adaptation, with error bars.

    python -m benchmarks.tinyworld.sweep [--work outputs/tinyworld-sweep] [--seeds 0 1 2] [--distillation on off]
        [--scales 0.5 1 2] [--smoke]

Cells: every seed x distillation (on: the demo's weight, off: the paper's loss) x scale of the rate of whatever
adapts the sources' text tokens (the DAMC sources' text LoRA, the NaiveMC sources' shared LoRA), as a multiple of
the demo's rates. A cell is the demo's pipeline with those settings; for each seed the base LLM, the encoders, the
data and stage 1 are built once and shared by its cells. Every step is cached (see `run.py`): an interrupted sweep
resumes where it stopped, and a finished one only reads its results back.

For each (distillation, scale) and each composite method of `run.METHODS`: the sources' unimodal accuracy, the
composite's unimodal retention (composite / source, averaged over modalities), tiny MCUB-2/3/4 and open tiny
MCUB-2/3/4, each as the mean over seeds with a 95% interval from a bootstrap over seeds and, within each, over test
questions; the size of the deltas a merge adds up (`text_delta_ratio`, per family); and the paired differences
DAMC - NaiveMC and routed - NaiveMC on open-2/3/4, bootstrapped the same way with each question's two answers drawn
together. Printed as two tables, written to `summary.json` and plotted to `sweep.png` (x: scale, y: open-4, a line
and band per method). The plot shows open-4 rather than MCUB-4: since the options' order is random (issue 23) every
model, the base LLM on names included, is at chance on multiple choice, so MCUB-4 would show only noise.

`--smoke` runs every step at a few steps and questions (under `<work>/smoke`): it checks the wiring, not quality.
"""

import argparse
import itertools
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from modeling_composite.state_dict_keys import TEXT, base_layer_key, per_delta_factor_key

from .run import BASE_ROW, MCUB_COLUMNS, METHODS, OPEN_COLUMNS, Results, Settings, run
from .stats import bootstrap, mean_accuracy, mean_difference, mean_retention
from .world import MODALITIES


logger = logging.getLogger("tinyworld")
DISTILLATION = {"on": Settings.text_distillation_weight, "off": 0.0}
# Every tiny-MCUB column: multiple choice, then open.
MCUB = (*MCUB_COLUMNS.values(), *OPEN_COLUMNS.values())
COLUMNS = ("sources", "retention", *MCUB)
PLOTTED = OPEN_COLUMNS[4]  # the plot's y (see the module's docstring)
# Paired differences between composites on the same seeds and questions: DAMC against NaiveMC (the paper's question:
# does decoupling pay?) and routed against NaiveMC (the same sources; only how the text deltas are used differs).
PAIRS = (("damc", "naive"), ("routed", "naive"))
# A few steps and questions each: the whole pipeline in about a minute per cell.
SMOKE = dict(
    base_steps=4,
    base_corpus=300,
    stage1_steps=2,
    stage1_samples=16,
    stage2_steps=2,
    stage2_samples=16,
    batch_size=4,
    mcub_questions=8,
    unimodal_questions=8,
)


def cell_settings(seed: int, distillation: str, scale: float, smoke: bool = False) -> Settings:
    defaults = Settings(**SMOKE) if smoke else Settings()
    return replace(
        defaults,
        seed=seed,
        text_distillation_weight=DISTILLATION[distillation],
        text_lora_learning_rate=scale * defaults.text_lora_learning_rate,
        shared_lora_learning_rate=scale * defaults.shared_lora_learning_rate,
    )


def cell_folder(work: Path, seed: int, distillation: str, scale: float) -> Path:
    return work / f"seed-{seed}" / f"distillation-{distillation}-scale-{scale:g}"


def text_delta_ratio(source: Path) -> float:
    """`||T||_F / ||W0||_F` of one trained source over the LLM projections its text LoRA adapts: `T = s B A` is the
    delta a merge adds up (the DAMC sources' text LoRA, the NaiveMC sources' one LoRA), `W0` the frozen base weights.
    How far the merged parameters drifted, comparable across the two families whatever their rates."""
    config = json.loads((source / "config.json").read_text())["text_lora"]
    scaling = 1.0 if config.get("folded") else config["alpha"] / config["r"]
    tensors = load_file(source / "model.safetensors")
    suffix = per_delta_factor_key("", "A", TEXT)
    delta_squared = base_squared = 0.0
    for key in tensors:
        if key.endswith(suffix):
            module = key.removesuffix(suffix)
            factor_a, factor_b = (tensors[per_delta_factor_key(module, side, TEXT)].float() for side in "AB")
            delta_squared += float((scaling * factor_b @ factor_a).square().sum())
            base_squared += float(tensors[base_layer_key(module)].float().square().sum())
    if base_squared == 0:
        raise ValueError(f"{source}: no text LoRA over base weights (`*{suffix}` with `*.base_layer.weight`)")
    return math.sqrt(delta_squared / base_squared)


def text_deltas(work: Path, seeds: list[int], distillations: list[str], scales: list[float]) -> dict:
    """(distillation, scale) -> family -> `text_delta_ratio` averaged over modalities and seeds."""
    families = dict.fromkeys(method.sources for method in METHODS.values())
    deltas: dict = {}
    for distillation, scale in itertools.product(distillations, scales):
        # Per seed, the folder holding the cell's sources (`<modality>-<family>`).
        folders = [cell_folder(work, seed, distillation, scale) / "sources" for seed in seeds]
        deltas[distillation, scale] = {
            family: float(np.mean([text_delta_ratio(f / f"{m}-{family}") for f in folders for m in MODALITIES]))
            for family in families
        }
    return deltas


def run_sweep(
    work: Path, seeds: list[int], distillations: list[str], scales: list[float], smoke: bool = False
) -> dict[tuple[int, str, float], Results]:
    """Build (or read back) every cell; returns (seed, distillation, scale) -> per-question results."""
    cells = list(itertools.product(seeds, distillations, scales))
    results = {}
    start = time.perf_counter()
    for index, (seed, distillation, scale) in enumerate(cells):
        cell_start = time.perf_counter()
        results[seed, distillation, scale] = run(
            cell_folder(work, seed, distillation, scale),
            cell_settings(seed, distillation, scale, smoke),
            shared=work / f"seed-{seed}" / "shared",
        )
        logger.info(
            "cell %d/%d (seed %d, distillation %s, scale %g): %.0f s (%.0f s in all)",
            index + 1,
            len(cells),
            seed,
            distillation,
            scale,
            time.perf_counter() - cell_start,
            time.perf_counter() - start,
        )
    return results


def _retention_groups(runs: list[Results], method: str) -> list[np.ndarray]:
    """Per seed: (questions, modalities, 2), the composite's result then its source's on each unimodal question."""
    family = METHODS[method].sources
    return [
        np.stack(
            [
                np.stack(
                    [
                        np.asarray(rows[f"{method} composite"][m], dtype=float),
                        np.asarray(rows[f"{m} source ({family})"][m], dtype=float),
                    ],
                    axis=-1,
                )
                for m in MODALITIES
            ],
            axis=1,
        )
        for rows in runs
    ]


def _sources_groups(runs: list[Results], method: str) -> list[np.ndarray]:
    """Per seed: each unimodal question's result by its modality's source, all modalities in one column."""
    family = METHODS[method].sources
    return [
        np.concatenate([np.asarray(rows[f"{m} source ({family})"][m], dtype=float) for m in MODALITIES])
        for rows in runs
    ]


def _paired_groups(runs: list[Results], first: str, second: str, column: str) -> list[np.ndarray]:
    """Per seed: (questions, 2), composite `first`'s result then `second`'s on each question of `column`."""
    return [
        np.stack([np.asarray(rows[f"{name} composite"][column], dtype=float) for name in (first, second)], axis=-1)
        for rows in runs
    ]


def summarize(
    results: dict[tuple[int, str, float], Results], resamples: int = 2000, deltas: dict | None = None
) -> dict:
    """(distillation, scale) -> method -> column -> (mean, low, high) over the seeds present, the paired differences of
    `PAIRS` on the open columns, the families' `text_deltas` where given, and the base LLM's tiny MCUB (multiple
    choice and open) on names (it depends on the seed only) under `base`."""
    seeds = sorted({seed for seed, _, _ in results})
    settings = sorted({(distillation, scale) for _, distillation, scale in results})
    summary: dict = {"seeds": seeds, "cells": {}}
    for distillation, scale in settings:
        runs = [results[seed, distillation, scale] for seed in seeds if (seed, distillation, scale) in results]
        table = {}
        for method in METHODS:
            table[method] = {
                "sources": bootstrap(_sources_groups(runs, method), mean_accuracy, resamples),
                "retention": bootstrap(_retention_groups(runs, method), mean_retention, resamples),
                **{
                    column: bootstrap(
                        [np.asarray(rows[f"{method} composite"][column], dtype=float) for rows in runs],
                        mean_accuracy,
                        resamples,
                    )
                    for column in MCUB
                },
            }
        summary["cells"][f"distillation {distillation}, scale {scale:g}"] = {
            "distillation": distillation,
            "scale": scale,
            "seeds": len(runs),
            "methods": table,
            "text_delta": (deltas or {}).get((distillation, scale)),
            "differences": {
                f"{first} - {second}": {
                    column: bootstrap(_paired_groups(runs, first, second, column), mean_difference, resamples)
                    for column in OPEN_COLUMNS.values()
                }
                for first, second in PAIRS
            },
        }
    base_runs = {seed: rows for (seed, _, _), rows in results.items()}
    summary["base"] = {
        column: bootstrap(
            [np.asarray(base_runs[seed][BASE_ROW][column], dtype=float) for seed in sorted(base_runs)],
            mean_accuracy,
            resamples,
        )
        for column in MCUB
    }
    return summary


def _cell(value: tuple[float, float, float], ratio: bool = False, signed: bool = False) -> str:
    estimate, low, high = (100 * v for v in value)
    if ratio:
        return f"{estimate:.0f}% [{low:.0f}, {high:.0f}]"
    return f"{estimate:+.1f} [{low:+.1f}, {high:+.1f}]" if signed else f"{estimate:.1f} [{low:.1f}, {high:.1f}]"


def _render(header: list[str], lines: list[list[str]], left: int) -> str:
    """Columns padded to their widest value: the first `left` flush left, the others flush right."""
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    render = lambda line: "  ".join(  # noqa: E731
        value.ljust(width) if i < left else value.rjust(width) for i, (value, width) in enumerate(zip(line, widths))
    )
    return "\n".join([render(header), "  ".join("-" * width for width in widths), *map(render, lines)]).rstrip()


def format_summary(summary: dict) -> str:
    """One line per (distillation, scale, method): mean [95% interval] of each column."""
    header = ["distillation", "scale", "method", "|T|/|W0|", "sources unimodal", "retention", *MCUB]
    lines = []
    for cell in summary["cells"].values():
        for method, values in cell["methods"].items():
            lines.append(
                [
                    cell["distillation"],
                    f"{cell['scale']:g}x",
                    method,
                    "-" if cell["text_delta"] is None else f"{cell['text_delta'][METHODS[method].sources]:.2f}",
                    _cell(values["sources"]),
                    _cell(values["retention"], ratio=True),
                    *(_cell(values[column]) for column in MCUB),
                ]
            )
    lines.append(["-", "-", "base LLM, names", "-", "-", "-", *(_cell(summary["base"][column]) for column in MCUB)])
    return _render(header, lines, left=3)


def format_differences(summary: dict) -> str:
    """One line per (distillation, scale, pair): the paired difference in points [95% interval] on each open
    column; an interval that excludes 0 is a difference beyond the noise of these seeds and questions."""
    columns = list(OPEN_COLUMNS.values())
    lines = [
        [
            cell["distillation"],
            f"{cell['scale']:g}x",
            pair,
            *(_cell(values[column], signed=True) for column in columns),
        ]
        for cell in summary["cells"].values()
        for pair, values in cell["differences"].items()
    ]
    return _render(["distillation", "scale", "difference", *columns], lines, left=3)


def plot_summary(summary: dict, path: Path, column: str = PLOTTED) -> Path:
    """`column` (open-4 unless given) against the scale (log axis), a line and a 95% band per method; one panel per
    distillation setting. The 25% chance line only on multiple-choice columns: an open answer has no fixed chance."""
    import matplotlib

    matplotlib.use("Agg")  # headless: written by a script
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(cell["distillation"] for cell in summary["cells"].values()))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), sharey=True, squeeze=False)
    for axis, distillation in zip(axes[0], panels):
        cells = sorted(
            (cell for cell in summary["cells"].values() if cell["distillation"] == distillation),
            key=lambda cell: cell["scale"],
        )
        scales = [cell["scale"] for cell in cells]
        for method in METHODS:
            estimate, low, high = (
                np.array([100 * cell["methods"][method][column][i] for cell in cells]) for i in range(3)
            )
            axis.plot(scales, estimate, marker="o", label=method)
            axis.fill_between(scales, low, high, alpha=0.2)
        base = summary["base"][column]
        axis.axhspan(100 * base[1], 100 * base[2], color="grey", alpha=0.15, label="base LLM on names")
        if column in MCUB_COLUMNS.values():
            axis.axhline(25, color="grey", linestyle="--", linewidth=1, label="chance")
        axis.set_xscale("log", base=2)
        axis.set_xticks(scales, [f"{scale:g}x" for scale in scales])
        axis.set_xlabel("text-adaptation rate (x demo's)")
        axis.set_title(f"distillation {distillation}")
        axis.set_ylim(0, 100)
    seeds = len(summary["seeds"])
    axes[0][0].set_ylabel(f"tiny {column} (%), {seeds} seed{'s' if seeds > 1 else ''}, 95% band")
    axes[0][-1].legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="outputs/tinyworld-sweep", help="folder for every artifact (cached)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--distillation", nargs="+", choices=list(DISTILLATION), default=list(DISTILLATION))
    parser.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=[0.5, 1.0, 2.0],
        help="multiples of the demo's text-LoRA rates (DAMC text LoRA, NaiveMC shared LoRA)",
    )
    parser.add_argument("--smoke", action="store_true", help="a few steps and questions per cell, under <work>/smoke")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "training", "httpx", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("conversion").setLevel(logging.ERROR)  # the expected "large deltas" warning, see __main__
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    work = Path(args.work) / "smoke" if args.smoke else Path(args.work)
    start = time.perf_counter()
    results = run_sweep(work, args.seeds, args.distillation, args.scales, args.smoke)
    summary = summarize(results, deltas=text_deltas(work, args.seeds, args.distillation, args.scales))
    print(
        f"\ntiny world sweep: mean over seeds {args.seeds} [95% interval, bootstrap over seeds and questions]; "
        "scale: text-LoRA rates as a multiple of the demo's; |T|/|W0|: the size of the merged text deltas against the "
        "base weights (mean over the family's sources)"
    )
    print(format_summary(summary))
    print("\npaired differences, points (same seeds and questions; bootstrap over seeds and questions, pairs kept)")
    print(format_differences(summary))
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    plot = plot_summary(summary, work / "sweep.png")
    print(f"wrote {work / 'summary.json'} and {plot} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
