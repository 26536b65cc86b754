"""Config of the LanguageBind video encoder (a CLIP ViT whose layers also attend across the frames of a video)."""

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN


class CompositeLanguageBindVideoConfig(PreTrainedConfig):
    r"""
    Configuration of [`CompositeLanguageBindVideoEncoder`]. Defaults follow the vision tower of
    `LanguageBind/LanguageBind_Video_merge` (the paper's video encoder): ViT-L/14 at 224 pixels, 8 frames, temporal
    attention in every layer.

    Args:
        hidden_size (`int`, default 1024): transformer width.
        intermediate_size (`int`, default 4096): width of each layer's MLP.
        num_hidden_layers (`int`, default 24), num_attention_heads (`int`, default 16).
        num_channels (`int`, default 3), image_size (`int`, default 224), patch_size (`int`, default 14).
        hidden_act (`str`, default `"gelu"`): MLP activation (LanguageBind starts from an OpenCLIP ViT-L/14, which uses
            exact GELU, not OpenAI's quick GELU).
        layer_norm_eps (`float`, default 1e-5), attention_dropout (`float`, default 0.0).
        initializer_range (`float`, default 0.02), initializer_factor (`float`, default 1.0): random initialisation
            only.
        num_frames (`int`, default 8): frames per video; also the length of each layer's temporal position embedding.
        add_time_attn (`bool`, default True): whether every layer first attends across the frames (at each token
            position) before its usual attention across the tokens of a frame. Without it the model is a plain CLIP ViT
            run on each frame.
    """

    model_type = "composite_languagebind_video"

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    num_frames: int = 8
    add_time_attn: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})."
            )
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {self.num_frames}.")
        if self.patch_size < 1 or self.image_size < self.patch_size:
            raise ValueError(f"patch_size ({self.patch_size}) must be between 1 and image_size ({self.image_size}).")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not an activation transformers knows (e.g. 'gelu').")

    @property
    def tokens_per_frame(self) -> int:
        """Tokens of one frame: the class token plus one per patch (257 for ViT-L/14 at 224)."""
        return (self.image_size // self.patch_size) ** 2 + 1


__all__ = ["CompositeLanguageBindVideoConfig"]
