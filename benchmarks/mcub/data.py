"""The paper's question and answer files, checked against a composite before anything is generated.

A question file is a JSON list of

    {"id": ...,
     "conversations": [{"from": "human", "value": "<image> <audio> Which ...?"}, {"from": "gpt", "value": null}],
     "modal_inputs": {"vision": ["coco/1.jpg"], "audio": ["audiocaps/2.wav"], "video": [...], "point": [...]}}

and an answer file a JSON list of items whose `conversations[-1].value` is the gold answer, matched by `id`.
`modal_inputs` keys are the paper's (`vision` for images, `audio`, `video`, `point`) or a composite's modality names.

`prepare_questions` finds every problem up front (answers missing, unknown keys, modalities the composite lacks,
placeholder counts, media files missing or unreadable without PyAV) and reports them together.
"""

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .media import SUFFIXES_BY_KIND, load_item, needs_pyav, pyav_available


logger = logging.getLogger(__name__)

# The paper's modal_inputs keys -> our modality kinds, and the placeholder the paper's prompts use for each.
PAPER_KINDS = {"vision": "image", "audio": "audio", "video": "video", "point": "point"}
PAPER_PLACEHOLDERS = {"vision": "<image>", "audio": "<audio>", "video": "<video>", "point": "<point>"}
CALL_ARGUMENTS = {"image": "images", "video": "videos", "audio": "audio", "point": "point_clouds"}
# How many offending ids or files an error message lists before it summarises.
_SHOWN = 10


class BenchmarkError(ValueError):
    """A problem with the question or answer files, the media, the model or the output folder; the message names the
    thing and the fix. The command line prints it on one line and exits with status 2."""


@dataclass(frozen=True)
class Question:
    """One question as written in the file: `media` maps each `modal_inputs` key to its paths."""

    id: Any
    prompt: str
    media: dict[str, list[str]]
    answer: str | None = None

    @property
    def key(self) -> str:
        """The id as a string: how questions, answers and predictions are matched."""
        return str(self.id)


@dataclass(frozen=True)
class PreparedQuestion:
    """A question ready for a composite: its prompt with the composite's placeholders, and each media file with the
    modality it feeds, in the order of the placeholders (the order the processor assigns inputs in)."""

    question: Question
    prompt: str
    items: tuple[tuple[str, Path], ...]


def _read_json_list(path: str | Path, what: str) -> list:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchmarkError(f"{path}: the {what} file does not exist.") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BenchmarkError(f"{path}: cannot read the {what} file as JSON ({error}).") from None
    if not isinstance(data, list) or not data:
        raise BenchmarkError(f"{path}: the {what} file must hold a non-empty JSON list.")
    return data


def _listed(values: list, total: int | None = None) -> str:
    total = len(values) if total is None else total
    shown = ", ".join(str(value) for value in values[:_SHOWN])
    return shown + (f" and {total - _SHOWN} more" if total > _SHOWN else "")


def read_questions(path: str | Path) -> list[Question]:
    """The questions of a paper-format question file, in file order."""
    path = Path(path)
    questions, seen = [], set()
    for index, item in enumerate(_read_json_list(path, "question")):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or "id" not in item:
            raise BenchmarkError(f"{path}: item {index} needs an `id` and a `conversations` list.")
        human = [turn for turn in turns if isinstance(turn, dict) and turn.get("from") in ("human", "user")]
        if len(human) != 1 or not isinstance(human[0].get("value"), str):
            raise BenchmarkError(
                f"{path}: question {item['id']!r} must have exactly one `human` turn with a string value "
                "(multi-turn questions are not part of these benchmarks)."
            )
        raw_media = item.get("modal_inputs") or {}
        if not isinstance(raw_media, dict):
            raise BenchmarkError(f"{path}: question {item['id']!r}: `modal_inputs` must map a modality to file paths.")
        media = {}
        for key, paths in raw_media.items():
            paths = [paths] if isinstance(paths, str) else paths
            if not isinstance(paths, list) or not all(isinstance(one, str) for one in paths):
                raise BenchmarkError(
                    f"{path}: question {item['id']!r}: modal_inputs[{key!r}] must be a list of paths."
                )
            if paths:
                media[key] = list(paths)
        question = Question(id=item["id"], prompt=human[0]["value"], media=media)
        if question.key in seen:
            raise BenchmarkError(f"{path}: question id {item['id']!r} appears more than once.")
        seen.add(question.key)
        questions.append(question)
    return questions


def read_answers(path: str | Path) -> dict[str, str]:
    """Question id (as a string) -> gold answer, from a paper-format answer file."""
    path = Path(path)
    answers = {}
    for index, item in enumerate(_read_json_list(path, "answer")):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if "id" not in (item if isinstance(item, dict) else {}) or not isinstance(turns, list) or not turns:
            raise BenchmarkError(f"{path}: item {index} needs an `id` and a non-empty `conversations` list.")
        gold = turns[-1].get("value") if isinstance(turns[-1], dict) else None
        if not isinstance(gold, str) or not gold.strip():
            raise BenchmarkError(
                f"{path}: answer {item['id']!r} has no gold answer (the last turn's `value` must be a non-empty "
                "string)."
            )
        answers[str(item["id"])] = gold
    return answers


def attach_answers(questions: list[Question], answers: dict[str, str], answers_path: str | Path) -> list[Question]:
    """The questions with their gold answers; every question must have one."""
    missing = [question.id for question in questions if question.key not in answers]
    if missing:
        raise BenchmarkError(
            f"{answers_path}: no answer for {len(missing)} of {len(questions)} questions (ids {_listed(missing)}); "
            "use the answer file that belongs to this question file."
        )
    return [Question(q.id, q.prompt, q.media, answers[q.key]) for q in questions]


def modality_for_key(key: str, modalities: dict[str, dict]) -> tuple[str | None, str | None]:
    """(modality name, None) for a `modal_inputs` key, or (None, why not): `kind:<kind>` when the composite has no
    modality of the key's kind, `unknown` when the key names neither a modality nor a kind, `ambiguous` when several
    modalities share its kind."""
    if key in modalities:
        return key, None
    kind = PAPER_KINDS.get(key, key)
    if kind not in CALL_ARGUMENTS:
        return None, "unknown"
    owners = [name for name, entry in modalities.items() if entry["kind"] == kind]
    if not owners:
        return None, f"kind:{kind}"
    return (owners[0], None) if len(owners) == 1 else (None, "ambiguous")


def _placeholder_pattern(modalities: dict[str, dict]) -> re.Pattern:
    """Any of the composite's placeholders, longest first (as the processor matches them)."""
    tokens = sorted((entry["placeholder"] for entry in modalities.values()), key=len, reverse=True)
    return re.compile("|".join(re.escape(token) for token in tokens))


def prepare_questions(
    questions: list[Question],
    modalities: dict[str, dict],
    media_root: str | Path | None,
    skip_missing: bool = False,
) -> tuple[list[PreparedQuestion], list[Question]]:
    """Check `questions` against a composite's `modalities` (the processor's entries) and the media on disk; return the
    usable questions and those skipped for needing a modality the composite lacks (only with `skip_missing`).

    Every problem found is reported in one `BenchmarkError`: answers are never generated for a question set that
    would fail later.
    """
    root = Path(media_root) if media_root else None
    by_placeholder = {entry["placeholder"]: name for name, entry in modalities.items()}
    pattern = _placeholder_pattern(modalities) if modalities else None
    problems: dict[str, list[str]] = {}
    lacking: dict[str, list] = {}
    missing_files: list[str] = []
    pyav_files: list[str] = []
    prepared, skipped = [], []

    def problem(kind: str, message: str) -> None:
        problems.setdefault(kind, []).append(message)

    for question in questions:
        names, lacks = {}, []
        for key in question.media:
            name, why = modality_for_key(key, modalities)
            if why == "unknown":
                problem("key", f"question {question.id!r}: modal_inputs key {key!r}")
            elif why == "ambiguous":
                problem("key", f"question {question.id!r}: modal_inputs key {key!r} (several modalities of that kind)")
            elif why:
                lacks.append(why.split(":", 1)[1])
            else:
                names[key] = name
        if lacks:
            for kind in lacks:
                lacking.setdefault(kind, []).append(question.id)
            skipped.append(question)
            continue
        prompt = question.prompt
        for key, name in names.items():
            # The paper's prompts use `<image>` for `vision` etc.; a composite may name its placeholders otherwise.
            paper_token = PAPER_PLACEHOLDERS.get(key, f"<{modalities[name]['kind']}>")
            if paper_token != modalities[name]["placeholder"] and paper_token not in by_placeholder:
                prompt = prompt.replace(paper_token, modalities[name]["placeholder"])
        queues = {name: [] for name in modalities}
        for key, paths in question.media.items():
            if key in names:
                queues[names[key]] += paths
        found = [by_placeholder[token] for token in pattern.findall(prompt)] if pattern else []
        mismatched = [
            f"{modalities[name]['placeholder']} x{found.count(name)} for {len(paths)} file(s)"
            for name, paths in queues.items()
            if found.count(name) != len(paths)
        ]
        if mismatched:
            problem("placeholders", f"question {question.id!r}: " + ", ".join(mismatched))
            continue
        items = []
        for name in found:
            path = Path(queues[name].pop(0))
            resolved = path if path.is_absolute() or root is None else root / path
            kind = modalities[name]["kind"]
            if resolved.suffix.lower() not in SUFFIXES_BY_KIND[kind]:
                readable = " ".join(SUFFIXES_BY_KIND[kind])
                problem("suffix", f"question {question.id!r}: {path} as {kind} (readable: {readable})")
            elif not resolved.is_file():
                missing_files.append(str(resolved))
            elif needs_pyav(resolved, kind):
                pyav_files.append(str(resolved))
            items.append((name, resolved))
        prepared.append(PreparedQuestion(question, prompt, tuple(items)))

    messages = []
    if lacking and not skip_missing:
        counts = ", ".join(
            f"{kind} ({len(ids)} questions, e.g. {_listed(ids[:3], len(ids))})" for kind, ids in lacking.items()
        )
        kinds = {name: entry["kind"] for name, entry in modalities.items()}
        messages.append(
            f"the composite has no modality of kind {counts}; its modalities are {kinds} (pass --skip-missing to skip "
            "those questions)"
        )
    titles = {
        "key": "unknown modal_inputs keys (use vision/audio/video/point or a modality name of the composite)",
        "placeholders": "placeholder counts that do not match the media files",
        "suffix": "files of a format this harness cannot read",
    }
    for kind, title in titles.items():
        if problems.get(kind):
            messages.append(f"{len(problems[kind])} {title}: {_listed(problems[kind])}")
    if missing_files:
        where = f"under --media-root {root}" if root else "(relative paths need --media-root)"
        messages.append(f"{len(missing_files)} media files missing {where}: {_listed(missing_files)}")
    if pyav_files and not pyav_available():
        messages.append(
            f"{len(pyav_files)} media files need PyAV to decode (e.g. {pyav_files[0]}); install it with "
            "`pip install av`"
        )
    if messages:
        raise BenchmarkError("; ".join(messages) + ".")
    if skipped:
        logger.warning("skipping %d questions that need a modality the composite lacks", len(skipped))
    return prepared, skipped


def image_pad_fill(processor: Any, name: str) -> tuple[int, int, int]:
    """The padding colour for a modality's images: its image processor's mean, as 0-255 RGB (LLaVA's choice)."""
    settings = processor.modalities[name].get("image_processor_kwargs") or {}
    mean = settings.get("image_mean", getattr(processor.image_processor, "image_mean", None)) or [0.5, 0.5, 0.5]
    mean = list(mean) * 3 if len(mean) == 1 else list(mean)
    return tuple(int(value * 255) for value in mean[:3])


def load_inputs(prepared: list[PreparedQuestion], processor: Any, pad_images: bool = True) -> dict[str, list]:
    """The processor keyword arguments (`images=`, `videos=`, `audio=`, `point_clouds=`) for a batch of questions:
    each kind's items in the order of its placeholders across the batch."""
    inputs: dict[str, list] = {}
    sampling_rate = getattr(getattr(processor, "feature_extractor", None), "sampling_rate", None)
    for entry in prepared:
        for name, path in entry.items:
            modality = processor.modalities[name]
            kind = modality["kind"]
            fill = image_pad_fill(processor, name) if pad_images and kind == "image" else None
            try:
                item = load_item(
                    path, kind, num_frames=modality.get("num_frames"), sampling_rate=sampling_rate, pad_fill=fill
                )
            except ValueError as error:
                raise BenchmarkError(f"question {entry.question.id!r}: {error}") from None
            inputs.setdefault(CALL_ARGUMENTS[kind], []).append(item)
    return inputs
