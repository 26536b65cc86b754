"""Composite multimodal LLMs (NaiveMC / DAMC model composition) as transformers models.

The files of this folder other than `builder.py` and `tiny.py` travel as remote code inside every composite folder.
"""

from .builder import ModalitySpec, compose, save_composite
from .configuration_composite import CompositeMLLMConfig
from .configuration_point_encoder import CompositePointEncoderConfig
from .modeling_composite import CompositeMLLMForCausalLM, CompositeMLLMModel
from .modeling_point_encoder import CompositePointEncoder
from .processing_composite import CompositeMLLMProcessor


__all__ = [
    "CompositeMLLMConfig",
    "CompositeMLLMForCausalLM",
    "CompositeMLLMModel",
    "CompositeMLLMProcessor",
    "CompositePointEncoder",
    "CompositePointEncoderConfig",
    "ModalitySpec",
    "compose",
    "save_composite",
]
