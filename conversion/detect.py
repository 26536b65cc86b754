"""Which reader a source needs: the recipe's `format:`, or what its files say."""

import logging
from collections.abc import Callable

from .errors import ConversionError
from .format_modelcompose import read_modelcompose
from .format_transformers import read_llava, read_qwen2_audio, read_video_llava
from .locate import Location
from .recipe import SourceRecipe
from .sources import Source, read_json


logger = logging.getLogger(__name__)

# config.json `model_type` of the transformers-native formats.
_MODEL_TYPES = {"llava": "llava", "video_llava": "video_llava", "qwen2_audio": "qwen2_audio", "composite_mllm": "composite"}


def _readers() -> dict[str, Callable[[SourceRecipe, Location], Source]]:
    from .format_composite import read_composite
    from .format_peft import read_peft

    return {
        "llava": read_llava,
        "video_llava": read_video_llava,
        "qwen2_audio": read_qwen2_audio,
        "modelcompose": read_modelcompose,
        "peft": read_peft,
        "composite": read_composite,
    }


def detect_format(recipe: SourceRecipe, location: Location) -> str:
    folder = location.folder
    if (folder / "adapter_config.json").is_file():
        return "peft"
    if (folder / "config.json").is_file():
        config = read_json(folder / "config.json", recipe.label)
        if config.get("model_type") in _MODEL_TYPES:
            return _MODEL_TYPES[config["model_type"]]
        if "lora_strategy" in config or any(key.startswith("mm_") and key.endswith("_encoder") for key in config):
            return "modelcompose"
    raise ConversionError(
        f"{recipe.label}: cannot tell its format from {folder}; set `format:` to one of llava, video_llava, "
        "qwen2_audio, modelcompose, peft, composite."
    )


# Source keys that only some formats read; the others carry these things in their own files.
_KEYS_READ_BY_FORMAT = {
    "peft": ("encoder", "projector", "kind", "feature_layer", "feature_select"),
    "modelcompose": ("encoder", "feature_layer", "feature_select"),
}
_FORMAT_DEPENDENT_KEYS = tuple(dict.fromkeys(key for keys in _KEYS_READ_BY_FORMAT.values() for key in keys))


def read_source(recipe: SourceRecipe, location: Location) -> Source:
    fmt = recipe.format or detect_format(recipe, location)
    logger.debug("%s: read as format %s (%s)", recipe.label, fmt, "set in the recipe" if recipe.format else "detected")
    # A key that this format's reader never reads would be ignored without a word: refuse it instead.
    ignored = [
        key for key in _FORMAT_DEPENDENT_KEYS
        if getattr(recipe, key) is not None and key not in _KEYS_READ_BY_FORMAT.get(fmt, ())
    ]
    if ignored:
        readers = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in _KEYS_READ_BY_FORMAT.items())
        raise ConversionError(
            f"{recipe.label}: {ignored} do not apply to a {fmt} source, which carries its encoder, projector and "
            f"feature selection in its own files; remove them (the formats that read them: {readers})."
        )
    return _readers()[fmt](recipe, location)
