"""The tiny world's base LLM: a word-level tokenizer over the world's words, and a small Llama trained on text about
the concepts (their attributes, and text-only versions of the benchmark's questions), so that knowledge of the
concepts and reasoning over their attributes live in the LLM before any modality is added."""

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

from conversations.data import IGNORE_INDEX, ConversationCollator
from fixtures.tiny_composite import SPECIAL_TOKENS, wrap_tokenizer

from .questions import (
    LETTERS,
    Question,
    as_text,
    attribute_question,
    caption_question,
    identify_question,
    mcub_open_question,
    mcub_question,
    recall_question,
    template_words,
)
from .world import ATTRIBUTES, NAMES, Concept


def world_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word of the world (names, attribute values, template words, option letters); BOS first."""
    words = [
        "USER:",
        "ASSISTANT:",
        *template_words(),
        *LETTERS,
        *NAMES,
        *(value for values in ATTRIBUTES.values() for value in values),
    ]
    vocab = {token: index for index, token in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *words]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return wrap_tokenizer(backend, clean_up_tokenization_spaces=False)


def base_llm(tokenizer: PreTrainedTokenizerFast, seed: int) -> torch.nn.Module:
    """A 4-layer Llama of width 128 (every Linear fits bitsandbytes' 4-bit CPU kernels)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config)


def base_corpus(concepts: list[Concept], count: int, seed: int) -> list[Question]:
    """Text-only questions: every (concept, attribute) fact, and a mix of single-item and 2-4 item "which fits all"
    questions, open 2-4 item "what do all share" questions (never with a held-out concept set, see `held_out`) and
    "what is it" questions, all in the training wordings and orders."""
    rng = random.Random(f"base-{seed}")
    questions: list[Question] = []
    for concept in concepts:
        for attribute in ATTRIBUTES:
            questions.append(
                Question(
                    f"fact-{concept.name}-{attribute}",
                    "recall",
                    (("text", concept.name),),
                    answer=getattr(concept, attribute),
                    asks=attribute,
                )
            )
    while len(questions) < count:
        draw = rng.random()
        index = len(questions)
        if draw < 0.15:
            questions.append(as_text(recall_question(rng, rng.choice(concepts), "text", f"base-{index}")))
        elif draw < 0.3:
            questions.append(as_text(attribute_question(rng, rng.choice(concepts), "text", f"base-{index}")))
        elif draw < 0.35:
            questions.append(as_text(identify_question(rng, rng.choice(concepts), "text", f"base-{index}")))
        elif draw < 0.4:
            questions.append(as_text(caption_question(rng.choice(concepts), "text", f"base-{index}")))
        elif draw < 0.65:
            # A quarter of the corpus, taken from the multiple-choice share: this 4-layer LLM never learns to bind
            # option letters to values, but learns to answer the shared value itself (94% on held-out sets).
            k = rng.choice((2, 3, 4))
            questions.append(
                as_text(mcub_open_question(rng, concepts, ("text",) * k, f"base-{index}", test_side=False))
            )
        else:
            k = rng.choice((2, 3, 4))
            questions.append(as_text(mcub_question(rng, concepts, ("text",) * k, f"base-{index}", test_side=False)))
    return questions


def render_conversation(prompt: str, answer: str) -> tuple[str, str]:
    """(prompt, answer) as the composite's chat template renders one turn: `USER: q ASSISTANT:` + ` a</s>`."""
    return f"USER: {prompt} ASSISTANT:", f" {answer}</s>"


class TextQuestions(torch.utils.data.Dataset):
    def __init__(self, questions: list[Question], tokenizer: PreTrainedTokenizerFast):
        self.examples = []
        for question in questions:
            prompt, answer = render_conversation(question.prompt(), question.answer)
            prompt_ids = tokenizer(prompt)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            self.examples.append((prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        input_ids, labels = self.examples[index]
        return {"input_ids": input_ids, "labels": labels}


def train_base(folder: Path, concepts: list[Concept], seed: int, steps: int, corpus_size: int) -> Path:
    """Train the base LLM on the text corpus and save it (with its tokenizer) to `folder`."""
    tokenizer = world_tokenizer()
    model = base_llm(tokenizer, seed)
    dataset = TextQuestions(base_corpus(concepts, corpus_size, seed), tokenizer)
    args = TrainingArguments(
        output_dir=str(folder / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=64,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=steps // 20,
        weight_decay=0.0,
        logging_steps=max(steps // 10, 1),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        dataloader_drop_last=True,
    )
    Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=ConversationCollator(tokenizer.pad_token_id)
    ).train()
    model.generation_config.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
