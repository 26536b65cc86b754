"""The composite's state-dict names, in one place: what `save_pretrained` writes for the text model, the encoders, the
projectors and every routed projection (`routing.RoutedLinear`), so that the converter, the composite reader, the
builder and the trainer name tensors the way the model does (a test builds a `RoutedLinear` in both layouts and checks
its keys against these).

A routed projection `<module>` (a decoder layer's `q_proj`, say) keeps

- the original linear as `<module>.base_layer.weight` (and `.bias`), holding `W_text` in a composite;
- with `lora_layout: stacked`, every delta's factors in one pair, `<module>.lora_A.weight` `(R, in)` and
  `<module>.lora_B.weight` `(out, R)` (the text delta's rows first, then each modality's, by name);
- with `lora_layout: per_delta`, each delta in its own pair, as PEFT keys its adapters:
  `<module>.text_lora_A.weight` / `<module>.text_lora_B.weight` for the text delta and
  `<module>.lora_A.<modality>.weight` / `<module>.lora_B.<modality>.weight` for a modality's.
"""

import re
from dataclasses import dataclass


# The name of the text delta among the deltas of a routed projection (modality deltas are named by their modality).
TEXT = "text"
# `RoutedLinear`'s child that holds the original linear.
BASE_LAYER = "base_layer"
FACTOR_SIDES = ("A", "B")
# Where the parts live in a composite's state dict (`CompositeMLLMForCausalLM`).
TEXT_MODEL_PREFIX = "model.language_model."
ENCODERS_PREFIX = "model.encoders."
PROJECTORS_PREFIX = "model.projectors."
LM_HEAD = "lm_head.weight"
# The learnable tokens a projector puts around each item's features (`<projector>.prefix`, `<projector>.suffix`).
PROJECTOR_TOKENS = ("prefix", "suffix")


def base_layer_key(module: str, parameter: str = "weight") -> str:
    """`<module>.base_layer.<parameter>`: the original linear of a routed projection."""
    return f"{module}.{BASE_LAYER}.{parameter}"


def stacked_factor_key(module: str, side: str) -> str:
    """`<module>.lora_A.weight` / `<module>.lora_B.weight` (`lora_layout: stacked`)."""
    return f"{module}.lora_{_side(side)}.weight"


def per_delta_factor_key(module: str, side: str, delta: str) -> str:
    """One delta's factor with `lora_layout: per_delta`: `<module>.text_lora_A.weight` for the text delta,
    `<module>.lora_A.<modality>.weight` for a modality's."""
    if delta == TEXT:
        return f"{module}.text_lora_{_side(side)}.weight"
    return f"{module}.lora_{_side(side)}.{delta}.weight"


def encoder_key(modality: str, key: str) -> str:
    return f"{ENCODERS_PREFIX}{modality}.{key}"


def projector_key(modality: str, key: str) -> str:
    return f"{PROJECTORS_PREFIX}{modality}.{key}"


def is_factor_key(key: str) -> bool:
    """Whether a key (of a text model's or a composite's state dict) is a routed projection's low-rank factor."""
    return _FACTOR_KEY.search(key) is not None


@dataclass(frozen=True)
class RoutedKey:
    """One tensor of a routed projection, as `parse_routed_key` reads it. `side` is None for the base layer; `delta`
    is `TEXT`, a modality's name, or None for a stacked factor (which holds every delta)."""

    module: str
    parameter: str | None = None
    side: str | None = None
    delta: str | None = None

    @property
    def is_base_layer(self) -> bool:
        return self.side is None

    @property
    def stacked(self) -> bool:
        return self.side is not None and self.delta is None


def parse_routed_key(key: str, prefix: str = "") -> RoutedKey | None:
    """Read a routed projection's tensor key (after `prefix`, e.g. `TEXT_MODEL_PREFIX`), or None for any other key.
    `module` is the projection's name without the prefix."""
    if not key.startswith(prefix):
        return None
    match = _ROUTED_KEY.match(key[len(prefix) :])
    if match is None:
        return None
    module = match.group("module")
    if match.group("parameter"):
        return RoutedKey(module, parameter=match.group("parameter"))
    if match.group("text_side"):
        return RoutedKey(module, parameter="weight", side=match.group("text_side"), delta=TEXT)
    return RoutedKey(module, parameter="weight", side=match.group("side"), delta=match.group("delta"))


def _side(side: str) -> str:
    if side not in FACTOR_SIDES:
        raise ValueError(f"A factor's side is 'A' or 'B', got {side!r}.")
    return side


_ROUTED_KEY = re.compile(
    rf"^(?P<module>.+)\.(?:{BASE_LAYER}\.(?P<parameter>weight|bias)"
    r"|text_lora_(?P<text_side>[AB])\.weight"
    r"|lora_(?P<side>[AB])\.(?:(?P<delta>\w+)\.)?weight)$"
)
_FACTOR_KEY = re.compile(r"(?:^|\.)(?:text_)?lora_[AB](?:\.\w+)?\.weight$")
