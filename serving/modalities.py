"""How a composite's modalities are addressed in vLLM requests (no vLLM import: shared by the plugin and tests).

vLLM's OpenAI server turns content items into data of the modalities `image`, `video` and `audio`; the offline `LLM`
API takes `multi_modal_data` keyed by any modality name the model declares. A modality that is the only one of its
kind among image, video and audio is addressed by its kind (so that the server's content types reach it, whatever
its name); every other modality (point clouds, and each of two modalities of one kind) by its own name.
"""

from typing import Any

from modeling_composite.configuration_modality import ModalityConfig


SERVER_KINDS = ("image", "video", "audio")


def config_modalities(config: Any) -> dict[str, ModalityConfig]:
    """The composite config's `modalities`, typed: a composite saved before `ModalityConfig` existed keeps plain
    dicts there (its own remote code builds the config), which read the same."""
    return {
        name: entry if isinstance(entry, ModalityConfig) else ModalityConfig.from_dict(name, entry)
        for name, entry in config.modalities.items()
    }


def modality_keys(modalities: dict[str, ModalityConfig]) -> dict[str, str]:
    """vLLM modality key -> composite modality name, for the composite's modalities (`config_modalities`)."""
    kinds = [entry.kind for entry in modalities.values()]
    keys: dict[str, str] = {}
    for name, entry in modalities.items():
        kind = entry.kind
        key = kind if kind in SERVER_KINDS and kinds.count(kind) == 1 else name
        if key in keys:
            raise ValueError(
                f"Modalities {keys[key]!r} and {name!r} would both be addressed as {key!r} in vLLM requests (a "
                f"modality named after a kind that another modality has alone); rename one of them."
            )
        keys[key] = name
    return keys


def describe_keys(keys: dict[str, str]) -> str:
    return ", ".join(key if key == name else f"{key} (modality {name!r})" for key, name in keys.items())
