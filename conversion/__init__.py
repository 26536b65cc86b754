"""Build NaiveMC / DAMC composites from published source models: `compose(recipe, output_dir)`, or the command line
`python -m conversion RECIPE.yaml OUTPUT_DIR` (also installed as `composite-convert`)."""

from .compose import compose
from .errors import ConversionError
from .recipe import Recipe, load_recipe


__all__ = ["ConversionError", "Recipe", "compose", "load_recipe"]
