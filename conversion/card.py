"""The model card (README.md) of a converted composite: front matter for the Hub, and a body that says exactly what
went in (sources with revisions and weights, base, merge rule, modalities, the recipe) and how to load it.

The layout lives in `model_cards/composite.md`; this module computes the values and escapes every user-provided
string for the place it lands in (Markdown text, table cell, code span, Python literal, code fence), so that a name
with quotes or pipes, or a recipe with a code fence inside, cannot break the card.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from huggingface_hub import ModelCard, ModelCardData

from .errors import ConversionError
from .merge import MERGE_RULES
from .recipe import METHODS


# `model_cards/` is a top-level folder of the repository, beside `conversion/`.
# `model_cards/` is a top-level folder of the repository; an installed package has it as `conversion/model_cards/`.
_TEMPLATE_CANDIDATES = (
    Path(__file__).resolve().parent / "model_cards" / "composite.md",
    Path(__file__).resolve().parent.parent / "model_cards" / "composite.md",
)

_METHODS = METHODS
_RULES = MERGE_RULES
# The Hub tag of each modality kind; the order is the order tags are written in.
_KIND_TAGS = {"image": "image", "video": "video", "audio": "audio", "point": "point-cloud"}
_REQUIRED_TAGS = ("model-composition", "multimodal", "merge", "custom_code")
_MODALITY_KEYS = ("kind", "encoder", "placeholder", "positions_per_item", "lora_rank")

# How each kind appears in the usage snippet: the processor keyword, the variable passed (prefixed by the modality's
# name when that differs from the kind), and what that variable is.
_USAGE_BY_KIND = {
    "image": ("images", "image", "a PIL image"),
    "video": ("videos", "video", "an array (frames, height, width, 3) or a list of PIL images"),
    "audio": ("audio", "audio", "a mono waveform (1-D floats) at processor.feature_extractor.sampling_rate"),
    "point": ("point_clouds", "points", "an array (num_points, 3) of xyz, or (num_points, 6) with rgb"),
}

# Characters that Markdown (CommonMark/GFM, and the Hub's HTML pass) may interpret in running text; a backslash
# before any ASCII punctuation is a valid escape, so escaping these is always safe.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~#!])")


@dataclass
class CardSource:
    """One source of the composite (or its base LLM), as the card reports it."""

    reference: str  # what the recipe said: a Hub id (org/name or org/name/sub/folder) or a local path
    hub_id: str | None  # the Hub repo id when the source came from the Hub, else None
    revision: str | None  # commit sha or revision, when known
    format: str  # llava | video_llava | qwen2_audio | modelcompose | peft | composite
    modalities: dict[str, str]  # modality name in the composite -> kind (image | video | audio | point)
    weight: float
    # Method routed: the rank of the factors its modality tokens use (None: a modality LoRA of its own, or no delta),
    # and the share of its delta's squared Frobenius norm they keep.
    rank: int | None = None
    energy_kept: float | None = None


@dataclass
class CardInfo:
    """Everything the card states about a composite."""

    name: str
    method: str  # naive | damc | routed
    rule: str  # linear | ties | dare_linear | dare_ties
    density: float | None
    seed: int | None
    base: CardSource  # the base LLM (modalities empty, weight 1.0)
    sources: list[CardSource]
    # name -> {"kind", "encoder" (model_type), "placeholder", "positions_per_item", "lora_rank" (int | None)}
    modalities: dict[str, dict]
    recipe_yaml: str  # the recipe text, verbatim
    repo_id: str | None = None  # where it will be pushed: the usage snippet loads it from there
    folder: str | None = None  # else the name of the folder it is written to, which the snippet loads from its parent
    license: str | None = None
    notes: list[str] = field(default_factory=list)  # Markdown paragraphs for the end of the Limitations section
    # The conventions of a ties / dare merge (normalize, lambda, rescale), as `MergeSettings.provenance()` gives them.
    merge_options: dict[str, object] = field(default_factory=dict)
    # Method routed: {"rank", "energy_kept"} of the merged text delta that modality tokens take off again.
    text_routing: dict | None = None


def template_path() -> Path:
    """The Jinja2 template of the card. Raises `ConversionError` when it is missing (a broken installation)."""
    for candidate in _TEMPLATE_CANDIDATES:
        if candidate.is_file():
            return candidate
    raise ConversionError(
        f"The model card template is missing (looked at {[str(path) for path in _TEMPLATE_CANDIDATES]}); reinstall "
        "the project or restore model_cards/composite.md."
    )


def render_model_card(info: CardInfo) -> ModelCard:
    """The model card of the composite described by `info`: Hub metadata in the front matter, and a body with the
    method, modality and source tables, base model, merge rule, usage snippets and the recipe."""
    _check(info)
    kinds = [entry["kind"] for entry in info.modalities.values()]
    card_data = ModelCardData(
        license=info.license,
        library_name="transformers",
        pipeline_tag="image-text-to-text" if set(kinds) == {"image"} else "any-to-any",
        tags=list(_REQUIRED_TAGS) + [tag for kind, tag in _KIND_TAGS.items() if kind in kinds],
    )
    base_models = _hub_ids([info.base, *info.sources])
    if base_models:
        card_data.base_model = base_models
        # Tells the Hub to list this repo in its bases' model trees as a merge (not a fine-tune or an adapter).
        card_data.base_model_relation = "merge"
    return ModelCard.from_template(card_data, template_path=str(template_path()), **_template_values(info))


def _check(info: CardInfo) -> None:
    """Reject values the card cannot describe truthfully, naming the field."""
    if info.method not in _METHODS:
        raise ConversionError(f"Model card: method {info.method!r} is unknown; use one of {list(_METHODS)}.")
    if info.rule not in _RULES:
        raise ConversionError(f"Model card: merge rule {info.rule!r} is unknown; use one of {list(_RULES)}.")
    if not info.modalities:
        raise ConversionError("Model card: the composite has no modalities.")
    for name, entry in info.modalities.items():
        missing = [key for key in _MODALITY_KEYS if key not in entry]
        if missing:
            raise ConversionError(f"Model card: modality {name!r} lacks {missing}.")
        if entry["kind"] not in _KIND_TAGS:
            raise ConversionError(
                f"Model card: modality {name!r} has kind {entry['kind']!r}; use one of {list(_KIND_TAGS)}."
            )
    for source in info.sources:
        for name in source.modalities:
            if name not in info.modalities:
                raise ConversionError(
                    f"Model card: source {source.reference!r} contributes modality {name!r}, which the composite "
                    f"does not have (it has {list(info.modalities)})."
                )


def _hub_ids(sources: list[CardSource]) -> list[str]:
    """Hub ids in order of first appearance, without duplicates (two sources may come from one repository)."""
    ids: list[str] = []
    for source in sources:
        if source.hub_id and source.hub_id not in ids:
            ids.append(source.hub_id)
    return ids


def _template_values(info: CardInfo) -> dict:
    """The template's variables, each already escaped for where the template puts it."""
    repo = info.repo_id or info.folder or info.name
    usage = _usage(info.modalities)
    # One fence for all Python blocks, longer than any backtick run that a string literal could bring in.
    python_fence = _fence(repo + usage["prompt"])
    recipe_text = _normalize_newlines(info.recipe_yaml)
    if not recipe_text.endswith("\n"):
        recipe_text += "\n"  # the closing fence must start its own line
    return {
        "title": _markdown_text(info.name),
        "method": info.method,
        "rule": info.rule,
        "rule_parameters": _rule_parameters(info),
        "source_count": len(info.sources),
        "modality_rows": [_modality_row(name, entry) for name, entry in info.modalities.items()],
        "source_rows": [_source_row(source) for source in info.sources],
        "routed_rows": [_routed_row(source) for source in info.sources] if info.method == "routed" else [],
        "text_routing": _text_routing(info.text_routing),
        "base_reference": _source_link(info.base, in_table=False),
        "base_revision": _code(info.base.revision, in_table=False) if info.base.revision else "",
        "repo_literal": _python_string(repo),
        "prompt_literal": _python_string(usage["prompt"]),
        "call_arguments": usage["call_arguments"],
        "input_notes": usage["input_notes"],
        "image_variable": usage["image_variable"],
        "loads_local_folder": info.repo_id is None and info.folder is not None,
        "python_fence": python_fence,
        "recipe_fence": _fence(recipe_text),
        "recipe_text": recipe_text,
        "notes": [_normalize_newlines(note) for note in info.notes],
    }


def _rule_parameters(info: CardInfo) -> str:
    """The merge parameters that the rule uses: density for ties and dare, the seed of the random drop for dare, and
    their conventions (normalize, lambda, rescale)."""
    parts = []
    if info.rule != "linear" and info.density is not None:
        parts.append(f"density `{_number(info.density)}`")
    if info.rule.startswith("dare") and info.seed is not None:
        parts.append(f"seed `{info.seed}`")
    for key, value in info.merge_options.items():
        shown = str(value).lower() if isinstance(value, bool) else _number(value)
        parts.append(f"{key} `{shown}`")
    return ", ".join(parts)


def _modality_row(name: str, entry: dict) -> dict[str, str]:
    rank = entry["lora_rank"]
    return {
        "name": _code(name),
        "kind": entry["kind"],
        "encoder": _code(str(entry["encoder"])),
        "placeholder": _code(entry["placeholder"]),
        "positions": str(entry["positions_per_item"]),
        "rank": "-" if rank is None else str(rank),
    }


def _source_row(source: CardSource) -> dict[str, str]:
    modalities = ", ".join(
        _code(name) if name == kind else f"{_code(name)} ({kind})" for name, kind in source.modalities.items()
    )
    return {
        "reference": _source_link(source, in_table=True),
        "revision": _code(source.revision) if source.revision else "-",
        "format": _code(source.format),
        "modalities": modalities or "-",
        "weight": _number(source.weight),
    }


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _routed_row(source: CardSource) -> dict[str, str]:
    return {
        "reference": _source_link(source, in_table=True),
        "rank": "-" if source.rank is None else str(source.rank),
        "energy": _share(source.energy_kept),
    }


def _text_routing(text: dict | None) -> str:
    if not text or not text.get("rank"):
        return ""
    return f"rank {text['rank']}, keeping {_share(text['energy_kept'])} of its energy"


def _source_link(source: CardSource, in_table: bool) -> str:
    """The reference as written in the recipe, linked to its Hub page (at its revision and subfolder) when it has
    one; a local path stays plain code."""
    label = _code(source.reference, in_table=in_table)
    if not source.hub_id:
        return label
    url = "https://huggingface.co/" + quote(source.hub_id, safe="/")
    subfolder = source.reference[len(source.hub_id) :].strip("/") if source.reference.startswith(source.hub_id) else ""
    if source.revision or subfolder:
        url += "/tree/" + quote(source.revision or "main", safe="")
        if subfolder:
            url += "/" + quote(subfolder, safe="/")
    return f"[{label}]({url})"


def _usage(modalities: dict[str, dict]) -> dict:
    """The prompt, processor arguments and comments of the usage snippet. Every modality gets a placeholder and a
    variable; the processor hands the inputs of one keyword (`images=`, ...) to that kind's placeholders in text
    order, so two modalities of one kind share their keyword's list."""
    placeholders, arguments, input_notes = [], {}, []
    image_variable = None
    for name, entry in modalities.items():
        keyword, variable, description = _USAGE_BY_KIND[entry["kind"]]
        if name != entry["kind"]:
            variable = f"{name}_{variable}"  # a modality name is a Python identifier
        image_variable = image_variable or (variable if entry["kind"] == "image" else None)
        placeholders.append(entry["placeholder"])
        arguments.setdefault(keyword, []).append(variable)
        input_notes.append(f"{variable}: {description}, for {entry['placeholder']}")
    question = "What do these have in common?" if len(placeholders) > 1 else "What is this?"
    prompt = f"USER: {' '.join(placeholders)} {question} ASSISTANT:"
    call_arguments = [f"{keyword}=[{', '.join(variables)}]" for keyword, variables in arguments.items()]
    return {
        "prompt": prompt,
        "call_arguments": call_arguments,
        "input_notes": _comment_lines(input_notes),
        "image_variable": image_variable,
    }


def _comment_lines(notes: list[str]) -> list[str]:
    """Notes safe to follow `# ` in Python: one line each (a newline in a name would end the comment)."""
    return [" ".join(note.split()) for note in notes]


def _python_string(text: str) -> str:
    """A Python string literal for `text` (JSON string syntax is a subset of Python's)."""
    return json.dumps(text)


def _number(value: float) -> str:
    """A weight or density as people write it: 0.5, 1, 0.333333."""
    return f"{value:g}"


def _normalize_newlines(text: str) -> str:
    # A stray carriage return would change the line ending that huggingface_hub detects for the whole card.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _markdown_text(text: str) -> str:
    """`text` on one line, with every character that Markdown could interpret escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def _code(text: str, in_table: bool = True) -> str:
    """`text` as an inline code span on one line. The delimiter is longer than any backtick run inside, and in a
    table cell a pipe is escaped (GFM splits cells on pipes even inside code spans)."""
    text = " ".join(text.split())
    ticks = "`" * (_longest_backtick_run(text) + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    if in_table:
        text = text.replace("|", "\\|")
    return f"{ticks}{padding}{text}{padding}{ticks}"


def _fence(text: str) -> str:
    """A code fence that `text` cannot close: at least three backticks, and more than any run inside."""
    return "`" * max(3, _longest_backtick_run(text) + 1)


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)
