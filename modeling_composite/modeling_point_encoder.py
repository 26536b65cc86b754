"""A PointBERT-style point-cloud encoder in pure torch: farthest-point sampling picks group centres, k nearest
neighbours form each group, a mini-PointNet embeds each group, and a transformer runs over [CLS] + the groups."""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput

from .configuration_point_encoder import CompositePointEncoderConfig


def farthest_point_sample(xyz: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Indices `(batch, num_samples)` of points chosen greedily, each the farthest (squared Euclidean distance) from
    those already chosen; ties go to the lowest index.

    This is the algorithm of PointBERT's `misc.fps` as PointLLM and the paper run it (pure torch, not the pointnet2
    CUDA kernel), with one deliberate difference: the paper starts every cloud at a random point
    (`torch.randint`), so its centres change from call to call; we start at point 0 so that the result is
    deterministic. Given the same start, the chosen points are identical.
    """
    batch, num_points, _ = xyz.shape
    chosen = torch.zeros(batch, num_samples, dtype=torch.long, device=xyz.device)
    distance = torch.full((batch, num_points), float("inf"), device=xyz.device, dtype=xyz.dtype)
    farthest = torch.zeros(batch, dtype=torch.long, device=xyz.device)
    batch_index = torch.arange(batch, device=xyz.device)
    for step in range(num_samples):
        chosen[:, step] = farthest
        centre = xyz[batch_index, farthest].unsqueeze(1)
        distance = torch.minimum(distance, ((xyz - centre) ** 2).sum(-1))
        farthest = distance.argmax(-1)  # the first index among equal maxima
    return chosen


def squared_distances(queries: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances `(batch, Q, N)` between `queries` `(batch, Q, 3)` and `points` `(batch, N, 3)`.

    Computed as |q|^2 + |p|^2 - 2 q.p, the way PointBERT's kNN does: the rounding of this form decides which of two
    almost equally near points joins a group, so using it keeps our groups identical to the paper's."""
    distances = -2 * torch.matmul(queries, points.transpose(1, 2))
    distances = distances + (queries**2).sum(-1).unsqueeze(-1)
    return distances + (points**2).sum(-1).unsqueeze(1)


def group_points(points: torch.Tensor, num_groups: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split clouds `(batch, N, C)` into `num_groups` neighbourhoods of `group_size` points.

    Centres are chosen by farthest-point sampling; each neighbourhood holds its centre's `group_size` nearest points
    (the centre itself included) in no particular order (the mini-PointNet that reads them is order-invariant).
    Returns the neighbourhoods `(batch, G, K, C)` with xyz relative to their centre and any further channels (colour)
    untouched, and the centres `(batch, G, 3)`, all in the dtype of `points`.
    """
    xyz = points[..., :3]
    batch_index = torch.arange(points.shape[0], device=points.device).unsqueeze(-1)
    centres = xyz[batch_index, farthest_point_sample(xyz, num_groups)]
    neighbours = squared_distances(centres, xyz).topk(group_size, dim=-1, largest=False, sorted=False).indices
    groups = points[batch_index.unsqueeze(-1), neighbours]
    relative_xyz = groups[..., :3] - centres.unsqueeze(2)
    return torch.cat([relative_xyz, groups[..., 3:]], dim=-1), centres


class PointCoordinateLinear(nn.Linear):
    """The 3 -> 128 input layer of the position embedding. A subclass, so bitsandbytes (which converts modules whose
    type is exactly `nn.Linear`) leaves it unquantized: it is tiny, and its 3 inputs fit no 4-bit kernel."""


class PointGroupEmbedding(nn.Module):
    """Mini-PointNet: a shared per-point MLP, max-pooled over the group, concatenated back, and pooled again."""

    def __init__(self, config: CompositePointEncoderConfig):
        super().__init__()
        self.first_conv = nn.Sequential(
            nn.Conv1d(config.point_dims, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, config.encoder_dims, 1)
        )

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        batch, num_groups, group_size, dims = groups.shape
        per_point = self.first_conv(groups.reshape(batch * num_groups, group_size, dims).transpose(1, 2))
        pooled = per_point.max(dim=2, keepdim=True).values
        per_point = torch.cat([pooled.expand(-1, -1, group_size), per_point], dim=1)
        return self.second_conv(per_point).max(dim=2).values.reshape(batch, num_groups, -1)


class PointAttention(nn.Module):
    def __init__(self, config: CompositePointEncoderConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, width // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(query, key, value)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, width))


class PointMLP(nn.Module):
    def __init__(self, config: CompositePointEncoderConfig):
        super().__init__()
        inner = int(config.hidden_size * config.mlp_ratio)
        self.fc1 = nn.Linear(config.hidden_size, inner)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(inner, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class PointBlock(nn.Module):
    """Pre-norm transformer block. The group position embedding is added to the input of every block, as PointBERT
    does."""

    def __init__(self, config: CompositePointEncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = PointAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = PointMLP(config)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + position_embeddings
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        return hidden_states + self.mlp(self.norm2(hidden_states))


class CompositePointEncoder(PreTrainedModel):
    """Point-cloud encoder. Input `point_clouds` `(batch, num_points, point_dims)`; output `num_groups + 1` tokens
    (CLS first) of width `hidden_size` per cloud, after the final LayerNorm.

    This is PointLLM's PointBERT v1.2 (`PointTransformer` with `use_max_pool=False`, as the paper feeds its projector:
    513 x 384), up to float rounding when the farthest-point sampling starts at the same point (see
    `farthest_point_sample`). `conversion/encoder_pointbert.py` reads its published weights."""

    config: CompositePointEncoderConfig
    config_class = CompositePointEncoderConfig
    main_input_name = "point_clouds"
    _no_split_modules = ["PointBlock"]
    _supports_sdpa = True

    def __init__(self, config: CompositePointEncoderConfig):
        super().__init__(config)
        self.encoder = PointGroupEmbedding(config)
        self.reduce_dim = nn.Linear(config.encoder_dims, config.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.pos_embed = nn.Sequential(PointCoordinateLinear(3, 128), nn.GELU(), nn.Linear(128, config.hidden_size))
        self.blocks = nn.ModuleList([PointBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CompositePointEncoder):
            init.trunc_normal_(module.cls_token, std=self.config.initializer_range)
            init.trunc_normal_(module.cls_pos, std=self.config.initializer_range)

    def forward(self, point_clouds: torch.Tensor, output_hidden_states: bool = False, **kwargs) -> BaseModelOutput:
        config = self.config
        if point_clouds.ndim != 3 or point_clouds.shape[-1] != config.point_dims:
            raise ValueError(
                f"point_clouds must have shape (batch, num_points, {config.point_dims}), "
                f"got {tuple(point_clouds.shape)}."
            )
        if point_clouds.shape[1] < max(config.num_groups, config.group_size):
            raise ValueError(
                f"A point cloud needs at least {max(config.num_groups, config.group_size)} points, got "
                f"{point_clouds.shape[1]}."
            )
        dtype = self.cls_token.dtype  # never quantized, unlike the linears
        # Grouping runs in float32 whatever the model's dtype: in bfloat16, coordinates keep 8 bits of mantissa and
        # distinct points would tie. (The paper ran everything, grouping included, in float16.)
        groups, centres = group_points(point_clouds.float(), config.num_groups, config.group_size)
        groups, centres = groups.to(dtype), centres.to(dtype)
        tokens = self.reduce_dim(self.encoder(groups))
        batch = tokens.shape[0]
        hidden_states = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        position_embeddings = torch.cat([self.cls_pos.expand(batch, -1, -1), self.pos_embed(centres)], dim=1)
        all_hidden_states = [hidden_states]
        for block in self.blocks:
            hidden_states = block(hidden_states, position_embeddings)
            all_hidden_states.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        # Like transformers' ViTs, the last entry of hidden_states is the last block's output before the final norm.
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=tuple(all_hidden_states) if output_hidden_states else None
        )


__all__ = ["CompositePointEncoder"]
