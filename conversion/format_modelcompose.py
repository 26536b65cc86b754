"""Reader for the paper's released checkpoints (THUNLP-MT/ModelCompose, Hub repo `Adu2021/ModelCompose`).

A folder holds `adapter_model.bin` (a plain state dict, no `base_model.model.` prefix) and `config.json`:

- LoRA factors on the LLM's projections, `model.layers.{i}.{self_attn,mlp}.{proj}.lora_{A,B}.{adapter}.weight`, where
  adapter `default` is the text LoRA and `vision` / `audio` / `video` / `point` the modality LoRA (DAMC checkpoints);
  one scale `lora_alpha / lora_r` for all of them;
- projectors `model.modal_projectors.{m}.*` (an `nn.Sequential` for `mlp{N}x_gelu`: Linear at 0, 2, 4, ...);
- DAMC's learnable tokens `prefix_tokens.{m}` / `suffix_tokens.{m}` of shape (1, n, hidden).

The encoders are not in the checkpoint: the config names them by a local path of the authors' machines, so the recipe
says which encoder to use (`encoder:`). `lora_strategy` tells the kind: `modal+language` (DAMC: text and modality
LoRA), `same` (NaiveMC: one LoRA for all tokens), `modal` (modality LoRA only, text frozen).
"""

import logging
import re

from .encoder_beats import read_beats_encoder
from .encoder_languagebind import read_languagebind_video_encoder
from .encoder_pointbert import read_pointbert_encoder
from .encoders import read_vision_encoder
from .projector_qformer import check_qformer_spec, infer_qformer_shape, qformer_projector_weights
from .errors import ConversionError
from .locate import Location
from .recipe import SourceRecipe
from .sources import LowRank, ModalityPart, Source, read_json, select_modalities
from .tensors import Lazy, TensorStore


_ENCODER_READERS = {
    "image": read_vision_encoder,
    "audio": read_beats_encoder,
    "video": read_languagebind_video_encoder,
    "point": read_pointbert_encoder,
}


logger = logging.getLogger(__name__)

PAPER_KINDS = {"vision": "image", "audio": "audio", "video": "video", "point": "point"}
_LORA_KEY = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.\w+)\.lora_([AB])\.([\w-]+)\.weight$")
_PROJECTOR_KEY = re.compile(r"^model\.modal_projectors\.(\w+)\.(?:(\d+)\.)?(weight|bias)$")
_TOKENS_KEY = re.compile(r"^(prefix|suffix)_tokens\.(\w+)$")
# The audio Q-Former's tensors are named `model.modal_projectors.audio.audio_{Qformer,query_tokens,...}`.
_QFORMER_KEY = re.compile(
    r"^model\.modal_projectors\.(\w+)\.((?:audio_Qformer|audio_query_tokens|audio_llama_proj|audio_position_embedding)\b.*)$"
)
# Config fields naming the projector type and the feature selection per paper modality.
_PROJECTOR_FIELD = {
    "vision": "mm_projector_type",
    "audio": "mm_audio_projector_type",
    "video": "mm_video_projector_type",
    "point": "mm_point_projector_type",
}
_STRATEGIES = ("modal+language", "same", "modal", "none", None)


def _weights_file(location: Location, label: str):
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (location.folder / name).is_file():
            return location.folder / name
    raise ConversionError(f"{label}: no adapter_model.bin / adapter_model.safetensors in {location.folder}.")


def _projector_spec(config: dict, modality: str, indices: list[int | None], label: str) -> str:
    spec = config.get(_PROJECTOR_FIELD[modality]) or "linear"
    match = re.match(r"^mlp(\d+)x_gelu$", spec)
    if spec == "linear":
        expected = [None]
    elif match:
        expected = [2 * index for index in range(int(match.group(1)))]
    else:
        raise ConversionError(
            f"{label}: projector type {spec!r} of {modality} is not supported (linear | mlpNx_gelu)."
        )
    if sorted(indices, key=lambda i: -1 if i is None else i) != expected:
        raise ConversionError(f"{label}: the {modality} projector's tensors do not match its type {spec!r}.")
    return spec


def read_modelcompose(recipe: SourceRecipe, location: Location) -> Source:
    label = recipe.label
    config = read_json(location.folder / "config.json", label) if (location.folder / "config.json").is_file() else None
    if config is None:
        raise ConversionError(f"{label}: no config.json (the paper's checkpoints carry one with lora_r / lora_alpha).")
    strategy = config.get("lora_strategy")
    if strategy not in _STRATEGIES:
        raise ConversionError(f"{label}: lora_strategy {strategy!r} is unknown (expected one of {_STRATEGIES[:-1]}).")
    if (location.folder / "non_lora_trainables.bin").is_file():
        raise ConversionError(
            f"{label}: has non_lora_trainables.bin, which this reader does not place yet; convert it without that "
            "file only if you know its tensors are not needed."
        )
    store = TensorStore([_weights_file(location, label)], label)
    scaling = float(config.get("lora_alpha", 256)) / float(config.get("lora_r", 128))

    factors: dict[str, dict[str, dict[str, str]]] = {}  # adapter -> module -> {"A": key, "B": key}
    projectors: dict[str, dict[int | None, dict[str, str]]] = {}
    tokens: dict[str, dict[str, str]] = {}
    qformers: dict[str, dict[str, str]] = {}  # modality -> {key after `model.modal_projectors.<m>.`: key}
    unknown = []
    for key in store.keys():
        if match := _LORA_KEY.match(key):
            module, side, adapter = match.groups()
            factors.setdefault(adapter, {}).setdefault(f"{module}.weight", {})[side] = key
        elif match := _QFORMER_KEY.match(key):
            qformers.setdefault(match.group(1), {})[match.group(2)] = key
        elif match := _PROJECTOR_KEY.match(key):
            modality, index, kind = match.groups()
            projectors.setdefault(modality, {}).setdefault(None if index is None else int(index), {})[kind] = key
        elif match := _TOKENS_KEY.match(key):
            tokens.setdefault(match.group(2), {})[match.group(1)] = key
        else:
            unknown.append(key)
    merged = [adapter for adapter in factors if adapter.startswith("default-")]
    if merged:
        raise ConversionError(
            f"{label}: holds merged adapters {merged}; give the unimodal checkpoints it was made from."
        )
    strange = sorted(set(factors) - {"default", *PAPER_KINDS} | (set(projectors) | set(qformers)) - set(PAPER_KINDS))
    if unknown or strange:
        raise ConversionError(f"{label}: tensors this format does not know: {(unknown + strange)[:3]}.")
    for adapter, modules in factors.items():
        broken = [module for module, sides in modules.items() if set(sides) != {"A", "B"}]
        if broken:
            raise ConversionError(f"{label}: LoRA {adapter!r} lacks A or B at {broken[:2]}.")

    def low_rank(adapter: str) -> dict[str, LowRank]:
        return {
            module: LowRank(Lazy(store, sides["A"]), Lazy(store, sides["B"]), scaling)
            for module, sides in factors.get(adapter, {}).items()
        }

    if not projectors and not qformers:
        raise ConversionError(f"{label}: no modality projector found (model.modal_projectors.*).")
    paper_modalities = sorted(set(projectors) | set(qformers))
    available = sorted(PAPER_KINDS[modality] for modality in paper_modalities)
    unknown = [name for name in recipe.modalities or [] if name not in available]
    if unknown:
        # Parts not taken are skipped before `select_modalities`, which would then list none: say it here.
        raise ConversionError(
            f"{label}: `modalities` names {unknown}, but this source has {available} (the paper's vision is called "
            "image here; audio, video and point keep their names)."
        )
    parts = {}
    for modality in paper_modalities:
        kind = PAPER_KINDS[modality]
        if recipe.modalities is not None and kind not in recipe.modalities:
            continue  # not taken: its encoder is never read
        modality_lora = low_rank(modality) if strategy in ("modal+language", "modal") else {}
        parts[kind] = _modality_part(
            recipe,
            config,
            modality,
            projectors.get(modality),
            qformers.get(modality),
            store,
            tokens,
            modality_lora,
            scaling,
            label,
        )
    used = {"default"} if strategy in ("modal+language", "same") else set()
    if strategy in ("modal+language", "modal"):
        used |= set(projectors) | set(qformers)
    unused = sorted(set(factors) - used)
    if unused:
        raise ConversionError(
            f"{label}: LoRA adapters {unused} are not used under lora_strategy {strategy!r} (or have no projector); "
            "fix lora_strategy in its config.json (modal+language for DAMC checkpoints, same for NaiveMC ones)."
        )
    text_lora = low_rank("default") if strategy in ("modal+language", "same") else {}
    decoupled = strategy in ("modal+language", "modal") and any(part.lora for part in parts.values())
    return Source(
        recipe=recipe,
        location=location,
        format="modelcompose",
        modalities=select_modalities(recipe, parts),
        text_lora=text_lora,
        decoupled=decoupled,
    )


def _modality_part(
    recipe: SourceRecipe,
    config: dict,
    modality: str,
    layers: dict[int | None, dict[str, str]] | None,
    qformer_keys: dict[str, str] | None,
    store: TensorStore,
    tokens: dict[str, dict[str, str]],
    modality_lora: dict[str, LowRank],
    scaling: float,
    label: str,
) -> ModalityPart:
    """One modality of a paper checkpoint: its encoder (read from the recipe's `encoder:`), projector, learnable
    tokens and (DAMC) LoRA, with the feature selection the paper's code applies to that modality."""
    kind = PAPER_KINDS[modality]
    if layers is not None and qformer_keys is not None:
        raise ConversionError(f"{label}: the {modality} projector mixes Q-Former and linear tensors.")
    encoder = _ENCODER_READERS[kind](recipe.encoder, label)
    projector_options = None
    if qformer_keys is not None:
        shape = infer_qformer_shape(store, qformer_keys, label)
        check_qformer_spec(shape, config.get(_PROJECTOR_FIELD[modality]) or "", label)
        spec, bias = shape.spec, True
        projector_weights = {
            f"qformer.{name}": lazy for name, lazy in qformer_projector_weights(store, qformer_keys, label).items()
        }
        projector_options = {
            "num_positions": shape.num_positions,
            "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size,
        }
    else:
        spec = _projector_spec(config, modality, list(layers), label)
        bias = "bias" in next(iter(layers.values()))
        projector_weights = {}
        for index, tensors in layers.items():
            linear = 1 if index is None else index // 2 + 1
            for kind_name, key in tensors.items():
                projector_weights[f"linear_{linear}.{kind_name}"] = Lazy(store, key)
    side_tokens = {
        side: Lazy(store, key, lambda t: t.reshape(-1, t.shape[-1]), shape=tuple(store.shape(key)[1:]))
        for side, key in tokens.get(modality, {}).items()
    }
    layer, select, num_frames = _feature_selection(kind, config, encoder, label)
    rank = next(iter(modality_lora.values())).rank if modality_lora else None
    if kind == "image" and config.get("image_aspect_ratio") == "pad":
        # A fact about every paper vision checkpoint, not a problem of this run: the model card states it too.
        logger.info(
            "%s: the paper pads images to a square (mean colour) before resizing; the composite's processor "
            "resizes and centre-crops. Pad images yourself to match the paper exactly.",
            label,
        )
    # Named by kind (`image`, with placeholder `<image>`, as the paper's prompts write it), not `vision`.
    return ModalityPart(
        name=kind,
        kind=kind,
        encoder_config=encoder.config,
        encoder_weights=encoder.weights,
        projector=spec,
        projector_bias=bias,
        projector_weights=projector_weights,
        projector_options=projector_options,
        feature_layer=recipe.feature_layer if recipe.feature_layer is not None else layer,
        feature_select=recipe.feature_select or select,
        num_frames=num_frames,
        prefix=side_tokens.get("prefix"),
        suffix=side_tokens.get("suffix"),
        lora={"r": rank, "alpha": scaling * rank} if rank else None,
        lora_factors=modality_lora,
        image_processor=encoder.image_processor if kind in ("image", "video") else None,
        feature_extractor=encoder.image_processor if kind == "audio" else None,
    )


def _feature_selection(kind: str, config: dict, encoder, label: str) -> tuple[int | str, str, int | None]:
    """(feature layer, feature select, frames) as the paper's encoder wrappers take features: images from
    `mm_vision_select_layer` without CLS (`patch`); videos from `mm_video_select_layer` with every token of every frame
    (its wrapper ignores `mm_video_select_feature`); BEATs and PointBERT their final output, whole. The tokens per
    item follow from these and the encoder (`count_encoder_tokens`)."""
    if kind == "image":
        select = config.get("mm_vision_select_feature", "patch")
        if select not in ("patch", "cls_patch"):
            raise ConversionError(
                f"{label}: mm_vision_select_feature {select!r} is not supported (patch | cls_patch)."
            )
        return config.get("mm_vision_select_layer", -2), "patch" if select == "patch" else "full", None
    if kind == "video":
        return config.get("mm_video_select_layer", -2), "full", encoder.config.num_frames
    return "last", "full", None
