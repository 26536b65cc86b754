"""The image processor of composites: CLIP's, with the backend the environment has."""

from typing import Any

from transformers.utils import is_torchvision_available


# Settings of a CLIP-style image processor: what a source's image processor carries over to the composite's, and what
# may differ per modality (applied as call-time overrides by the processor).
CLIP_IMAGE_SETTINGS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)


def clip_image_processor(**settings: Any) -> Any:
    """CLIP's image processor: the torchvision backend when it is installed, else the PIL one (named directly, since
    asking transformers for `CLIPImageProcessor` without torchvision logs a fallback warning on every import)."""
    if is_torchvision_available():
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(**settings)
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**settings)
