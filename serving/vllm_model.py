"""The composite as a vLLM model: vLLM's Transformers modeling backend around the composite's own remote code.

What the backend does unchanged: builds `CompositeMLLMModel` from the folder's remote code (on the meta device),
swaps its linear layers, embeddings and norms for vLLM's, serves the text model's attention from vLLM's paged KV
cache, loads the weights, computes the logits.

What this class adds:
- processing (`vllm_processing`): placeholders expanded to the positions each item fills, inputs by modality;
- features: `embed_multimodal` runs the composite's encoder and projector of each modality
  (`get_modality_features`), vLLM scatters them into the placeholder positions;
- DAMC routing inside the compiled graph: vLLM compiles the model's forward once and replays it with no guards, so
  routing must be data flow, never state set outside the graph. The model asks for the raw token ids beside the
  embeddings (`requires_raw_input_tokens`); `CompositeRoutedTextModel` (the compiled module) turns the placeholder
  ids into the per-token modality index and the static-shape routing plan (every row and column, no host sync) and
  runs the text model under it, all inside one graph;
- placeholder ids masked out of the logits (transformers does it with `generation_config.suppress_tokens`, which
  vLLM does not apply);
- tensor parallelism: the routed projections' low-rank factors get their own split (`tensor_parallel`).
"""

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.models.transformers import MultiModalMixin
from vllm.model_executor.models.transformers.causal import CausalMixin
from vllm.model_executor.models.transformers.utils import can_enable_torch_compile
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from .modalities import config_modalities, modality_keys
from .tensor_parallel import routed_factor_tp_plan
from .vllm_processing import (
    CompositeDummyInputsBuilder,
    CompositeMultiModalProcessor,
    CompositeProcessingInfo,
    input_field,
)


# The remote code's API this plugin calls; a composite saved with older remote code lacks some of it.
REQUIRED_MODEL_API = ("get_modality_features", "modality_index", "plan_routing", "routing", "language_model")


class CompositeRoutedTextModel(nn.Module):
    """The composite's text model, routed by the token ids it is given: the module vLLM compiles.

    `composite` is the backend's `CompositeMLLMModel`; its text model runs under the routing plan of these tokens
    (NaiveMC composites: none)."""

    def __init__(self, composite: nn.Module):
        super().__init__()
        self.composite = composite
        self.routed = composite.delta_layout is not None

    def forward(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        # vLLM passes the batch's tokens flattened, `(tokens,)`; transformers' text models take `(1, tokens)`.
        modality_index = self.composite.modality_index(input_ids[None]) if self.routed else None
        with self.composite.routing(modality_index, static_shapes=True):
            outputs = self.composite.language_model(
                inputs_embeds=inputs_embeds[None], position_ids=position_ids[None], use_cache=False, return_dict=False
            )
        return outputs[0][0]


_compilable_text_model = None


def _compilable_text_model_class() -> type[CompositeRoutedTextModel]:
    """`CompositeRoutedTextModel` marked for vLLM's compilation (once per process: the decorator changes the class)."""
    global _compilable_text_model
    if _compilable_text_model is None:
        _compilable_text_model = support_torch_compile(
            dynamic_arg_dims={"input_ids": 0, "inputs_embeds": 0, "position_ids": -1},
            enable_if=can_enable_torch_compile,
        )(CompositeRoutedTextModel)
    return _compilable_text_model


@MULTIMODAL_REGISTRY.register_processor(
    CompositeMultiModalProcessor, info=CompositeProcessingInfo, dummy_inputs=CompositeDummyInputsBuilder
)
class CompositeMLLMForVLLM(MultiModalMixin, CausalMixin):
    """A composite multimodal LLM (NaiveMC or DAMC) served by vLLM."""

    # The routing of DAMC composites needs each token's modality, which the placeholder ids give.
    requires_raw_input_tokens = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError(
                "Serving a composite with pipeline parallelism is not supported (its encoders and routing run with "
                "the text model's first layers); use pipeline_parallel_size=1, and tensor parallelism to split it."
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        missing = [name for name in REQUIRED_MODEL_API if not hasattr(self.model, name)]
        if missing:
            raise ValueError(
                f"This composite's remote code ({type(self.model).__module__}) lacks {missing}, which serving with "
                "vLLM needs: it was saved by an older version of the composite code. Load it with transformers and "
                "save it again (`save_composite`), or convert it again."
            )
        modalities = config_modalities(self.config)
        modality_keys(modalities)  # refuses two modalities that requests could not tell apart
        self.text_model = _compilable_text_model_class()(self.model, vllm_config=vllm_config, prefix=prefix)
        placeholder_ids = [entry.placeholder_id for entry in modalities.values()]
        self.register_buffer("placeholder_ids", torch.tensor(placeholder_ids, dtype=torch.long), persistent=False)

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        # The composite's chat template writes each content item's placeholder itself.
        return None

    def _decorate_for_torch_compile(self) -> None:
        # vLLM would compile the text model's class, whose forward cannot see the token ids; the routed wrapper
        # (`CompositeRoutedTextModel`) is compiled instead, when this model builds it.
        return None

    def recursive_replace(self) -> None:
        if self.tp_group.world_size > 1:
            # Names and patterns relative to `self.model`: the backend prefixes both with "model." before matching.
            routed = [name for name, module in self.model.named_modules() if hasattr(module, "delta_factors")]
            if routed:
                self.model._tp_plan = routed_factor_tp_plan(self.model.tp_plan or {}, routed)
        super().recursive_replace()

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        """Features of the items of the one modality vLLM asks for: `(positions_per_item, hidden)` per item."""
        features = []
        for name in self.config.modalities:
            inputs = kwargs.get(input_field(name))
            if inputs is None:
                continue
            if isinstance(inputs, (list, tuple)):
                inputs = torch.stack(list(inputs))
            features.extend(self.model.get_modality_features(name, inputs))
        return features

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("The composite needs the token ids of every step (requires_raw_input_tokens).")
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        return self.text_model(input_ids, inputs_embeds, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden_states)
        if logits is not None:
            # Placeholders stand for inputs, never for text to generate (transformers: suppress_tokens).
            logits = logits.index_fill(-1, self.placeholder_ids.to(logits.device), float("-inf"))
        return logits
