"""Run a composite on a paper-format benchmark: batched greedy generation, resumable predictions, scores.

    python -m benchmarks.mcub --model FOLDER_OR_HUB_ID --questions Q.json --answers A.json --media-root DIR \
        --output DIR \
        [--task mcub|avqa|music-avqa] [--batch-size 8] [--max-new-tokens 128] [--limit N] \
        [--dtype float32|bfloat16|float16] [--load-in-4bit] [--device cpu|cuda] [--skip-missing]

The protocol is the paper's: the question is rendered with the composite's chat template after the Vicuna v1 system
line (`--system-prompt ""` drops it), images are padded to a square (`--no-pad-images` keeps the processor's crop),
decoding is greedy for at most 128 new tokens. Every batch's outputs are appended to `OUTPUT/predictions.jsonl`
(`{id, question_id, prompt, text}`); a rerun generates only the questions missing there. At the end
`OUTPUT/results.json` holds the metrics, counts, files and settings, and the table is printed.
"""

import argparse
import dataclasses
import datetime
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import (
    BenchmarkError,
    PreparedQuestion,
    Question,
    attach_answers,
    load_inputs,
    prepare_questions,
    read_answers,
    read_questions,
)
from .metrics import TASKS, summarize


logger = logging.getLogger(__name__)

# The system line of the paper's `vicuna_v1` conversation template.
VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREDICTIONS_FILE = "predictions.jsonl"
RESULTS_FILE = "results.json"
# The settings that change what is generated: a rerun into the same folder must use the same ones.
GENERATION_FILE = "generation.json"


@dataclasses.dataclass
class EvaluationSettings:
    """How questions are asked and scored. `generation_key` fields must match between runs into one folder."""

    task: str = "mcub"
    batch_size: int = 8
    max_new_tokens: int = 128
    limit: int | None = None
    skip_missing: bool = False
    system_prompt: str = VICUNA_SYSTEM_PROMPT
    pad_images: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise BenchmarkError(f"Unknown task {self.task!r}; choose one of {list(TASKS)}.")
        if self.batch_size < 1 or self.max_new_tokens < 1 or (self.limit is not None and self.limit < 1):
            raise BenchmarkError("batch size, max new tokens and limit must be positive.")

    def generation_key(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "system_prompt": self.system_prompt,
            "pad_images": self.pad_images,
        }


def resolve_device(device: str | None) -> str:
    """`device`, or cuda when available else cpu; a cuda request without a GPU is an error."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchmarkError(f"--device {device}: no CUDA device is available; use --device cpu.")
    return device


def model_reference(model: str | Path) -> str:
    """How the results name `--model`: a local folder by its absolute path, a Hub id as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else str(model)


def load_processor(model: str | Path) -> Any:
    """A composite's processor, from a local folder or a Hub id, through `AutoProcessor` and remote code."""
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoProcessor

    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise BenchmarkError(f"--model {model}: no config.json there; give a composite folder or Hub id.")
    try:
        processor = AutoProcessor.from_pretrained(str(model), trust_remote_code=True)
    except (OSError, HFValidationError) as error:
        problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BenchmarkError(
            f"--model {model}: not a composite folder, and it cannot be loaded from the Hub ({problem}); check the "
            "path or the repo id, your network and login (`hf auth login`)."
        ) from error
    if not isinstance(getattr(processor, "modalities", None), dict) or not processor.modalities:
        raise BenchmarkError(f"--model {model}: its processor has no `modalities`; this harness needs a composite.")
    return processor


def load_model(
    folder: str | Path, dtype: str = "float32", load_in_4bit: bool = False, device: str | None = None
) -> Any:
    """A composite model in eval mode on `device`, through `AutoModelForCausalLM` and remote code (optionally 4-bit
    nf4 with bitsandbytes, computing in `dtype`)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if dtype not in DTYPES:
        raise BenchmarkError(f"--dtype {dtype!r}: choose one of {list(DTYPES)}.")
    device = resolve_device(device)
    options: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": True}
    if load_in_4bit:
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[dtype]
        )
        options["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(folder, **options).eval()
    return model if load_in_4bit else model.to(device)


@dataclasses.dataclass
class EvaluationPlan:
    """The questions of a run: all in the file, those selected (`--limit`), those ready for the composite and those
    skipped for a modality it lacks."""

    questions: list[Question]
    selected: list[Question]
    prepared: list[PreparedQuestion]
    skipped: list[Question]


def plan_evaluation(
    processor: Any,
    questions_path: str | Path,
    answers_path: str | Path,
    media_root: str | Path | None,
    settings: EvaluationSettings,
) -> EvaluationPlan:
    """Read and check the question and answer files and the media against the composite's processor: every problem
    is raised here, before a model is loaded or anything generated."""
    questions = attach_answers(read_questions(questions_path), read_answers(answers_path), answers_path)
    selected = questions[: settings.limit] if settings.limit else questions
    prepared, skipped = prepare_questions(selected, processor.modalities, media_root, settings.skip_missing)
    return EvaluationPlan(questions, selected, prepared, skipped)


def render_prompt(processor: Any, question_prompt: str, system_prompt: str) -> str:
    """The text the model is given: the composite's chat template on (system line,) user turn, ending with the
    assistant's generation prompt (Vicuna v1: `{system} USER: {question} ASSISTANT:`)."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question_prompt}
    ]
    template = getattr(processor, "chat_template", None)
    if not template:
        logger.warning("the processor has no chat template; using the Vicuna v1 layout")
        return (f"{system_prompt} " if system_prompt else "") + f"USER: {question_prompt} ASSISTANT:"
    return processor.tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )


def read_predictions(path: Path) -> dict[str, dict]:
    """Question id (string) -> prediction line. A last line cut off by an interrupted run is dropped from the file."""
    if not path.exists():
        return {}
    predictions: dict[str, dict] = {}
    lines = path.read_text().splitlines(keepends=True)
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not line.endswith("\n") or not isinstance(record, dict) or "id" not in record or "text" not in record:
                raise ValueError("incomplete")
        except ValueError:
            if number == len(lines) - 1:
                logger.warning("%s: dropping an incomplete last line (an interrupted run)", path)
                path.write_text("".join(lines[:number]))
                break
            raise BenchmarkError(
                f"{path}: line {number + 1} is not a prediction; remove it or use another --output."
            ) from None
        predictions[str(record["id"])] = record
    return predictions


def _check_generation_settings(output: Path, key: dict[str, Any]) -> None:
    """Refuse to mix predictions made with other generation settings into one folder."""
    path = output / GENERATION_FILE
    if path.exists() and (output / PREDICTIONS_FILE).exists():
        before = json.loads(path.read_text())
        changed = sorted(name for name in set(key) | set(before) if before.get(name) != key.get(name))
        if changed:
            details = ", ".join(f"{name}: {before.get(name)!r} then, {key.get(name)!r} now" for name in changed)
            raise BenchmarkError(
                f"{output}: its predictions were generated with other settings ({details}); use another --output "
                "or the same settings."
            )
    path.write_text(json.dumps(key, indent=2) + "\n")


@torch.no_grad()
def generate_batch(
    model: Any, processor: Any, texts: list[str], inputs: dict[str, list], max_new_tokens: int
) -> list[str]:
    """Greedy continuations of a left-padded batch, decoded and stripped."""
    batch = processor(text=texts, return_tensors="pt", padding=True, **inputs)
    batch = batch.to(model.device, dtype=model.dtype)
    tokenizer = processor.tokenizer
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    # The paper also cuts a trailing stop string the decoder left in.
    eos = tokenizer.eos_token or ""
    return [text.strip().removesuffix(eos).strip() if eos else text.strip() for text in texts]


def _prepare_tokenizer(processor: Any) -> None:
    tokenizer = processor.tokenizer
    # Batched generation continues every row from its last token: pad on the left.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token


def evaluate(
    model: Any,
    processor: Any,
    questions_path: str | Path,
    answers_path: str | Path,
    output_dir: str | Path,
    media_root: str | Path | None = None,
    settings: EvaluationSettings | None = None,
    model_name: str | None = None,
    run_info: dict[str, Any] | None = None,
    plan: EvaluationPlan | None = None,
) -> dict[str, Any]:
    """Answer the questions not yet in `output_dir/predictions.jsonl`, score them all, write `results.json` and return
    its content. Every file problem is raised as a `BenchmarkError` before the first generation (`plan`, when given,
    is `plan_evaluation`'s result for these arguments)."""
    settings = settings or EvaluationSettings()
    output = Path(output_dir)
    plan = plan or plan_evaluation(processor, questions_path, answers_path, media_root, settings)
    questions, selected, prepared, skipped = plan.questions, plan.selected, plan.prepared, plan.skipped
    _prepare_tokenizer(processor)
    prompts = {
        entry.question.key: render_prompt(processor, entry.prompt, settings.system_prompt) for entry in prepared
    }

    output.mkdir(parents=True, exist_ok=True)
    generation = {
        "model": model_name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "load_in_4bit": bool(getattr(model, "is_loaded_in_4bit", False)),
        **settings.generation_key(),
    }
    _check_generation_settings(output, generation)
    predictions_path = output / PREDICTIONS_FILE
    done = read_predictions(predictions_path)
    changed = [
        entry.question.id
        for entry in prepared
        if entry.question.key in done and done[entry.question.key].get("prompt") != entry.question.prompt
    ]
    if changed:
        raise BenchmarkError(
            f"{predictions_path}: {len(changed)} stored predictions were made for other question texts "
            f"(ids {changed[:5]}); use another --output for this question file."
        )
    todo = [entry for entry in prepared if entry.question.key not in done]
    logger.info(
        "%d questions: %d answered before, %d to generate, %d skipped",
        len(selected),
        len(prepared) - len(todo),
        len(todo),
        len(skipped),
    )

    batches = [todo[start : start + settings.batch_size] for start in range(0, len(todo), settings.batch_size)]
    with (
        ThreadPoolExecutor(max_workers=1) as loader,
        predictions_path.open("a") as stream,
        tqdm(total=len(todo), desc="generating", unit="question", disable=not settings.progress) as progress,
    ):
        # Media of the next batch are read while the model answers the current one.
        pending = loader.submit(load_inputs, batches[0], processor, settings.pad_images) if batches else None
        for number, batch in enumerate(batches):
            inputs = pending.result()
            if number + 1 < len(batches):
                pending = loader.submit(load_inputs, batches[number + 1], processor, settings.pad_images)
            texts = generate_batch(
                model, processor, [prompts[entry.question.key] for entry in batch], inputs, settings.max_new_tokens
            )
            for entry, text in zip(batch, texts):
                # `question_id` too, the key the paper's scoring scripts read.
                question = entry.question
                record = {"id": question.id, "question_id": question.id, "prompt": question.prompt, "text": text}
                stream.write(json.dumps(record, ensure_ascii=False) + "\n")
                done[entry.question.key] = record
            stream.flush()
            progress.update(len(batch))

    records = [
        {"text": done[question.key]["text"], "answer": question.answer, "prompt": question.prompt}
        for question in (entry.question for entry in prepared)
    ]
    summary = summarize(records, settings.task)
    results = {
        "task": settings.task,
        "model": model_name,
        "files": {
            "questions": str(questions_path),
            "answers": str(answers_path),
            "media_root": str(media_root) if media_root else None,
            "predictions": str(predictions_path),
        },
        "settings": {**dataclasses.asdict(settings), **(run_info or {})},
        "counts": {
            "questions_in_file": len(questions),
            "selected": len(selected),
            "evaluated": len(prepared),
            "skipped_missing_modality": len(skipped),
            "generated_this_run": len(todo),
        },
        "metrics": summary["metrics"],
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if "unparsed" in summary:
        results["counts"]["unparsed_by_forgiving_parse"] = summary["unparsed"]
    (output / RESULTS_FILE).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results


def format_table(results: dict[str, Any]) -> str:
    """The metrics as a plain-text table (accuracy in percent, correct / total), with the counts below."""
    rows = [("metric", "accuracy", "correct/total")]
    rows += [
        (name, f"{100 * value['accuracy']:.2f}%", f"{value['correct']}/{value['total']}")
        for name, value in results["metrics"].items()
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = [f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}" for row in rows]
    counts = results["counts"]
    lines.append(
        f"{results['task']}: {counts['evaluated']} questions evaluated, {counts['generated_this_run']} generated this "
        f"run, {counts['skipped_missing_modality']} skipped (missing modality)"
        + (f", {counts['unparsed_by_forgiving_parse']} unparsed" if "unparsed_by_forgiving_parse" in counts else "")
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.mcub",
        description="Evaluate a composite on MCUB-3/4, AVQA or MUSIC-AVQA (the paper's question files).",
    )
    parser.add_argument(
        "--model", required=True, help="composite folder or Hub id (loaded with trust_remote_code=True)"
    )
    parser.add_argument("--questions", required=True, help="question JSON (paper format)")
    parser.add_argument("--answers", required=True, help="answer JSON (gold = last turn's value, matched by id)")
    parser.add_argument("--media-root", default=None, help="folder the media paths are relative to")
    parser.add_argument("--output", required=True, help="folder for predictions.jsonl and results.json (resumable)")
    parser.add_argument(
        "--task", choices=TASKS, default="mcub", help="metrics: mcub/avqa (letters), music-avqa (open answers)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--load-in-4bit", action="store_true", help="quantize with bitsandbytes (nf4)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--skip-missing", action="store_true", help="skip questions that need a modality the composite lacks"
    )
    parser.add_argument("--system-prompt", default=VICUNA_SYSTEM_PROMPT, help="system line (default: Vicuna v1's)")
    parser.add_argument(
        "--pad-images",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pad images to a square before the image processor, as the paper's evaluation does",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; exit status 0, 2 on a problem with the inputs (one line on stderr), 130 when interrupted."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("benchmarks.mcub").setLevel(logging.INFO)
    try:
        settings = EvaluationSettings(
            task=args.task,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            limit=args.limit,
            skip_missing=args.skip_missing,
            system_prompt=args.system_prompt,
            pad_images=args.pad_images,
            progress=not args.no_progress,
        )
        device = resolve_device(args.device)
        processor = load_processor(args.model)
        # Every file is checked before the model loads: a wrong path should not cost a model load.
        plan = plan_evaluation(processor, args.questions, args.answers, args.media_root, settings)
        model = load_model(args.model, args.dtype, args.load_in_4bit, device)
        results = evaluate(
            model,
            processor,
            args.questions,
            args.answers,
            args.output,
            media_root=args.media_root,
            settings=settings,
            model_name=model_reference(args.model),
            run_info={"dtype": args.dtype, "load_in_4bit": args.load_in_4bit, "device": device},
            plan=plan,
        )
    except BenchmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the predictions so far are in {Path(args.output) / PREDICTIONS_FILE}", file=sys.stderr)
        return 130
    print(format_table(results))
    return 0
