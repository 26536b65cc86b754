"""What every source reader produces: the parts of one source model, as lazy tensor references in the composite's own
naming, so that the rest of the conversion never looks at a source format again.

LLM tensors are named as in the base causal LM's checkpoint (`model.layers.0.self_attn.q_proj.weight`,
`lm_head.weight`): the "canonical" keys. Encoder tensors are named as the composite encoder's state dict, projector
tensors as `CompositeMLLMProjector`'s (`linear_1.weight`, ...).
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase

from .errors import ConversionError
from .locate import Location
from .recipe import SourceRecipe
from .tensors import Lazy, TensorStore, open_model_weights


logger = logging.getLogger(__name__)

VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")
# Config fields that must agree between the base and every source: they fix the shape of every LLM tensor.
ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


@dataclass
class LowRank:
    """A low-rank delta `scaling * B @ A` of one linear layer."""

    lora_a: Lazy
    lora_b: Lazy
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def dense(self) -> torch.Tensor:
        return (self.lora_b.load().float() @ self.lora_a.load().float()) * self.scaling


@dataclass
class ModalityPart:
    """One modality a source contributes: its encoder, projector and (DAMC) routed delta."""

    name: str
    kind: str
    encoder_config: PreTrainedConfig
    encoder_weights: dict[str, Lazy]
    projector: str
    projector_bias: bool
    projector_weights: dict[str, Lazy]
    projector_options: dict[str, int] | None = None
    feature_layer: int | str = "last"
    feature_select: str = "full"
    num_frames: int | None = None
    tokens_per_item: int | None = None
    prefix: Lazy | None = None
    suffix: Lazy | None = None
    lora: dict[str, float] | None = None
    lora_factors: dict[str, LowRank] = field(default_factory=dict)
    # The source's own rows for its placeholder token in the embedding / LM head (canonical key -> row).
    placeholder_rows: dict[str, Lazy] = field(default_factory=dict)
    image_processor: Any = None
    feature_extractor: Any = None


@dataclass
class Source:
    """A source model, read: text delta (full weights or low-rank) and modalities."""

    recipe: SourceRecipe
    location: Location
    format: str
    modalities: dict[str, ModalityPart]
    text_config: PreTrainedConfig | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    full_weights: dict[str, Lazy] | None = None
    text_lora: dict[str, LowRank] = field(default_factory=dict)
    # A DAMC-ready source keeps modality parameters apart from text parameters.
    decoupled: bool = False
    # With full weights too: the text LoRA is not folded into them (a composite saved in training form).
    text_lora_unfolded: bool = False
    # A composite: its text LoRA is exactly the delta its LLM weights hold (merge rule linear, text block kept whole);
    # else the factors only approximate it (ties / dare, routed full fine-tunes), and the weights are what it is.
    text_lora_exact: bool = True

    @property
    def label(self) -> str:
        return self.recipe.label

    def text_delta(self, key: str, base_tensor: torch.Tensor) -> torch.Tensor | None:
        """This source's change to LLM tensor `key` (float32, the shape of `base_tensor`: for the embedding and LM
        head, the base's rows), or None where it changed nothing."""
        low_rank = self.low_rank_delta(key)
        if self.full_weights is None:
            return low_rank
        tensor = self.full_weights[key].load()
        if key in VOCAB_KEYS:
            tensor = tensor[: base_tensor.shape[0]]
        delta = tensor.float() - base_tensor.float()
        return delta if low_rank is None else delta + low_rank

    def low_rank_delta(self, key: str) -> torch.Tensor | None:
        """The dense `s B A` of this source's text LoRA on `key` where its full weights (if any) do not already hold
        it (they do unless `text_lora_unfolded`), else None."""
        low_rank = self.text_lora.get(key)
        if low_rank is None or (self.full_weights is not None and not self.text_lora_unfolded):
            return None
        return low_rank.dense()


class BaseModel:
    """The shared base LLM: config, tokenizer and weights (canonical keys)."""

    def __init__(self, location: Location):
        self.location = location
        self.label = f"base ({location.reference})"
        self.config = load_config(location.folder, self.label)
        self.tokenizer = load_tokenizer(location.folder, self.label)
        if self.tokenizer is None:
            raise ConversionError(f"{self.label}: no tokenizer found; the base folder must hold the LLM's tokenizer.")
        self.store = open_model_weights(location.folder, self.label)
        strays = [key for key in self.store.keys() if not key.startswith("model.") and key != "lm_head.weight"]
        if strays:
            raise ConversionError(
                f"{self.label}: tensors {strays[:3]} are not those of a causal LM (model.* and lm_head.weight); "
                "`base` must be the text LLM the sources were fine-tuned from."
            )

    @property
    def vocab(self) -> int:
        """The base vocabulary: the tokens of its tokenizer (embedding rows past it are padding)."""
        return len(self.tokenizer)

    def keys(self) -> list[str]:
        return self.store.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.store.shape(key)

    def get(self, key: str) -> torch.Tensor:
        return self.store.get(key)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_config(folder: Path, label: str) -> PreTrainedConfig:
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{label}: {folder} has no config.json.")
    read_json(folder / "config.json", label)  # a JSON object, before transformers reads it
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:  # anything transformers raises on a config it cannot use: the source's problem
        raise ConversionError(f"{label}: cannot read its config.json ({_first_line(error)}).") from error


def load_tokenizer(folder: Path, label: str) -> PreTrainedTokenizerBase | None:
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            read_json(folder / name, label)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:  # anything the tokenizer libraries raise on files they cannot use: the source's problem
        raise ConversionError(f"{label}: cannot load its tokenizer ({_first_line(error)}).") from error


def read_json(path: Path, label: str) -> dict:
    """A JSON file of a source that must hold a JSON object (configs, indexes): anything else is refused by name."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConversionError(f"{label}: cannot read {path.name} ({error}).") from None
    if not isinstance(value, dict):
        raise ConversionError(
            f"{label}: {path.name} holds a JSON {type(value).__name__}, not an object; the file is damaged."
        )
    return value


def map_keys(
    store: TensorStore, rules: list[tuple[str, str]], label: str, dropped: tuple[str, ...] = ()
) -> dict[str, dict[str, str]]:
    """Sort every key of `store` into named groups by prefix rules `(source_prefix, group)`; a key matching a prefix
    of `dropped` is left out on purpose. Returns group -> {key without the prefix: source key}. Any other key is an
    error: a source tensor must be mapped or dropped on purpose, never skipped silently."""
    groups: dict[str, dict[str, str]] = {group: {} for _, group in rules}
    unknown = []
    for key in store.keys():
        for prefix, group in rules:
            if key.startswith(prefix):
                groups[group][key[len(prefix) :]] = key
                break
        else:
            if not key.startswith(dropped):
                unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{label}: {len(unknown)} tensor(s) this format does not know, e.g. {unknown[:3]}; the checkpoint is not "
            "the format it claims (set `format:` in the recipe) or holds parts the conversion cannot place."
        )
    return groups


def lazy_map(store: TensorStore, keys: dict[str, str], prefix: str = "") -> dict[str, Lazy]:
    return {prefix + name: Lazy(store, key) for name, key in keys.items()}


def align_encoder_keys(encoder_config: PreTrainedConfig, weights: dict[str, Lazy], label: str) -> dict[str, Lazy]:
    """Name encoder tensors as the installed transformers' encoder class does: checkpoints saved by older versions
    nest vision towers under `vision_model.`, which current CLIP / SigLIP vision models no longer have."""
    from modeling_composite.modeling_composite import build_encoder

    with torch.device("meta"):
        expected = set(build_encoder(encoder_config).state_dict())
    aligned = {}
    for key, lazy in weights.items():
        if key not in expected and key.startswith("vision_model.") and key[len("vision_model.") :] in expected:
            key = key[len("vision_model.") :]
        aligned[key] = lazy
    return aligned


def select_modalities(recipe: SourceRecipe, parts: dict[str, ModalityPart]) -> dict[str, ModalityPart]:
    """Apply the recipe's `modalities` (which to take) and `rename` to a source's modalities (keyed by source name)."""
    chosen = recipe.modalities or list(parts)
    unknown = [name for name in chosen if name not in parts]
    if unknown:
        raise ConversionError(f"{recipe.label}: `modalities` names {unknown}, but this source has {list(parts)}.")
    stray_renames = [name for name in recipe.rename if name not in chosen]
    if stray_renames:
        raise ConversionError(
            f"{recipe.label}: `rename` names {stray_renames}, which are not among its modalities {chosen}."
        )
    targets = [recipe.rename.get(name, name) for name in chosen]
    clashes = sorted({name for name in targets if targets.count(name) > 1})
    if clashes:
        raise ConversionError(
            f"{recipe.label}: after `rename` two of its modalities are both called {clashes}; rename one differently."
        )
    selected = {}
    for name in chosen:
        part = parts[name]
        part.name = recipe.rename.get(name, name)
        part.encoder_weights = align_encoder_keys(part.encoder_config, part.encoder_weights, recipe.label)
        selected[part.name] = part
    return selected
