"""The LanguageBind video encoder: a CLIP ViT over every frame of a video whose layers first attend across frames.

Each layer does, in order: (1) at every token position, the video's frames attend to each other (after a learned
per-frame embedding is added), with their own layer norm and a residual; (2) CLIP's usual pre-norm attention over
the tokens of each frame; (3) CLIP's MLP. Step (1) is what LanguageBind adds to CLIP; steps (2) and (3) and the patch
embedding are transformers' own CLIP modules.

Parameter names are those of the `vision_model.` part of the published `LanguageBind/LanguageBind_Video_merge`
checkpoint without that prefix (`embeddings.*`, `pre_layrnorm.*`, `encoder.layers.{i}.{self_attn, layer_norm1, mlp,
layer_norm2, temporal_attn, temporal_layer_norm1, temporal_embedding}`, `post_layernorm.*`), i.e. transformers'
current flat `CLIPVisionModel` layout plus the temporal parameters.
"""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention, CLIPVisionEmbeddings

from .configuration_languagebind_video import CompositeLanguageBindVideoConfig


class LanguageBindFrameAttention(nn.Module):
    """Multi-head attention across the frames of a video, with CLIP attention's parameters (`q_proj`, `k_proj`,
    `v_proj`, `out_proj`, all with bias).

    The sequences are only `num_frames` (8) long, so a fused kernel gains nothing here; the heads are made contiguous
    before the two matmuls because that is the order of operations LanguageBind's float32 results come from:
    transformers' attention on strided per-head views rounds differently on such short sequences (7e-7 per layer,
    1.7e-5 after 24 layers, against 0 this way).
    """

    def __init__(self, config: CompositeLanguageBindVideoConfig):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = width // self.num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states` `(sequences, frames, width)` -> the same shape; every frame sees every other."""
        sequences, frames, width = hidden_states.shape

        def split_heads(projected: torch.Tensor) -> torch.Tensor:
            return projected.view(sequences, frames, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

        query = split_heads(self.q_proj(hidden_states))
        key = split_heads(self.k_proj(hidden_states))
        value = split_heads(self.v_proj(hidden_states))
        weights = (torch.matmul(query, key.transpose(2, 3)) * self.scale).softmax(dim=-1, dtype=torch.float32)
        attended = torch.matmul(weights.to(value.dtype), value)
        return self.out_proj(attended.transpose(1, 2).reshape(sequences, frames, width))


class LanguageBindVideoEncoderLayer(GradientCheckpointingLayer):
    """A CLIP encoder layer preceded (when `add_time_attn`) by attention across the frames of each video."""

    def __init__(self, config: CompositeLanguageBindVideoConfig):
        super().__init__()
        width = config.hidden_size
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.add_time_attn = config.add_time_attn
        if config.add_time_attn:
            self.temporal_embedding = nn.Parameter(torch.zeros(1, config.num_frames, width))
            self.temporal_attn = LanguageBindFrameAttention(config)
            self.temporal_layer_norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, frames: int) -> torch.Tensor:
        """`hidden_states` is `(videos * frames, tokens, width)`, the frames of each video contiguous and in order."""
        if self.add_time_attn:
            hidden_states = self._attend_across_frames(hidden_states, frames)
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), attention_mask=None)
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))

    def _attend_across_frames(self, hidden_states: torch.Tensor, frames: int) -> torch.Tensor:
        video_frames, tokens, width = hidden_states.shape
        videos = video_frames // frames
        # One sequence per (video, token position), running over that video's frames.
        per_position = hidden_states.reshape(videos, frames, tokens, width).transpose(1, 2).reshape(-1, frames, width)
        # A single frame (an image given as a video) gets no frame embedding, as in LanguageBind; its temporal
        # attention, over a sequence of one, still runs.
        if frames > 1:
            per_position = per_position + self.temporal_embedding[:, :frames].to(per_position.dtype)
        attended = self.temporal_attn(self.temporal_layer_norm1(per_position))
        per_position = per_position + attended
        return per_position.reshape(videos, tokens, frames, width).transpose(1, 2).reshape(video_frames, tokens, width)


class LanguageBindVideoEncoderStack(nn.Module):
    """The layers, under the name `encoder.layers` that the checkpoint uses."""

    def __init__(self, config: CompositeLanguageBindVideoConfig):
        super().__init__()
        self.layers = nn.ModuleList([LanguageBindVideoEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class CompositeLanguageBindVideoEncoder(PreTrainedModel):
    """LanguageBind video encoder. Input `pixel_values_videos` `(videos, frames, channels, height, width)`.

    Output: `last_hidden_state` and every entry of `hidden_states` are `(videos * frames, tokens_per_frame, width)`,
    row `v * frames + f` holding frame `f` of video `v` (the frames of a video contiguous and in order), so
    `reshape(videos, frames * tokens_per_frame, width)` gives each video's tokens frame after frame, as LanguageBind's
    `(b, t, n, d) -> (b, t * n, d)` does. `hidden_states[0]` is the embedding output (after `pre_layrnorm`) and
    `hidden_states[i]` the output of layer `i`; `last_hidden_state` is the last layer's output before
    `post_layernorm`, as in CLIP. `pooler_output` `(videos, width)`: the post-norm class token, averaged over frames.
    """

    config: CompositeLanguageBindVideoConfig
    config_class = CompositeLanguageBindVideoConfig
    main_input_name = "pixel_values_videos"
    # Tells the composite to hand this encoder whole videos, not frames flattened into a batch of images.
    takes_whole_videos = True
    _no_split_modules = ["LanguageBindVideoEncoderLayer", "CLIPVisionEmbeddings"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: CompositeLanguageBindVideoConfig):
        super().__init__(config)
        self.embeddings = CLIPVisionEmbeddings(config)
        # The misspelling is CLIP's own parameter name, kept so that checkpoints load as they are.
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = LanguageBindVideoEncoderStack(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        factor = self.config.initializer_factor
        if isinstance(module, CLIPVisionEmbeddings):
            init.normal_(module.class_embedding, std=module.embed_dim**-0.5 * factor)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        if isinstance(module, LanguageBindVideoEncoderLayer) and module.add_time_attn:
            init.normal_(module.temporal_embedding, std=self.config.hidden_size**-0.5)

    def forward(
        self,
        pixel_values_videos: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        config = self.config
        videos, frames = self._check_input(pixel_values_videos)
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        # (videos, frames, C, H, W) -> (videos * frames, C, H, W): row v * frames + f is frame f of video v.
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values_videos.flatten(0, 1)))
        all_hidden_states = [hidden_states]
        for layer in self.encoder.layers:
            hidden_states = layer(hidden_states, frames)
            all_hidden_states.append(hidden_states)
        pooled = self.post_layernorm(hidden_states[:, 0]).reshape(videos, frames, -1).mean(dim=1)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden_states,
            pooler_output=pooled,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )

    def _check_input(self, pixel_values_videos: torch.Tensor) -> tuple[int, int]:
        config = self.config
        if not torch.is_tensor(pixel_values_videos) or pixel_values_videos.ndim != 5:
            shape = (
                tuple(pixel_values_videos.shape) if torch.is_tensor(pixel_values_videos) else type(pixel_values_videos)
            )
            raise ValueError(
                "pixel_values_videos must be a tensor (videos, frames, channels, height, width), got "
                f"{shape}; give one video as a batch of one."
            )
        videos, frames, channels = pixel_values_videos.shape[:3]
        if videos == 0 or channels != config.num_channels:
            raise ValueError(
                f"pixel_values_videos must hold at least one video with {config.num_channels} channels, got shape "
                f"{tuple(pixel_values_videos.shape)}."
            )
        # The frame embedding has num_frames rows and LanguageBind only ever runs all of them or a single frame.
        if config.add_time_attn and frames not in (config.num_frames, 1):
            raise ValueError(
                f"Videos must have {config.num_frames} frames (or 1, an image given as a video), got {frames}; "
                "sample num_frames frames per video."
            )
        return videos, frames


__all__ = ["CompositeLanguageBindVideoEncoder"]
