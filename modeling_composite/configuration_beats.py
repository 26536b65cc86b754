"""Config of the BEATs audio encoder (the paper's audio modality: BEATs_iter3_plus_AS2M over 128-bin fbanks)."""

from transformers import PreTrainedConfig


class CompositeBeatsConfig(PreTrainedConfig):
    r"""
    Configuration of [`CompositeBeatsEncoder`]. Defaults are the encoder of BEATs_iter3_plus_AS2M (Chen et al. 2022,
    "BEATs: Audio Pre-Training with Acoustic Tokenizers"), the checkpoint the paper's audio models use: 16x16 patches
    of a 128-bin fbank, 12 post-norm ("deep norm") layers of width 768, a grouped convolutional position embedding and
    a gated, bucketed relative position bias.

    Args:
        num_mel_bins (`int`, default 128): fbank bins per frame (the feature extractor's `num_mel_bins`).
        patch_size (`int`, default 16): side of the square (frames x bins) patches; 1024 frames give 64 x 8 = 512
            tokens.
        patch_embedding_dim (`int`, default 512): width of the patch embedding; projected to `hidden_size` when they
            differ (BEATs' `embed_dim`).
        patch_embedding_bias (`bool`, default False): whether the patch convolution has a bias (BEATs' `conv_bias`).
        hidden_size (`int`, default 768): transformer width (BEATs' `encoder_embed_dim`).
        num_hidden_layers (`int`, default 12), num_attention_heads (`int`, default 12).
        intermediate_size (`int`, default 3072): feed-forward width (BEATs' `encoder_ffn_embed_dim`).
        hidden_act (`str`, default "gelu"): feed-forward activation; BEATs checkpoints use "gelu" (exact, in fp32).
        deep_norm (`bool`, default True): scale residuals by `(2 * num_hidden_layers) ** 0.25` before each post-norm.
        num_conv_pos_embeddings (`int`, default 128), num_conv_pos_embedding_groups (`int`, default 16): kernel size
            and groups of the convolutional position embedding (BEATs' `conv_pos`, `conv_pos_groups`).
        relative_position_embedding (`bool`, default True): add a learned bias per bucket of relative distance.
        num_relative_buckets (`int`, default 320), max_relative_distance (`int`, default 800): the bucketing (BEATs'
            `num_buckets`, `max_distance`).
        gated_relative_position (`bool`, default True): scale that bias per query by a learned gate (BEATs'
            `gru_rel_pos`).
        layer_norm_eps (`float`, default 1e-5), initializer_range (`float`, default 0.02).
    """

    model_type = "composite_beats"

    num_mel_bins: int = 128
    patch_size: int = 16
    patch_embedding_dim: int = 512
    patch_embedding_bias: bool = False
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    deep_norm: bool = True
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    relative_position_embedding: bool = True
    num_relative_buckets: int = 320
    max_relative_distance: int = 800
    gated_relative_position: bool = True
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in (
            "num_mel_bins",
            "patch_size",
            "patch_embedding_dim",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "num_conv_pos_embeddings",
            "num_conv_pos_embedding_groups",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.hidden_act != "gelu":
            raise ValueError(
                f"hidden_act must be 'gelu' (the only activation BEATs checkpoints use), got {self.hidden_act!r}."
            )
        if self.patch_size > self.num_mel_bins:
            raise ValueError(f"patch_size ({self.patch_size}) must not exceed num_mel_bins ({self.num_mel_bins}).")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.hidden_size % self.num_conv_pos_embedding_groups != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_conv_pos_embedding_groups "
                f"({self.num_conv_pos_embedding_groups})."
            )
        if self.gated_relative_position and not self.relative_position_embedding:
            raise ValueError(
                "gated_relative_position needs relative_position_embedding=True: the gate scales that bias."
            )
        if self.relative_position_embedding:
            # Distances below num_relative_buckets // 4 get a bucket each; the rest share log-spaced buckets up to
            # max_relative_distance, which must therefore lie beyond the exact range.
            if self.num_relative_buckets < 4 or self.num_relative_buckets % 2:
                raise ValueError(f"num_relative_buckets must be an even number >= 4, got {self.num_relative_buckets}.")
            if self.max_relative_distance <= self.num_relative_buckets // 4:
                raise ValueError(
                    f"max_relative_distance ({self.max_relative_distance}) must exceed num_relative_buckets // 4 "
                    f"({self.num_relative_buckets // 4})."
                )


__all__ = ["CompositeBeatsConfig"]
