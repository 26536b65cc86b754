"""What differs between the transformers releases this remote code runs on, in one place.

These files travel inside every composite folder and run under whichever transformers the user has installed, not
the one the composite was made with. Where a newer transformers API is used, the older form is chosen here; below
`MINIMUM_TRANSFORMERS` the composite cannot load, and importing this module says so.
"""

import re

import transformers
from transformers import AutoConfig, PreTrainedConfig


# 5.6 flattened the CLIP/SigLIP vision towers (`vision_model.` left the weight names) that composites are saved with;
# an older release would load such a composite with its vision towers left at random, and before 5.4 configs were
# not dataclasses yet.
MINIMUM_TRANSFORMERS = (5, 6)
# Not for the remote code: the package's conversion and training, tested from 5.23 (5.6 lacks `AutoImageProcessor`'s
# PIL fallback without torchvision, the current Qwen2-Audio layout and `activation_checkpointing`).
TOOLS_MINIMUM_TRANSFORMERS = (5, 23)


def check_transformers_version(
    version: str, minimum: tuple[int, int] = MINIMUM_TRANSFORMERS, needed_by: str = "This composite's remote code"
) -> None:
    """Raise ImportError, naming both versions and the fix, when transformers `version` is older than `minimum`."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match.group(1)), int(match.group(2))) < minimum:
        required = ".".join(map(str, minimum))
        raise ImportError(
            f"{needed_by} needs transformers >= {required}, but transformers {version} is installed: "
            f"pip install -U 'transformers>={required}'."
        )


check_transformers_version(transformers.__version__)


try:  # transformers >= 5.20: sub-configs are declared with a spec (class + default model type)
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # 5.6 - 5.19: a plain `sub_configs` dict of classes
    SubConfigSpec = None


def auto_sub_config(value: dict | PreTrainedConfig | None, default_model_type: str) -> PreTrainedConfig:
    """A sub-config resolved through `AutoConfig` as transformers >= 5.20 resolves a `SubConfigSpec(AutoConfig,
    model_type=...)` field: a config stays as it is, a dict names its `model_type` (else the default), None gives the
    default model type's defaults. The config does it itself so that every release runs the same code."""
    if isinstance(value, PreTrainedConfig):
        return value
    if value is None:
        return AutoConfig.for_model(default_model_type)
    if not isinstance(value, dict):
        raise TypeError(f"A sub-config must be a dict, a PreTrainedConfig or None, got {type(value).__name__}.")
    settings = dict(value)
    return AutoConfig.for_model(settings.pop("model_type", default_model_type), **settings)
