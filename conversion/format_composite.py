"""Reader for composites made by this project, so that a composite can be re-weighted (one composite source with a
new weight) or grown by a new source (the composite plus another source).

Its LLM tensors are full weights (`W0 + T`, the text delta folded in); for a DAMC composite the stacked text factors
give the same `T` in low-rank form (needed to route a new DAMC composite) and each modality keeps its own factors.
"""

import copy
import re

from transformers import AutoFeatureExtractor

from modeling_composite.configuration_composite import CompositeMLLMConfig, build_encoder_config
from modeling_composite.feature_extraction_beats import CompositeBeatsFeatureExtractor
from modeling_composite.processing_composite import CompositeMLLMProcessor

from .errors import ConversionError
from .locate import Location
from .recipe import SourceRecipe
from .sources import LowRank, ModalityPart, Source, select_modalities
from .tensors import Lazy, open_model_weights


_ROUTED = re.compile(
    r"^model\.language_model\.(.+)\.(base_layer\.(weight|bias)|text_lora_[AB]\.weight|lora_[AB]\.(\w+)\.weight)$"
)


def read_composite(recipe: SourceRecipe, location: Location) -> Source:
    label = recipe.label
    try:
        config = CompositeMLLMConfig.from_pretrained(location.folder)
    except (ValueError, OSError) as error:
        raise ConversionError(f"{label}: not a readable composite config ({error}).") from None
    store = open_model_weights(location.folder, label)
    full: dict[str, Lazy] = {}
    text_factors: dict[str, dict[str, str]] = {}
    modality_factors: dict[str, dict[str, dict[str, str]]] = {}
    encoders: dict[str, dict[str, Lazy]] = {name: {} for name in config.modalities}
    projectors: dict[str, dict[str, Lazy]] = {name: {} for name in config.modalities}
    for key in store.keys():
        if match := _ROUTED.match(key):
            module, tail = match.group(1), match.group(2)
            if tail.startswith("base_layer."):
                full[f"model.{module}.{match.group(3)}"] = Lazy(store, key)
            elif tail.startswith("text_lora_"):
                text_factors.setdefault(f"model.{module}.weight", {})[tail[len("text_lora_")]] = key
            else:
                modality_factors.setdefault(match.group(4), {}).setdefault(f"model.{module}.weight", {})[tail[5]] = key
        elif key.startswith("model.language_model."):
            full["model." + key[len("model.language_model."):]] = Lazy(store, key)
        elif key == "lm_head.weight":
            full[key] = Lazy(store, key)
        elif key.startswith(("model.encoders.", "model.projectors.")):
            _, group, name, rest = key.split(".", 3)
            if name not in config.modalities:
                raise ConversionError(f"{label}: tensor {key!r} belongs to no modality of its config.")
            (encoders if group == "encoders" else projectors)[name][rest] = Lazy(store, key)
        else:
            raise ConversionError(f"{label}: tensor {key!r} is not part of a composite.")

    text_lora_config = config.text_lora or {}
    text_scaling = text_lora_config.get("alpha", 1.0) / max(text_lora_config.get("r", 1), 1)
    text_lora = {
        module: LowRank(Lazy(store, pair["A"]), Lazy(store, pair["B"]), text_scaling) for module, pair in text_factors.items()
    }
    # A composite's own feature extractor (BEATs' fbank) is remote code of its folder; the installed package has the
    # same class, registered so that the processor loads it from here without running the folder's code.
    AutoFeatureExtractor.register(CompositeMLLMConfig, CompositeBeatsFeatureExtractor, exist_ok=True)
    try:
        processor = CompositeMLLMProcessor.from_pretrained(location.folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise ConversionError(f"{label}: cannot load its processor ({str(error).splitlines()[0]}); the composite folder is incomplete.") from None
    embed_key = "model.language_model.embed_tokens.weight"
    parts = {}
    for name, entry in config.modalities.items():
        lora = entry["lora"]
        factors = {}
        if lora is not None:
            scaling = lora["alpha"] / lora["r"]
            factors = {
                module: LowRank(Lazy(store, pair["A"]), Lazy(store, pair["B"]), scaling)
                for module, pair in modality_factors.get(name, {}).items()
            }
        placeholder_id = entry["placeholder_id"]
        rows = {"model.embed_tokens.weight": Lazy(store, embed_key, lambda t, i=placeholder_id: t[i])}
        if "lm_head.weight" in store:
            rows["lm_head.weight"] = Lazy(store, "lm_head.weight", lambda t, i=placeholder_id: t[i])
        projector = projectors[name]
        prefix, suffix = projector.pop("prefix", None), projector.pop("suffix", None)
        image_processor = None
        if entry["kind"] in ("image", "video"):
            overrides = processor.modalities.get(name, {}).get("image_processor_kwargs") or {}
            shared = processor.image_processor
            image_processor = type(shared).from_dict({**shared.to_dict(), **overrides}) if overrides else copy.deepcopy(shared)
        parts[name] = ModalityPart(
            name=name,
            kind=entry["kind"],
            encoder_config=build_encoder_config(entry["encoder"]),
            encoder_weights=encoders[name],
            projector=entry["projector"],
            projector_bias=entry["projector_bias"],
            projector_options=entry["projector_options"],
            projector_weights=projector,
            feature_layer=entry["feature_layer"],
            feature_select=entry["feature_select"],
            num_frames=entry["num_frames"],
            tokens_per_item=entry["tokens_per_item"],
            prefix=prefix,
            suffix=suffix,
            lora=dict(lora) if lora else None,
            lora_factors=factors,
            placeholder_rows=rows,
            image_processor=image_processor,
            feature_extractor=processor.feature_extractor if entry["kind"] == "audio" else None,
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
    )
