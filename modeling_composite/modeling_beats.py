"""The BEATs audio encoder in pure torch, as the paper's audio modality runs it: 16x16 patches of a normalised fbank, a
grouped convolutional position embedding, and post-norm ("deep norm") transformer layers with a gated, bucketed
relative position bias. `last_hidden_state` is what the paper hands to its audio projector: the last layer's output
(no classifier head; the paper's padding mask is all-valid, so it changes nothing and is not taken).

Parameter names equal the released checkpoint's keys, with two exceptions (see `conversion/encoder_beats.py`): the
weight-normed position convolution stores its magnitude and direction as `encoder.pos_conv.0.parametrizations.weight.
original0` / `original1` (the released `weight_g` / `weight_v`), and only layer 0 holds the relative position table,
which every layer shares."""

import math

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput

from .configuration_beats import CompositeBeatsConfig


class BeatsWeightNorm(nn.Module):
    """Weight normalisation as a parametrization: `weight = direction * magnitude / ||direction||`, the norm taken
    over every dimension but `dim`. Written out rather than `torch._weight_norm` so the arithmetic (and its rounding
    in half precision) is the one BEATs checkpoints were run with."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, magnitude: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        return direction * (magnitude / torch.norm_except_dim(direction, 2, self.dim))

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.norm_except_dim(weight, 2, self.dim), weight


class DropLastStep(nn.Module):
    """An even-sized convolution padded by half its kernel on both sides yields one step too many: drop the last."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[:, :, :-1]


def positional_convolution(config: CompositeBeatsConfig) -> nn.Sequential:
    """Conv1d over time (weight-normed over the kernel axis) + trim + GELU; a Sequential so its keys are
    `pos_conv.0.*`."""
    kernel = config.num_conv_pos_embeddings
    conv = nn.Conv1d(
        config.hidden_size,
        config.hidden_size,
        kernel,
        padding=kernel // 2,
        groups=config.num_conv_pos_embedding_groups,
    )
    parametrize.register_parametrization(conv, "weight", BeatsWeightNorm(dim=2), unsafe=True)
    trim = [DropLastStep()] if kernel % 2 == 0 else []
    return nn.Sequential(conv, *trim, nn.GELU())


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """Bucket index `(length, length)` of each key's signed distance from each query: one half of the buckets for keys
    after the query; within each half, exact distances below a quarter of the buckets, log-spaced ones beyond."""
    position = torch.arange(length, dtype=torch.long, device=device)
    distance = position[None, :] - position[:, None]
    half = num_buckets // 2
    buckets = (distance > 0).long() * half
    distance = distance.abs()
    exact = half // 2
    # clamp only keeps log() finite where the exact branch is taken anyway; the float ops match the released model's.
    log_spaced = (
        exact
        + (torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    )
    log_spaced = log_spaced.clamp(max=half - 1)
    return buckets + torch.where(distance < exact, distance, log_spaced)


class BeatsGateLinear(nn.Linear):
    """The per-head `head_dim -> 8` layer of the relative-position gate. A subclass, so bitsandbytes (which converts
    modules whose type is exactly `nn.Linear`) leaves it unquantized: it is tiny, and its 8 outputs fit no 4-bit
    kernel."""


class BeatsAttention(nn.Module):
    """Multi-head self-attention with BEATs' relative position bias, gated per query when configured. Layer 0 owns
    the bias table (`relative_attention_bias`); the encoder computes the bias once and every layer reuses it."""

    def __init__(self, config: CompositeBeatsConfig, owns_position_table: bool):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = width // self.num_heads
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        if config.relative_position_embedding and owns_position_table:
            self.relative_attention_bias = nn.Embedding(config.num_relative_buckets, self.num_heads)
        self.gated = config.gated_relative_position
        if self.gated:
            self.grep_linear = BeatsGateLinear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))

    def forward(self, hidden_states: torch.Tensor, position_bias: torch.Tensor | None) -> torch.Tensor:
        """`hidden_states` `(batch, length, width)`; `position_bias` `(heads, length, length)` or None."""
        batch, length, width = hidden_states.shape

        def heads(projected: torch.Tensor) -> torch.Tensor:
            return projected.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        query = heads(self.q_proj(hidden_states))
        key = heads(self.k_proj(hidden_states))
        value = heads(self.v_proj(hidden_states))
        bias = None
        if position_bias is not None:
            bias = position_bias.to(query.dtype).unsqueeze(0)
            if self.gated:
                # Two sigmoid gates from the (unscaled) query: each the sum of 4 of the 8 gate outputs.
                gates = torch.sigmoid(self.grep_linear(query).view(batch, self.num_heads, length, 2, 4).sum(-1))
                gate_a, gate_b = gates.chunk(2, dim=-1)
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
        attended = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, scale=self.head_dim**-0.5
        )
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, width))


class BeatsEncoderLayer(nn.Module):
    """Post-norm transformer layer; with deep norm the residual branch is scaled by `(2 * layers) ** 0.25`."""

    def __init__(self, config: CompositeBeatsConfig, layer_index: int):
        super().__init__()
        self.self_attn = BeatsAttention(config, owns_position_table=layer_index == 0)
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.residual_scale = (2 * config.num_hidden_layers) ** 0.25 if config.deep_norm else 1.0

    def forward(self, hidden_states: torch.Tensor, position_bias: torch.Tensor | None) -> torch.Tensor:
        hidden_states = self.self_attn_layer_norm(
            hidden_states * self.residual_scale + self.self_attn(hidden_states, position_bias)
        )
        inner = self.fc1(hidden_states)
        # BEATs evaluates its GELU in fp32 whatever the model's dtype.
        inner = nn.functional.gelu(inner.float()).to(inner.dtype)
        return self.final_layer_norm(hidden_states * self.residual_scale + self.fc2(inner))


class BeatsTransformer(nn.Module):
    """Convolutional position embedding, layer norm, then the layers (BEATs' `encoder`)."""

    def __init__(self, config: CompositeBeatsConfig):
        super().__init__()
        self.config = config
        self.pos_conv = positional_convolution(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList([BeatsEncoderLayer(config, index) for index in range(config.num_hidden_layers)])

    def position_bias(self, length: int) -> torch.Tensor | None:
        """The relative position bias `(heads, length, length)` shared by all layers, or None without one."""
        if not self.config.relative_position_embedding:
            return None
        table = self.layers[0].self_attn.relative_attention_bias
        buckets = relative_position_buckets(
            length, self.config.num_relative_buckets, self.config.max_relative_distance, table.weight.device
        )
        return table(buckets).permute(2, 0, 1)

    def forward(
        self, hidden_states: torch.Tensor, output_hidden_states: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        positions = self.pos_conv(hidden_states.transpose(1, 2)).transpose(1, 2)
        hidden_states = self.layer_norm(hidden_states + positions)
        position_bias = self.position_bias(hidden_states.shape[1])
        all_hidden_states = [hidden_states] if output_hidden_states else []
        for layer in self.layers:
            if position_bias is not None:
                position_bias = position_bias.to(hidden_states.device)  # layers may sit on several devices
            hidden_states = layer(hidden_states, position_bias)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        return hidden_states, all_hidden_states


class CompositeBeatsEncoder(PreTrainedModel):
    """BEATs audio encoder. Input `input_features` `(clips, frames, num_mel_bins)`: normalised fbanks from
    [`CompositeBeatsFeatureExtractor`]. Output `(frames // patch_size) * (num_mel_bins // patch_size)` tokens (512
    for 1024 frames) of width `hidden_size` per clip, in time-major order."""

    config: CompositeBeatsConfig
    config_class = CompositeBeatsConfig
    main_input_name = "input_features"
    _no_split_modules = ["BeatsEncoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: CompositeBeatsConfig):
        super().__init__(config)
        self.patch_embedding = nn.Conv2d(
            1,
            config.patch_embedding_dim,
            config.patch_size,
            stride=config.patch_size,
            bias=config.patch_embedding_bias,
        )
        self.layer_norm = nn.LayerNorm(config.patch_embedding_dim, eps=config.layer_norm_eps)
        self.post_extract_proj = (
            nn.Linear(config.patch_embedding_dim, config.hidden_size)
            if config.patch_embedding_dim != config.hidden_size
            else None
        )
        self.encoder = BeatsTransformer(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, BeatsTransformer):
            conv = module.pos_conv[0]
            magnitude, direction = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
            # BEATs' own initialisation: direction ~ N(0, sqrt(4 / (kernel * width))), magnitude = its norm.
            init.normal_(direction, mean=0.0, std=math.sqrt(4 / (conv.kernel_size[0] * conv.in_channels)))
            init.copy_(magnitude, torch.norm_except_dim(direction, 2, 2))
            init.zeros_(conv.bias)
        elif isinstance(module, BeatsAttention) and module.gated:
            init.ones_(module.grep_a)

    def forward(
        self,
        input_features: torch.Tensor,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        config = self.config
        if input_features.ndim != 3 or input_features.shape[-1] != config.num_mel_bins:
            raise ValueError(
                f"input_features must have shape (clips, frames, {config.num_mel_bins}), got "
                f"{tuple(input_features.shape)}."
            )
        if input_features.shape[1] < config.patch_size:
            raise ValueError(f"A clip needs at least {config.patch_size} frames, got {input_features.shape[1]}.")
        dtype = self.patch_embedding.weight.dtype  # never quantized, unlike the linears
        patches = self.patch_embedding(input_features.to(dtype).unsqueeze(1))
        # (clips, width, time patches, frequency patches) -> (clips, time * frequency, width)
        hidden_states = self.layer_norm(patches.flatten(2).transpose(1, 2))
        if self.post_extract_proj is not None:
            hidden_states = self.post_extract_proj(hidden_states)
        hidden_states, all_hidden_states = self.encoder(hidden_states, output_hidden_states)
        # hidden_states[0] is the input of the first layer; the last entry equals last_hidden_state (post-norm layers).
        all_hidden_states = tuple(all_hidden_states) if output_hidden_states else None
        if not return_dict:
            return tuple(value for value in (hidden_states, all_hidden_states) if value is not None)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)


__all__ = ["CompositeBeatsEncoder"]
