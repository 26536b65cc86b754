"""Our merge rules against mergekit's on the same tiny sources: the same recipe written for both tools, the merged LLM
tensors compared (max |ours - mergekit|), one row per rule and setting.

    python -m benchmarks.merge_parity [--mergekit PATH/TO/mergekit-yaml] [--workdir /tmp/composite-merge-parity]

Sources: a tiny Llama base and two LLaVA-1.5 full fine-tunes of it (`fixtures.tiny_sources`), float32. Half of the
second source's LLM tensors are the exact mirror of the first's around the base (`2 W0 - W1`, computed in float64), so
that, with equal weights, many entries have a weighted sign sum of exactly 0: the case where the sign-election
conventions differ. mergekit reads the same two LLMs as plain `LlamaForCausalLM` folders (bit-identical tensors).
Compared: every LLM tensor, except the rows of the placeholder tokens in the embeddings and LM head (a composite
takes each placeholder's row from its own source). DARE below density 1 is random in both tools (mergekit draws its
masks from torch's global generator, unseeded), so it is compared at density 1 only; its rescale is compared
separately, as functions, on one mask (mergekit's `rescaled_masked_tensor` against ours).

mergekit is the one `benchmarks.conversion_speed` installs (`benchmarks/.mergekit-venv`) unless `--mergekit` names a
`mergekit-yaml`; its version is printed.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from benchmarks import write_figures


# (label, our `merge:`, mergekit's method and parameters, the two sources' weights)
CASES = [
    ("linear, normalize", {"rule": "linear", "normalize": True}, ("linear", {}), (1.0, 3.0)),
    (
        "task_arithmetic, lambda 1.5",
        {"rule": "task_arithmetic", "lambda": 1.5},
        ("task_arithmetic", {"lambda": 1.5}),
        (0.5, 0.25),
    ),
    ("ties 0.3", {"rule": "ties", "density": 0.3}, ("ties", {}), (0.5, 0.5)),
    (
        "ties 0.5, no normalize, lambda 0.7",
        {"rule": "ties", "density": 0.5, "normalize": False, "lambda": 0.7},
        ("ties", {"normalize": False, "lambda": 0.7}),
        (1.0, 0.5),
    ),
    ("ties 0.3, rescale", {"rule": "ties", "density": 0.3, "rescale": True}, ("ties", {"rescale": True}), (0.5, 0.5)),
    ("ties 1.0, equal weights", {"rule": "ties", "density": 1.0}, ("ties", {}), (0.5, 0.5)),
    ("dare_ties 1.0", {"rule": "dare_ties", "density": 1.0}, ("dare_ties", {}), (0.5, 0.5)),
    ("dare_linear 1.0", {"rule": "dare_linear", "density": 1.0}, ("dare_linear", {}), (0.6, 0.4)),
]


def write_sources(workdir: Path) -> dict[str, Path]:
    from fixtures.tiny_sources import save_tiny_base, save_tiny_llava

    folders = {"base": save_tiny_base(workdir / "base")}
    folders["llava_0"] = save_tiny_llava(workdir / "llava_0", folders["base"], seed=1)
    folders["llava_1"] = save_tiny_llava(workdir / "llava_1", folders["base"], seed=2)
    base = load_file(str(folders["base"] / "model.safetensors"))
    first = load_file(str(folders["llava_0"] / "model.safetensors"))
    second = load_file(str(folders["llava_1"] / "model.safetensors"))
    for index, key in enumerate(sorted(base)):
        if index % 2 == 0:
            source_key = key if key == "lm_head.weight" else "model.language_model." + key[len("model.") :]
            mirrored = 2 * base[key].double() - first[source_key].double()
            second[source_key] = mirrored.to(first[source_key].dtype)
    save_file(second, str(folders["llava_1"] / "model.safetensors"), metadata={"format": "pt"})
    for index in (0, 1):
        state = load_file(str(folders[f"llava_{index}"] / "model.safetensors"))
        llm = {
            key: state[key if key == "lm_head.weight" else "model.language_model." + key[len("model.") :]]
            for key in base
        }
        folder = workdir / f"llm_{index}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(llm, str(folder / "model.safetensors"), metadata={"format": "pt"})
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (folders["base"] / name).is_file():
                (folder / name).write_bytes((folders["base"] / name).read_bytes())
        folders[f"llm_{index}"] = folder
    return folders


def run_ours(folders: dict[str, Path], merge: dict, weights: tuple[float, float], output: Path) -> tuple[dict, list]:
    """Our composite's LLM tensors under the plain Llama names, and its placeholder token ids."""
    from conversion import compose

    recipe = {
        "method": "naive",
        "base": str(folders["base"]),
        "merge": merge,
        "dtype": "float32",
        "sources": [
            {"path": str(folders["llava_0"]), "weight": weights[0]},
            {"path": str(folders["llava_1"]), "weight": weights[1], "rename": {"image": "chart"}},
        ],
    }
    folder = compose(recipe, output, force=True, verify=False)
    state = load_file(str(folder / "model.safetensors"))
    placeholders = [
        entry.placeholder_id for entry in json.loads((folder / "config.json").read_text())["modalities"].values()
    ]
    llm = {
        ("lm_head.weight" if key == "lm_head.weight" else "model." + key[len("model.language_model.") :]): value
        for key, value in state.items()
        if key.startswith("model.language_model.") or key == "lm_head.weight"
    }
    return llm, placeholders


def run_mergekit(
    mergekit: Path,
    folders: dict[str, Path],
    method: str,
    parameters: dict,
    density: float | None,
    weights: tuple[float, float],
    output: Path,
) -> dict:
    models = []
    for index, weight in enumerate(weights):
        model_parameters = {"weight": weight} if density is None else {"weight": weight, "density": density}
        models.append({"model": str(folders[f"llm_{index}"]), "parameters": model_parameters})
    config = {"merge_method": method, "models": models, "dtype": "float32"}
    if method != "linear":
        config["base_model"] = str(folders["base"])
    if parameters:
        config["parameters"] = parameters
    path = output.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run([str(mergekit), str(path), str(output), "--no-cuda", "--quiet"], check=True)
    state = {}
    for file in sorted(output.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def compare(ours: dict, theirs: dict, placeholders: list[int]) -> tuple[float, int]:
    """Max |difference| over every LLM tensor (without the placeholders' rows), and how many entries differ."""
    worst, count = 0.0, 0
    for key, value in theirs.items():
        mine = ours[key]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            keep = torch.ones(value.shape[0], dtype=torch.bool)
            keep[placeholders] = False
            mine, value = mine[: value.shape[0]][keep], value[keep]
        difference = (mine.float() - value.float()).abs()
        worst = max(worst, difference.max().item())
        count += int((difference > 0).sum())
    return worst, count


def exact_ties(folders: dict[str, Path], weights: tuple[float, float]) -> tuple[int, int]:
    """Entries whose weighted delta sum is exactly 0 while some delta is not: where the tie convention decides."""
    base = load_file(str(folders["base"] / "model.safetensors"))
    sources = [load_file(str(folders[f"llm_{index}"] / "model.safetensors")) for index in (0, 1)]
    ties = total = 0
    for key, value in base.items():
        deltas = [source[key].float() - value.float() for source in sources]
        summed = weights[0] * deltas[0] + weights[1] * deltas[1]
        ties += int(((summed == 0) & ((deltas[0] != 0) | (deltas[1] != 0))).sum())
        total += value.numel()
    return ties, total


RESCALE_CHECK = """
import json, sys, torch
from mergekit.sparsify import RescaleNorm, rescaled_masked_tensor
data = torch.load(sys.argv[1], weights_only=True)
print(json.dumps(rescaled_masked_tensor(data["delta"], data["mask"], RescaleNorm.l1).tolist()))
"""


def rescale_difference(mergekit: Path, workdir: Path) -> float:
    """mergekit's L1 rescale against ours on one random delta and mask."""
    from conversion.merge import _rescaled

    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(4096, generator=generator) * 0.01
    mask = (torch.rand(4096, generator=generator) < 0.3).float()
    torch.save({"delta": delta, "mask": mask}, workdir / "rescale.pt")
    python = mergekit.parent / "python"
    result = subprocess.run(
        [str(python), "-c", RESCALE_CHECK, str(workdir / "rescale.pt")], check=True, capture_output=True, text=True
    )
    theirs = torch.tensor(json.loads(result.stdout))
    return (_rescaled(delta, delta * mask) - theirs).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit", type=Path, help="a mergekit-yaml executable (default: benchmarks' own venv)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/composite-merge-parity"))
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmarks/merge_parity.json"))
    args = parser.parse_args()
    if args.mergekit is None:
        from benchmarks.conversion_speed import ensure_mergekit

        args.mergekit = ensure_mergekit()
    version = subprocess.run(
        [str(args.mergekit.parent / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    args.workdir.mkdir(parents=True, exist_ok=True)
    folders = write_sources(args.workdir)
    rows = []
    print(f"mergekit {version}; sources in {args.workdir}")
    print(f"{'case':40} {'max |ours - mergekit|':>22} {'entries differing':>18} {'exact sign ties':>16}")
    for label, merge, (method, parameters), weights in CASES:
        slug = label.replace(" ", "_").replace(",", "")
        ours, placeholders = run_ours(folders, merge, weights, args.workdir / "ours" / slug)
        theirs = run_mergekit(
            args.mergekit, folders, method, parameters, merge.get("density"), weights, args.workdir / "mergekit" / slug
        )
        worst, count = compare(ours, theirs, placeholders)
        ties, total = exact_ties(folders, weights) if method in ("ties", "dare_ties") else (0, 0)
        tie_text = f"{ties} of {total}" if total else "-"
        print(f"{label:40} {worst:22.3g} {count:18d} {tie_text:>16}")
        rows.append({"case": label, "max_abs_diff": worst, "entries_differing": count, "exact_sign_ties": ties})
    rescale = rescale_difference(args.mergekit, args.workdir)
    print(f"{'L1 rescale (functions, one mask)':40} {rescale:22.3g}")
    report = {"mergekit": version, "cases": rows, "rescale_max_abs_diff": rescale}
    print(f"wrote {write_figures(report, args.output)}")


if __name__ == "__main__":
    sys.exit(main())
