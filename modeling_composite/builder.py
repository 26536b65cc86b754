"""Build a composite in memory from a base LLM, encoders and projectors, and save it as a self-contained folder that
loads with the auto classes and `trust_remote_code=True`.

This file is part of the installed package only; it is not remote code and never travels inside a composite folder.
"""

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, WhisperFeatureExtractor
from transformers.utils import is_torchvision_available

from .configuration_composite import CompositeMLLMConfig
from .configuration_modality import MODALITY_KINDS, ModalityConfig, settings_of
from .modeling_composite import CompositeMLLMForCausalLM
from .processing_composite import CompositeMLLMProcessor
from .routing import RoutedLinear
from .state_dict_keys import PROJECTOR_TOKENS, base_layer_key, is_factor_key


AUTO_MODEL_CLASSES = (
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoModelForMultimodalLM",
)
_CONTENT_TYPES_BY_KIND = {"image": ("image",), "video": ("video",), "audio": ("audio",), "point": ("point", "point_cloud")}


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


# The paper's conversation (LLaVA's `vicuna_v1`): this system line, then "USER: q ASSISTANT: a</s>" turns joined by a
# space after the question and nothing after the answer's `</s>`.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions."
)
CHAT_TEMPLATE_NAMES = ("default", "vicuna_v1")


def named_chat_template(name: str, modalities: dict[str, dict[str, Any]]) -> str:
    """The chat template a recipe names: `default` ([`default_chat_template`]) or `vicuna_v1` (the paper's: the same
    turns, its system line when the messages bring none, and no space after an answer's end-of-sequence token)."""
    if name == "default":
        return default_chat_template(modalities)
    if name == "vicuna_v1":
        return default_chat_template(modalities, default_system=VICUNA_V1_SYSTEM, space_after_answer=False)
    raise ValueError(f"Unknown chat template name {name!r}; use one of {list(CHAT_TEMPLATE_NAMES)} or a Jinja template.")


def default_chat_template(
    modalities: dict[str, dict[str, Any]], default_system: str | None = None, space_after_answer: bool = True
) -> str:
    """A Vicuna-style chat template whose content items may be text or any modality the composite has.

    `modalities` maps each modality name to (at least) its `kind` and `placeholder`, as [`CompositeMLLMConfig.processor_modalities`]
    gives them. A content item of a kind (`image`, `video`, `audio`, `point` or `point_cloud`) becomes the placeholder
    of the modality it names in its `"modality"` key, or of the first modality of that kind when it names none,
    followed by a newline; naming a modality that is not of the item's kind raises an error. `default_system` is
    written first when the messages hold no system message; `space_after_answer=False` joins an answer's
    end-of-sequence token directly to the next turn, as LLaVA's `vicuna_v1` does.
    """
    by_kind: dict[str, list[str]] = {}
    for name, entry in modalities.items():
        by_kind.setdefault(entry["kind"], []).append(name)
    branches = ""
    for kind, names in by_kind.items():
        # Placeholders and names are emitted as Jinja string literals, never as template text, so that a token such
        # as `{{x}}` stays literal and no whitespace control strips part of it.
        choices = "".join(
            "{%- elif item['modality'] == " + repr(name) + " %}{{ " + repr(modalities[name]["placeholder"]) + " }}"
            for name in names
        )
        unknown = repr(f", which is not one of the {kind} modalities {names}.")
        branches += (
            "{%- elif item['type'] in " + repr(list(_CONTENT_TYPES_BY_KIND[kind])) + " %}"
            "{%- if item['modality'] is not defined or item['modality'] is none %}"
            "{{ " + repr(modalities[names[0]]["placeholder"]) + " }}" + choices + "{%- else %}"
            "{{ raise_exception('A content item of type ' ~ item['type'] ~ ' names modality ' ~ item['modality'] ~ "
            + unknown + ") }}"
            "{%- endif %}{{ '\\n' }}"
        )
    system = (
        "{%- if messages[0]['role'] != 'system' %}{{ " + repr(default_system) + " }}{{ ' ' }}{%- endif %}"
        if default_system
        else ""
    )
    after_answer = "{{ eos_token }}{{ ' ' }}" if space_after_answer else "{{ eos_token }}"
    return (
        system + "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}"
        "{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}{{ ' ' }}"
        "{%- else %}"
        "{{ message['role'] | upper }}{{ ': ' }}"
        "{%- if message['content'] is string %}{{ message['content'] }}"
        "{%- else %}{%- for item in message['content'] %}"
        "{%- if item['type'] == 'text' %}{{ item['text'] }}" + branches + "{%- endif %}"
        "{%- endfor %}{%- endif %}"
        "{%- if message['role'] == 'assistant' %}" + after_answer + "{%- else %}{{ ' ' }}{%- endif %}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}ASSISTANT:{%- endif %}"
    )


# Settings of a CLIP-style image processor: what a source's image processor carries over to the composite's, and what
# may differ per modality (applied as call-time overrides by the processor).
CLIP_IMAGE_SETTINGS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                       "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def clip_image_processor(**settings: Any) -> Any:
    """CLIP's image processor: the torchvision backend when it is installed, else the PIL one (named directly, since
    asking transformers for `CLIPImageProcessor` without torchvision logs a fallback warning on every import)."""
    if is_torchvision_available():
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(**settings)
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**settings)


def add_placeholder_tokens(tokenizer: PreTrainedTokenizerBase, placeholders: list[str]) -> dict[str, int]:
    """Add the placeholders missing from `tokenizer` as special tokens (in place); returns placeholder -> id."""
    missing = [token for token in placeholders if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in placeholders}
    for token, token_id in ids.items():
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
    return suppressed + [entry.placeholder_id for entry in config.modalities.values() if entry.placeholder_id not in suppressed]


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
    routed_names = {name for name, module in composite.language_model.named_modules() if isinstance(module, RoutedLinear)}
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
        raise ValueError(f"{where}: weights do not match the composite; unexpected {unexpected[:5]}, missing {missing[:5]}.")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{where}.{key}: shape {tuple(value.shape)} does not match the composite's {tuple(own[key].shape)}.")
    module.load_state_dict({**own, **state})


def composite_auto_map() -> dict[str, str]:
    """`auto_map` of a composite folder: every auto class a composite answers to, pointing at its remote-code files."""
    return {
        "AutoConfig": "configuration_composite.CompositeMLLMConfig",
        **dict.fromkeys(AUTO_MODEL_CLASSES, "modeling_composite.CompositeMLLMForCausalLM"),
        "AutoModel": "modeling_composite.CompositeMLLMModel",
        "AutoProcessor": "processing_composite.CompositeMLLMProcessor",
    }


def save_composite(model: CompositeMLLMForCausalLM, processor: CompositeMLLMProcessor, directory: str | os.PathLike, **kwargs) -> None:
    """Write a self-contained composite folder: weights, config with `auto_map` for every auto class the model
    answers to, the remote-code files, tokenizer, processor and generation config."""
    register_composite_auto_classes(model, processor)
    model.save_pretrained(directory, **kwargs)
    processor.save_pretrained(directory)


def register_composite_auto_classes(model: CompositeMLLMForCausalLM, processor: CompositeMLLMProcessor) -> None:
    """Make every later `save_pretrained` of `model` and `processor` write a folder that loads with the auto classes
    and `trust_remote_code=True` (the remote-code files are copied beside the weights, `auto_map` names them): what
    `Trainer` checkpoints need to be composites too."""
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForCausalLM")
    register_processor_auto_classes(processor)
    model.config.auto_map = composite_auto_map()


def register_processor_auto_classes(processor: CompositeMLLMProcessor) -> None:
    """Make `processor.save_pretrained` record `auto_map` for the processor and, when it is one of ours (BEATs'
    fbank), its feature extractor, so that `AutoProcessor` finds both as remote code."""
    type(processor).register_for_auto_class()
    feature_extractor = getattr(processor, "feature_extractor", None)
    if feature_extractor is not None and type(feature_extractor).__module__.startswith(f"{__package__}."):
        type(feature_extractor).register_for_auto_class("AutoFeatureExtractor")
