"""Config of the point-cloud encoder (a PointBERT-style transformer over groups of points)."""

from transformers import PreTrainedConfig


class CompositePointEncoderConfig(PreTrainedConfig):
    r"""
    Configuration of [`CompositePointEncoder`]. Defaults follow PointBERT as trained in PointLLM (8192 points with
    xyz + rgb, 512 groups of 32 points, 12 layers of width 384).

    Args:
        point_dims (`int`, default 6): values per point: 3 (xyz) or 6 (xyz + rgb).
        num_points (`int`, default 8192): points per cloud the processor samples or pads to.
        num_groups (`int`, default 512): group centres chosen by farthest-point sampling.
        group_size (`int`, default 32): nearest neighbours gathered around each centre.
        encoder_dims (`int`, default 256): width of the per-group mini-PointNet's output.
        hidden_size (`int`, default 384): transformer width.
        num_hidden_layers (`int`, default 12), num_attention_heads (`int`, default 6),
            mlp_ratio (`float`, default 4.0).
        layer_norm_eps (`float`, default 1e-5), initializer_range (`float`, default 0.02).
    """

    model_type = "composite_point_encoder"

    point_dims: int = 6
    num_points: int = 8192
    num_groups: int = 512
    group_size: int = 32
    encoder_dims: int = 256
    hidden_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.point_dims not in (3, 6):
            raise ValueError(f"point_dims must be 3 (xyz) or 6 (xyz + rgb), got {self.point_dims}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})."
            )
        if not 1 <= self.group_size <= self.num_points or not 1 <= self.num_groups <= self.num_points:
            raise ValueError(
                f"num_groups ({self.num_groups}) and group_size ({self.group_size}) must be between 1 and "
                f"num_points ({self.num_points})."
            )


__all__ = ["CompositePointEncoderConfig"]
