"""One modality of a composite (`ModalityConfig`): its encoder, projector, placeholder, feature selection and (DAMC)
low-rank delta, checked once when a `CompositeMLLMConfig` takes it. Everything else that describes a modality (the
processor's view, the builder's and the converter's inputs) derives from it."""

import copy
import json
import re
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from .configuration_beats import CompositeBeatsConfig
from .configuration_languagebind_video import CompositeLanguageBindVideoConfig
from .configuration_point_encoder import CompositePointEncoderConfig


MODALITY_KINDS = ("image", "video", "audio", "point")
FEATURE_SELECTIONS = ("patch", "full")
_PROJECTOR_PATTERN = re.compile(r"^(linear|mlp(\d+)x_gelu)$")
_QFORMER_SPEC = re.compile(r"^qformer_(\d+)N_(\d+)L$")
# Settings a Q-Former projector takes beside its spec (the paper's audio projector: 1024 positions, BERT-base).
QFORMER_OPTIONS = ("num_positions", "hidden_size", "num_attention_heads", "intermediate_size")
_MODALITY_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
        raise ValueError(
            f"Malformed Q-Former projector spec {spec!r}: write 'qformer_{{Q}}N_{{L}}L', e.g. 'qformer_32N_2L'."
        )
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
            raise ValueError(
                f"Modality {name!r}: projector_options[{key!r}] must be a positive integer, got {value!r}."
            )


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


def check_lora(where: str, lora: Any, allow_zero_rank: bool = False, extra_keys: tuple[str, ...] = ()) -> dict | None:
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
        raise ValueError(
            f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted({'r', 'alpha', *extra_keys})}."
        )
    return normalized


def parse_feature_layer(value: Any, from_text: bool = False) -> int | str:
    """An encoder feature layer: `"last"` (its `last_hidden_state`) or an integer index into its `hidden_states`
    (LLaVA uses -2). With `from_text`, the integer may be given as its decimal text (a command-line argument). Raises
    ValueError for anything else."""
    if from_text and isinstance(value, str) and value != "last":
        try:
            value = int(value)
        except ValueError:
            pass
    if value != "last" and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"feature_layer must be 'last' or an index into hidden states, got {value!r}.")
    return value


def count_encoder_tokens(
    encoder_config: PreTrainedConfig, kind: str, feature_select: str, num_frames: int | None, audio_frames: int = 1024
) -> int:
    """Features one item yields, from the encoder config: ViTs give a patch grid (+ CLS for CLIP and LanguageBind),
    Whisper-style audio encoders `max_source_positions // 2` after their average pooling, BEATs one token per 16 x 16
    patch of its `audio_frames` x mel-bins fbank (the feature extractor's `max_length`), the point encoder its groups
    + CLS."""
    model_type = encoder_config.model_type
    if model_type in ("clip_vision_model", "siglip_vision_model", CompositeLanguageBindVideoConfig.model_type):
        tokens = (encoder_config.image_size // encoder_config.patch_size) ** 2
        tokens += 1 if model_type != "siglip_vision_model" else 0
    elif model_type == CompositeBeatsConfig.model_type:
        patch = encoder_config.patch_size
        tokens = (audio_frames // patch) * (encoder_config.num_mel_bins // patch)
    elif model_type == "qwen2_audio_encoder":
        tokens = encoder_config.max_source_positions // 2
    elif model_type == CompositePointEncoderConfig.model_type:
        tokens = encoder_config.num_groups + 1
    else:
        raise ValueError(
            f"Cannot count the features of encoder type {model_type!r}; pass tokens_per_item in its ModalitySpec."
        )
    tokens -= 1 if feature_select == "patch" else 0
    return tokens * (num_frames if kind == "video" else 1)


def check_modality_name(name: Any) -> None:
    if not isinstance(name, str) or not _MODALITY_NAME_PATTERN.match(name) or name == "text":
        raise ValueError(
            f"Invalid modality name {name!r}: use a Python identifier other than 'text' (it becomes a module key)."
        )


@dataclass
class ModalityConfig:
    """One modality of a composite, as `CompositeMLLMConfig.modalities[name]` holds it and config.json stores it (one
    JSON object of these fields). See [`CompositeMLLMConfig`] for what each field means.

    Build one with `ModalityConfig.build(...)` (which counts `tokens_per_item` from the encoder when not given and
    brings the encoder config into its canonical form) or from its JSON form with `ModalityConfig.from_dict`; the
    composite config checks it (`checked`) when it takes it.
    """

    kind: str
    encoder: dict[str, Any]
    placeholder: str
    placeholder_id: int
    tokens_per_item: int
    feature_layer: int | str = "last"
    feature_select: str = "full"
    projector: str = "mlp2x_gelu"
    projector_bias: bool = True
    projector_options: dict[str, int] | None = None
    num_frames: int | None = None
    prefix_tokens: int = 0
    suffix_tokens: int = 0
    lora: dict[str, float] | None = None

    @classmethod
    def build(
        cls,
        kind: str,
        encoder_config: PreTrainedConfig,
        placeholder: str,
        placeholder_id: int,
        tokens_per_item: int | None = None,
        audio_frames: int = 1024,
        **settings: Any,
    ) -> "ModalityConfig":
        """A modality of `encoder_config`; `settings` are the other fields. `tokens_per_item` defaults to the
        encoder's features per item (`count_encoder_tokens`, `audio_frames` for BEATs)."""
        if tokens_per_item is None:
            tokens_per_item = count_encoder_tokens(
                encoder_config, kind, settings.get("feature_select", "full"), settings.get("num_frames"), audio_frames
            )
        return cls(kind, encoder_config.to_dict(), placeholder, placeholder_id, tokens_per_item, **settings)

    @classmethod
    def from_dict(cls, name: str, entry: Any) -> "ModalityConfig":
        """The JSON form (one entry of config.json's `modalities`), with its defaults filled; unknown or missing
        fields raise ValueError naming the modality."""
        if is_dataclass(entry) and type(entry).__name__ == cls.__name__:
            # This class from another copy of this file: the installed package's beside a composite folder's remote
            # code (vLLM loads the config from the folder, the plugin reads it with the package's classes).
            entry = entry.to_dict()
        if not isinstance(entry, dict):
            raise ValueError(f"Modality {name!r}: the entry must be a dict, got {type(entry).__name__}.")
        allowed = [field.name for field in fields(cls)]
        unknown = set(entry) - set(allowed)
        if unknown:
            raise ValueError(f"Modality {name!r}: unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}.")
        missing = [key for key in _REQUIRED_FIELDS if entry.get(key) is None]
        if missing:
            raise ValueError(f"Modality {name!r}: missing required fields {missing}.")
        return cls(**copy.deepcopy(entry))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, every field."""
        return {field.name: copy.deepcopy(getattr(self, field.name)) for field in fields(self)}

    def checked(self, name: str, vocab_size: int | None = None) -> "ModalityConfig":
        """This modality with its encoder config in canonical form, after every check (ValueError naming the modality
        and the field): the one place a modality is validated."""
        check_modality_name(name)
        missing = [key for key in _REQUIRED_FIELDS if getattr(self, key) is None]
        if missing:
            raise ValueError(f"Modality {name!r}: missing required fields {missing}.")
        if self.kind not in MODALITY_KINDS:
            raise ValueError(f"Modality {name!r}: kind {self.kind!r} is not one of {list(MODALITY_KINDS)}.")
        encoder = self.encoder
        if not isinstance(encoder, PreTrainedConfig) and not (isinstance(encoder, dict) and "model_type" in encoder):
            raise ValueError(f"Modality {name!r}: 'encoder' must be a config (or config dict naming its model_type).")
        # Canonical form: only the values that differ from the encoder's defaults, as they read back from JSON, so
        # that a config equals itself after save and load.
        encoder = build_encoder_config(encoder)
        encoder = json.loads(json.dumps({**encoder.to_diff_dict(), "model_type": encoder.model_type}))
        encoder.pop("transformers_version", None)
        if self.feature_select not in FEATURE_SELECTIONS:
            raise ValueError(
                f"Modality {name!r}: feature_select {self.feature_select!r} is not one of {list(FEATURE_SELECTIONS)}."
            )
        try:
            parse_feature_layer(self.feature_layer)
        except ValueError as error:
            raise ValueError(f"Modality {name!r}: {error}") from None
        _check_projector(name, self.projector, self.projector_options)
        for field in ("tokens_per_item", "prefix_tokens", "suffix_tokens", "placeholder_id"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < (1 if field == "tokens_per_item" else 0):
                raise ValueError(
                    f"Modality {name!r}: {field} must be a non-negative integer (tokens_per_item >= 1), got {value!r}."
                )
        if vocab_size is not None and self.placeholder_id >= vocab_size:
            raise ValueError(
                f"Modality {name!r}: placeholder_id {self.placeholder_id} is outside the text vocabulary "
                f"(vocab_size {vocab_size}); add the placeholder token to the tokenizer and resize the embeddings."
            )
        if self.kind == "video":
            frames = self.num_frames
            if not isinstance(frames, int) or frames < 1:
                raise ValueError(f"Modality {name!r}: a video modality needs num_frames >= 1, got {frames!r}.")
            if self.tokens_per_item % frames != 0:
                raise ValueError(
                    f"Modality {name!r}: tokens_per_item {self.tokens_per_item} must be num_frames ({frames}) "
                    "times the tokens of one frame."
                )
        elif self.num_frames is not None:
            raise ValueError(f"Modality {name!r}: num_frames only applies to video modalities, not {self.kind!r}.")
        if parse_qformer_spec(self.projector) is not None:
            if not self.projector_bias:
                raise ValueError(
                    f"Modality {name!r}: a Q-Former projector always has biases; set projector_bias to True."
                )
            positions = (self.projector_options or {}).get("num_positions", 1024)
            if self.tokens_per_item > positions:
                raise ValueError(
                    f"Modality {name!r}: the Q-Former has position embeddings for {positions} encoder tokens but "
                    f"tokens_per_item is {self.tokens_per_item}; raise projector_options['num_positions']."
                )
        lora = check_lora(f"Modality {name!r}: lora", self.lora)
        return replace(self, encoder=encoder, lora=lora, projector_options=copy.deepcopy(self.projector_options))

    def encoder_config(self) -> PreTrainedConfig:
        """The encoder config, rebuilt from its dict form."""
        return build_encoder_config(self.encoder)

    @property
    def projected_tokens_per_item(self) -> int:
        """Tokens the projector makes of one item: its features, or a Q-Former's queries."""
        qformer = parse_qformer_spec(self.projector)
        return qformer[0] if qformer else self.tokens_per_item

    @property
    def positions_per_item(self) -> int:
        """Sequence positions one item fills: prefix + projected tokens + suffix."""
        return self.prefix_tokens + self.projected_tokens_per_item + self.suffix_tokens


# The fields that the builder's `ModalitySpec` and the converter's `ModalityPart` carry under the same names, passed
# through as they are (`settings_of`).
SETTING_FIELDS = ("feature_layer", "feature_select", "projector", "projector_bias", "projector_options", "num_frames")


def settings_of(inputs: Any) -> dict[str, Any]:
    """The `SETTING_FIELDS` of an object that describes a modality to build (for `ModalityConfig.build`)."""
    return {name: getattr(inputs, name) for name in SETTING_FIELDS}


# Fields without a default: every entry names them.
_REQUIRED_FIELDS = ("kind", "encoder", "placeholder", "placeholder_id", "tokens_per_item")
