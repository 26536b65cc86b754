"""Configuration of a composite multimodal LLM: one text LLM, and any number of modalities, each with its own encoder,
projector, placeholder token and (for DAMC composites) low-rank parameters that only its tokens use."""

import copy
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

# transformers 5.8 and 5.9 copy a local folder's remote code per entry file with only the files that it imports
# itself: this file (the entry of `AutoConfig`) imports every file its modalities need.
from .compat import SubConfigSpec, auto_sub_config
from .configuration_beats import CompositeBeatsConfig  # noqa: F401
from .configuration_languagebind_video import CompositeLanguageBindVideoConfig  # noqa: F401
from .configuration_modality import (  # noqa: F401 (MODALITY_KINDS and the parsers: importable from here too)
    MODALITY_KINDS,
    ModalityConfig,
    build_encoder_config,
    check_lora,
    parse_projector_spec,
    parse_qformer_spec,
)
from .configuration_point_encoder import CompositePointEncoderConfig  # noqa: F401


DEFAULT_LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# How routed projections store their low-rank factors (see `lora_layout` in `CompositeMLLMConfig`).
LORA_LAYOUTS = ("stacked", "per_delta")


class CompositeMLLMConfig(PreTrainedConfig):
    r"""
    Configuration of [`CompositeMLLMForCausalLM`]: a decoder-only LLM plus several modalities composed into it.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the text LLM (any decoder-only model transformers knows; defaults to Llama).
        modalities (`dict[str, ModalityConfig | dict]`, *optional*):
            Modality name -> entry (a [`ModalityConfig`], or its JSON form, a dict of its fields). An entry has:
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
        self.modalities = {
            name: (entry if isinstance(entry, ModalityConfig) else ModalityConfig.from_dict(name, entry)).checked(
                name, vocab_size
            )
            for name, entry in raw_modalities.items()
        }
        ids = [entry.placeholder_id for entry in self.modalities.values()]
        if len(set(ids)) != len(ids):
            raise ValueError(f"Modalities must use distinct placeholder ids, got {dict(zip(self.modalities, ids))}.")
        self.lora_target_modules = list(self.lora_target_modules or DEFAULT_LORA_TARGET_MODULES)
        if self.text_lora is not None:
            folded = self.text_lora.get("folded", True)
            self.text_lora = check_lora("text_lora", self.text_lora, allow_zero_rank=True, extra_keys=("folded",))
            self.text_lora["folded"] = bool(folded)
        if self.lora_layout not in LORA_LAYOUTS:
            raise ValueError(f"lora_layout must be one of {list(LORA_LAYOUTS)}, got {self.lora_layout!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        self.composition = dict(self.composition or {})
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # config.json keeps each modality as a plain JSON object of its fields.
        output["modalities"] = {name: entry.to_dict() for name, entry in self.modalities.items()}
        return output

    def projected_tokens_per_item(self, modality: str) -> int:
        """Tokens the projector makes of one item: its features, or a Q-Former's queries."""
        return self.modalities[modality].projected_tokens_per_item

    def positions_per_item(self, modality: str) -> int:
        """Sequence positions one item of `modality` fills: prefix + projected tokens + suffix."""
        return self.modalities[modality].positions_per_item

    def encoder_config(self, modality: str) -> PreTrainedConfig:
        """The encoder config of `modality`, rebuilt from its dict form."""
        return self.modalities[modality].encoder_config()

    def processor_modalities(
        self, image_processor_kwargs: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, dict[str, Any]]:
        """What the processor must know of each modality so that its placeholder expansion matches the model
        (`CompositeMLLMProcessor`'s `modalities`).

        `image_processor_kwargs` maps image or video modality names to the image-processor settings of that modality
        (`size`, `crop_size`, `image_mean`, ...), for sources trained at different resolutions or normalisations.
        """
        unknown = sorted(set(image_processor_kwargs or {}) - set(self.modalities))
        if unknown:
            raise ValueError(
                f"image_processor_kwargs names {unknown}, which are not modalities of {list(self.modalities)}."
            )
        entries = {}
        for name, entry in self.modalities.items():
            info = {
                "kind": entry.kind,
                "placeholder": entry.placeholder,
                "positions_per_item": entry.positions_per_item,
            }
            if entry.kind == "video":
                info["num_frames"] = entry.num_frames
            if entry.kind == "point":
                encoder = self.encoder_config(name)
                info.update(num_points=encoder.num_points, point_dims=encoder.point_dims)
            if (image_processor_kwargs or {}).get(name) is not None:
                info["image_processor_kwargs"] = copy.deepcopy(image_processor_kwargs[name])
            entries[name] = info
        return entries

    @property
    def has_routed_deltas(self) -> bool:
        """Whether the LLM needs routed layers: some modality has its own delta, or an unfolded text delta exists."""
        text_lora = self.text_lora or {}
        unfolded_text = text_lora.get("r", 0) > 0 and not text_lora.get("folded", True)
        return unfolded_text or any(entry.lora is not None for entry in self.modalities.values())


__all__ = ["CompositeMLLMConfig"]
