"""Build a composite in memory from a base LLM, encoders and projectors (`compose`), as the Python API and the
trainer do; the converter builds composites from published checkpoints without loading them (`conversion/`)."""

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, WhisperFeatureExtractor

from modeling_composite.configuration_composite import CompositeMLLMConfig
from modeling_composite.configuration_modality import MODALITY_KINDS, ModalityConfig, settings_of
from modeling_composite.modeling_composite import CompositeMLLMForCausalLM
from modeling_composite.processing_composite import CompositeMLLMProcessor
from modeling_composite.routing import RoutedLinear
from modeling_composite.state_dict_keys import PROJECTOR_TOKENS, base_layer_key, is_factor_key

from .chat_template import default_chat_template
from .image_processor import clip_image_processor


@dataclass
class ModalitySpec:
    """One modality to put into a composite.

    Args:
        kind: `image`, `video`, `audio` or `point`.
        encoder: the encoder model (e.g. a `CLIPVisionModel`, `Qwen2AudioEncoder`, `CompositePointEncoder`).
        projector: projector spec (`linear` or `mlp{N}x_gelu`).
        projector_state_dict: trained projector weights (`linear_1.weight`, ...); None keeps a fresh projector.
        placeholder: placeholder token (default `<{name}>`); added to the tokenizer as a special token.
        feature_layer / feature_select / num_frames / prefix_tokens / suffix_tokens / lora: as in
            [`CompositeMLLMConfig`].
        tokens_per_item: features per item; computed from the encoder config when left out.
    """

    kind: str
    encoder: PreTrainedModel
    projector: str = "mlp2x_gelu"
    projector_bias: bool = True
    projector_options: dict[str, int] | None = None
    projector_state_dict: dict[str, torch.Tensor] | None = None
    placeholder: str | None = None
    feature_layer: int | str = "last"
    feature_select: str = "full"
    num_frames: int | None = None
    prefix_tokens: int = 0
    suffix_tokens: int = 0
    lora: dict[str, Any] | None = None
    tokens_per_item: int | None = None


def add_placeholder_tokens(tokenizer: PreTrainedTokenizerBase, placeholders: list[str]) -> dict[str, int]:
    """Add the placeholders missing from `tokenizer` as special tokens (in place); returns placeholder -> id."""
    missing = [token for token in placeholders if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in placeholders}
    for token in ids:
        if tokenizer.tokenize(token) != [token]:
            raise ValueError(f"The placeholder {token!r} does not tokenize to a single token; it must be special.")
    return ids


def compose(
    language_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    modalities: dict[str, ModalitySpec],
    image_processor: Any = None,
    feature_extractor: Any = None,
    text_lora: dict[str, Any] | None = None,
    lora_target_modules: list[str] | None = None,
    lora_layout: str = "stacked",
    chat_template: str | None = None,
    composition: dict[str, Any] | None = None,
) -> tuple[CompositeMLLMForCausalLM, CompositeMLLMProcessor]:
    """Make a composite model and its processor from a causal LM, encoders and projectors (all copied).

    The tokenizer gets every placeholder as a special token (a copy; the argument is not changed) and the LLM's
    embeddings grow to match. Low-rank factors start as PEFT's do (B = 0), so the composite then equals its parts;
    `lora_layout` says how they are stored (see [`CompositeMLLMConfig`]).
    """
    if not modalities:
        raise ValueError("A composite needs at least one modality.")
    tokenizer = copy.deepcopy(tokenizer)
    language_model = copy.deepcopy(language_model)
    placeholders = {name: spec.placeholder or f"<{name}>" for name, spec in modalities.items()}
    token_ids = add_placeholder_tokens(tokenizer, list(placeholders.values()))
    if len(tokenizer) > language_model.get_input_embeddings().weight.shape[0]:
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config_entries = {}
    for name, spec in modalities.items():
        if spec.kind not in MODALITY_KINDS:
            raise ValueError(f"Modality {name!r}: kind {spec.kind!r} is not one of {list(MODALITY_KINDS)}.")
        config_entries[name] = ModalityConfig.build(
            spec.kind,
            spec.encoder.config,
            placeholders[name],
            token_ids[placeholders[name]],
            tokens_per_item=spec.tokens_per_item or None,
            audio_frames=getattr(feature_extractor, "max_length", 1024),
            **settings_of(spec),
            prefix_tokens=spec.prefix_tokens,
            suffix_tokens=spec.suffix_tokens,
            lora=spec.lora,
        )
    config = CompositeMLLMConfig(
        text_config=language_model.config.to_dict(),
        modalities=config_entries,
        lora_target_modules=lora_target_modules,
        text_lora=text_lora,
        lora_layout=lora_layout,
        composition=composition or {},
        dtype=language_model.dtype,
    )
    model = CompositeMLLMForCausalLM(config).to(language_model.dtype)
    _copy_weights(model, language_model, modalities)
    model.generation_config.update(**_generation_defaults(language_model, tokenizer))
    model.generation_config.suppress_tokens = placeholder_suppression(config, model.generation_config)
    # ProcessorMixin needs every sub-processor; one for a kind the composite lacks is never used.
    processor = CompositeMLLMProcessor(
        image_processor=image_processor if image_processor is not None else clip_image_processor(),
        feature_extractor=feature_extractor if feature_extractor is not None else WhisperFeatureExtractor(),
        tokenizer=tokenizer,
        modalities=config.processor_modalities(),
        chat_template=chat_template or default_chat_template(config.processor_modalities()),
    )
    return model, processor


def placeholder_suppression(config: CompositeMLLMConfig, generation_config: Any) -> list[int]:
    """`suppress_tokens` for a composite: the generation config's own plus every placeholder id. A generated
    placeholder is never a useful answer, and without a cache every step re-reads the whole sequence, where an extra
    placeholder would break the count of modality positions."""
    suppressed = list(generation_config.suppress_tokens or [])
    return suppressed + [
        entry.placeholder_id for entry in config.modalities.values() if entry.placeholder_id not in suppressed
    ]


def _generation_defaults(language_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    source = language_model.generation_config
    return {
        "bos_token_id": source.bos_token_id if source.bos_token_id is not None else tokenizer.bos_token_id,
        "eos_token_id": source.eos_token_id if source.eos_token_id is not None else tokenizer.eos_token_id,
        "pad_token_id": source.pad_token_id if source.pad_token_id is not None else tokenizer.pad_token_id,
    }


def _copy_weights(
    model: CompositeMLLMForCausalLM,
    language_model: PreTrainedModel,
    modalities: dict[str, ModalitySpec],
) -> None:
    """Copy the parts into the composite with strict key checks; routed layers hold the base weight as
    `base_layer.weight`, so LLM keys are renamed accordingly."""
    composite = model.model
    routed_names = {
        name for name, module in composite.language_model.named_modules() if isinstance(module, RoutedLinear)
    }
    text_state = {}
    for key, value in language_model.get_decoder().state_dict().items():
        module_name, _, parameter = key.rpartition(".")
        text_state[base_layer_key(module_name, parameter) if module_name in routed_names else key] = value
    _load_exact(composite.language_model, text_state, "language_model")
    with torch.no_grad():
        model.lm_head.weight.copy_(language_model.get_output_embeddings().weight)
    for name, spec in modalities.items():
        _load_exact(composite.encoders[name], spec.encoder.state_dict(), f"encoders.{name}")
        if spec.projector_state_dict is not None:
            _load_exact(composite.projectors[name], spec.projector_state_dict, f"projectors.{name}")


def _load_exact(module: nn.Module, state: dict, where: str) -> None:
    """Load `state` into `module`; every key of `state` must exist, and every module key must be given unless it is a
    low-rank factor or a prefix/suffix token (those keep their fresh init)."""
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(
        key for key in set(own) - set(state) if not is_factor_key(key) and not key.endswith(PROJECTOR_TOKENS)
    )
    if unexpected or missing:
        raise ValueError(
            f"{where}: weights do not match the composite; unexpected {unexpected[:5]}, missing {missing[:5]}."
        )
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(
                f"{where}.{key}: shape {tuple(value.shape)} does not match the composite's {tuple(own[key].shape)}."
            )
    module.load_state_dict({**own, **state})
