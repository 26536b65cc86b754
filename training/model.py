"""The model a source is trained as: a one-modality composite (base LLM + encoder + projector), to which stage 2 adds
low-rank deltas and learnable prefix/suffix tokens.

- Decoupled (DAMC): a text LoRA used by every text token and a modality LoRA used by the modality's tokens. In the
  composite's terms: an unfolded text delta (`text_lora.folded=False`) plus the modality's own `lora`; the routed
  layers add the text delta to text rows and the modality delta to modality rows.
- Shared (NaiveMC): one LoRA for all tokens, i.e. only the unfolded text delta.
"""

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn
from transformers import (
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.utils import cached_file

from composition.compose import ModalitySpec, compose
from conversion.encoders import not_an_encoder, read_vision_tower
from conversion.errors import ConversionError
from conversion.locate import locate
from conversion.sources import align_encoder_keys
from modeling_composite.configuration_composite import DEFAULT_LORA_TARGET_MODULES
from modeling_composite.configuration_modality import MODALITY_KINDS, parse_feature_layer
from modeling_composite.configuration_point_encoder import CompositePointEncoderConfig
from modeling_composite.modeling_composite import CompositeMLLMForCausalLM, build_encoder
from modeling_composite.modeling_point_encoder import CompositePointEncoder
from modeling_composite.processing_composite import CompositeMLLMProcessor
from modeling_composite.routing import RoutedLinear
from modeling_composite.state_dict_keys import TEXT, TEXT_MODEL_PREFIX, parse_routed_key

from .arguments import SourceModelArguments


logger = logging.getLogger(__name__)
DEFAULT_PLACEHOLDERS = {"image": "<image>", "video": "<video>", "audio": "<audio>", "point": "<point>"}
# Two-tower checkpoints whose vision tower is the encoder.
_TWO_TOWER_TYPES = ("clip", "siglip")
# Encoders that load with AutoModel as they are (their features are counted by `count_encoder_tokens`).
_AUTO_ENCODER_TYPES = ("clip_vision_model", "siglip_vision_model", "qwen2_audio_encoder")
_ENCODERS = (
    "a CLIP or SigLIP checkpoint or vision tower for images and videos, a Qwen2-Audio encoder for audio, or a "
    "composite point encoder for point clouds"
)


class SourceModelError(ValueError):
    """Arguments that cannot build the source model."""


def load_encoder(location: str) -> PreTrainedModel:
    """An encoder folder or Hub id: a vision tower (or a CLIP/SigLIP model, whose vision tower is taken), an audio
    encoder transformers knows, or the project's point encoder. Anything else (a whole multimodal model, an LLM) is
    refused with what to pass instead."""
    label = f"--encoder {location}"
    try:
        config = json.loads(Path(cached_file(location, "config.json")).read_text())
    except (OSError, ValueError) as error:
        raise SourceModelError(f"{label}: no readable config.json ({str(error).splitlines()[0]}).") from error
    model_type = config.get("model_type")
    if model_type == CompositePointEncoderConfig.model_type:
        return CompositePointEncoder.from_pretrained(location)
    if model_type in _TWO_TOWER_TYPES:
        return _vision_tower(location, label)
    if model_type in _AUTO_ENCODER_TYPES:
        return AutoModel.from_pretrained(location)
    raise SourceModelError(f"{not_an_encoder(label, config, _ENCODERS)}.")


def _vision_tower(location: str, label: str) -> PreTrainedModel:
    """The vision tower of a two-tower CLIP / SigLIP checkpoint, read as the converter reads a source's encoder: the
    text tower is left out on purpose (the vision class's `from_pretrained` would report each of its tensors as
    unexpected), and every vision tensor must load. Parameters keep the checkpoint's dtype, as `from_pretrained`'s."""
    try:
        config, weights = read_vision_tower(locate(location, label), label)
    except ConversionError as error:
        raise SourceModelError(str(error)) from None
    encoder = build_encoder(config)
    state = {name: lazy.load() for name, lazy in align_encoder_keys(config, weights, label).items()}
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder.eval()


@contextlib.contextmanager
def _loading(argument: str, location: str) -> Iterator[None]:
    """A folder or Hub id that transformers cannot load (missing, offline, not a model) becomes one line naming the
    argument, instead of an OSError traceback."""
    try:
        yield
    except OSError as error:
        problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SourceModelError(f"{argument} {location}: cannot be loaded ({problem}).") from error


def recorded_reference(location: str) -> str:
    """How a trained source records a model it was built from (config `composition`): a local folder as an absolute
    path, so that later stages and distillation find it from any directory; a Hub id as given."""
    path = Path(location).expanduser()
    return str(path.resolve()) if path.exists() else location


def _preprocessor(kind: str, location: str) -> dict[str, Any]:
    """The image processor (image, video) or feature extractor (audio) saved beside the encoder."""
    try:
        if kind in ("image", "video"):
            return {"image_processor": AutoImageProcessor.from_pretrained(location)}
        if kind == "audio":
            return {"feature_extractor": AutoFeatureExtractor.from_pretrained(location)}
    except (OSError, ValueError) as error:
        raise SourceModelError(
            f"{location}: no {kind} preprocessor config ({str(error).splitlines()[0]}); pass --processor with a "
            "folder that has one."
        ) from error
    return {}


def _feature_layer(value: str | int) -> str | int:
    try:
        return parse_feature_layer(value, from_text=True)
    except ValueError:
        # The parser's message names the config field; this one the argument.
        raise SourceModelError(f"--feature_layer must be 'last' or an integer, got {value!r}.") from None


def _projector_options(text: str | None) -> dict[str, int] | None:
    if text is None:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise SourceModelError(f"--projector_options must be a JSON object, got {text!r} ({error}).") from None
    return options


def build_base_source(args: SourceModelArguments) -> tuple[CompositeMLLMForCausalLM, CompositeMLLMProcessor]:
    """Base LLM + encoder + a fresh projector, as a one-modality composite without low-rank deltas."""
    if args.base_model is None or args.encoder is None:
        raise SourceModelError("Without --init_from, both --base_model and --encoder are needed.")
    encoder = load_encoder(args.encoder)  # first: a wrong --encoder is found before a large LLM loads
    with _loading("--base_model", args.base_model):
        language_model = AutoModelForCausalLM.from_pretrained(args.base_model)
        tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    spec = ModalitySpec(
        kind=args.kind,
        encoder=encoder,
        projector=args.projector,
        placeholder=args.placeholder or DEFAULT_PLACEHOLDERS[args.kind],
        feature_layer=_feature_layer(args.feature_layer),
        feature_select=args.feature_select,
        num_frames=args.num_frames,
        projector_options=_projector_options(args.projector_options),
    )
    preprocessors = _preprocessor(args.kind, args.processor or args.encoder)
    return compose(
        language_model,
        tokenizer,
        {args.modality: spec},
        lora_target_modules=args.lora_target_modules,
        composition={
            "method": "source",
            "base": recorded_reference(args.base_model),
            "encoder": recorded_reference(args.encoder),
        },
        **preprocessors,
    )


def load_source(args: SourceModelArguments) -> tuple[CompositeMLLMForCausalLM, CompositeMLLMProcessor]:
    """The composite given by --init_from; it must have the modality being trained."""
    with _loading("--init_from", args.init_from):
        model = CompositeMLLMForCausalLM.from_pretrained(args.init_from)
        processor = CompositeMLLMProcessor.from_pretrained(args.init_from, trust_remote_code=False)
    entry = model.config.modalities.get(args.modality)
    if entry is None or entry.kind != args.kind:
        found = {name: e.kind for name, e in model.config.modalities.items()}
        raise SourceModelError(
            f"--init_from {args.init_from} has modalities {found}, not {args.modality!r} of kind {args.kind!r}."
        )
    return model, processor


def add_low_rank(
    model: CompositeMLLMForCausalLM, processor: CompositeMLLMProcessor, args: SourceModelArguments
) -> None:
    """Give the source its stage-2 parameters, in place: the text (or shared) LoRA, the modality LoRA when decoupled,
    and the prefix/suffix tokens. PEFT's initialisation (B = 0, zero tokens as in the paper), so the model's outputs
    do not change until it trains. A model that already has them (a stage-2 checkpoint) must have the same ones."""
    config = model.config
    entry = config.modalities[args.modality]
    lora = {"r": args.lora_rank, "alpha": float(args.lora_alpha)}
    wanted_text = {**lora, "folded": False}
    wanted_modality = lora if args.decoupled else None
    if config.has_routed_deltas:
        current = (config.text_lora, entry.lora, entry.prefix_tokens, entry.suffix_tokens)
        if current != (wanted_text, wanted_modality, args.prefix_tokens, args.suffix_tokens):
            raise SourceModelError(
                f"--init_from already has low-rank parameters (text_lora={config.text_lora}, lora={entry.lora}, "
                f"prefix/suffix={entry.prefix_tokens}/{entry.suffix_tokens}) that differ from the arguments; "
                "start from the stage-1 output instead."
            )
        return
    if args.lora_rank < 1:
        raise SourceModelError(f"--lora_rank must be >= 1, got {args.lora_rank}.")
    targets = list(args.lora_target_modules or config.lora_target_modules or DEFAULT_LORA_TARGET_MODULES)
    # Per-delta storage: the text and the modality LoRA are separate parameters, trained at their own learning rates.
    model.model.add_routed_deltas(
        targets,
        text_lora=lora,
        modality_loras={args.modality: lora} if args.decoupled else None,
        lora_layout="per_delta",
        dropout=args.lora_dropout,
    )
    model.model.add_modality_tokens(args.modality, args.prefix_tokens, args.suffix_tokens)
    # The processor must expand each placeholder into the positions the model now fills.
    processor.update_modalities(config)


def trainable_parameter_groups(
    model: CompositeMLLMForCausalLM, modality: str, stage: int
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Freeze everything, then unfreeze and return what the stage trains, by group: `projector` (its linear layers),
    `tokens` (prefix/suffix), `modality_lora` and `text_lora` (the shared LoRA of a NaiveMC source)."""
    if stage not in (1, 2):
        raise SourceModelError(f"--stage must be 1 or 2, got {stage}.")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {
        "projector": [],
        "tokens": [],
        "modality_lora": [],
        "text_lora": [],
    }
    prefix = f"model.projectors.{modality}."
    for name, parameter in model.named_parameters():
        if name.startswith(prefix):
            group = "tokens" if name.endswith(("prefix", "suffix")) else "projector"
            if group == "projector" or stage == 2:
                groups[group].append((name, parameter))
        elif stage == 2 and (routed := parse_routed_key(name, TEXT_MODEL_PREFIX)) and not routed.is_base_layer:
            if routed.delta == TEXT:
                groups["text_lora"].append((name, parameter))
            elif routed.delta == modality:
                groups["modality_lora"].append((name, parameter))
    if stage == 2 and not any(isinstance(module, RoutedLinear) for module in model.modules()):
        raise SourceModelError("Stage 2 needs the low-rank parameters; none were added.")
    for members in groups.values():
        for _, parameter in members:
            parameter.requires_grad_(True)
    counts = {group: sum(p.numel() for _, p in members) for group, members in groups.items() if members}
    logger.info("stage %d trains %s parameters", stage, counts)
    return groups


def build_source_model(
    args: SourceModelArguments, stage: int
) -> tuple[CompositeMLLMForCausalLM, CompositeMLLMProcessor]:
    """The model to train at `stage`: from --init_from, or from --base_model + --encoder; stage 2 adds its LoRAs."""
    if args.kind not in MODALITY_KINDS:
        raise SourceModelError(f"--kind must be one of {list(MODALITY_KINDS)}, got {args.kind!r}.")
    model, processor = load_source(args) if args.init_from else build_base_source(args)
    if stage == 2:
        add_low_rank(model, processor, args)
    return model, processor
