"""Answer the tiny world's questions with a composite (or the text-only base LLM) and score them.

Answers are greedy: the first generated token of `USER: {question} ASSISTANT:`, computed in left-padded batches with
one forward pass (greedy decoding's first step, placeholders suppressed as in the generation config). Accuracy is
exact match of the answer's first letter with the gold letter.
"""

import torch

from .base import render_conversation
from .questions import TEXT, Question, as_text
from .render import instance_rng, render
from .report import first_letter
from .world import Concept


CALL_ARGUMENTS = {"image": "images", "video": "videos", "audio": "audio", "point": "point_clouds"}


def question_inputs(question: Question, concepts: dict[str, Concept], split: str) -> dict[str, list]:
    """The rendered inputs of a question, by processor argument; every item gets its own reproducible instance."""
    inputs: dict[str, list] = {}
    for index, (modality, name) in enumerate(question.items):
        if modality == TEXT:
            continue
        array = render(modality, concepts[name], instance_rng(split, question.id, index))
        inputs.setdefault(CALL_ARGUMENTS[modality], []).append(array)
    return inputs


@torch.no_grad()
def first_tokens(
    model, processor, questions: list[Question], concepts: dict[str, Concept], split: str, batch_size: int = 32
) -> list[str]:
    """The greedy first answer token of each question, decoded."""
    tokenizer = getattr(processor, "tokenizer", processor)
    suppressed = list(getattr(model.generation_config, "suppress_tokens", None) or [])
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        prompts = [render_conversation(question.prompt(), "")[0] for question in chunk]
        if tokenizer is processor:
            batch = tokenizer(prompts, return_tensors="pt", padding=True)
        else:
            media: dict[str, list] = {}
            for question in chunk:
                for argument, items in question_inputs(question, concepts, split).items():
                    media.setdefault(argument, []).extend(items)
            batch = processor(text=prompts, padding=True, **media)
        logits = model(**batch).logits[:, -1].float()
        if suppressed:
            logits[:, suppressed] = float("-inf")
        answers += tokenizer.batch_decode(logits.argmax(-1)[:, None], skip_special_tokens=True)
    return answers


def correctness(
    model, processor, questions: list[Question], concepts: dict[str, Concept], split: str, batch_size: int = 32
) -> list[bool]:
    """Whether each answer is right: exact match of the first letter for multiple choice, of the first word for open
    answers (names)."""
    predictions = first_tokens(model, processor, questions, concepts, split, batch_size)
    return [is_correct(question, prediction) for question, prediction in zip(questions, predictions)]


def score(
    model, processor, questions: list[Question], concepts: dict[str, Concept], split: str, batch_size: int = 32
) -> float:
    """Accuracy (see `correctness`)."""
    results = correctness(model, processor, questions, concepts, split, batch_size)
    return sum(results) / len(results)


def is_correct(question: Question, prediction: str) -> bool:
    if question.options:
        return first_letter(prediction) == question.answer
    words = prediction.split()
    return bool(words) and words[0] == question.answer


def correctness_text(model, tokenizer, questions: list[Question], concepts: dict[str, Concept]) -> list[bool]:
    """The base LLM on the text-only versions of the questions (every input written as its concept's name)."""
    return correctness(model, tokenizer, [as_text(question) for question in questions], concepts, "text")
