"""Reader for PEFT LoRA adapters on the base LLM (`adapter_config.json` + `adapter_model.safetensors|bin`), as
LLaVA-style LoRA releases publish them, plus a projector file and the vision encoder named in the recipe.

The text delta is `s B A` per adapted layer, with `s = lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA). LoRA
variants whose delta is not `s B A` (DoRA, trained biases, fully trained modules) are refused rather than approximated.
"""

import math
import re
from pathlib import Path

from .encoders import read_vision_encoder
from .errors import ConversionError
from .locate import Location
from .recipe import SourceRecipe
from .sources import LowRank, ModalityPart, Source, read_json, select_modalities
from .tensors import Lazy, TensorStore


_LORA_KEY = re.compile(r"^base_model\.model\.(model\.layers\.\d+\.[\w.]+?)\.lora_([AB])(?:\.default)?\.weight$")
# Projector key layouts in the wild: original LLaVA (`model.mm_projector.0`), LLaVA's LoRA releases
# (`non_lora_trainables.bin`: `base_model.model.model.mm_projector.0`), and transformers'
# (`multi_modal_projector.linear_1`).
_SEQUENTIAL_PROJECTOR = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?mm_projector\.(?:(\d+)\.)?(weight|bias)$")
_NAMED_PROJECTOR = re.compile(r"^(?:model\.)?(?:multi_modal_projector\.)?linear_(\d+)\.(weight|bias)$")
_DEFAULT_PROJECTOR_FILES = ("non_lora_trainables.bin", "mm_projector.safetensors", "mm_projector.bin")


def _adapter_store(location: Location, label: str) -> TensorStore:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (location.folder / name).is_file():
            return TensorStore([location.folder / name], label)
    raise ConversionError(f"{label}: no adapter_model.safetensors / adapter_model.bin next to adapter_config.json.")


def _scaling(config: dict, label: str) -> float:
    for flag, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out layers")):
        if config.get(flag):
            raise ConversionError(f"{label}: {what} adapters are not supported (their delta is not s·B·A).")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise ConversionError(f"{label}: adapters with trained biases or modules_to_save are not supported yet.")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ConversionError(f"{label}: per-layer rank_pattern / alpha_pattern adapters are not supported yet.")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise ConversionError(f"{label}: adapter_config.json needs integer r >= 1 and lora_alpha.")
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _projector_file(recipe: SourceRecipe, location: Location) -> Path:
    if recipe.projector is not None:
        for candidate in (Path(recipe.projector).expanduser(), location.folder / recipe.projector):
            if candidate.is_file():
                return candidate
        raise ConversionError(f"{recipe.label}: the projector file {recipe.projector!r} does not exist.")
    for name in _DEFAULT_PROJECTOR_FILES:
        if (location.folder / name).is_file():
            return location.folder / name
    raise ConversionError(
        f"{recipe.label}: a PEFT source needs its projector weights; "
        "set `projector:` to the file (e.g. mm_projector.bin)."
    )


def _projector(path: Path, label: str) -> tuple[str, bool, dict[str, Lazy]]:
    store = TensorStore([path], f"{label} projector")
    weights = {}
    for key in store.keys():
        if match := _SEQUENTIAL_PROJECTOR.match(key):
            index = int(match.group(1) or 0)
            if index % 2:
                raise ConversionError(f"{label}: projector tensor {key!r} is not at a Linear position (0, 2, 4, ...).")
            weights[f"linear_{index // 2 + 1}.{match.group(2)}"] = Lazy(store, key)
        elif match := _NAMED_PROJECTOR.match(key):
            weights[f"linear_{match.group(1)}.{match.group(2)}"] = Lazy(store, key)
        else:
            raise ConversionError(f"{label}: {path.name} holds {key!r}, which is not a projector tensor.")
    depth = len({name.split(".")[0] for name in weights})
    if depth == 0 or {f"linear_{i}.weight" for i in range(1, depth + 1)} - set(weights):
        raise ConversionError(f"{label}: {path.name} does not hold a complete projector (linear_1 .. linear_N).")
    return ("linear" if depth == 1 else f"mlp{depth}x_gelu"), "linear_1.bias" in weights, weights


def read_peft(recipe: SourceRecipe, location: Location) -> Source:
    label = recipe.label
    config = read_json(location.folder / "adapter_config.json", label)
    if config.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{label}: peft_type {config.get('peft_type')!r} is not supported (LORA only).")
    scaling = _scaling(config, label)
    store = _adapter_store(location, label)
    sides: dict[str, dict[str, str]] = {}
    for key in store.keys():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ConversionError(f"{label}: adapter tensor {key!r} is not a LoRA factor of the LLM's layers.")
        sides.setdefault(f"{match.group(1)}.weight", {})[match.group(2)] = key
    broken = [module for module, pair in sides.items() if set(pair) != {"A", "B"}]
    if broken:
        raise ConversionError(f"{label}: LoRA factors A or B missing at {broken[:2]}.")
    text_lora = {
        module: LowRank(Lazy(store, pair["A"]), Lazy(store, pair["B"]), scaling) for module, pair in sides.items()
    }

    kind = recipe.kind or "image"
    if kind != "image":
        raise ConversionError(
            f"{label}: a PEFT source is read as a LLaVA-style image model (a LoRA plus an image projector); kind "
            f"{kind!r} is not supported for this format. Leave `kind` out, or convert the source to a composite first."
        )
    encoder = read_vision_encoder(recipe.encoder, label)
    spec, bias, projector = _projector(_projector_file(recipe, location), label)
    part = ModalityPart(
        name=kind,
        kind=kind,
        encoder_config=encoder.config,
        encoder_weights=encoder.weights,
        projector=spec,
        projector_bias=bias,
        projector_weights=projector,
        # LLaVA-1.5's choice (the penultimate layer, CLS dropped) unless the recipe says otherwise.
        feature_layer=recipe.feature_layer if recipe.feature_layer is not None else -2,
        feature_select=recipe.feature_select or "patch",
        image_processor=encoder.image_processor,
    )
    return Source(
        recipe=recipe,
        location=location,
        format="peft",
        modalities=select_modalities(recipe, {kind: part}),
        text_lora=text_lora,
    )
