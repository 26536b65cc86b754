"""What `device_map` offloading (accelerate: modules on the CPU beside an accelerator, or on disk) needs from the
composite's modules.

An offloaded module keeps its weights on the meta device between forwards; accelerate's hook on each module with
weights of its own loads them for that module's own forward and drops them after. Two kinds of module break that:

- a module that uses its children's weights directly instead of calling them (Qwen2-Audio's encoder moves its inputs
  to `conv1.weight.device` and adds `embed_positions.weight`; a routed projection multiplies by its stacked factors'
  weights): it runs inside `weights_loaded`, which loads every weight below it for its forward (what accelerate's
  `preload_module_classes` does, which transformers does not pass);
- a module with weights of its own beside children with weights (a projector's prefix/suffix tokens, a Q-Former's
  queries, PointBERT's CLS token): `device_map="auto"` may split it, and then its own weights get no hook at all.
  `unsplittable_classes` names them for `_no_split_modules`.
"""

from contextlib import ExitStack, contextmanager
from collections.abc import Iterator

from torch import nn


try:  # accelerate places the modules of a `device_map` load; without it nothing is ever offloaded
    from accelerate.utils import align_module_device
except ImportError:
    align_module_device = None


def is_offloaded(parameter: nn.Parameter) -> bool:
    """Whether `device_map` offloaded this weight (it is on the meta device until its module's hook loads it)."""
    return parameter.device.type == "meta"


@contextmanager
def weights_loaded(*modules: nn.Module) -> Iterator[None]:
    """Within this context every offloaded weight below `modules` is loaded on its execution device (costs their
    weights while it runs; nothing when nothing is offloaded)."""
    with ExitStack() as stack:
        if align_module_device is not None:
            for module in modules:
                for child in module.modules():
                    if any(is_offloaded(parameter) for parameter in child.parameters(recurse=False)):
                        stack.enter_context(align_module_device(child))
        yield


def unsplittable_classes(module: nn.Module) -> set[str]:
    """Class names of the modules below `module` that have weights of their own beside children with weights."""
    classes = set()
    for child in module.modules():
        has_own = any(True for _ in child.parameters(recurse=False))
        if has_own and any(any(True for _ in grandchild.parameters()) for grandchild in child.children()):
            classes.add(type(child).__name__)
    return classes
