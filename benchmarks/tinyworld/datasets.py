"""Training data of the tiny world's sources, written in the paper's JSON format with media files beside it.

Stage 1 (projector pre-training): captions, `<image>` -> the concept's name. Stage 2 (instructions): captions,
open questions, "what is it", and "which fits all" questions about the input, alone or with concepts named in
text. Every sample gets its own rendering; no sample shows two modality inputs, and none uses a held-out concept set.
Every sample also has its text version (`text_conversations`: the input written as its concept's name), which the
trainer's distillation from the base LLM reads.
"""

import json
import random
from pathlib import Path

from .questions import (
    TEXT,
    Question,
    as_text,
    attribute_question,
    caption_question,
    identify_question,
    mcub_question,
    recall_question,
)
from .render import instance_rng, render, save_media
from .world import Concept


def source_questions(concepts: list[Concept], modality: str, stage: int, count: int, seed: int) -> list[Question]:
    """Stage 1: captions. Stage 2: captions, open attribute questions, "what is it", "which fits all" about the input
    alone, and "which fits all" about the input together with concepts named in text (2 to 4 items, never a
    held-out concept set): the source learns to use its input the way the base LLM uses a concept's name."""
    rng = random.Random(f"source-{modality}-{stage}-{seed}")
    questions = []
    for index in range(count):
        concept = rng.choice(concepts)
        qid = f"train-{modality}-s{stage}-{index}"
        draw = rng.random() if stage == 2 else 0.0
        if draw < 0.1:
            questions.append(caption_question(concept, modality, qid))
        elif draw < 0.25:
            questions.append(recall_question(rng, concept, modality, qid))
        elif draw < 0.35:
            questions.append(identify_question(rng, concept, modality, qid))
        elif draw < 0.7:
            questions.append(attribute_question(rng, concept, modality, qid))
        else:
            k = rng.choice((2, 3, 4))
            slots = [TEXT] * k
            slots[rng.randrange(k)] = modality
            questions.append(mcub_question(rng, concepts, tuple(slots), qid, test_side=False))
    return questions


def write_source_data(folder: Path, concepts: list[Concept], modality: str, stage: int, count: int, seed: int) -> Path:
    """Write `count` samples and their media under `folder`; returns the JSON file (media paths are relative)."""
    by_name = {concept.name: concept for concept in concepts}
    samples = []
    for question in source_questions(concepts, modality, stage, count, seed):
        media = []
        for index, (item_modality, name) in enumerate(question.items):
            if item_modality == TEXT:
                continue
            array = render(item_modality, by_name[name], instance_rng("train", question.id, index))
            media.append(
                save_media(item_modality, array, folder / "media" / f"{question.id}-{index}").relative_to(folder)
            )
        samples.append(
            {
                "id": question.id,
                "conversations": [
                    {"from": "human", "value": question.prompt()},
                    {"from": "gpt", "value": question.answer},
                ],
                "modal_inputs": {modality: [str(path) for path in media]},
                # The input written as its concept's name: what the base LLM reads for distillation.
                "text_conversations": [
                    {"from": "human", "value": as_text(question).prompt()},
                    {"from": "gpt", "value": question.answer},
                ],
            }
        )
    path = folder / f"{modality}-stage{stage}.json"
    path.write_text(json.dumps(samples, indent=1))
    return path
