"""The tiny world end to end (the project's demo): train the base LLM and one DAMC and one NaiveMC source per modality,
compose each family with the converter, evaluate, print the table (each figure with its 95% bootstrap interval over
the test questions), write it as JSON and PNG, and answer a few tiny MCUB questions (multiple choice and open) through
`pipeline()` and `generate()` with the DAMC composite loaded in 4-bit.

    python -m benchmarks.tinyworld [--work outputs/tinyworld] [--seed 0] [--text-lora-learning-rate 1e-3]
        [--text-distillation-weight 5]

Artifacts are cached under --work: a rerun with the same settings only evaluates.
"""

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from .evaluate import question_inputs
from .questions import PLACEHOLDERS, mcub_open_split, mcub_split, unimodal_split
from .report import format_table, plot_table
from .run import MCUB_COLUMNS, OPEN_COLUMNS, Results, Settings, accuracies, run
from .stats import bootstrap, mean_accuracy
from .world import MODALITIES, make_concepts


COLUMNS = [*MODALITIES, *MCUB_COLUMNS.values(), *OPEN_COLUMNS.values()]


def examples(folder: Path, settings: Settings, count: int = 3) -> None:
    """Test questions answered by the composite loaded in 4-bit with its remote code, the way a user loads it: image
    questions through `pipeline("image-text-to-text")` with chat messages, tiny MCUB-4 questions, multiple choice and
    open (four modalities at once, which that pipeline cannot pass), through `generate()`."""
    from transformers import BitsAndBytesConfig, pipeline

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    chat = pipeline(
        "image-text-to-text",
        model=str(folder),
        trust_remote_code=True,
        model_kwargs={"quantization_config": quantization},
    )
    model, processor = chat.model, chat.processor
    layers = sum(type(module).__name__ == "Linear4bit" for module in model.modules())
    print(f"\nthe DAMC composite in 4-bit ({layers} Linear4bit layers), {folder}")
    concepts = {concept.name: concept for concept in make_concepts(settings.seed)}
    for question in unimodal_split(list(concepts.values()), "image", 2 * count, settings.seed, "test")[1::2]:
        image = question_inputs(question, concepts, "test")["images"][0]
        # The prompt's text around its image, in order (some wordings put the question before the input).
        before, after = (part.strip() for part in question.prompt().split(PLACEHOLDERS["image"]))
        content = [{"type": "text", "text": before}] if before else []
        content += [{"type": "image", "image": image}, {"type": "text", "text": after}]
        answer = chat(
            text=[{"role": "user", "content": content}], max_new_tokens=2, generate_kwargs={"do_sample": False}
        )
        reply = answer[0]["generated_text"][-1]["content"].strip()
        print(f"  pipeline  [image={question.items[0][1]}] {question.prompt()} -> {reply!r} (gold {question.answer})")
    mcub = [
        *mcub_split(list(concepts.values()), 4, count, settings.seed, "test"),
        *mcub_open_split(list(concepts.values()), 4, count, settings.seed, "test"),
    ]
    for question in mcub:
        batch = processor(text=f"USER: {question.prompt()} ASSISTANT:", **question_inputs(question, concepts, "test"))
        output = model.generate(**batch, max_new_tokens=2, do_sample=False)
        reply = processor.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        shown = " ".join(f"{modality}={name}" for modality, name in question.items)
        print(
            f"  generate  [{shown}] {question.prompt()} -> {reply!r} "
            f"(gold {question.answer}: all {question.meta['shared']})"
        )


def with_intervals(results: Results) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Each accuracy with its 95% interval from a bootstrap over the test questions (one training run: the noise of
    the question sample, not of training; `python -m benchmarks.tinyworld.sweep` adds seeds)."""
    return {
        row: {
            column: bootstrap([np.asarray(values, dtype=float)], mean_accuracy) for column, values in columns.items()
        }
        for row, columns in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="outputs/tinyworld", help="folder for every artifact (cached)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--text-lora-learning-rate",
        type=float,
        default=Settings.text_lora_learning_rate,
        help="learning rate of the DAMC sources' text LoRA; 0 freezes it (use another --work)",
    )
    parser.add_argument(
        "--text-distillation-weight",
        type=float,
        default=Settings.text_distillation_weight,
        help="weight of the sources' distillation from the base LLM reading each input's name (0: off)",
    )
    parser.add_argument(
        "--search-lambda",
        action="store_true",
        help="also choose λ on a grid: by validation accuracy, and by agreement with the sources (no labels)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "training", "httpx", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Rank-8 deltas on a width-128 LLM are large next to its weights: the converter's "is it really fine-tuned from
    # this base?" warning is expected here.
    logging.getLogger("conversion").setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    work = Path(args.work)
    settings = Settings(
        seed=args.seed,
        text_lora_learning_rate=args.text_lora_learning_rate,
        text_distillation_weight=args.text_distillation_weight,
    )
    start = time.perf_counter()
    results = run(work, settings)
    rows = with_intervals(results)
    table = format_table(rows, COLUMNS)
    print(
        f"\ntiny world (seed {settings.seed}): accuracy % ± half its 95% interval (bootstrap over questions); "
        f"chance 25 for letters, unimodal = half names, half letters; open-k: tiny MCUB-k answered with the shared "
        f"value, no options ({settings.unimodal_questions} unimodal questions per modality, "
        f"{settings.mcub_questions} per MCUB split)"
    )
    print(table)
    (work / "results.json").write_text(
        json.dumps(
            {"settings": vars(settings), "rows": rows, "accuracy": accuracies(results), "per_question": results},
            indent=1,
        )
    )
    # One bar per family in the plot: each source fills its own modality's column.
    plotted = {f"sources ({family})": {} for family in ("damc", "naive")}
    for label, row in rows.items():
        target = f"sources ({label.split('(')[-1].rstrip(')')})" if " source (" in label else label
        plotted.setdefault(target, {}).update(row)
    plot = plot_table(
        plotted, COLUMNS, work / "results.png", "tiny world: the base LLM on names, each source alone, the composites"
    )
    print(f"wrote {work / 'results.json'} and {plot} ({time.perf_counter() - start:.0f} s)")
    if args.search_lambda:
        report_lambda_search(work, settings, accuracies(results))
    # Quiet while the examples print, bitsandbytes included: its notice (a warning) that its optional CPU kernel could
    # not be fetched offline goes by its own logger's level, set above, not the root's.
    for name in ("", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    examples(work / "composites" / "damc-built" / "model", settings)


def report_lambda_search(work: Path, settings: Settings, rows: dict[str, dict[str, float]]) -> None:
    """λ chosen on the validation split (supervised) and by agreement with the sources (unsupervised), each scored
    on the test split against λ = 1/N."""
    from .lambda_search import search
    from .run import build_world, evaluate_composite

    sources = build_world(work, settings)
    results = search(work, sources, settings)
    table = {}
    for name, result in results.items():
        for value, entry in result["grid"].items():
            table[f"{name} λ={value}"] = {"validation": entry["validation"], "agreement": entry["agreement"]}
        for criterion in ("supervised", "unsupervised"):
            chosen = result[criterion]
            test = evaluate_composite(Path(result["grid"][chosen]["folder"]), settings)
            table[f"{name} {criterion} pick λ={chosen}"] = accuracies({"": test})[""]
        table[f"{name} λ=1/4 (default)"] = rows[f"{name} composite"]
    print("\nλ search (validation and agreement select; test reports):")
    print(format_table(table, ["validation", "agreement", *COLUMNS]))
    (work / "lambda_search.json").write_text(json.dumps({"search": results, "table": table}, indent=1, default=str))


if __name__ == "__main__":
    main()
