"""Composing multimodal LLMs in Python: `compose` builds a composite in memory from a base LLM and each modality's
encoder and projector (`ModalitySpec`), `save_composite` writes it as a folder that loads with the auto classes.

Part of the installed library, never of a composite folder (the remote code is `modeling_composite/`, all of it).
"""

from .compose import ModalitySpec, compose
from .saving import save_composite


__all__ = ["ModalitySpec", "compose", "save_composite"]
