"""Choose λ (one value for every source) on a small grid instead of the paper's 1/N.

Each candidate is composed into a temporary folder and answers the questions of `weight_search.data` (the paper's JSON:
`conversations` + `modal_inputs`; the last `gpt` turn is the answer) greedily. Its score is either

- `accuracy`: the fraction whose first answer word equals the first word of the answer given, or
- `agreement` (no answers needed): each source alone (composed by itself at λ = 1, which reproduces it) answers the
  questions about its own modalities; the candidate's score is the fraction of those answers it repeats, averaged
  over sources. A good λ keeps what every source can do alone.

The best candidate wins (the earlier one on a tie). Only the questions given are used: keep a test split out of them.
"""

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from conversations.data import ROLES, ConversationDataset, DataError, load_samples
from modeling_composite.modeling_composite import CompositeMLLMForCausalLM
from modeling_composite.processing_composite import CompositeMLLMProcessor

from .errors import ConversionError
from .recipe import Recipe


logger = logging.getLogger(__name__)


def _first_word(text: str) -> str:
    words = text.split()
    return words[0] if words else ""


@torch.no_grad()
def answer_questions(folder: Path, samples: list[dict], media_root: str | None) -> dict[int, str]:
    """Greedy answers (first word) of the composite in `folder` to every sample it has the modalities for."""
    model = CompositeMLLMForCausalLM.from_pretrained(folder).eval()
    processor = CompositeMLLMProcessor.from_pretrained(folder, trust_remote_code=False)
    dataset = ConversationDataset(samples, processor, media_root=media_root)
    answers = {}
    for index in range(len(samples)):
        try:
            dataset.modality_names(index)
        except DataError:
            continue  # a question about a modality this model does not have
        prompt, _ = dataset.prompt_and_answer(index)
        inputs = processor.tokenizer(processor.expand_placeholders(prompt), return_tensors="pt")
        modality_inputs = dataset.modality_inputs(index)
        output = model.generate(**inputs, modality_inputs=modality_inputs or None, max_new_tokens=8, do_sample=False)
        answers[index] = _first_word(
            processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    return answers


def search_weights(recipe: Recipe, compose_candidate, scratch: Path) -> tuple[float, dict[float, float]]:
    """The λ of `recipe.weight_search.grid` with the best score, and every candidate's score.

    `compose_candidate(recipe, folder)` builds a recipe (without weight search) into `folder`, a new folder inside
    `scratch` (the caller's to remove).
    """
    search = recipe.weight_search
    try:
        samples = load_samples(search.data)[: search.max_samples]
    except DataError as error:
        raise ConversionError(f"weight_search.data: {error}") from None
    answers_given = {}
    references: list[dict[int, str]] = []
    if search.objective == "agreement":
        for number, source in enumerate(recipe.sources):
            alone = dataclasses.replace(
                recipe, sources=[dataclasses.replace(source, weight=1.0, index=0)], weight_search=None
            )
            folder = compose_candidate(alone, scratch / f"source-{number}")
            references.append(answer_questions(folder, samples, search.media_root))
            if not references[-1]:
                raise ConversionError(
                    f"weight_search: no question in {search.data} is about the modalities of {source.label}; "
                    "agreement needs some for every source."
                )
    else:
        for index, sample in enumerate(samples):
            turns = [turn for turn in sample["conversations"] if ROLES.get(turn.get("from")) == "assistant"]
            if turns and isinstance(turns[-1].get("value"), str):
                answers_given[index] = _first_word(turns[-1]["value"])
        if not answers_given:
            raise ConversionError(f"weight_search: objective accuracy needs answers (`gpt` turns) in {search.data}.")

    def compose_at(value: float) -> Path:
        candidate = dataclasses.replace(
            recipe,
            sources=[dataclasses.replace(source, weight=value) for source in recipe.sources],
            weight_search=None,
        )
        return compose_candidate(candidate, scratch / f"lambda-{value}")

    def score(folder: Path) -> dict[str, float]:
        answers = answer_questions(folder, samples, search.media_root)
        if search.objective == "agreement":
            rates = [sum(answers.get(i) == a for i, a in ref.items()) / len(ref) for ref in references]
            return {"agreement": sum(rates) / len(rates)}
        return {"accuracy": sum(answers.get(i) == a for i, a in answers_given.items()) / len(answers_given)}

    scores, picks = search_grid(search.grid, compose_at, score)
    return picks[search.objective], {value: row[search.objective] for value, row in scores.items()}


def search_grid(
    grid: Sequence[float],
    compose: Callable[[float], Path],
    score: Callable[[Path], Mapping[str, float]],
    label: str = "weight search",
) -> tuple[dict[float, dict[str, float]], dict[str, float]]:
    """Every λ search of the project (the converter's `weight_search`, the tiny world's benchmark) is this one loop,
    so that they visit, score, log and choose alike.

    Each λ of `grid`, in order, is composed by `compose(λ)` (uniform: every source gets λ; it returns the candidate's
    folder) and scored by `score(folder)`, which names one or more criteria: answering is the slow part, so criteria
    that read the same answers come from one pass. Returns every candidate's scores (`{λ: {criterion: score}}`, grid
    order) and, per criterion, the λ `best_weight` picks.
    """
    scores: dict[float, dict[str, float]] = {}
    for value in grid:
        scores[value] = dict(score(compose(value)))
        shown = ", ".join(f"{result:.3f} ({criterion})" for criterion, result in scores[value].items())
        logger.info("%s: λ = %g scores %s", label, value, shown)
    criteria = next(iter(scores.values()), {})
    picks = {name: best_weight({value: row[name] for value, row in scores.items()}) for name in criteria}
    return scores, picks


def best_weight(scores: Mapping[float, float]) -> float:
    """The λ of the best score, the first of the grid (the mapping's order) on a tie: the choice `search_grid` makes
    for each criterion."""
    return max(scores, key=scores.__getitem__)
