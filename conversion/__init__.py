"""Build NaiveMC / DAMC composites from published source models: `compose(recipe, output_dir)`, or the command line
`python -m conversion RECIPE.yaml OUTPUT_DIR` (also installed as `composite-convert`).

The exports other than `ConversionError` are imported on first use (PEP 562), as transformers' own package does: the
command line's `--help` and `--example-recipe` then answer without importing torch and transformers. No submodule
shares an exported name, so importing a submodule never shadows an export.
"""

import importlib
from typing import TYPE_CHECKING

from .errors import ConversionError


_LAZY_EXPORTS = {"compose": ".composer", "Recipe": ".recipe", "load_recipe": ".recipe"}

if TYPE_CHECKING:
    from .composer import compose
    from .recipe import Recipe, load_recipe


def __getattr__(name: str):
    if name not in _LAZY_EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))


__all__ = ["ConversionError", "Recipe", "compose", "load_recipe"]
