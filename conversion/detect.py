"""Which reader a source needs: the recipe's `format:`, or what its files say (the formats:
`formats.SOURCE_FORMATS`)."""

import logging

from .errors import ConversionError
from .formats import FORMAT_DEPENDENT_KEYS, SOURCE_FORMATS, identify_format
from .locate import Location
from .recipe import SourceRecipe
from .sources import Source, read_json


logger = logging.getLogger(__name__)


def detect_format(recipe: SourceRecipe, location: Location) -> str:
    folder = location.folder
    config_file = folder / "config.json"
    source_format = identify_format(
        folder, lambda: read_json(config_file, recipe.label) if config_file.is_file() else None
    )
    if source_format is None:
        raise ConversionError(
            f"{recipe.label}: cannot tell its format from {folder}; set `format:` to one of "
            f"{', '.join(SOURCE_FORMATS)}."
        )
    return source_format.name


def read_source(recipe: SourceRecipe, location: Location) -> Source:
    name = recipe.format or detect_format(recipe, location)
    logger.debug(
        "%s: read as format %s (%s)", recipe.label, name, "set in the recipe" if recipe.format else "detected"
    )
    source_format = SOURCE_FORMATS[name]
    # A key that this format's reader never reads would be ignored without a word: refuse it instead.
    ignored = [
        key
        for key in FORMAT_DEPENDENT_KEYS
        if getattr(recipe, key) is not None and key not in source_format.recipe_keys
    ]
    if ignored:
        readers = "; ".join(
            f"{other.name}: {', '.join(other.recipe_keys)}" for other in SOURCE_FORMATS.values() if other.recipe_keys
        )
        raise ConversionError(
            f"{recipe.label}: {ignored} do not apply to a {name} source, which carries its encoder, projector and "
            f"feature selection in its own files; remove them (the formats that read them: {readers})."
        )
    return source_format.read(recipe, location)
