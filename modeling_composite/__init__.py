"""Composite multimodal LLMs (NaiveMC / DAMC model composition) as transformers models.

Every module of this folder travels as remote code inside every composite folder (this `__init__.py`, the installed
package's entry, does not): they import only torch, transformers and the standard library, and each other relatively.
Building composites in Python is `composition`, converting published models `conversion`.
"""

from transformers import AutoConfig

from .configuration_composite import CompositeMLLMConfig
from .configuration_point_encoder import CompositePointEncoderConfig
from .modeling_composite import CompositeMLLMForCausalLM, CompositeMLLMModel
from .modeling_point_encoder import CompositePointEncoder
from .processing_composite import CompositeMLLMProcessor


# The installed package's config class is known to the auto API, as transformers' own are: without it, a composite
# folder loaded without trust_remote_code (`AutoTokenizer` reads its config first) falls back to a bare config class
# with a warning that the model types differ. Loading with trust_remote_code=True still takes the folder's own code.
AutoConfig.register(CompositeMLLMConfig.model_type, CompositeMLLMConfig, exist_ok=True)

__all__ = [
    "CompositeMLLMConfig",
    "CompositeMLLMForCausalLM",
    "CompositeMLLMModel",
    "CompositeMLLMProcessor",
    "CompositePointEncoder",
    "CompositePointEncoderConfig",
]
