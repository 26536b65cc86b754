"""Serve composites with vLLM (`pip install ".[vllm]"`): an out-of-tree vLLM plugin.

vLLM loads every installed `vllm.general_plugins` entry point at start-up; ours (`register`) registers the composite's
architecture, `CompositeMLLMForCausalLM`, with vLLM's model registry. The model class it names reuses vLLM's
Transformers modeling backend (the composite's own remote code, with vLLM's attention, linear layers and KV cache)
and adds what a composite needs: its processing (placeholders expanded to the positions each item fills, inputs by
modality), its encoders and projectors for the features, DAMC routing computed inside the compiled graph from the
raw token ids, and its placeholder tokens masked out of the logits.

Nothing here imports vLLM until vLLM itself calls `register()`.
"""

ARCHITECTURE = "CompositeMLLMForCausalLM"


def register() -> None:
    """The `vllm.general_plugins` entry point: map the composite's architecture to the plugin's model class (imported
    lazily by vLLM, by name)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "serving.vllm_model:CompositeMLLMForVLLM")
