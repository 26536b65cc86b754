"""Composite multimodal LLM: a text LLM, per-modality encoders and projectors, and (for DAMC composites) low-rank
deltas that only the tokens of their modality use. Names follow transformers' LLaVA where they fit, so a LLaVA
checkpoint maps onto this model almost key for key (`vision_tower` -> `encoders.<name>`,
`multi_modal_projector` -> `projectors.<name>`)."""

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple, logging

# transformers 5.8 and 5.9 copy a local folder's remote code per entry file with only the files that it imports
# itself, and then fail on the missing ones: this file (the entry of every model auto class) imports all of them.
from .compat import MINIMUM_TRANSFORMERS  # noqa: F401
from .configuration_beats import CompositeBeatsConfig  # noqa: F401
from .configuration_composite import CompositeMLLMConfig, parse_projector_spec, parse_qformer_spec
from .configuration_languagebind_video import CompositeLanguageBindVideoConfig  # noqa: F401
from .configuration_modality import ModalityConfig  # noqa: F401
from .configuration_point_encoder import CompositePointEncoderConfig  # noqa: F401
from .input_checks import check_generation_length, check_labels, check_modality_items, check_text_inputs
from .modeling_beats import CompositeBeatsEncoder
from .modeling_languagebind_video import CompositeLanguageBindVideoEncoder
from .modeling_point_encoder import CompositePointEncoder
from .modeling_qformer_projector import QFormerProjector
from .offload import unsplittable_classes, weights_loaded
from .routing import (
    DeltaLayout,
    IndexSummary,
    RoutedLinear,
    RoutingChannel,
    RoutingPlan,
    inject_routed_layers,
    plan_routing,
    summarize_index,
)
from .state_dict_keys import TEXT_MODEL_PREFIX  # noqa: F401


logger = logging.get_logger(__name__)


# The standard input name of each modality kind.
INPUT_NAME_BY_KIND = {
    "image": "pixel_values",
    "video": "pixel_values_videos",
    "audio": "input_features",
    "point": "point_clouds",
}
# Inputs that transformers' generate() knows nothing of (it refuses to split the standard ones in a chunked prefill).
_INPUTS_ONLY_AT_PREFILL = ("point_clouds", "modality_inputs")
# Every modality input: only the prefill reads them, decode steps are text (the features are in the cache).
# transformers >= 5.15 drops the standard ones after prefill by itself, older releases pass them on every step.
_MODALITY_INPUT_NAMES = (*INPUT_NAME_BY_KIND.values(), "modality_inputs")


# transformers 5.24 renamed the key-value cache `past_key_values` -> `cache` in forward arguments, model outputs and
# generate(). Remote code runs under whichever version its user has, so the name is read from transformers itself.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def take_cache(past_key_values: Cache | None, kwargs: dict) -> Cache | None:
    """The cache of a forward call, given as `past_key_values` (transformers < 5.24) or `cache` (5.24 and later,
    which then arrives among the keyword arguments)."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the key-value cache once: as `cache` or as `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


def _continues_a_sequence(cache: Cache | None) -> bool:
    """Whether a forward pass extends cached positions. A compilable cache (static) keeps its length on the device:
    reading it would cost a host sync per decoded token and break a compiled decode step's graph, so such a cache
    counts as continuing whenever it is given (a prefill into it then skips only the refusal of placeholders that
    come without inputs)."""
    if cache is None:
        return False
    if getattr(cache, "is_compileable", False) or torch.compiler.is_compiling():
        return True
    return cache.get_seq_length() > 0


@dataclass
class CompositeMLLMModelOutput(BaseModelOutputWithPast):
    """Output of [`CompositeMLLMModel`]: the LLM's outputs plus the modality index used for routing."""

    modality_index: torch.LongTensor | None = None


@dataclass
class CompositeMLLMCausalLMOutput(CausalLMOutputWithPast):
    """Output of [`CompositeMLLMForCausalLM`]. `modality_index` is `(batch, seq)`: 0 for text, i for the i-th modality
    of `config.modalities`."""

    modality_index: torch.LongTensor | None = None


def encoder_width(encoder_config) -> int:
    """Width of an encoder's features (`hidden_size` for ViTs and PointBERT, `d_model` for Whisper-style audio)."""
    for attribute in ("hidden_size", "d_model"):
        if isinstance(getattr(encoder_config, attribute, None), int):
            return getattr(encoder_config, attribute)
    raise ValueError(
        f"Cannot tell the feature width of encoder {type(encoder_config).__name__}: no hidden_size/d_model."
    )


# Encoders of ours, by their config's model type (configs: `OWN_ENCODER_CONFIGS`); the rest come from `AutoModel`.
_OWN_ENCODERS = {
    model_class.config_class.model_type: model_class
    for model_class in (CompositePointEncoder, CompositeBeatsEncoder, CompositeLanguageBindVideoEncoder)
}


def build_encoder(encoder_config) -> PreTrainedModel:
    # Compare model types, not classes: remote code loads the config and model files as separate module copies.
    model_class = _OWN_ENCODERS.get(encoder_config.model_type)
    if model_class is not None:
        return model_class(model_class.config_class(**encoder_config.to_diff_dict()))
    return AutoModel.from_config(encoder_config)


class CompositeMLLMProjector(nn.Module):
    """Projects encoder features into the LLM's embedding space (`linear`, or `mlp{N}x_gelu`: N linears with GELU in
    between), and places the modality's learnable prefix and suffix tokens around each item."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: str,
        bias: bool,
        prefix: int,
        suffix: int,
        options: dict[str, int] | None = None,
    ):
        super().__init__()
        qformer = parse_qformer_spec(spec)
        # A Q-Former (the paper's audio projector) replaces the linears; its parameters live under `qformer.`.
        self.qformer = QFormerProjector(in_features, out_features, *qformer, **(options or {})) if qformer else None
        depth = 0 if qformer else parse_projector_spec(spec)
        self.act = nn.GELU()
        for index in range(1, depth + 1):
            width_in = in_features if index == 1 else out_features
            self.add_module(f"linear_{index}", nn.Linear(width_in, out_features, bias=bias))
        self.depth = depth
        self.out_features = out_features
        self.prefix = nn.Parameter(torch.zeros(prefix, out_features)) if prefix else None
        self.suffix = nn.Parameter(torch.zeros(suffix, out_features)) if suffix else None

    def reset_tokens(self, prefix: int, suffix: int) -> None:
        """Fresh learnable prefix / suffix tokens (zeros, as the paper initialises them) in the dtype and on the
        device of the projector's weights (linears or a Q-Former); a count of 0 removes them."""
        reference = next(parameter for name, parameter in self.named_parameters() if name not in ("prefix", "suffix"))
        factory = {"dtype": reference.dtype, "device": reference.device}
        self.prefix = nn.Parameter(torch.zeros(prefix, self.out_features, **factory)) if prefix else None
        self.suffix = nn.Parameter(torch.zeros(suffix, self.out_features, **factory)) if suffix else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.qformer is not None:
            hidden_states = self.qformer(features)
        else:
            hidden_states = self.linear_1(features)
        for index in range(2, self.depth + 1):
            hidden_states = getattr(self, f"linear_{index}")(self.act(hidden_states))
        items = hidden_states.shape[0]
        parts = [hidden_states]
        if self.prefix is not None:
            parts.insert(0, self.prefix.to(hidden_states.dtype).expand(items, -1, -1))
        if self.suffix is not None:
            parts.append(self.suffix.to(hidden_states.dtype).expand(items, -1, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else hidden_states


class CompositeMLLMPreTrainedModel(PreTrainedModel):
    config: CompositeMLLMConfig
    config_class = CompositeMLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    @property
    def input_modalities(self) -> tuple[str, ...]:
        kinds = {entry.kind for entry in self.config.modalities.values()}
        return ("text", *(kind for kind in ("image", "video", "audio") if kind in kinds))

    def routed_layers(self) -> list[RoutedLinear]:
        """The routed projections of the LLM (none in a NaiveMC composite)."""
        return [module for module in self.modules() if isinstance(module, RoutedLinear)]

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable | None = None, **kwargs
    ) -> None:
        # Checkpointed layers are recomputed during the backward pass, after the forward that set their routing plan
        # returned (and possibly after later forwards set others): each checkpointed call records the plan in flight
        # and its replay runs under that plan again.
        if gradient_checkpointing_func is not None:
            gradient_checkpointing_func = _replaying_routing(gradient_checkpointing_func, self._routing_channel())
            kwargs["gradient_checkpointing_func"] = gradient_checkpointing_func
        super()._set_gradient_checkpointing(enable=enable, **kwargs)

    def _routing_channel(self) -> RoutingChannel:
        return self.model.routing_channel if hasattr(self, "model") else self.routing_channel

    def materialize_original_weights(self) -> int:
        """Trade memory for speed on modality tokens: every routed projection keeps a dense copy of its original
        weights `W0`, so that a token of modality m costs one dense matmul plus its own low-rank delta, instead of
        also the stacked text correction (rank Σ r_i). Text tokens are unchanged. Costs one more copy of the routed
        projections' weights; the copy is never saved, and `release_original_weights()` drops it (release and
        materialize again after changing any weights). Needs unquantized base weights in memory. Returns the bytes
        added."""
        added = 0
        self._routing_model().dense_routing = True
        for layer in self.routed_layers():
            layer.materialize_original_weight()
            if layer.original_weight is not None:
                added += layer.original_weight.numel() * layer.original_weight.element_size()
        logger.info("Dense original weights kept for modality tokens: %.1f MiB.", added / 2**20)
        return added

    def release_original_weights(self) -> None:
        """Undo `materialize_original_weights()`: modality tokens go back to the low-rank correction."""
        self._routing_model().dense_routing = False
        for layer in self.routed_layers():
            layer.release_original_weight()

    def _routing_model(self) -> "CompositeMLLMModel":
        return self.model if hasattr(self, "model") else self

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        if isinstance(module, CompositeMLLMProjector):
            for token in (module.prefix, module.suffix):
                if token is not None:
                    init.normal_(token, mean=0.0, std=std)
        if isinstance(module, QFormerProjector):
            module.init_query_tokens()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        super().initialize_weights()
        # Routed layers sit inside the text model, whose `_init_weights` initialises their factor linears like any
        # linear (normal): initialise them again as PEFT's LoRA, so that a fresh delta is zero.
        for layer in self.routed_layers():
            layer.reset_lora_parameters()


def _replaying_routing(checkpoint: Callable, channel: RoutingChannel) -> Callable:
    """`checkpoint` whose recomputation runs under the routing plan that was in flight when the layer was called."""

    def checkpoint_with_routing(function: Callable, *args, **kwargs):
        plan = channel.plan

        def replay(*inner_args, **inner_kwargs):
            previous, channel.plan = channel.plan, plan
            try:
                return function(*inner_args, **inner_kwargs)
            finally:
                channel.plan = previous

        return checkpoint(replay, *args, **kwargs)

    return checkpoint_with_routing


def delta_layout(config: CompositeMLLMConfig) -> DeltaLayout | None:
    """The stacked low-rank deltas of the composite's routed projections (None for a NaiveMC composite)."""
    if not config.has_routed_deltas:
        return None
    text_lora = config.text_lora or {"r": 0, "alpha": None, "folded": True}
    modality_ranks = {
        name: (entry.lora["r"], entry.lora["alpha"]) for name, entry in config.modalities.items() if entry.lora
    }
    return DeltaLayout.build(text_lora["r"], text_lora["alpha"], modality_ranks, text_lora["folded"])


class CompositeMLLMModel(CompositeMLLMPreTrainedModel):
    """The composite without a language-modelling head: `language_model`, `encoders` and `projectors`."""

    def __init__(self, config: CompositeMLLMConfig):
        super().__init__(config)
        text_config = config.get_text_config()
        self.language_model = AutoModel.from_config(text_config)
        self.modality_names = list(config.modalities)
        self.encoders = nn.ModuleDict()
        self.projectors = nn.ModuleDict()
        no_split = set(self.language_model._no_split_modules or [])
        for name, entry in config.modalities.items():
            encoder_config = config.encoder_config(name)
            self.encoders[name] = build_encoder(encoder_config)
            no_split.update(self.encoders[name]._no_split_modules or [])
            self.projectors[name] = CompositeMLLMProjector(
                encoder_width(encoder_config),
                text_config.hidden_size,
                entry.projector,
                entry.projector_bias,
                entry.prefix_tokens,
                entry.suffix_tokens,
                entry.projector_options,
            )
        no_split.update(unsplittable_classes(self.encoders), unsplittable_classes(self.projectors))
        # Encoders live in a ModuleDict, which post_init does not search for `_no_split_modules`.
        self._no_split_modules = sorted(no_split)
        # The routing plan of the forward in flight, read by every routed projection (see routing.py).
        self.routing_channel = RoutingChannel()
        self.delta_layout = delta_layout(config)
        self.dense_routing = False  # some projection keeps a dense W0 (materialize_original_weights)
        if self.delta_layout is not None:
            inject_routed_layers(
                self.language_model,
                self.routing_channel,
                config.lora_target_modules,
                self.delta_layout,
                config.lora_layout,
                config.lora_dropout,
            )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @property
    def _compute_dtype(self) -> torch.dtype:
        # The embeddings are never quantized, so their dtype is the model's floating dtype even in 4-bit.
        return self.get_input_embeddings().weight.dtype

    def get_modality_features(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """Encode and project the items of one modality: `(items, positions_per_item, hidden)`.

        Video encoders see frames as images (`(items * frames, channels, height, width)`), unless they model time
        themselves (class attribute `takes_whole_videos`, e.g. LanguageBind's): those get the videos whole and return
        per-frame tokens, frame-major, as `(items * frames, tokens, width)`."""
        entry = self.config.modalities[modality]
        encoder = self.encoders[modality]
        check_modality_items(modality, entry.kind, entry, encoder.config, inputs)  # before the encoder runs
        items = inputs.shape[0]
        if entry.kind == "video":
            frames = inputs.shape[1]
            if frames != entry.num_frames:
                raise ValueError(f"Modality {modality!r}: videos must have {entry.num_frames} frames, got {frames}.")
            if not getattr(encoder, "takes_whole_videos", False):
                inputs = inputs.flatten(0, 1)
        # Point clouds stay in float32: the encoder groups points by distance in float32 itself, as the paper does,
        # and coordinates rounded to bf16 would pick other neighbours.
        dtype = torch.float32 if entry.kind == "point" else self._compute_dtype
        layer = entry.feature_layer
        with weights_loaded(encoder):
            inputs = inputs.to(device=next(encoder.parameters()).device, dtype=dtype)
            outputs = encoder(inputs, output_hidden_states=layer != "last", return_dict=True)
        features = outputs.last_hidden_state if layer == "last" else outputs.hidden_states[layer]
        if entry.feature_select == "patch":
            features = features[:, 1:]
        features = features.reshape(items, -1, features.shape[-1])
        if features.shape[1] != entry.tokens_per_item:
            raise ValueError(
                f"Modality {modality!r}: the encoder gave {features.shape[1]} features per item but the config says "
                f"tokens_per_item={entry.tokens_per_item}; check the input size against the encoder config."
            )
        projector = self.projectors[modality]
        with weights_loaded(projector):
            return projector(features.to(self._compute_dtype))

    def _check_input_shape(self, modality: str, inputs: torch.Tensor) -> None:
        entry, encoder_config = self.config.modalities[modality], self.encoders[modality].config
        check_modality_items(modality, entry.kind, entry, encoder_config, inputs, check_values=False)

    def check_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        standard_inputs: dict[str, torch.Tensor | None],
        modality_inputs: dict[str, torch.Tensor] | None,
    ) -> None:
        """Refuse unusable inputs before anything runs (no encoder, no embedding lookup), naming the input or modality
        and the numbers: text inputs (dtypes, shapes, batch sizes, token ids in range) and every modality's input
        (dtype, item shape for its encoder, finite, normalised pixels); see `input_checks.py`. A decode step (one new
        token, a cache, no modality inputs) costs no host sync here."""
        by_modality = self.collect_modality_inputs(standard_inputs, modality_inputs)
        # A compilable cache keeps its length on the device: not read here (see `_continues_a_sequence`).
        compilable = getattr(past_key_values, "is_compileable", False) or torch.compiler.is_compiling()
        past_length = None if compilable else past_key_values.get_seq_length() if past_key_values is not None else 0
        check_text_inputs(
            self.get_input_embeddings().weight.shape[0],
            self.config.get_text_config().hidden_size,
            input_ids,
            inputs_embeds,
            attention_mask,
            past_length,
            bool(by_modality),
        )
        for name, items in by_modality.items():
            entry = self.config.modalities[name]
            check_modality_items(name, entry.kind, entry, self.encoders[name].config, items)

    def collect_modality_inputs(
        self, standard_inputs: dict[str, torch.Tensor | None], modality_inputs: dict[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        """Map inputs given by standard name (`pixel_values`, ...) or by modality name to the composite's
        modalities."""
        resolved = {}
        for input_name, value in standard_inputs.items():
            if value is None:
                continue
            kind = next(kind for kind, name in INPUT_NAME_BY_KIND.items() if name == input_name)
            owners = [name for name, entry in self.config.modalities.items() if entry.kind == kind]
            if not owners:
                raise ValueError(
                    f"Got `{input_name}` but this composite has no {kind} modality (it has: "
                    f"{ {name: entry.kind for name, entry in self.config.modalities.items()} })."
                )
            if len(owners) > 1:
                raise ValueError(
                    f"Got `{input_name}` but this composite has several {kind} modalities {owners}; pass "
                    f"`modality_inputs={{name: tensor}}` to say which one."
                )
            resolved[owners[0]] = value
        for name, value in (modality_inputs or {}).items():
            if name not in self.config.modalities:
                raise ValueError(
                    f"modality_inputs names {name!r}, which is not a modality of this composite {self.modality_names}."
                )
            if name in resolved:
                raise ValueError(f"Modality {name!r} got inputs twice: by standard name and in modality_inputs.")
            resolved[name] = value
        return resolved

    def modality_index(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None = None
    ) -> torch.LongTensor:
        """`(batch, seq)` modality of every position: 0 for text, i for the i-th modality (its placeholder token).
        Found in `input_ids` when given, else by comparing `inputs_embeds` with the placeholders' embeddings."""
        reference = input_ids if input_ids is not None else inputs_embeds
        index = torch.zeros(reference.shape[:2], dtype=torch.long, device=reference.device)
        embeddings = self.get_input_embeddings()
        for slot, name in enumerate(self.modality_names, start=1):
            token_id = self.config.modalities[name].placeholder_id
            if input_ids is not None:
                is_placeholder = input_ids == token_id
            else:
                placeholder = embeddings(torch.tensor(token_id, device=inputs_embeds.device)).to(inputs_embeds.dtype)
                is_placeholder = (inputs_embeds == placeholder).all(-1)
            index = index.masked_fill(is_placeholder.to(index.device), slot)
        return index

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        point_clouds: torch.Tensor | None = None,
        modality_inputs: dict[str, torch.Tensor] | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CompositeMLLMModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, channels, height, width)`, *optional*):
                Images, in the order their placeholders appear in the batch.
            pixel_values_videos (`torch.FloatTensor` of shape `(num_videos, frames, channels, height, width)`,
                *optional*):
                Videos (the image tower runs on every frame).
            input_features (`torch.FloatTensor` of shape `(num_clips, mel_bins, frames)`, *optional*):
                Log-mel features of audio clips.
            point_clouds (`torch.FloatTensor` of shape `(num_clouds, num_points, point_dims)`, *optional*):
                Point clouds (xyz, or xyz + rgb), normalised by the processor.
            modality_inputs (`dict[str, torch.Tensor]`, *optional*):
                Inputs by modality name, for composites with several modalities of one kind.
        """
        past_key_values = take_cache(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        standard = {
            "pixel_values": pixel_values,
            "pixel_values_videos": pixel_values_videos,
            "input_features": input_features,
            "point_clouds": point_clouds,
        }
        self.check_inputs(input_ids, inputs_embeds, attention_mask, past_key_values, standard, modality_inputs)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        inputs_by_modality = self.collect_modality_inputs(standard, modality_inputs)
        continuing = _continues_a_sequence(past_key_values)
        # A decode step is text, even a placeholder the model itself generated: no modality index to search for, and
        # none of the host syncs that counting placeholders and routing rows would cost on every generated token.
        text_step = continuing and not inputs_by_modality
        if text_step:
            modality_index = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        else:
            self._check_length(inputs_embeds.shape[1], past_key_values)
            modality_index = self.modality_index(input_ids, inputs_embeds)
        summary = None
        if not text_step:
            if continuing:
                # Placeholders generated earlier in a conversation whose new turn brings other modalities' inputs.
                for slot, name in enumerate(self.modality_names, start=1):
                    if name not in inputs_by_modality:
                        modality_index = modality_index.masked_fill(modality_index == slot, 0)
            # One host sync per forward: every placeholder count, and where the routed rows are.
            summary = summarize_index(modality_index, len(self.modality_names) + 1)
        for slot, name in enumerate(() if text_step else self.modality_names, start=1):
            count, items = summary.counts[slot], inputs_by_modality.get(name)
            if items is None:
                if count:
                    raise ValueError(
                        f"Modality {name!r}: the prompt has {count} {name} placeholder positions but no {name} inputs "
                        "were given."
                    )
                continue
            self._check_input_shape(name, items)
            expected = len(items) * self.config.positions_per_item(name)
            if count != expected:
                raise ValueError(
                    f"Modality {name!r}: the prompt has {count} placeholder positions but {len(items)} input(s) need "
                    f"{expected} ({self.config.positions_per_item(name)} each); let the processor expand placeholders."
                )
            features = self.get_modality_features(name, items).to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter((modality_index == slot).unsqueeze(-1), features)
        plan = None if text_step else self.plan_routing(modality_index, summary=summary)
        previous, self.routing_channel.plan = self.routing_channel.plan, plan
        try:
            outputs = self.language_model(
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **{CACHE_NAME: past_key_values},
                **kwargs,
            )
        finally:
            # The text model called on its own (`get_decoder()`) must not see this forward's plan. Gradient
            # checkpointing's recomputation re-enters it (`_replaying_routing`).
            self.routing_channel.plan = previous
        return CompositeMLLMModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
            modality_index=modality_index,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )

    def add_routed_deltas(
        self,
        target_modules: list[str],
        text_lora: dict | None = None,
        modality_loras: dict[str, dict] | None = None,
        lora_layout: str = "per_delta",
        dropout: float = 0.0,
    ) -> None:
        """Give the text model's `target_modules` fresh routed low-rank deltas (B = 0, so outputs do not change until
        they train) and record them in the config: `text_lora` (`{"r", "alpha"}`) is an unfolded text delta used by
        every token without a delta of its own, `modality_loras` maps modality names to their own delta. For training
        a source; a composite that already has routed deltas refuses."""
        if self.delta_layout is not None:
            raise ValueError("This composite already has routed low-rank deltas; add them to one that has none.")
        unknown = sorted(set(modality_loras or {}) - set(self.config.modalities))
        if unknown:
            raise ValueError(f"modality_loras names {unknown}, which are not modalities of {self.modality_names}.")
        if text_lora is None and not modality_loras:
            raise ValueError("add_routed_deltas() needs a text_lora or at least one modality lora.")
        config = self.config
        if text_lora is not None:
            text_lora = {"r": int(text_lora["r"]), "alpha": float(text_lora["alpha"]), "folded": False}
        config.text_lora = text_lora
        for name, lora in (modality_loras or {}).items():
            lora = {"r": int(lora["r"]), "alpha": float(lora["alpha"])}
            config.modalities[name] = dataclasses.replace(config.modalities[name], lora=lora).checked(name)
        config.lora_target_modules = list(target_modules)
        config.lora_layout = lora_layout
        config.lora_dropout = dropout
        self.delta_layout = delta_layout(config)
        inject_routed_layers(
            self.language_model,
            self.routing_channel,
            config.lora_target_modules,
            self.delta_layout,
            lora_layout,
            dropout,
        )

    def add_modality_tokens(self, modality: str, prefix_tokens: int, suffix_tokens: int) -> None:
        """Give `modality`'s projector fresh learnable prefix / suffix tokens (zeros) and record their counts in the
        config, so that every item of it then fills `config.positions_per_item(modality)` positions. For training a
        source (the paper's stage 2); the processor follows with `processor.update_modalities(config)`."""
        if modality not in self.projectors:
            raise ValueError(f"{modality!r} is not a modality of this composite {self.modality_names}.")
        for name, count in (("prefix_tokens", prefix_tokens), ("suffix_tokens", suffix_tokens)):
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {count!r}.")
        self.projectors[modality].reset_tokens(prefix_tokens, suffix_tokens)
        entry = self.config.modalities[modality]
        self.config.modalities[modality] = dataclasses.replace(
            entry, prefix_tokens=prefix_tokens, suffix_tokens=suffix_tokens
        ).checked(modality, self.config.get_text_config().vocab_size)

    def plan_routing(
        self, modality_index: torch.LongTensor, static_shapes: bool = False, summary: IndexSummary | None = None
    ) -> RoutingPlan | None:
        """The routing plan of a forward pass over positions of this `(batch, seq)` modality index (as
        `modality_index()` gives it): None for a NaiveMC composite, or when no position needs low-rank work.
        `static_shapes=True` plans every row and column with no host sync (for graphs compiled once)."""
        if self.delta_layout is None:
            return None
        return plan_routing(
            modality_index,
            self.delta_layout,
            self.modality_names,
            self._compute_dtype,
            static_shapes=static_shapes,
            dense=self.dense_routing,
            summary=summary,
        )

    @contextmanager
    def routing(
        self, modality_index: torch.LongTensor | None, static_shapes: bool = False
    ) -> Iterator[RoutingPlan | None]:
        """Route calls of the text model (`self.language_model`) inside this block as the composite's forward does
        for positions of `modality_index` (None: text only). For running the LLM on prepared embeddings (benchmarks,
        serving engines): `with model.model.routing(index): model.model.language_model(inputs_embeds=...)`.
        `static_shapes=True` plans every row and column with no host sync (`plan_routing`): inside a graph compiled
        once (vLLM), with the index computed in the graph too, so that the plan is data flow of each call."""
        plan = None if modality_index is None else self.plan_routing(modality_index, static_shapes=static_shapes)
        previous, self.routing_channel.plan = self.routing_channel.plan, plan
        try:
            yield plan
        finally:
            self.routing_channel.plan = previous

    def _check_length(self, new_tokens: int, past_key_values: Cache | None) -> None:
        limit = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if limit is not None and past + new_tokens > limit:
            raise ValueError(
                f"The sequence is {past + new_tokens} positions ({past} cached + {new_tokens} new) but the text model "
                f"allows {limit} (max_position_embeddings); shorten the prompt or use fewer modality inputs."
            )


class CompositeMLLMForCausalLM(CompositeMLLMPreTrainedModel, GenerationMixin):
    """Composite multimodal LLM with a language-modelling head; generates text from any mix of its modalities."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: CompositeMLLMConfig):
        super().__init__(config)
        self.model = CompositeMLLMModel(config)
        text_config = config.get_text_config()
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        point_clouds: torch.Tensor | None = None,
        modality_inputs: dict[str, torch.Tensor] | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CompositeMLLMCausalLMOutput:
        r"""
        Same inputs as [`CompositeMLLMModel.forward`], plus:
            labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*): next-token targets (-100 is ignored).
            logits_to_keep (`int` or `torch.Tensor`, default 0): compute logits only for the last N positions (0: all).
        """
        if labels is not None:
            reference = input_ids if input_ids is not None else inputs_embeds
            if reference is not None:
                check_labels(labels, *reference.shape[:2], self.config.get_text_config().vocab_size)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=take_cache(past_key_values, kwargs),
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            input_features=input_features,
            point_clouds=point_clouds,
            modality_inputs=modality_inputs,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.get_text_config().vocab_size, **kwargs
            )
        return CompositeMLLMCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            modality_index=outputs.modality_index,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )

    def generate(self, *args, **kwargs):
        """[`GenerationMixin.generate`], refusing a chunked prefill that would split point clouds or `modality_inputs`
        (transformers refuses it for the standard inputs, `pixel_values` and the like, by itself)."""
        # generate()'s first two parameters, which may come by position; the rest pass through untouched.
        inputs = args[0] if args else kwargs.get("inputs")
        generation_config = args[1] if len(args) > 1 else kwargs.get("generation_config")
        chunk_size = kwargs.get(
            "prefill_chunk_size", getattr(generation_config or self.generation_config, "prefill_chunk_size", None)
        )
        raw_inputs = [name for name in _INPUTS_ONLY_AT_PREFILL if kwargs.get(name) is not None]
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if torch.is_tensor(prompt) and prompt.ndim >= 2:
            settings = generation_config or self.generation_config
            check_generation_length(
                getattr(self.config.get_text_config(), "max_position_embeddings", None),
                prompt.shape[1],
                kwargs.get("max_new_tokens", getattr(settings, "max_new_tokens", None)),
                kwargs.get("max_length", getattr(settings, "max_length", None)),
            )
        if chunk_size is not None and raw_inputs:
            positions = prompt.shape[1] if prompt is not None else None
            if positions is None or positions > chunk_size:
                raise ValueError(
                    f"Chunked prefill (prefill_chunk_size={chunk_size}) cannot split {raw_inputs} between chunks: "
                    "each chunk would get all the inputs but only some of their placeholders. Pass "
                    "prefill_chunk_size=None, or a chunk at least as long as the prompt."
                )
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        # `inputs_embeds` is named in the signature: generate() accepts it only from models whose signature does.
        # Modality inputs go to the prefill only (or to every step without a cache): held back here rather than left to
        # generate(), which drops only the standard ones and only in recent releases. Before transformers 5.23 a
        # chunked prefill (in one chunk: see `generate`) comes with is_first_iteration=False; the cache tells then.
        held_back = {name: kwargs.pop(name) for name in _MODALITY_INPUT_NAMES if kwargs.get(name) is not None}
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        prefill = is_first_iteration or not _continues_a_sequence(kwargs.get(CACHE_NAME))
        if held_back and (prefill or not kwargs.get("use_cache", True)):
            model_inputs.update(held_back)
        return model_inputs

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ) -> tuple[torch.LongTensor | None, dict]:
        """Beam search and `num_return_sequences` repeat every prompt `expand_size` times. A prompt's modality inputs
        must be repeated as a group (`[a, b]` -> `[a, b, a, b]`) to stay in its placeholders' order; the stock method
        repeats every tensor item by item (`[a, a, b, b]`), which is right only with one item per prompt."""
        if expand_size == 1:
            return input_ids, model_kwargs
        given = {
            key: model_kwargs.pop(key) for key in INPUT_NAME_BY_KIND.values() if model_kwargs.get(key) is not None
        }
        by_name = model_kwargs.pop("modality_inputs", None)
        if given or by_name:
            # Placeholders of the prompts before they are repeated. generate() passes empty `input_ids` beside
            # `inputs_embeds`; the placeholders are then in the embeddings.
            ids = input_ids if input_ids is not None and input_ids.numel() else None
            index = self.model.modality_index(ids, model_kwargs.get("inputs_embeds"))
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if given or by_name:
            for key, items in given.items():
                (name,) = self.model.collect_modality_inputs({key: items}, None)
                model_kwargs[key] = self._repeat_per_prompt(name, items, index, expand_size)
            if by_name:
                model_kwargs["modality_inputs"] = {
                    name: self._repeat_per_prompt(name, items, index, expand_size) for name, items in by_name.items()
                }
        return input_ids, model_kwargs

    def _repeat_per_prompt(
        self, name: str, items: torch.Tensor, modality_index: torch.LongTensor, expand_size: int
    ) -> torch.Tensor:
        """`items` of modality `name` (in placeholder order over the batch), each prompt's own group repeated
        `expand_size` times in place."""
        if name not in self.model.modality_names:
            return items  # refused by name in forward
        slot = self.model.modality_names.index(name) + 1
        per_prompt = (modality_index == slot).sum(-1) // self.config.positions_per_item(name)
        if int(per_prompt.sum()) != len(items):
            return items.repeat_interleave(expand_size, dim=0)  # forward says what does not match
        groups = items.split(per_prompt.tolist())
        return torch.cat([group for group in groups for _ in range(expand_size)])


__all__ = ["CompositeMLLMForCausalLM", "CompositeMLLMModel", "CompositeMLLMPreTrainedModel"]
