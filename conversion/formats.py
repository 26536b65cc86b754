"""The source formats the converter reads, one registry entry each: its name (a recipe's `format:`), how its files
identify it, where its key map lives, and the format-dependent source keys it reads.

Adding a format is one entry here and one reader module (`format_<name>.py` or a reader in an existing one) that
turns the files into a `sources.Source`. This module imports no reader (nor torch or transformers): a recipe is
checked against these names in a second, and a reader is imported when a source of its format is read.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


# Source keys that only some formats read (the others carry these things in their own files): a recipe that sets one
# for a format that ignores it is refused rather than silently not applied.
FORMAT_DEPENDENT_KEYS = ("encoder", "projector", "kind", "feature_layer", "feature_select")


@dataclass(frozen=True)
class SourceFormat:
    """One source format.

    - `reader`: `"module:function"` in the `conversion` package, `(SourceRecipe, Location) -> Source`.
    - `key_map`: where the reader's key map is (the code that places every tensor of the format), and its layout.
    - How its folder identifies it (`detect_format` tries the kinds of evidence in this order, the surest first):
      `marker_file`, a file only this format has; `model_type`, its config.json's; `identify`, other fields of its
      config.json (`config -> bool`).
    - `recipe_keys`: which of `FORMAT_DEPENDENT_KEYS` it reads from the recipe.
    - `folds_text_lora`: its LLM weights already hold its text LoRA, folded in (a composite of ours), so although it
      has full weights its text delta can be that LoRA (where the source's `text_lora_exact` says the factors are the
      whole delta, method routed takes the LoRA, not an SVD).

    Every format can be a source of every method; a method that needs something of a source (DAMC: decoupled modality
    parameters) checks the source as read, not its format.
    """

    name: str
    reader: str
    key_map: str
    marker_file: str | None = None
    model_type: str | None = None
    identify: Callable[[dict[str, Any]], bool] | None = None
    recipe_keys: tuple[str, ...] = ()
    folds_text_lora: bool = False

    def read(self, recipe, location):
        """Read a source of this format (imports its reader now)."""
        module, _, function = self.reader.partition(":")
        return getattr(importlib.import_module(f"conversion.{module}"), function)(recipe, location)


def _has_modelcompose_fields(config: dict[str, Any]) -> bool:
    # The paper's checkpoints have a LLaVA-style config.json with its own fields: the LoRA strategy and the encoders.
    return "lora_strategy" in config or any(key.startswith("mm_") and key.endswith("_encoder") for key in config)


_FORMATS = (
    SourceFormat(
        "llava",
        reader="format_transformers:read_llava",
        key_map="format_transformers: `model.language_model.*` (or `language_model.model.*`), `vision_tower`, "
        "`multi_modal_projector`",
        model_type="llava",
    ),
    SourceFormat(
        "video_llava",
        reader="format_transformers:read_video_llava",
        key_map="format_transformers: the LLaVA layout with `image_tower` and `video_tower`",
        model_type="video_llava",
    ),
    SourceFormat(
        "qwen2_audio",
        reader="format_transformers:read_qwen2_audio",
        key_map="format_transformers: the LLaVA layout with `audio_tower`",
        model_type="qwen2_audio",
    ),
    SourceFormat(
        "modelcompose",
        reader="format_modelcompose:read_modelcompose",
        key_map="format_modelcompose: `model.layers.*.lora_{A,B}.<adapter>.weight`, `model.modal_projectors.<m>`, "
        "`prefix_tokens.<m>` / `suffix_tokens.<m>`",
        identify=_has_modelcompose_fields,
        recipe_keys=("encoder", "feature_layer", "feature_select"),
    ),
    SourceFormat(
        "peft",
        reader="format_peft:read_peft",
        key_map="format_peft: `base_model.model.<LLM key>.lora_{A,B}[.default].weight`, projectors in LLaVA's layouts",
        marker_file="adapter_config.json",
        recipe_keys=("encoder", "projector", "kind", "feature_layer", "feature_select"),
    ),
    SourceFormat(
        "composite",
        reader="format_composite:read_composite",
        key_map="format_composite: a composite's own state dict (`modeling_composite.state_dict_keys`)",
        model_type="composite_mllm",
        folds_text_lora=True,
    ),
)
SOURCE_FORMATS: dict[str, SourceFormat] = {source_format.name: source_format for source_format in _FORMATS}


def identify_format(folder: Path, read_config: Callable[[], dict[str, Any] | None]) -> SourceFormat | None:
    """The format whose evidence the folder has, or None; `read_config` gives its config.json (None without one),
    read only when no marker file decided."""
    for source_format in _FORMATS:
        if source_format.marker_file is not None and (folder / source_format.marker_file).is_file():
            return source_format
    config = read_config()
    if config is None:
        return None
    for source_format in _FORMATS:
        if source_format.model_type is not None and config.get("model_type") == source_format.model_type:
            return source_format
    for source_format in _FORMATS:
        if source_format.identify is not None and source_format.identify(config):
            return source_format
    return None
