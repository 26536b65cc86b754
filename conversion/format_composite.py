"""Reader for composites made by this project, so that a composite can be re-weighted (one composite source with a
new weight) or grown by a new source (the composite plus another source).

Its LLM tensors are full weights (`W0 + T`, the text delta folded in); for a DAMC composite the text factors give the
same `T` in low-rank form (needed to route a new DAMC composite) and each modality keeps its own factors. Factors are
read in either storage (`lora_layout`): `stacked` (one `lora_A` / `lora_B` pair per projection, sliced into its deltas
by the config's layout) or `per_delta` (`text_lora_[AB]` and `lora_[AB].<modality>`, as trained sources keep them).
"""

import copy

from transformers import AutoFeatureExtractor

from modeling_composite.configuration_composite import CompositeMLLMConfig, build_encoder_config
from modeling_composite.feature_extraction_beats import CompositeBeatsFeatureExtractor
from modeling_composite.modeling_composite import delta_layout
from modeling_composite.processing_composite import CompositeMLLMProcessor
from modeling_composite.state_dict_keys import (
    ENCODERS_PREFIX,
    LM_HEAD,
    PROJECTORS_PREFIX,
    TEXT,
    TEXT_MODEL_PREFIX,
    RoutedKey,
    parse_routed_key,
)

from .errors import ConversionError
from .locate import Location
from .merge import merge_rule
from .recipe import SourceRecipe
from .sources import LowRank, ModalityPart, Source, select_modalities
from .tensors import Lazy, open_model_weights


def read_composite(recipe: SourceRecipe, location: Location) -> Source:
    label = recipe.label
    try:
        config = CompositeMLLMConfig.from_pretrained(location.folder)
    except (ValueError, OSError) as error:
        raise ConversionError(f"{label}: not a readable composite config ({error}).") from None
    store = open_model_weights(location.folder, label)
    full: dict[str, Lazy] = {}
    # Per delta name ("text" or a modality), per base module key: the Lazy A and B of that delta.
    factors: dict[str, dict[str, dict[str, Lazy]]] = {}
    layout = delta_layout(config)
    stacked = config.lora_layout == "stacked"
    encoders: dict[str, dict[str, Lazy]] = {name: {} for name in config.modalities}
    projectors: dict[str, dict[str, Lazy]] = {name: {} for name in config.modalities}
    for key in store.keys():
        if routed := parse_routed_key(key, TEXT_MODEL_PREFIX):
            if routed.is_base_layer:
                full[f"model.{routed.module}.{routed.parameter}"] = Lazy(store, key)
            else:
                _add_factor(factors, store, key, f"model.{routed.module}.weight", routed, layout, stacked, label)
        elif key.startswith(TEXT_MODEL_PREFIX):
            full["model." + key[len(TEXT_MODEL_PREFIX) :]] = Lazy(store, key)
        elif key == LM_HEAD:
            full[key] = Lazy(store, key)
        elif key.startswith((ENCODERS_PREFIX, PROJECTORS_PREFIX)):
            _, group, name, rest = key.split(".", 3)
            if name not in config.modalities:
                raise ConversionError(f"{label}: tensor {key!r} belongs to no modality of its config.")
            (encoders if group == "encoders" else projectors)[name][rest] = Lazy(store, key)
        else:
            raise ConversionError(f"{label}: tensor {key!r} is not part of a composite.")

    text_lora_config = config.text_lora or {}
    text_lora = _low_ranks(factors, TEXT, layout)
    # A composite's own feature extractor (BEATs' fbank) is remote code of its folder; the installed package has the
    # same class, registered so that the processor loads it from here without running the folder's code.
    AutoFeatureExtractor.register(CompositeMLLMConfig, CompositeBeatsFeatureExtractor, exist_ok=True)
    try:
        processor = CompositeMLLMProcessor.from_pretrained(location.folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise ConversionError(
            f"{label}: cannot load its processor ({str(error).splitlines()[0]}); the composite folder is incomplete."
        ) from error
    embed_key = "model.language_model.embed_tokens.weight"
    parts = {}
    for name, entry in config.modalities.items():
        lora = entry.lora
        placeholder_id = entry.placeholder_id
        rows = {"model.embed_tokens.weight": Lazy(store, embed_key, lambda t, i=placeholder_id: t[i])}
        if "lm_head.weight" in store:
            rows["lm_head.weight"] = Lazy(store, "lm_head.weight", lambda t, i=placeholder_id: t[i])
        projector = projectors[name]
        prefix, suffix = projector.pop("prefix", None), projector.pop("suffix", None)
        image_processor = None
        if entry.kind in ("image", "video"):
            overrides = processor.modalities.get(name, {}).get("image_processor_kwargs") or {}
            shared = processor.image_processor
            image_processor = (
                type(shared).from_dict({**shared.to_dict(), **overrides}) if overrides else copy.deepcopy(shared)
            )
        parts[name] = ModalityPart(
            name=name,
            kind=entry.kind,
            encoder_config=build_encoder_config(entry.encoder),
            encoder_weights=encoders[name],
            projector=entry.projector,
            projector_bias=entry.projector_bias,
            projector_options=entry.projector_options,
            projector_weights=projector,
            feature_layer=entry.feature_layer,
            feature_select=entry.feature_select,
            num_frames=entry.num_frames,
            tokens_per_item=entry.tokens_per_item,
            prefix=prefix,
            suffix=suffix,
            lora=dict(lora) if lora else None,
            lora_factors=_low_ranks(factors, name, layout) if lora is not None else {},
            placeholder_rows=rows,
            image_processor=image_processor,
            feature_extractor=processor.feature_extractor if entry.kind == "audio" else None,
        )
    return Source(
        recipe=recipe,
        location=location,
        format="composite",
        modalities=select_modalities(recipe, parts),
        text_config=config.get_text_config(),
        tokenizer=processor.tokenizer,
        full_weights=full,
        text_lora=text_lora,
        decoupled=any(part.lora for part in parts.values()),
        text_lora_unfolded=not text_lora_config.get("folded", True),
        text_lora_exact=_text_lora_exact(config.composition),
    )


def _text_lora_exact(composition: dict) -> bool:
    """Whether a composite's text factors are exactly its merged text delta, from its provenance: a rule whose merge
    is a weighted sum (linear), and under method routed a text block that kept all of the merged delta (composites
    without provenance are taken as DAMC's linear default)."""
    kept = ((composition.get("routing") or {}).get("text") or {}).get("energy_kept")
    rule = merge_rule(composition.get("rule", "linear"))
    return rule is not None and rule.is_weighted_sum and kept in (None, 1.0)


def _add_factor(
    factors: dict, store, key: str, module_key: str, routed: RoutedKey, layout, stacked: bool, label: str
) -> None:
    """File one factor tensor under the delta(s) it holds: a stacked factor is sliced into every delta of the layout
    (A by rows, B by columns); a per-delta factor names its delta."""
    side, name = routed.side, routed.delta
    names = [block.name for block in layout.blocks] if layout is not None else []
    if name is not None and name not in names:
        raise ConversionError(
            f"{label}: tensor {key!r} is a factor of {name!r}, a delta its config does not have {names}."
        )
    if stacked != routed.stacked:
        storage = "stacked" if stacked else "per_delta"
        raise ConversionError(f"{label}: tensor {key!r} does not fit its config's lora_layout {storage!r}.")
    if not stacked:
        factors.setdefault(name, {}).setdefault(module_key, {})[side] = Lazy(store, key)
        return
    rows, columns = store.shape(key)
    for block in layout.blocks:
        span = slice(block.start, block.stop)
        if side == "A":
            lazy = Lazy(store, key, lambda tensor, span=span: tensor[span], shape=(block.rank, columns))
        else:
            lazy = Lazy(store, key, lambda tensor, span=span: tensor[:, span], shape=(rows, block.rank))
        factors.setdefault(block.name, {}).setdefault(module_key, {})[side] = lazy


def _low_ranks(factors: dict, name: str, layout) -> dict[str, LowRank]:
    """The LowRank delta of `name` on every module that has one, with the layout's scaling for it."""
    if layout is None or not any(block.name == name for block in layout.blocks):
        return {}
    scaling = layout.block(name).scaling
    return {module: LowRank(pair["A"], pair["B"], scaling) for module, pair in factors.get(name, {}).items()}
