"""Training data in the paper's JSON format, turned into model inputs with the loss on assistant answers only.

A sample:

    {"id": "...",
     "conversations": [{"from": "human", "value": "<image> What is it?"}, {"from": "gpt", "value": "A cat."}, ...],
     "modal_inputs": {"image": ["cats/1.png"]}}

`modal_inputs` keys are modality names; the paper's `vision` is accepted for an image modality. The conversation is
rendered with the processor's chat template (the same text the composite sees at inference), and every assistant
answer, up to and including its end-of-sequence token, is the only part with labels.

A sample may also carry `text_conversations`, the same conversation with every input written as text; with
`with_text_version`, the dataset tokenizes it too, for distillation from the base LLM (see `distillation.py`).
"""

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .media import MediaError, load_media


IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PAPER_KEYS = {"vision": "image"}  # the paper's modal_inputs key -> our kind
CALL_ARGUMENTS = {"image": "images", "video": "videos", "audio": "audio", "point": "point_clouds"}


class DataError(ValueError):
    """A training sample that cannot be used, named by its id."""


def load_samples(data_path: str | Path) -> list[dict[str, Any]]:
    path = Path(data_path)
    try:
        samples = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read the training data ({error}).") from None
    if not isinstance(samples, list) or not samples:
        raise DataError(f"{path}: expected a non-empty JSON list of samples.")
    for index, sample in enumerate(samples):
        if not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
            raise DataError(f"{path}: sample {index} has no `conversations` list.")
    return samples


class ConversationDataset(Dataset):
    """Tokenized conversations with their modality inputs, for one modality of a composite (or several)."""

    def __init__(
        self,
        samples: list[dict[str, Any]],
        processor: Any,
        media_root: str | Path | None = None,
        system_prompt: str | None = None,
        model_max_length: int = 2048,
        with_text_version: bool = False,
        cache_samples: bool = False,
    ):
        self.samples = samples
        self.with_text_version = with_text_version
        # Index -> the finished item, when caching (each dataloader worker keeps its own).
        self._cache: dict[int, dict[str, Any]] | None = {} if cache_samples else None
        self.processor = processor
        self.media_root = Path(media_root) if media_root else None
        self.system_prompt = system_prompt
        self.model_max_length = model_max_length
        self.modalities = processor.modalities
        placeholders = [entry["placeholder"] for entry in self.modalities.values()]
        self._placeholder_ids = set(processor.tokenizer.convert_tokens_to_ids(placeholders))

    def __len__(self) -> int:
        return len(self.samples)

    def sample_id(self, index: int) -> str:
        return str(self.samples[index].get("id", f"#{index}"))

    def check_turns(self, index: int) -> None:
        """Raise `DataError` when the sample's turns cannot be trained on (malformed turns, no assistant turn)."""
        self._messages(index)

    def _messages(self, index: int, key: str = "conversations") -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for turn in self.samples[index][key]:
            role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
            if role is None or not isinstance(turn.get("value"), str):
                raise DataError(
                    f"Sample {self.sample_id(index)}: every turn needs `from` (human/gpt/system) and a string "
                    f"`value`, got {turn!r}."
                )
            messages.append({"role": role, "content": turn["value"]})
        if not any(message["role"] == "assistant" for message in messages):
            raise DataError(f"Sample {self.sample_id(index)}: no assistant (`gpt`) turn, so nothing to learn.")
        return messages

    def _pieces(self, index: int, key: str = "conversations") -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is_answer) pieces with the chat template: each answer is what
        rendering it adds after the generation prompt of its question."""
        messages = self._messages(index, key)
        pieces: list[tuple[str, bool]] = []
        done = ""
        for position, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:position], add_generation_prompt=True)
            full = self._render(messages[: position + 1])
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise DataError(
                    f"Sample {self.sample_id(index)}: the chat template does not render the conversation as a "
                    "growing prefix, so answers cannot be told from prompts."
                )
            # Whitespace the template puts after an answer separates it from the next turn: it is not learned.
            answer = full[len(prompt) :].rstrip()
            pieces += [(prompt[len(done) :], False), (answer, True)]
            done = prompt + answer
        return pieces

    def prompt_and_answer(self, index: int) -> tuple[str, str]:
        """The conversation up to its last answer, rendered with the generation prompt, and that answer (what an
        evaluation asks the model and compares with)."""
        messages = self._messages(index)
        last = max(position for position, message in enumerate(messages) if message["role"] == "assistant")
        return self._render(messages[:last], add_generation_prompt=True), messages[last]["content"]

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """Text of `messages` by the processor's chat template (what the composite sees at inference)."""
        return self.processor.tokenizer.apply_chat_template(
            messages,
            chat_template=self.processor.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def modality_names(self, index: int) -> set[str]:
        """The modalities a sample gives inputs for."""
        return {self.modality_of_key(index, key) for key in (self.samples[index].get("modal_inputs") or {})}

    def modality_inputs(self, index: int) -> dict[str, torch.Tensor]:
        """The sample's inputs as model tensors, by modality name."""
        return self._modality_inputs(index)

    def _modality_inputs(self, index: int) -> dict[str, torch.Tensor]:
        raw = self.samples[index].get("modal_inputs") or {}
        inputs = {}
        for key, paths in raw.items():
            name = self.modality_of_key(index, key)
            kind = self.modalities[name]["kind"]
            paths = [paths] if isinstance(paths, str) else list(paths)
            try:
                items = [load_media(self.resolve(path), kind) for path in paths]
            except MediaError as error:
                raise DataError(f"Sample {self.sample_id(index)}: {error}") from None
            if not items:
                continue
            placeholder = self.modalities[name]["placeholder"]
            # The processor turns raw items into the model's tensors; its text is just the item placeholders.
            batch = self.processor(text=" ".join([placeholder] * len(items)), **{CALL_ARGUMENTS[kind]: items})
            tensors = batch.get("modality_inputs", {}).get(name)
            inputs[name] = (
                tensors
                if tensors is not None
                else next(
                    value
                    for key_, value in batch.items()
                    if key_ not in ("input_ids", "attention_mask", "modality_inputs")
                )
            )
        return inputs

    def modality_of_key(self, index: int, key: str) -> str:
        if key in self.modalities:
            return key
        kind = PAPER_KEYS.get(key, key)
        owners = [name for name, entry in self.modalities.items() if entry["kind"] == kind]
        if len(owners) != 1:
            raise DataError(
                f"Sample {self.sample_id(index)}: modal_inputs key {key!r} names no modality of this model "
                f"({sorted(self.modalities)})."
            )
        return owners[0]

    def resolve(self, path: str) -> Path:
        """A media path of the data: absolute, or relative to `media_root`."""
        candidate = Path(path)
        return candidate if candidate.is_absolute() or self.media_root is None else self.media_root / candidate

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._cache is None:
            return self._build_item(index)
        if index not in self._cache:
            self._cache[index] = self._build_item(index)
        return self._cache[index]

    def _token_ids(self, index: int, key: str = "conversations") -> tuple[list[int], list[int]]:
        """Token ids of the conversation under `key` (placeholders expanded), and labels: the answers' ids."""
        input_ids: list[int] = []
        labels: list[int] = []
        for number, (text, is_answer) in enumerate(self._pieces(index, key)):
            ids = self.processor.tokenizer(self.processor.expand_placeholders(text), add_special_tokens=number == 0)[
                "input_ids"
            ]
            input_ids += ids
            labels += ids if is_answer else [IGNORE_INDEX] * len(ids)
        return input_ids, labels

    def _build_item(self, index: int) -> dict[str, Any]:
        input_ids, labels = self._token_ids(index)
        if len(input_ids) > self.model_max_length:
            raise DataError(
                f"Sample {self.sample_id(index)}: {len(input_ids)} tokens (modality positions included) exceed "
                f"model_max_length {self.model_max_length}; shorten it or raise the limit."
            )
        item = {"input_ids": input_ids, "labels": labels, "modality_inputs": self._modality_inputs(index)}
        if self.with_text_version:
            item["text_version"] = self._text_version(index, input_ids)
        return item

    def _text_version(self, index: int, input_ids: list[int]) -> dict[str, Any]:
        """The token ids of the sample's `text_conversations`, and how many final positions of the two line up
        (`aligned`; 0 for a sample without inputs): every token after the last modality input, which must be the same
        in both, and before them the last input's final position (its suffix token, or its last feature) against the
        last token of that input's text (a name, the end of a caption): both close the input."""
        if not isinstance(self.samples[index].get("text_conversations"), list):
            raise DataError(
                f"Sample {self.sample_id(index)}: no `text_conversations` list (the conversation with every input "
                "written as text), which distillation from the base LLM needs."
            )
        text_ids, _ = self._token_ids(index, "text_conversations")
        if self._placeholder_ids.intersection(text_ids):
            raise DataError(
                f"Sample {self.sample_id(index)}: `text_conversations` still has a modality placeholder; write every "
                "input as text there."
            )
        inputs = [position for position, token in enumerate(input_ids) if token in self._placeholder_ids]
        if not inputs:
            return {"input_ids": text_ids, "aligned": 0}
        after = len(input_ids) - inputs[-1] - 1
        # The text version needs the same `after` tokens, the input's text before them, and BOS or a prompt before it.
        if after + 1 >= len(text_ids) or text_ids[len(text_ids) - after :] != input_ids[len(input_ids) - after :]:
            raise DataError(
                f"Sample {self.sample_id(index)}: the text after its last input differs between `conversations` and "
                "`text_conversations`; only the inputs themselves may be rewritten as text."
            )
        return {"input_ids": text_ids, "aligned": after + 1}


class ConversationCollator:
    """Right-pads a batch; modality inputs are concatenated in sample order (the order of their placeholders)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids = [feature["input_ids"] for feature in features]
        batch = {
            "input_ids": _right_padded(input_ids, self.pad_token_id),
            "attention_mask": _padding_mask(input_ids),
            "labels": _right_padded([feature["labels"] for feature in features], IGNORE_INDEX),
        }
        grouped: dict[str, list[torch.Tensor]] = {}
        for feature in features:
            for name, tensor in feature.get("modality_inputs", {}).items():
                grouped.setdefault(name, []).append(torch.as_tensor(tensor))
        if grouped:
            batch["modality_inputs"] = {name: torch.cat(tensors) for name, tensors in grouped.items()}
        if "text_version" in features[0]:
            versions = [feature["text_version"] for feature in features]
            text_ids = [version["input_ids"] for version in versions]
            batch["text_version"] = {
                "input_ids": _right_padded(text_ids, self.pad_token_id),
                "attention_mask": _padding_mask(text_ids),
                "aligned": torch.tensor([version["aligned"] for version in versions]),
            }
        return batch


def _right_padded(sequences: list[list[int]], value: int) -> torch.Tensor:
    """The sequences as the rows of one tensor, each filled up on the right with `value`."""
    padded = torch.full((len(sequences), max(map(len, sequences))), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return padded


def _padding_mask(sequences: list[list[int]]) -> torch.Tensor:
    """1 on each sequence's own positions, 0 on the padding `_right_padded` adds."""
    lengths = torch.tensor([len(sequence) for sequence in sequences])
    return (torch.arange(int(lengths.max())) < lengths[:, None]).long()
