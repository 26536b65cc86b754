"""Readers for transformers-native multimodal models: LLaVA, Video-LLaVA and Qwen2-Audio.

Their LLMs are full fine-tunes of the base, so a source's text delta is `W_source - W_base`. Each reader is one
explicit key map; both the current layout (`model.language_model.*`, `lm_head.weight`) and the older one that many
Hub checkpoints still have (`language_model.model.*`, `language_model.lm_head.weight`) are accepted.
"""

import copy
import logging
from types import SimpleNamespace

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from composition.image_processor import CLIP_IMAGE_SETTINGS, clip_image_processor

from .errors import ConversionError
from .locate import Location
from .recipe import SourceRecipe
from .sources import ModalityPart, Source, lazy_map, load_config, map_keys, select_modalities
from .tensors import Lazy, TensorStore, open_model_weights


logger = logging.getLogger(__name__)

# (current prefix, older prefix) of the parts every one of these models has.
_LLM_PREFIXES = (("model.language_model.", "language_model.model."),)
_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")


def _rules(towers: dict[str, str]) -> list[tuple[str, str]]:
    """Prefix rules for `map_keys`: the LLM, the LM head, each tower (attribute -> group) and the projector."""
    rules = [("model.language_model.", "llm"), ("language_model.model.", "llm")]
    rules += [(head, "head") for head in _HEAD_KEYS]
    for attribute, group in towers.items():
        rules += [(f"model.{attribute}.", group), (f"{attribute}.", group)]
    rules += [("model.multi_modal_projector.", "projector"), ("multi_modal_projector.", "projector")]
    return rules


def _llm_weights(store: TensorStore, groups: dict[str, dict[str, str]]) -> dict[str, Lazy]:
    weights = {f"model.{name}": Lazy(store, key) for name, key in groups["llm"].items()}
    for key in groups["head"].values():
        weights["lm_head.weight"] = Lazy(store, key)
    return weights


def _placeholder_rows(store: TensorStore, groups: dict[str, dict[str, str]], token_id: int) -> dict[str, Lazy]:
    rows = {"model.embed_tokens.weight": Lazy(store, groups["llm"]["embed_tokens.weight"], lambda t: t[token_id])}
    for key in groups["head"].values():
        rows["lm_head.weight"] = Lazy(store, key, lambda t: t[token_id])
    return rows


def _processor(location: Location, label: str, image_only: bool = False):
    """The source's processor; with `image_only`, just its tokenizer and image processor (Video-LLaVA's full
    processor needs torchvision for its video part, which the composite does not use: frames go through the image
    processor)."""
    try:
        if image_only:
            return SimpleNamespace(
                tokenizer=AutoTokenizer.from_pretrained(location.folder, trust_remote_code=False),
                image_processor=AutoImageProcessor.from_pretrained(location.folder, trust_remote_code=False),
            )
        return AutoProcessor.from_pretrained(location.folder, trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(
            f"{label}: cannot load its processor ({first_line}); the folder needs its processor files."
        ) from error


def _feature_strategy(config, label: str) -> tuple[int, str]:
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ConversionError(
            f"{label}: vision_feature_layer {layer!r} (several layers concatenated) is not supported."
        )
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ConversionError(
            f"{label}: vision_feature_select_strategy {strategy!r} is not supported (default | full)."
        )
    return layer, "patch" if strategy == "default" else "full"


def _projector(
    groups: dict[str, dict[str, str]], store: TensorStore, label: str, act: str | None
) -> tuple[str, bool, dict]:
    """LLaVA-style `linear_1 .. linear_N` (GELU between) → `mlp{N}x_gelu`, or a single `linear` → `linear`."""
    if act is not None and act not in ("gelu",):
        raise ConversionError(f"{label}: projector activation {act!r} is not supported (only gelu, as LLaVA's).")
    names = groups["projector"]
    if set(names) <= {"linear.weight", "linear.bias"}:
        weights = {name.replace("linear.", "linear_1."): Lazy(store, key) for name, key in names.items()}
        return "linear", "linear.bias" in names, weights
    depth = len({name.split(".")[0] for name in names})
    expected = {f"linear_{index}.weight" for index in range(1, depth + 1)}
    if not expected <= set(names) or set(names) - expected - {name.replace("weight", "bias") for name in expected}:
        raise ConversionError(f"{label}: unexpected projector tensors {sorted(names)}.")
    spec = "linear" if depth == 1 else f"mlp{depth}x_gelu"
    return spec, "linear_1.bias" in names, lazy_map(store, names)


def _full_fine_tune(
    recipe: SourceRecipe, location: Location, fmt: str, parts: dict, config, store, groups, tokenizer
) -> Source:
    return Source(
        recipe=recipe,
        location=location,
        format=fmt,
        modalities=select_modalities(recipe, parts),
        text_config=config.text_config,
        tokenizer=tokenizer,
        full_weights=_llm_weights(store, groups),
    )


def _open(recipe: SourceRecipe, location: Location, towers: dict[str, str]) -> tuple:
    """The source's config, its tensors, and its keys sorted by part (`llm`, `head`, each tower, `projector`)."""
    config = load_config(location.folder, recipe.label)
    store = open_model_weights(location.folder, recipe.label)
    return config, store, map_keys(store, _rules(towers), recipe.label)


def read_llava(recipe: SourceRecipe, location: Location) -> Source:
    label = recipe.label
    config, store, groups = _open(recipe, location, {"vision_tower": "vision"})
    processor = _processor(location, label)
    layer, select = _feature_strategy(config, label)
    spec, bias, projector = _projector(groups, store, label, config.projector_hidden_act)
    part = ModalityPart(
        name="image",
        kind="image",
        encoder_config=copy.deepcopy(config.vision_config),
        encoder_weights=lazy_map(store, groups["vision"]),
        projector=spec,
        projector_bias=bias,
        projector_weights=projector,
        feature_layer=layer,
        feature_select=select,
        placeholder_rows=_placeholder_rows(store, groups, config.image_token_id),
        image_processor=processor.image_processor,
    )
    return _full_fine_tune(recipe, location, "llava", {"image": part}, config, store, groups, processor.tokenizer)


def read_video_llava(recipe: SourceRecipe, location: Location) -> Source:
    label = recipe.label
    config, store, groups = _open(recipe, location, {"image_tower": "image", "video_tower": "video"})
    processor = _processor(location, label, image_only=True)
    layer, select = _feature_strategy(config, label)
    spec, bias, projector = _projector(groups, store, label, config.projector_hidden_act)
    vision = config.vision_config
    # Video-LLaVA keeps every frame's CLS token and fixes the frame count through video_seq_length.
    per_frame = (vision.image_size // vision.patch_size) ** 2 + 1
    if config.video_seq_length % per_frame:
        raise ConversionError(
            f"{label}: video_seq_length {config.video_seq_length} is not a whole number of frames of "
            f"{per_frame} tokens."
        )
    # Video-LLaVA's image processor is CLIP's with a different output name; the composite uses CLIP's.
    settings = {key: value for key, value in processor.image_processor.to_dict().items() if key in CLIP_IMAGE_SETTINGS}
    image_processor = clip_image_processor(**settings)
    parts = {}
    for kind in ("image", "video"):
        # One projector serves both towers in Video-LLaVA; each modality of the composite gets its own copy.
        parts[kind] = ModalityPart(
            name=kind,
            kind=kind,
            encoder_config=copy.deepcopy(vision),
            encoder_weights=lazy_map(store, groups[kind]),
            projector=spec,
            projector_bias=bias,
            projector_weights=dict(projector),
            feature_layer=layer,
            feature_select=select if kind == "image" else "full",
            num_frames=config.video_seq_length // per_frame if kind == "video" else None,
            placeholder_rows=_placeholder_rows(
                store, groups, config.image_token_id if kind == "image" else config.video_token_id
            ),
            image_processor=image_processor,
        )
    return _full_fine_tune(recipe, location, "video_llava", parts, config, store, groups, processor.tokenizer)


def read_qwen2_audio(recipe: SourceRecipe, location: Location) -> Source:
    label = recipe.label
    config, store, groups = _open(recipe, location, {"audio_tower": "audio"})
    processor = _processor(location, label)
    spec, bias, projector = _projector(groups, store, label, None)
    tokenizer = processor.tokenizer
    embed_key = groups["llm"]["embed_tokens.weight"]
    # Qwen2-Audio wraps every clip's features in <|audio_bos|> ... <|audio_eos|>; their trained embeddings become the
    # modality's one-token prefix and suffix, so a composite prompt holds just the placeholder.
    boundary = {}
    for side, token in (("prefix", processor.audio_bos_token), ("suffix", processor.audio_eos_token)):
        token_id = tokenizer.convert_tokens_to_ids(token)
        boundary[side] = Lazy(
            store, embed_key, lambda t, i=token_id: t[i : i + 1], shape=(1, config.text_config.hidden_size)
        )
    part = ModalityPart(
        name="audio",
        kind="audio",
        encoder_config=copy.deepcopy(config.audio_config),
        encoder_weights=lazy_map(store, groups["audio"]),
        projector=spec,
        projector_bias=bias,
        projector_weights=projector,
        prefix=boundary["prefix"],
        suffix=boundary["suffix"],
        placeholder_rows=_placeholder_rows(store, groups, config.audio_token_id),
        feature_extractor=processor.feature_extractor,
    )
    return _full_fine_tune(recipe, location, "qwen2_audio", {"audio": part}, config, store, groups, tokenizer)
