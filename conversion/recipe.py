"""The conversion recipe: what goes into a composite and how its text parameters merge.

A recipe is YAML (or the same structure as a dict)::

    name: my-composite
    method: naive                # naive | damc | routed
    base: lmsys/vicuna-7b-v1.5   # local folder or Hub id[@revision]
    merge: {rule: linear}        # linear | ties | dare_linear | dare_ties (+ density, seed, and mergekit's normalize,
                                 # lambda, rescale, int8_mask)
    sources:
      - path: llava-hf/llava-1.5-7b-hf
        weight: 0.5
    dtype: bfloat16
    chat_template: vicuna_v1     # default | vicuna_v1 (the paper's, with its system line) | a Jinja template

Every key is checked here, before any file is read, so that a typo fails in a second with a message that names it.
`recipe_reference.py` documents every key (`composite-convert --example-recipe`). Relative paths in a recipe file start
from the file's folder.
"""

import logging
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConversionError
from .formats import SOURCE_FORMATS
from .merge import MERGE_RULES, merge_rule


logger = logging.getLogger(__name__)


METHODS = ("naive", "damc", "routed")
DTYPES = ("float32", "float16", "bfloat16")

_TOP_LEVEL_KEYS = (
    "name",
    "method",
    "base",
    "merge",
    "sources",
    "dtype",
    "chat_template",
    "license",
    "weight_search",
    "rank",
)
_WEIGHT_SEARCH_KEYS = ("grid", "objective", "data", "media_root", "max_samples")
WEIGHT_SEARCH_OBJECTIVES = ("accuracy", "agreement")
_MERGE_KEYS = ("rule", "density", "seed", "normalize", "lambda", "rescale", "int8_mask")
_SOURCE_KEYS = (
    "path",
    "format",
    "weight",
    "modalities",
    "rename",
    "encoder",
    "projector",
    "kind",
    "feature_layer",
    "feature_select",
    "rank",
)


@dataclass
class MergeSettings:
    """The recipe's `merge:`, with mergekit's parameter names and per-rule defaults (see `conversion.merge`).
    `normalize` and `rescale` are None when not given (the rule's default applies); `int8_mask` is accepted for
    mergekit configs and changes nothing (masks here are always boolean, one byte per entry, as mergekit's int8)."""

    rule: str = "linear"
    density: float | None = None
    seed: int = 0
    normalize: bool | None = None
    lambda_: float = 1.0
    rescale: bool | None = None
    int8_mask: bool = False

    @property
    def normalizes(self) -> bool:
        return MERGE_RULES[self.rule].default_normalize if self.normalize is None else self.normalize

    @property
    def rescales(self) -> bool:
        return MERGE_RULES[self.rule].default_rescale if self.rescale is None else self.rescale

    def options(self) -> dict[str, object]:
        """`merge_deltas`' keyword arguments for the rules other than linear (whose normalize and lambda go into the
        weights, see `Recipe.weights`)."""
        return {"normalize": self.normalizes, "lambda_": self.lambda_, "rescale": self.rescales}

    def provenance(self) -> dict[str, object]:
        """What a composite's config and card record beyond rule, density and seed: the resolved conventions of a
        rule that sparsifies or elects signs (the linear rule's are in its weights)."""
        if MERGE_RULES[self.rule].is_weighted_sum:
            return {}
        return {"normalize": self.normalizes, "lambda": self.lambda_, "rescale": self.rescales}


@dataclass
class SourceRecipe:
    """One source model. `path` is a local folder or a Hub reference `org/name[/sub/folder][@revision]`."""

    path: str
    format: str | None = None
    weight: float | None = None
    modalities: list[str] | None = None
    rename: dict[str, str] = field(default_factory=dict)
    encoder: str | None = None
    projector: str | None = None
    kind: str | None = None
    feature_layer: int | str | None = None
    feature_select: str | None = None
    # method routed: the rank of the truncated SVD of a full fine-tune's delta (None: the recipe's `rank`).
    rank: int | None = None
    index: int = 0

    @property
    def label(self) -> str:
        """How error messages name this source."""
        return f"sources[{self.index}] ({self.path})"


@dataclass
class WeightSearch:
    """Choose one λ for every source from `grid`, on paper-format questions in `data`: by `accuracy` (the first word
    of the greedy answer against the answer given) or, needing no answers, by `agreement` with each source alone on
    the questions about that source's modalities."""

    grid: list[float]
    objective: str = "agreement"
    data: str = ""
    media_root: str | None = None
    max_samples: int = 200


@dataclass
class Recipe:
    base: str
    sources: list[SourceRecipe]
    method: str = "naive"
    merge: MergeSettings = field(default_factory=MergeSettings)
    name: str | None = None
    dtype: str | None = None
    chat_template: str | None = None
    license: str | None = None
    weight_search: WeightSearch | None = None
    # method routed: the rank of every full fine-tune source that gives none of its own.
    rank: int | None = None
    text: str = ""

    def source_rank(self, source: SourceRecipe) -> int | None:
        """The rank a full fine-tune source's delta gets under method routed: its own `rank`, else the recipe's."""
        return source.rank if source.rank is not None else self.rank

    def given_weights(self) -> list[float]:
        """λ of every source as the recipe gives it (all or none of them, see `_check_weights_all_or_none`), else
        1/N (the paper's default)."""
        return [source.weight if source.weight is not None else 1.0 / len(self.sources) for source in self.sources]

    def weights(self) -> list[float]:
        """The weights the merge takes. For the linear rule these are the λ_i of `W0 + Σ λ_i T_i` as applied: the
        given ones times `merge.lambda`, divided by their sum with `merge.normalize` (mergekit's linear merge, a
        weighted mean of the models). The other rules apply normalize and lambda per entry and take them as given."""
        weights = self.given_weights()
        if not MERGE_RULES[self.merge.rule].is_weighted_sum:
            return weights
        scale = self.merge.lambda_
        if self.merge.normalizes:
            scale /= math.fsum(weights)
        return [weight * scale for weight in weights]


def _unknown_keys(where: str, given: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConversionError(f"{where}: unknown key(s) {unknown}; allowed keys are {list(allowed)}.")


# λ multiplies float32 tensors: a weight beyond float32's range cannot even be applied.
_LARGEST_WEIGHT = 3.4e38


def merge_weight(where: str, value: Any) -> float:
    """A λ: a finite number within float32's range. YAML 1.1 reads `1e-3` (no dot, unsigned exponent) as text, so
    text that is a number is taken as that number."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConversionError(f"{where} must be a finite number (λ for the text parameters), got {value!r}.")
    if abs(value) > _LARGEST_WEIGHT:
        raise ConversionError(f"{where} is {value:g}, beyond what float32 weights can be multiplied by; use a sane λ.")
    return float(value)


def _one_of(where: str, value: Any, choices: Collection[str], note: str = "") -> Any:
    """`value` if it is one of `choices`; else an error that names the key and the choices."""
    if value not in choices:
        raise ConversionError(f"{where} {value!r} is unknown; use one of {list(choices)}{note}.")
    return value


def _require_str(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConversionError(f"{where} must be a non-empty string, got {value!r}.")
    return value.strip()


def _parse_merge(raw: Any) -> MergeSettings:
    if raw is None:
        return MergeSettings()
    if isinstance(raw, str):
        raw = {"rule": raw}
    if not isinstance(raw, dict):
        raise ConversionError(f"merge must be a mapping like {{rule: linear}}, got {raw!r}.")
    _unknown_keys("merge", raw, _MERGE_KEYS)
    rule = raw.get("rule", "linear")
    spec = merge_rule(rule)
    if spec is None:
        raise ConversionError(
            f"merge.rule {rule!r} is unknown; use one of {list(MERGE_RULES)} (or task_arithmetic, the same as linear)."
        )
    rule = spec.name
    density = raw.get("density")
    if not spec.sparsify:
        for key in ("density", "rescale"):
            if raw.get(key) is not None:
                raise ConversionError(
                    f"merge.{key} only applies to the ties and dare rules (they trim or drop entries); remove it for "
                    f"rule {rule}."
                )
    else:
        if density is None:
            raise ConversionError(
                f"merge.rule {rule} needs merge.density (the fraction of each delta kept, e.g. 0.2)."
            )
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConversionError(f"merge.density must be a number in (0, 1], got {density!r}.")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConversionError(f"merge.seed must be an integer, got {seed!r}.")
    flags = {}
    for key in ("normalize", "rescale", "int8_mask"):
        value = raw.get(key)
        if value is not None and not isinstance(value, bool):
            raise ConversionError(f"merge.{key} must be true or false, got {value!r}.")
        flags[key] = value
    scale = raw.get("lambda", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ConversionError(f"merge.lambda must be a finite number (it multiplies the merged delta), got {scale!r}.")
    return MergeSettings(
        rule=rule,
        density=None if density is None else float(density),
        seed=seed,
        normalize=flags["normalize"],
        lambda_=float(scale),
        rescale=flags["rescale"],
        int8_mask=bool(flags["int8_mask"]),
    )


def _parse_source(index: int, raw: Any) -> SourceRecipe:
    # Imported here: the modality checks live with the model config, and `--help` must not import transformers.
    from modeling_composite.configuration_modality import FEATURE_SELECTIONS, MODALITY_KINDS, parse_feature_layer

    where = f"sources[{index}]"
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict):
        raise ConversionError(f"{where} must be a mapping with at least `path`, got {raw!r}.")
    _unknown_keys(where, raw, _SOURCE_KEYS)
    if "path" not in raw:
        raise ConversionError(f"{where} has no `path` (a local folder or a Hub id).")
    source = SourceRecipe(path=_require_str(f"{where}.path", raw["path"]), index=index)
    if raw.get("format") is not None:
        source.format = _one_of(f"{where}.format", raw["format"], SOURCE_FORMATS)
    if raw.get("weight") is not None:
        source.weight = merge_weight(f"{where}.weight", raw["weight"])
    modalities = raw.get("modalities")
    if modalities is not None:
        if isinstance(modalities, str):
            modalities = [modalities]
        if not isinstance(modalities, list) or not modalities or not all(isinstance(m, str) for m in modalities):
            raise ConversionError(
                f"{where}.modalities must be a non-empty list of modality names, got {modalities!r}."
            )
        source.modalities = modalities
    rename = raw.get("rename") or {}
    if not isinstance(rename, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in rename.items()):
        raise ConversionError(
            f"{where}.rename must map modality names to new names, e.g. {{image: chart}}, got {rename!r}."
        )
    for new_name in rename.values():
        if not new_name.isidentifier() or new_name == "text":
            raise ConversionError(
                f"{where}.rename: {new_name!r} cannot name a modality; use a Python identifier other than 'text' "
                "(it becomes a module name and a placeholder <name>)."
            )
    source.rename = dict(rename)
    for key in ("encoder", "projector"):
        if raw.get(key) is not None:
            setattr(source, key, _require_str(f"{where}.{key}", raw[key]))
    if raw.get("kind") is not None:
        source.kind = _one_of(f"{where}.kind", raw["kind"], MODALITY_KINDS)
    if raw.get("feature_layer") is not None:
        layer = raw["feature_layer"]
        try:
            source.feature_layer = parse_feature_layer(layer)
        except ValueError:
            # The parser's message names the config field; this one the recipe key.
            raise ConversionError(
                f"{where}.feature_layer must be an integer (e.g. -2) or 'last', got {layer!r}."
            ) from None
    if raw.get("feature_select") is not None:
        source.feature_select = _one_of(
            f"{where}.feature_select",
            raw["feature_select"],
            FEATURE_SELECTIONS,
            " ('patch' drops CLS, 'full' keeps it)",
        )
    if raw.get("rank") is not None:
        source.rank = _parse_rank(f"{where}.rank", raw["rank"])
    return source


def _parse_rank(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConversionError(
            f"{where} must be a positive integer (the rank of the truncated SVD of a full fine-tune's delta under "
            f"method routed), got {value!r}."
        )
    return value


def parse_recipe(raw: Any, text: str = "") -> Recipe:
    """Check a recipe given as a dict (as YAML loads it) and return it typed."""
    if not isinstance(raw, dict):
        raise ConversionError(
            f"A recipe must be a YAML mapping with `base`, `method` and `sources`, got {type(raw).__name__}."
        )
    _unknown_keys("recipe", raw, _TOP_LEVEL_KEYS)
    method = raw.get("method", "naive")
    _one_of("method", method, METHODS)
    if "base" not in raw:
        raise ConversionError("The recipe has no `base` (the base LLM every source was fine-tuned from).")
    sources_raw = raw.get("sources")
    if not isinstance(sources_raw, list) or not sources_raw:
        raise ConversionError("The recipe needs `sources`: a non-empty list of source models.")
    dtype = raw.get("dtype")
    if dtype is not None:
        _one_of("dtype", dtype, DTYPES)
    name = raw.get("name")
    if name is not None:
        name = _require_str("name", str(name))
    chat_template = raw.get("chat_template")
    if chat_template is not None:
        chat_template = _require_str("chat_template", chat_template)
    license_id = raw.get("license")
    recipe = Recipe(
        base=_require_str("base", raw["base"]),
        sources=[_parse_source(index, source) for index, source in enumerate(sources_raw)],
        method=method,
        merge=_parse_merge(raw.get("merge")),
        name=name,
        dtype=dtype,
        chat_template=chat_template,
        license=None if license_id is None else _require_str("license", license_id),
        weight_search=_parse_weight_search(raw.get("weight_search")),
        rank=None if raw.get("rank") is None else _parse_rank("rank", raw["rank"]),
        text=text,
    )
    if method != "routed":
        ranked = ["rank"] if recipe.rank is not None else []
        ranked += [f"sources[{source.index}].rank" for source in recipe.sources if source.rank is not None]
        if ranked:
            raise ConversionError(
                f"{', '.join(ranked)}: `rank` only applies to method routed (the rank with which a full fine-tune's "
                f"delta reaches its modality's tokens); method {method} does not use it, so remove it."
            )
    _check_weights_all_or_none(recipe.sources)
    if recipe.weight_search is not None and any(source.weight is not None for source in recipe.sources):
        raise ConversionError(
            "weight_search chooses the weight of every source; remove the sources' `weight` keys or the weight_search."
        )
    _check_merge_weights(recipe)
    if method == "damc" and not MERGE_RULES[recipe.merge.rule].is_weighted_sum:
        raise ConversionError(
            f"method damc merges the text deltas with rule linear only (modality tokens take the merged text delta "
            f"off again as low-rank factors, which a {recipe.merge.rule} merge does not have); use `merge: {{rule: "
            "linear}` or `method: naive`."
        )
    return recipe


def _check_merge_weights(recipe: Recipe) -> None:
    """Weights the merge settings can use, and a note where mergekit's `linear` would differ from ours."""
    merge, given = recipe.merge, recipe.given_weights()
    elects_sign = MERGE_RULES[merge.rule].elects_sign
    if elects_sign and merge.normalizes and any(weight < 0 for weight in given):
        raise ConversionError(
            f"merge.rule {merge.rule} with normalize divides by the weights of the sources that agree and needs "
            "weights >= 0; set `normalize: false` (or use linear / dare_linear) to subtract a source."
        )
    if merge.normalizes and not elects_sign and abs(math.fsum(given)) < 1e-8:
        raise ConversionError(
            f"merge.normalize divides by the sum of the sources' weights, which is 0 ({given}); give weights with a "
            "non-zero sum or set `normalize: false`."
        )
    if recipe.weight_search is not None and (merge.normalizes or merge.lambda_ != 1.0):
        raise ConversionError(
            "weight_search gives every source the same λ and compares the results; with merge.normalize the weights "
            "only count relative to each other (every candidate would be the same model) and merge.lambda would "
            "scale them again: set `normalize: false` and remove merge.lambda, or remove the weight_search."
        )
    if merge.rule == "linear" and merge.normalize is None and abs(math.fsum(given) - 1.0) > 1e-6:
        logger.info(
            "merge rule linear adds Σ λ_i T_i with the weights as given (sum %g), as the paper and mergekit's "
            "task_arithmetic do; mergekit's `linear` would divide by their sum: add `normalize: true` for that.",
            math.fsum(given),
        )


def _check_weights_all_or_none(sources: list[SourceRecipe]) -> None:
    """Refuse a recipe that weighs some sources and not others. The defaults would be 1/N beside the given weights
    (`weight: 0.5` beside two defaulted sources sums to 1.17), which nobody means; mergekit likewise requires a
    weight for every model. No weight at all keeps the paper's default, 1/N each."""
    missing = [source.label for source in sources if source.weight is None]
    if missing and len(missing) < len(sources):
        raise ConversionError(
            f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no `weight` while the other sources do; "
            f"give every source a weight (λ of its text delta), or none (each then gets 1/N = "
            f"{1 / len(sources):g}, the paper's default)."
        )


def _parse_weight_search(raw: Any) -> WeightSearch | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConversionError(f"weight_search must be a mapping with grid, objective and data, got {raw!r}.")
    _unknown_keys("weight_search", raw, _WEIGHT_SEARCH_KEYS)
    grid = raw.get("grid")
    if not isinstance(grid, list) or not grid:
        raise ConversionError(f"weight_search.grid must be a non-empty list of numbers (λ candidates), got {grid!r}.")
    grid = [merge_weight(f"weight_search.grid[{index}]", value) for index, value in enumerate(grid)]
    objective = raw.get("objective", "agreement")
    _one_of("weight_search.objective", objective, WEIGHT_SEARCH_OBJECTIVES)
    max_samples = raw.get("max_samples", 200)
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ConversionError(f"weight_search.max_samples must be a positive integer, got {max_samples!r}.")
    media_root = raw.get("media_root")
    return WeightSearch(
        grid=grid,
        objective=objective,
        data=_require_str("weight_search.data", raw.get("data")),
        media_root=None if media_root is None else _require_str("weight_search.media_root", media_root),
        max_samples=max_samples,
    )


def resolve_path(reference: str, folder: Path) -> str:
    """`reference` as written in a recipe file in `folder`: a relative path that exists there, or that is plainly
    local (`./x`, `../x`), becomes absolute; an absolute path or a Hub reference (`org/name`) stays as it is."""
    path = Path(reference).expanduser()
    if path.is_absolute():
        return reference
    candidate = folder / path
    if candidate.exists() or reference.startswith(("./", "../", ".\\", "..\\")) or reference in (".", ".."):
        return os.path.normpath(candidate)
    return reference


def _resolve_recipe_paths(recipe: Recipe, folder: Path) -> None:
    """Make the recipe's relative paths start from `folder` (the recipe file's), in place, whatever the current
    directory: a recipe and the models beside it move together."""
    recipe.base = resolve_path(recipe.base, folder)
    for source in recipe.sources:
        source.path = resolve_path(source.path, folder)
        if source.encoder is not None:
            source.encoder = resolve_path(source.encoder, folder)
        if source.projector is not None:
            source.projector = resolve_path(source.projector, folder)
    search = recipe.weight_search
    if search is not None:
        search.data = resolve_path(search.data, folder)
        if search.media_root is not None:
            search.media_root = resolve_path(search.media_root, folder)


def load_recipe(recipe: "str | Path | dict | Recipe") -> Recipe:
    """A recipe from a YAML file path (its relative paths start from the file's folder), a dict or an already parsed
    `Recipe` (relative paths start from the current directory)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe, yaml.safe_dump(recipe, sort_keys=False))
    path = Path(recipe)
    if not path.is_file():
        raise ConversionError(f"Recipe file {str(path)!r} does not exist.")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = str(error).replace("\n", " ")
        raise ConversionError(f"Recipe {str(path)!r} is not valid YAML: {problem}") from None
    parsed = parse_recipe(raw, text)
    _resolve_recipe_paths(parsed, path.resolve().parent)
    return parsed
