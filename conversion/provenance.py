"""What a composite says about where its parts came from, without publishing the user's local paths.

The config's `composition`, the model card and the saved recipe travel with the composite (and to the Hub with
`--push-to-hub`): Hub references are recorded as written (with the revision that was used), local folders and files by
their name only, since `/home/alice/...` tells others nothing useful and tells them who and where the user is.
"""

import os
from pathlib import Path
from typing import Any

import yaml

from modeling_composite.configuration_composite import CompositeMLLMConfig


def public_reference(reference: str, hub_id: str | None = None) -> str:
    """`reference` as a composite may publish it: a Hub reference as written, a local path by its last component."""
    if hub_id is not None or not _is_local_path(reference):
        return reference
    return Path(os.path.normpath(os.path.expanduser(reference))).name or reference


def _is_local_path(reference: str) -> bool:
    # The same test `locate` applies: an existing path, or one written as a path (absolute, ./, ../, ~, backslashes).
    return reference.startswith(("/", ".", "~")) or "\\" in reference or Path(reference).expanduser().exists()


def _path_values(raw: Any) -> list[str]:
    """The recipe values that name folders or files: base, each source's path, encoder and projector, and the weight
    search's data and media root."""
    if not isinstance(raw, dict):
        return []
    values = [raw.get("base")]
    for source in raw.get("sources") or []:
        if isinstance(source, dict):
            values += [source.get("path"), source.get("encoder"), source.get("projector")]
        else:
            values.append(source)
    search = raw.get("weight_search")
    if isinstance(search, dict):
        values += [search.get("data"), search.get("media_root")]
    return [value for value in values if isinstance(value, str)]


def _replace_values(raw: Any, replacements: dict[str, str]) -> Any:
    if isinstance(raw, dict):
        return {key: _replace_values(value, replacements) for key, value in raw.items()}
    if isinstance(raw, list):
        return [_replace_values(value, replacements) for value in raw]
    return replacements.get(raw, raw) if isinstance(raw, str) else raw


def public_recipe_text(text: str) -> str:
    """The recipe as saved in the composite: the user's own text (comments kept), with every local path replaced by
    its name. Where replacing the text alone would not give exactly that, the recipe is written out again."""
    raw = yaml.safe_load(text)
    replacements = {value: public_reference(value) for value in _path_values(raw)}
    replacements = {value: public for value, public in replacements.items() if public != value}
    if not replacements:
        return text
    expected = _replace_values(raw, replacements)
    edited = text
    for value in sorted(replacements, key=len, reverse=True):
        edited = edited.replace(value, replacements[value])
    try:
        if yaml.safe_load(edited) == expected:
            return edited
    except yaml.YAMLError:
        pass
    dumped = yaml.safe_dump(expected, sort_keys=False, allow_unicode=True)
    return "# Local paths are given by their name only.\n" + dumped


def forget_local_paths(config: CompositeMLLMConfig, base_name: str) -> None:
    """Drop the local paths that transformers records in configs (`_name_or_path`) from the composite's text and
    encoder configs: the text model is named after the base, encoders by nothing."""
    config.get_text_config()._name_or_path = base_name
    for entry in config.modalities.values():
        entry.encoder.pop("_name_or_path", None)
