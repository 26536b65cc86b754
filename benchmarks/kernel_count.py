"""Kernels a DAMC composite launches beyond the same composite without routed deltas (NaiveMC), counted on the CPU.

On a GPU a kernel launch costs about as much as a small matmul and a host sync stalls the pipeline, so what routing
costs is counted where it can be counted anywhere: the ATen operators the text model dispatches in one forward pass
(a `TorchDispatchMode` sees each one; views such as `view`, `t`, `slice` launch no kernel and are left out), and the
operators whose output shape depends on data (`nonzero`, `unique`, `.item()` / `.tolist()` as
`_local_scalar_dense`), which force a host sync.

For 1, 2, 4 and 8 image modalities, with the modality tokens in one contiguous stretch or in 16 interleaved runs, the
table gives the operators of the NaiveMC and the DAMC composite's text model in one prefill, the extra ones per
routed projection, the data-dependent ones inside the text model (transformers' own mask code has one in both), and
the operators that building the routing plan costs outside it (once per forward). Then one decode step, which must
cost exactly the NaiveMC composite's operators. Both composites read their placeholder counts and the routed span
with one `.tolist()` per prefill (one host sync, outside the text model; a CPU `tolist` dispatches no operator).

    python -m benchmarks.kernel_count [--lora-layout stacked|per_delta]
"""

import argparse
import collections
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from composition.compose import ModalitySpec, compose
from fixtures.tiny_composite import IMAGE_SIZE, tiny_image_processor, tiny_llm, tiny_tokenizer, tiny_vision_encoder
from modeling_composite.modeling_composite import CACHE_NAME, CompositeMLLMForCausalLM
from modeling_composite.processing_composite import CompositeMLLMProcessor


MODALITY_COUNTS = (1, 2, 4, 8)
LAYOUTS = ("contiguous", "interleaved")
INTERLEAVED_RUNS = 16
# Operators whose output shape depends on the data (or that read a value back to the host): each forces a sync.
DATA_DEPENDENT = ("nonzero", "_local_scalar_dense", "_unique", "unique_consecutive", "masked_select", "unique_dim")


def _is_view(operator: torch._ops.OpOverload) -> bool:
    returns = operator._schema.returns
    return bool(returns) and all(ret.alias_info is not None and not ret.alias_info.is_write for ret in returns)


class OperatorCounter(TorchDispatchMode):
    """Counts the non-view operators dispatched while it is entered."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _is_view(func):
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_text_model_operators(model: CompositeMLLMForCausalLM, run: Callable[[], object]) -> collections.Counter:
    """The operators `model`'s text model dispatches during `run()` (the counter is entered and left around the
    text model's forward by hooks, so the encoders run at full speed)."""
    counter = OperatorCounter()
    language_model = model.model.language_model

    def enter(*_) -> None:  # a pre-hook that returned the mode would replace the forward's arguments
        counter.__enter__()

    def leave(*_) -> None:
        counter.__exit__(None, None, None)

    hooks = [language_model.register_forward_pre_hook(enter), language_model.register_forward_hook(leave)]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return counter.counts


def data_dependent(counts: collections.Counter) -> int:
    return sum(count for name, count in counts.items() if name.startswith(DATA_DEPENDENT))


def build_composites(
    modalities: int, rank: int = 8, lora_layout: str = "stacked"
) -> tuple[CompositeMLLMForCausalLM, CompositeMLLMForCausalLM, CompositeMLLMProcessor]:
    """A DAMC composite of `modalities` image modalities (`m0`, `m1`, ...; 16 tokens per image, each with its own
    rank-`rank` delta and a stacked text delta of rank `rank` per modality, as from one source each) and the NaiveMC
    composite of the same parts, with random deltas."""
    encoder = tiny_vision_encoder()

    def specs(lora: dict | None) -> dict[str, ModalitySpec]:
        return {
            f"m{index}": ModalitySpec(
                kind="image", encoder=encoder, feature_layer=-2, feature_select="patch", lora=lora
            )
            for index in range(modalities)
        }

    common = dict(image_processor=tiny_image_processor())
    naive, processor = compose(tiny_llm(), tiny_tokenizer(), specs(None), **common)
    text_lora = {"r": rank * modalities, "alpha": float(rank * modalities), "folded": True}
    damc, _ = compose(
        tiny_llm(),
        tiny_tokenizer(),
        specs({"r": rank, "alpha": 2.0 * rank}),
        text_lora=text_lora,
        lora_layout=lora_layout,
        **common,
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for factor in (factor for layer in damc.model.routed_layers() for factor in layer.factor_parameters()):
            factor.copy_(torch.randn(factor.shape, generator=generator) * 0.1)
    return damc.eval(), naive.eval(), processor


def prompt_batch(processor: CompositeMLLMProcessor, modalities: int, layout: str) -> dict:
    """Contiguous: every modality's image back to back, then a question. Interleaved: 16 images taking turns across
    the modalities, each run of 16 image tokens followed by a word of text."""
    items = modalities if layout == "contiguous" else INTERLEAVED_RUNS
    names = [f"m{item % modalities}" for item in range(items)]
    separator = " " if layout == "contiguous" else " and "
    text = "USER: " + separator.join(f"<{name}>" for name in names) + " What do they share? ASSISTANT:"
    generator = torch.Generator().manual_seed(1)
    images = {name: [] for name in dict.fromkeys(names)}
    for name in names:
        images[name].append(torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator))
    batch = processor(text=text, images=[image for name in names for image in [images[name].pop(0)]])
    return dict(batch)


def measure(modalities: int, layout: str, lora_layout: str = "stacked") -> dict:
    damc, naive, processor = build_composites(modalities, lora_layout=lora_layout)
    batch = prompt_batch(processor, modalities, layout)
    inside = {
        label: count_text_model_operators(model, lambda model=model: model(**batch))
        for label, model in (("naive", naive), ("damc", damc))
    }
    routed = len(damc.model.routed_layers())
    with torch.no_grad():
        index = damc(**batch).modality_index
        plan_counter = OperatorCounter()
        with plan_counter:
            damc.model.plan_routing(index)
    decode = {}
    for label, model in (("naive", naive), ("damc", damc)):
        cache = DynamicCache(config=model.config.get_text_config())
        with torch.no_grad():
            prefill = model(**batch, use_cache=True, **{CACHE_NAME: cache})
        step = {"input_ids": prefill.logits[:, -1:].argmax(-1), "use_cache": True, CACHE_NAME: cache}
        decode[label] = count_text_model_operators(model, lambda model=model, step=step: model(**step))
    return {
        "modalities": modalities,
        "layout": layout,
        "tokens": batch["input_ids"].shape[1],
        "modality_tokens": int((index > 0).sum()),
        "routed_projections": routed,
        "naive_ops": sum(inside["naive"].values()),
        "damc_ops": sum(inside["damc"].values()),
        "extra_per_projection": (sum(inside["damc"].values()) - sum(inside["naive"].values())) / routed,
        "data_dependent_inside": {label: data_dependent(counts) for label, counts in inside.items()},
        "plan_ops": sum(plan_counter.counts.values()),
        "decode_extra_ops": sum(decode["damc"].values()) - sum(decode["naive"].values()),
        "decode_data_dependent": data_dependent(decode["damc"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora-layout", choices=("stacked", "per_delta"), default="stacked")
    args = parser.parse_args()
    print(
        f"operators dispatched by the text model in one prefill (2 layers, 7 routed projections each; lora_layout "
        f"{args.lora_layout})"
    )
    print(
        f"{'modalities':>10} {'runs':>12} {'tokens':>7} {'naive ops':>10} {'damc ops':>9} {'extra/proj':>11} "
        f"{'syncs in LLM naive/damc':>24} {'plan ops':>9} {'decode extra':>13}"
    )
    for modalities in MODALITY_COUNTS:
        for layout in LAYOUTS:
            row = measure(modalities, layout, args.lora_layout)
            syncs = "{naive}/{damc}".format(**row["data_dependent_inside"])
            print(
                f"{modalities:>10} {layout:>12} {row['tokens']:>7} {row['naive_ops']:>10} {row['damc_ops']:>9} "
                f"{row['extra_per_projection']:>11.2f} {syncs:>24} {row['plan_ops']:>9} {row['decode_extra_ops']:>13}"
            )


if __name__ == "__main__":
    main()
