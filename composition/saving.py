"""Saving a composite as a self-contained folder that loads with the auto classes and `trust_remote_code=True`: its
config names every auto class it answers to (`auto_map`) and `save_pretrained` copies the remote-code files
(`modeling_composite/`) beside the weights."""

import os

from modeling_composite.modeling_composite import CompositeMLLMForCausalLM
from modeling_composite.processing_composite import CompositeMLLMProcessor


AUTO_MODEL_CLASSES = (
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoModelForMultimodalLM",
)


def composite_auto_map() -> dict[str, str]:
    """`auto_map` of a composite folder: every auto class a composite answers to, pointing at its remote-code files."""
    return {
        "AutoConfig": "configuration_composite.CompositeMLLMConfig",
        **dict.fromkeys(AUTO_MODEL_CLASSES, "modeling_composite.CompositeMLLMForCausalLM"),
        "AutoModel": "modeling_composite.CompositeMLLMModel",
        "AutoProcessor": "processing_composite.CompositeMLLMProcessor",
    }


def save_composite(
    model: CompositeMLLMForCausalLM, processor: CompositeMLLMProcessor, directory: str | os.PathLike, **kwargs
) -> None:
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
    if feature_extractor is not None and type(feature_extractor).__module__.startswith("modeling_composite."):
        type(feature_extractor).register_for_auto_class("AutoFeatureExtractor")
