"""Check a whole training set before the first step, and report every sample that cannot be used at once, by id:
no assistant turn or malformed turns, inputs for a modality the model lacks, placeholders that do not match the
inputs given, media that are missing, empty or damaged, and (for distillation) no text version. A run then never
stops hours in on a sample that could have been found in seconds."""

import re

from conversations.data import ConversationDataset, DataError
from conversations.media import MediaError, check_media


def validate_dataset(dataset: ConversationDataset) -> None:
    """Raise `DataError` listing every unusable sample (one line each) when there is any."""
    problems = []
    for index in range(len(dataset)):
        problems += [f"  {dataset.sample_id(index)}: {problem}" for problem in sample_problems(dataset, index)]
    if problems:
        bad = len({line.split(": ", 1)[0] for line in problems})
        raise DataError(
            f"{bad} of {len(dataset)} training samples cannot be used (nothing was trained); fix or remove them:\n"
            + "\n".join(problems)
        )


def sample_problems(dataset: ConversationDataset, index: int) -> list[str]:
    """What is wrong with sample `index` (empty when nothing is)."""
    sample = dataset.samples[index]
    problems = []
    try:
        dataset.check_turns(index)
    except DataError as error:
        problems.append(_reason(error))
    if dataset.with_text_version and not isinstance(sample.get("text_conversations"), list):
        problems.append(
            "no `text_conversations` list (the conversation with every input written as text), which "
            "distillation from the base LLM needs"
        )
    raw = sample.get("modal_inputs") or {}
    if not isinstance(raw, dict):
        return problems + [f"`modal_inputs` must map modality names to file paths, got {type(raw).__name__}"]
    given: dict[str, int] = {}
    for key, paths in raw.items():
        try:
            name = dataset.modality_of_key(index, key)
        except DataError as error:
            problems.append(_reason(error))
            continue
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(path, str) for path in paths):
            problems.append(f"modal_inputs[{key!r}] must be a file path or a list of them, got {paths!r}")
            continue
        given[name] = given.get(name, 0) + len(paths)
        kind = dataset.modalities[name]["kind"]
        for path in paths:
            try:
                check_media(dataset.resolve(path), kind)
            except MediaError as error:
                problems.append(str(error))
    found = _placeholder_counts(dataset, sample)
    for name, entry in dataset.modalities.items():
        if found.get(name, 0) != given.get(name, 0):
            problems.append(
                f"the conversation has {found.get(name, 0)} {entry['placeholder']} placeholder(s) but "
                f"{given.get(name, 0)} {name} input(s) are given (modal_inputs); use one placeholder per input"
            )
    return problems


def _placeholder_counts(dataset: ConversationDataset, sample: dict) -> dict[str, int]:
    """Placeholders per modality over every turn, longest placeholder first (as the tokenizer splits them)."""
    by_token = {entry["placeholder"]: name for name, entry in dataset.modalities.items()}
    pattern = re.compile("|".join(re.escape(token) for token in sorted(by_token, key=len, reverse=True)))
    counts: dict[str, int] = {}
    for turn in sample.get("conversations") or []:
        if isinstance(turn, dict) and isinstance(turn.get("value"), str):
            for token in pattern.findall(turn["value"]):
                counts[by_token[token]] = counts.get(by_token[token], 0) + 1
    return counts


def _reason(error: DataError) -> str:
    """A `DataError` about one sample without its leading 'Sample <id>: '."""
    return re.sub(r"^Sample [^:]*: ", "", str(error)).rstrip(".")


__all__ = ["sample_problems", "validate_dataset"]
