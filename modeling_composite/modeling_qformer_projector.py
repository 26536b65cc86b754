"""The paper's audio projector, `qformer_{Q}N_{L}L`: a learned position embedding is added to the encoder's tokens, Q
learned queries read them through an L-layer BLIP-2-style Q-Former (BERT-base width, cross-attention in every layer,
no text path), and a linear layer maps the Q outputs into the LLM's embedding space.

The Q-Former is transformers' own `Blip2QFormerModel`. It computes what the paper's BLIP-2 BERT computes for a
query-only input: LayerNorm (eps 1e-12) and dropout on the query embeddings, then per layer post-norm self-attention
over the queries, post-norm cross-attention to the encoder tokens, and the query feed-forward block
(`intermediate_query` / `output_query`, GELU). With `use_qformer_text_input=False` it has no text feed-forward block
and no word or position embeddings, which is exactly what the paper deletes. The paper passes an all-ones attention
mask, which adds zero to every score, so no mask is the same computation.
"""

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers import initialization as init

from .configuration_composite import parse_qformer_spec


__all__ = ["QFormerProjector", "parse_qformer_spec"]


class QFormerProjector(nn.Module):
    """Projects `(items, T, encoder_width)` encoder features to `(items, num_queries, out_features)`.

    Parameters (state-dict names): `query_tokens` `(1, num_queries, hidden_size)`; `position_embedding.weight`
    `(num_positions, encoder_width)`; `qformer.*` (a `Blip2QFormerModel`); `projection.{weight,bias}`
    `(out_features, hidden_size)`. The defaults are BERT-base, as in the paper.
    """

    def __init__(
        self,
        encoder_width: int,
        out_features: int,
        num_queries: int,
        num_layers: int,
        num_positions: int = 1024,
        hidden_size: int = 768,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        initializer_range: float = 0.02,
    ):
        super().__init__()
        config = Blip2QFormerConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            initializer_range=initializer_range,
            cross_attention_frequency=1,
            encoder_hidden_size=encoder_width,
            use_qformer_text_input=False,
            # Eager attention reproduces the paper's Q-Former bit for bit (fp32 and bf16); SDPA differs by float
            # rounding (1e-5 at the paper's shape). At 32 queries x 512 tokens the cost is negligible either way.
            attn_implementation="eager",
        )
        self.num_positions = num_positions
        self.encoder_width = encoder_width
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, hidden_size))
        self.position_embedding = nn.Embedding(num_positions, encoder_width)
        # `_from_config` builds it in the current default dtype, as transformers' own composites (BLIP-2) do.
        self.qformer = Blip2QFormerModel._from_config(config)
        self.projection = nn.Linear(hidden_size, out_features)

    @property
    def num_queries(self) -> int:
        return self.query_tokens.shape[1]

    def init_query_tokens(self) -> None:
        """Draw the queries from N(0, initializer_range), as the paper does. Call it from the composite's
        `_init_weights` (it uses `transformers.initialization`, so queries loaded from a checkpoint stay as they are).
        The Q-Former's own weights are initialised by `Blip2QFormerModel._init_weights` (BERT's scheme)."""
        init.normal_(self.query_tokens, mean=0.0, std=self.qformer.config.initializer_range)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 3 or features.shape[-1] != self.encoder_width:
            raise ValueError(
                f"The Q-Former projector takes features of shape (items, tokens, {self.encoder_width}), got "
                f"{tuple(features.shape)}."
            )
        length = features.shape[1]
        if length > self.num_positions:
            raise ValueError(
                f"The Q-Former projector has position embeddings for {self.num_positions} encoder tokens but got "
                f"{length}; shorten the input (fewer encoder tokens per item) or build it with num_positions >= "
                f"{length}."
            )
        positions = torch.arange(length, device=features.device)
        features = features + self.position_embedding(positions).to(features.dtype)
        queries = self.query_tokens.to(features.dtype).expand(features.shape[0], -1, -1)
        query_states = self.qformer(query_embeds=queries, encoder_hidden_states=features).last_hidden_state
        # The Q-Former runs in its LayerNorm's dtype; hand the projection its own (4-bit layers compute in theirs).
        return self.projection(query_states.to(self.query_tokens.dtype))
