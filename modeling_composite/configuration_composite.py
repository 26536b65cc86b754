"""Configuration of a composite multimodal LLM: one text LLM, and any number of modalities, each with its own encoder,
projector, placeholder token and (for DAMC composites) low-rank parameters that only its tokens use."""

import copy
import json
import re
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from .compat import SubConfigSpec, auto_sub_config
from .configuration_beats import CompositeBeatsConfig
from .configuration_languagebind_video import CompositeLanguageBindVideoConfig
from .configuration_point_encoder import CompositePointEncoderConfig


MODALITY_KINDS = ("image", "video", "audio", "point")
FEATURE_SELECTIONS = ("patch", "full")
DEFAULT_LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PROJECTOR_PATTERN = re.compile(r"^(linear|mlp(\d+)x_gelu)$")
_QFORMER_SPEC = re.compile(r"^qformer_(\d+)N_(\d+)L$")
# Settings a Q-Former projector takes beside its spec (the paper's audio projector: 1024 positions, BERT-base).
QFORMER_OPTIONS = ("num_positions", "hidden_size", "num_attention_heads", "intermediate_size")
# How routed projections store their low-rank factors (see `lora_layout` in `CompositeMLLMConfig`).
LORA_LAYOUTS = ("stacked", "per_delta")
_MODALITY_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Fields of one modality entry and their defaults. `None` marks a field without a default (it must be given).
_MODALITY_FIELDS: dict[str, Any] = {
    "kind": None,
    "encoder": None,
    "placeholder": None,
    "placeholder_id": None,
    "tokens_per_item": None,
    "feature_layer": "last",
    "feature_select": "full",
    "projector": "mlp2x_gelu",
    "projector_bias": True,
    "projector_options": None,
    "num_frames": None,
    "prefix_tokens": 0,
    "suffix_tokens": 0,
    "lora": None,
}


def parse_projector_spec(spec: str) -> int:
    """Number of linear layers in a projector spec: `linear` is 1, `mlp{N}x_gelu` is N (linear layers joined by
    GELU)."""
    match = _PROJECTOR_PATTERN.match(spec) if isinstance(spec, str) else None
    if match is None or (match.group(2) is not None and int(match.group(2)) < 1):
        raise ValueError(
            f"Unknown projector spec {spec!r}: use 'linear', 'mlp{{N}}x_gelu' with N >= 1 (e.g. 'mlp2x_gelu') or "
            "'qformer_{{Q}}N_{{L}}L' (e.g. 'qformer_32N_2L')."
        )
    return 1 if match.group(2) is None else int(match.group(2))


def parse_qformer_spec(spec: str) -> tuple[int, int] | None:
    """`(queries, layers)` of a projector spec `qformer_{Q}N_{L}L` (e.g. `qformer_32N_2L` -> `(32, 2)`); None for a
    spec of another family (`linear`, `mlp2x_gelu`, ...). A spec that starts with `qformer` but is not of that form,
    or asks for zero queries or layers, raises ValueError."""
    if not isinstance(spec, str) or not spec.startswith("qformer"):
        return None
    match = _QFORMER_SPEC.match(spec)
    if match is None:
        raise ValueError(f"Malformed Q-Former projector spec {spec!r}: write 'qformer_{{Q}}N_{{L}}L', e.g. 'qformer_32N_2L'.")
    queries, layers = int(match.group(1)), int(match.group(2))
    if queries < 1 or layers < 1:
        raise ValueError(f"Q-Former projector spec {spec!r} needs at least 1 query and 1 layer.")
    return queries, layers


def _check_projector(name: str, spec: str, options: Any) -> None:
    try:
        is_qformer = parse_qformer_spec(spec) is not None
        if not is_qformer:
            parse_projector_spec(spec)
    except ValueError as error:
        raise ValueError(f"Modality {name!r}: {error}") from None
    if options is None:
        return
    if not is_qformer:
        raise ValueError(f"Modality {name!r}: projector_options only apply to Q-Former projectors, not {spec!r}.")
    if not isinstance(options, dict) or set(options) - set(QFORMER_OPTIONS):
        raise ValueError(
            f"Modality {name!r}: projector_options must be a dict with keys among {list(QFORMER_OPTIONS)}, "
            f"got {options!r}."
        )
    for key, value in options.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Modality {name!r}: projector_options[{key!r}] must be a positive integer, got {value!r}.")


# Encoders transformers lacks (the paper's), written here; every other encoder config comes from `AutoConfig`.
OWN_ENCODER_CONFIGS = {
    config_class.model_type: config_class
    for config_class in (CompositePointEncoderConfig, CompositeBeatsConfig, CompositeLanguageBindVideoConfig)
}


def build_encoder_config(encoder: dict[str, Any] | PreTrainedConfig) -> PreTrainedConfig:
    """Rebuild an encoder config from its dict form (which names its `model_type`)."""
    if isinstance(encoder, PreTrainedConfig):
        return encoder
    encoder = dict(encoder)
    model_type = encoder.pop("model_type", None)
    if model_type is None:
        raise ValueError("An encoder config dict must name its `model_type` (e.g. 'clip_vision_model').")
    if model_type in OWN_ENCODER_CONFIGS:
        return OWN_ENCODER_CONFIGS[model_type](**encoder)
    return AutoConfig.for_model(model_type, **encoder)


def _check_lora(where: str, lora: Any, allow_zero_rank: bool = False, extra_keys: tuple[str, ...] = ()) -> dict | None:
    if lora is None:
        return None
    if not isinstance(lora, dict) or "r" not in lora:
        raise ValueError(f"{where} must be a dict with at least 'r' (rank) and optionally 'alpha', got {lora!r}.")
    rank = lora["r"]
    minimum = 0 if allow_zero_rank else 1
    if not isinstance(rank, int) or rank < minimum:
        raise ValueError(f"{where}['r'] must be an integer >= {minimum}, got {rank!r}.")
    normalized = {"r": rank, "alpha": float(lora.get("alpha", rank))}
    unknown = set(lora) - {"r", "alpha", *extra_keys}
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted({'r', 'alpha', *extra_keys})}.")
    return normalized


def normalize_modality(name: str, entry: dict[str, Any], vocab_size: int | None = None) -> dict[str, Any]:
    """Fill defaults of one modality entry and check it, raising `ValueError` that names the modality and field."""
    if not isinstance(name, str) or not _MODALITY_NAME_PATTERN.match(name) or name == "text":
        raise ValueError(
            f"Invalid modality name {name!r}: use a Python identifier other than 'text' (it becomes a module key)."
        )
    if not isinstance(entry, dict):
        raise ValueError(f"Modality {name!r}: the entry must be a dict, got {type(entry).__name__}.")
    unknown = set(entry) - set(_MODALITY_FIELDS)
    if unknown:
        raise ValueError(f"Modality {name!r}: unknown fields {sorted(unknown)}; allowed: {sorted(_MODALITY_FIELDS)}.")
    normalized = {key: copy.deepcopy(entry.get(key, default)) for key, default in _MODALITY_FIELDS.items()}
    missing = [key for key, default in _MODALITY_FIELDS.items() if default is None and normalized[key] is None]
    missing = [key for key in missing if key not in ("num_frames", "lora", "projector_options")]
    if missing:
        raise ValueError(f"Modality {name!r}: missing required fields {missing}.")
    if normalized["kind"] not in MODALITY_KINDS:
        raise ValueError(f"Modality {name!r}: kind {normalized['kind']!r} is not one of {list(MODALITY_KINDS)}.")
    encoder = normalized["encoder"]
    if not isinstance(encoder, PreTrainedConfig) and not (isinstance(encoder, dict) and "model_type" in encoder):
        raise ValueError(f"Modality {name!r}: 'encoder' must be a config (or config dict naming its model_type).")
    # Canonical form: only the values that differ from the encoder's defaults, as they read back from JSON, so
    # that a config equals itself after save and load.
    encoder = build_encoder_config(encoder)
    normalized["encoder"] = json.loads(json.dumps({**encoder.to_diff_dict(), "model_type": encoder.model_type}))
    normalized["encoder"].pop("transformers_version", None)
    if normalized["feature_select"] not in FEATURE_SELECTIONS:
        raise ValueError(
            f"Modality {name!r}: feature_select {normalized['feature_select']!r} is not one of "
            f"{list(FEATURE_SELECTIONS)}."
        )
    layer = normalized["feature_layer"]
    if layer != "last" and (not isinstance(layer, int) or isinstance(layer, bool)):
        raise ValueError(f"Modality {name!r}: feature_layer must be 'last' or an index into hidden states, got {layer!r}.")
    _check_projector(name, normalized["projector"], normalized["projector_options"])
    for field in ("tokens_per_item", "prefix_tokens", "suffix_tokens", "placeholder_id"):
        value = normalized[field]
        if not isinstance(value, int) or value < (1 if field == "tokens_per_item" else 0):
            raise ValueError(f"Modality {name!r}: {field} must be a non-negative integer (tokens_per_item >= 1), got {value!r}.")
    if vocab_size is not None and normalized["placeholder_id"] >= vocab_size:
        raise ValueError(
            f"Modality {name!r}: placeholder_id {normalized['placeholder_id']} is outside the text vocabulary "
            f"(vocab_size {vocab_size}); add the placeholder token to the tokenizer and resize the embeddings."
        )
    if normalized["kind"] == "video":
        frames = normalized["num_frames"]
        if not isinstance(frames, int) or frames < 1:
            raise ValueError(f"Modality {name!r}: a video modality needs num_frames >= 1, got {frames!r}.")
        if normalized["tokens_per_item"] % frames != 0:
            raise ValueError(
                f"Modality {name!r}: tokens_per_item {normalized['tokens_per_item']} must be num_frames ({frames}) "
                "times the tokens of one frame."
            )
    elif normalized["num_frames"] is not None:
        raise ValueError(f"Modality {name!r}: num_frames only applies to video modalities, not {normalized['kind']!r}.")
    if parse_qformer_spec(normalized["projector"]) is not None:
        if not normalized["projector_bias"]:
            raise ValueError(f"Modality {name!r}: a Q-Former projector always has biases; set projector_bias to True.")
        positions = (normalized["projector_options"] or {}).get("num_positions", 1024)
        if normalized["tokens_per_item"] > positions:
            raise ValueError(
                f"Modality {name!r}: the Q-Former has position embeddings for {positions} encoder tokens but "
                f"tokens_per_item is {normalized['tokens_per_item']}; raise projector_options['num_positions']."
            )
    normalized["lora"] = _check_lora(f"Modality {name!r}: lora", normalized["lora"])
    return normalized


class CompositeMLLMConfig(PreTrainedConfig):
    r"""
    Configuration of [`CompositeMLLMForCausalLM`]: a decoder-only LLM plus several modalities composed into it.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the text LLM (any decoder-only model transformers knows; defaults to Llama).
        modalities (`dict[str, dict]`, *optional*):
            Modality name -> entry. An entry has:
            - `kind`: one of `image`, `video`, `audio`, `point`.
            - `encoder`: the encoder's config as a dict naming its `model_type` (e.g. `clip_vision_model`,
              `siglip_vision_model`, `qwen2_audio_encoder`, `composite_point_encoder`).
            - `feature_layer` (`int` or `"last"`, default `"last"`): `"last"` takes the encoder's `last_hidden_state`
              (after its final norm or pooling); an integer indexes its `hidden_states` (LLaVA uses -2).
            - `feature_select` (`patch` | `full`, default `full`): `patch` drops the first (CLS) token.
            - `projector` (`linear` | `mlp{N}x_gelu` | `qformer_{Q}N_{L}L`, default `mlp2x_gelu`) and
              `projector_bias` (default True). A Q-Former (the paper's audio projector) turns the features of an item
              into Q tokens; `projector_options` may set its `num_positions` (default 1024), `hidden_size`,
              `num_attention_heads` and `intermediate_size` (BERT-base by default).
            - `placeholder` / `placeholder_id`: the token the processor expands, and its id.
            - `tokens_per_item`: encoder features per item after selection (for video: frames x per-frame tokens); the
              projector keeps that many, except a Q-Former, which makes Q of them.
            - `num_frames`: frames per video (video only).
            - `prefix_tokens` / `suffix_tokens` (default 0): learnable tokens placed around each item's features.
            - `lora` (`{"r": int, "alpha": float}` or None): this modality's routed low-rank delta (DAMC).
        lora_target_modules (`list[str]`, *optional*):
            Names of the LLM's linear layers that carry routed low-rank deltas (default: the 7 Llama projections).
        text_lora (`dict`, *optional*):
            The stacked text low-rank delta `{"r": R, "alpha": a, "folded": bool}`. With `folded=True` (composites) the
            text delta is already inside the base weights and is subtracted on modality tokens that have their own
            `lora`; with `folded=False` (training) it is added on every token except those.
        lora_layout (`str`, default `"per_delta"`): how the routed projections store their low-rank factors.
            `"stacked"` (converted composites): one pair per projection, `lora_A.weight` `(R, in)` and
            `lora_B.weight` `(out, R)`, whose rows / columns hold the text delta (`text_lora["r"]` of them) and then
            each modality's delta with a `lora`, sorted by modality name. `"per_delta"` (sources being trained):
            `text_lora_A.weight` / `text_lora_B.weight` and `lora_A.<name>.weight` / `lora_B.<name>.weight`.
        lora_dropout (`float`, default 0.0): dropout on the input of low-rank deltas (training only).
        composition (`dict`, *optional*): provenance: method, merge rule, weights and sources with revisions.
    """

    model_type = "composite_mllm"
    if SubConfigSpec is not None:  # transformers >= 5.20
        sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}
    else:
        sub_configs = {"text_config": AutoConfig}

    text_config: dict | PreTrainedConfig | None = None
    modalities: dict | None = None
    lora_target_modules: list | None = None
    text_lora: dict | None = None
    lora_layout: str = "per_delta"
    lora_dropout: float = 0.0
    composition: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.text_config = auto_sub_config(self.text_config, default_model_type="llama")
        super().__post_init__(**kwargs)
        vocab_size = getattr(self.text_config, "vocab_size", None)
        raw_modalities = self.modalities or {}
        if not isinstance(raw_modalities, dict):
            raise ValueError(f"`modalities` must be a dict of name -> entry, got {type(raw_modalities).__name__}.")
        self.modalities = {name: normalize_modality(name, entry, vocab_size) for name, entry in raw_modalities.items()}
        ids = [entry["placeholder_id"] for entry in self.modalities.values()]
        if len(set(ids)) != len(ids):
            raise ValueError(f"Modalities must use distinct placeholder ids, got {dict(zip(self.modalities, ids))}.")
        self.lora_target_modules = list(self.lora_target_modules or DEFAULT_LORA_TARGET_MODULES)
        if self.text_lora is not None:
            folded = self.text_lora.get("folded", True)
            self.text_lora = _check_lora("text_lora", self.text_lora, allow_zero_rank=True, extra_keys=("folded",))
            self.text_lora["folded"] = bool(folded)
        if self.lora_layout not in LORA_LAYOUTS:
            raise ValueError(f"lora_layout must be one of {list(LORA_LAYOUTS)}, got {self.lora_layout!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        self.composition = dict(self.composition or {})
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    def projected_tokens_per_item(self, modality: str) -> int:
        """Tokens the projector makes of one item: its features, or a Q-Former's queries."""
        entry = self.modalities[modality]
        qformer = parse_qformer_spec(entry["projector"])
        return qformer[0] if qformer else entry["tokens_per_item"]

    def positions_per_item(self, modality: str) -> int:
        """Sequence positions one item of `modality` fills: prefix + projected tokens + suffix."""
        entry = self.modalities[modality]
        return entry["prefix_tokens"] + self.projected_tokens_per_item(modality) + entry["suffix_tokens"]

    def encoder_config(self, modality: str) -> PreTrainedConfig:
        """The encoder config of `modality`, rebuilt from its dict form."""
        return build_encoder_config(self.modalities[modality]["encoder"])

    @property
    def has_routed_deltas(self) -> bool:
        """Whether the LLM needs routed layers: some modality has its own delta, or an unfolded text delta exists."""
        text_lora = self.text_lora or {}
        unfolded_text = text_lora.get("r", 0) > 0 and not text_lora.get("folded", True)
        return unfolded_text or any(entry["lora"] is not None for entry in self.modalities.values())


__all__ = ["CompositeMLLMConfig"]
