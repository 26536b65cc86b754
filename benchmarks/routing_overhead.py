"""Routing overhead: the LLM of a DAMC composite (routed layers, folded text delta) against the same plain LLM, and
against the reference implementation's scheme (every adapter on every token, then masked; the MLP once per adapter),
re-implemented here as the baseline. Random weights; medians of repeated runs after warm-up, all in one process,
the variants taking turns within each round so that a slow spell of the machine skews no ratio; each ratio is the
median of its per-round ratios.

The reference holds the same composite as ours (`W0`, the sources' text LoRAs as its `default-{m}` adapters, each
modality's LoRA), so both compute the same outputs; the table prints how far apart they are. Like the paper's code,
it runs all adapters only for a prompt with modality tokens: a text-only prompt and a decode step (which has a cache)
get no modality mask and run the text adapter alone.

    python -m benchmarks.routing_overhead [--hidden 1024 --layers 8 --tokens 1024 --modalities 4 --rank 64]
    python -m benchmarks.routing_overhead --preset llama-7b --device cuda --dtypes bfloat16   # 7B shape on a GPU

At 7B's shape the four variants hold about 75 GB of bf16 weights together (the dense variant doubles the
projections): a 141 GB GPU holds them, an 80 GB one needs `--layers 16` (the ratios are per layer).

Prints a table and writes its figures to `--output` (JSON), for float32 and bfloat16 (`--dtypes`).

Peak memory of a prefill: each variant (plain, ours, reference) runs in a fresh subprocess, which builds the models,
runs one warm-up prefill, then for every workload resets the kernel's resident-set high-water mark (`5` written to
/proc/self/clear_refs), runs one prefill and reads `VmHWM` from /proc/self/status. The figure is that peak minus the
resident set just before the prefill: the memory the prefill itself needs on top of the weights (activations,
attention scores, the reference's per-adapter copies). The child runs with glibc's `MALLOC_MMAP_THRESHOLD_=65536`, so
freed blocks leave the resident set instead of being kept for reuse. On a GPU the same figure comes from the caching
allocator in the one process: `max_memory_allocated` over the prefill minus `memory_allocated` before it.
`--no-memory` skips it.
"""

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, DynamicCache, LlamaConfig, LlamaForCausalLM

from benchmarks import huge_page_kib, proc_kib, timed_seconds, write_figures
from composition.compose import ModalitySpec, compose
from fixtures.tiny_composite import tiny_tokenizer
from modeling_composite.modeling_composite import CACHE_NAME, CompositeMLLMForCausalLM
from modeling_composite.routing import RoutedLinear


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Llama-2-7B (Vicuna-7B, LLaVA-1.5-7B's LLM).
PRESETS = {"llama-7b": {"hidden": 4096, "intermediate": 11008, "layers": 32, "head_dim": 128}}


class _Masks:
    """The reference scheme's one-hot masks over all tokens, `(adapters, tokens, 1)`: row 0 is text. None when the
    reference passes no modality mask: a prompt without modality tokens, or a decode step."""

    value: torch.Tensor | None = None


class ReferenceLinear(nn.Module):
    """The reference's `LocalLoraLinear`: the base output once, then one full output per adapter (the base output
    plus that adapter's scaled low-rank branch; the text adapter's branch is the sum of the sources' text LoRAs
    `default-{m}`, stacked), summed under the masks. Without masks only the text adapter runs, as in the reference."""

    def __init__(
        self,
        base: nn.Linear,
        adapters: list[list[tuple[torch.Tensor, torch.Tensor]]],
        scalings: list[float],
        masks: _Masks,
    ):
        super().__init__()
        self.base, self.adapters, self.scalings, self.masks = base, adapters, scalings, masks

    def branch(self, flat: torch.Tensor, slot: int) -> torch.Tensor:
        branches = [(flat @ a.t()) @ b.t() * self.scalings[slot] for a, b in self.adapters[slot]]
        return branches[0] if len(branches) == 1 else torch.stack(branches).sum(0)

    def output(self, flat: torch.Tensor, slot: int) -> torch.Tensor:
        """One adapter's full output (the reference's `active_adapters=[slot]`)."""
        return self.base(flat) + self.branch(flat, slot)

    def outputs(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Every adapter's full output when there are masks (the base output shared), else only the text one."""
        if self.masks.value is None:
            return [self.output(flat, 0)]
        base = self.base(flat)
        return [base + self.branch(flat, slot) for slot in range(len(self.adapters))]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        return _masked_sum(self.outputs(flat), self.masks).view(*hidden_states.shape[:-1], -1)


def _masked_sum(outputs: list[torch.Tensor], masks: _Masks) -> torch.Tensor:
    if masks.value is None:
        return outputs[0]
    return torch.stack([mask * output for mask, output in zip(masks.value, outputs)]).sum(0)


class ReferenceMLP(nn.Module):
    """The reference's MLP: every adapter's gate and up outputs, then `down_proj` once per adapter on its own SwiGLU
    (so its dense matmul runs once per adapter), summed under the masks. Without masks, the text adapter's chain."""

    def __init__(
        self, mlp: nn.Module, gate: ReferenceLinear, up: ReferenceLinear, down: ReferenceLinear, masks: _Masks
    ):
        super().__init__()
        self.mlp, self.gate, self.up, self.down, self.masks = mlp, gate, up, down, masks

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        gates = [self.mlp.act_fn(gate) for gate in self.gate.outputs(flat)]
        ups = self.up.outputs(flat)
        downs = [self.down.output(gate * up, slot) for slot, (gate, up) in enumerate(zip(gates, ups))]
        return _masked_sum(downs, self.masks).view_as(hidden_states)


def _reference_linear(linear: nn.Linear, routed: RoutedLinear, names: list[str], masks: _Masks) -> ReferenceLinear:
    """`linear` (a copy of the plain model's, which holds `W_text`) as the reference holds the same composite: base
    weight `W0 = W_text - T`, the text adapter as the sources' rank-r pieces of the stacked text factors of `T`, and
    each modality's own factors. It then computes what `routed` computes."""
    text_a, text_b = routed.delta_factors("text")
    with torch.no_grad():
        text_delta = routed.delta_weight("text")
        linear.weight.copy_((linear.weight.float() - text_delta).to(linear.weight.dtype))
    rank = text_a.shape[0] // len(names)
    text = [
        (
            text_a[piece * rank : (piece + 1) * rank].detach().clone(),
            text_b[:, piece * rank : (piece + 1) * rank].detach().clone(),
        )
        for piece in range(len(names))
    ]
    own = [[tuple(factor.detach().clone() for factor in routed.delta_factors(name))] for name in names]
    scalings = [routed.layout.block(name).scaling for name in ("text", *names)]
    return ReferenceLinear(linear, [text, *own], scalings, masks)


@dataclasses.dataclass(frozen=True)
class Shape:
    """The benchmarked LLM and workload (the command-line sizes)."""

    hidden: int
    layers: int
    tokens: int
    modalities: int
    rank: int
    intermediate: int
    head_dim: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Shape":
        # Default MLP width: 11/4 of the hidden size, rounded down to a multiple of 64.
        intermediate = args.intermediate or args.hidden * 11 // 4 // 64 * 64
        return cls(args.hidden, args.layers, args.tokens, args.modalities, args.rank, intermediate, args.head_dim)

    def command_line(self) -> list[str]:
        return [f"--{field.name.replace('_', '-')}={getattr(self, field.name)}" for field in dataclasses.fields(self)]


def build(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[dict[str, nn.Module], list[str], _Masks]:
    """The variants by name (`VARIANTS`), the modality names, and the reference scheme's masks; made on `device`
    (the default device only while they are made: a `torch.device` context intercepts every torch call, which would
    also slow down the timed forwards)."""
    with torch.device(device):
        return _build(shape, dtype)


def _build(shape: Shape, dtype: torch.dtype):
    torch.manual_seed(0)
    hidden, rank, heads = shape.hidden, shape.rank, max(shape.hidden // shape.head_dim, 1)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=1024,
        max_position_embeddings=8192,
    )
    llm = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    plain = llm.model
    names = [f"m{index}" for index in range(shape.modalities)]

    # The DAMC composite of these modalities (a tiny image tower each: only its LLM is timed), built as users build
    # one, with random deltas; its text model is what the benchmark runs, routed by `CompositeMLLMModel.routing`.
    encoder = CLIPVisionModel._from_config(
        CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    )
    specs = {
        name: ModalitySpec(kind="image", encoder=encoder, lora={"r": rank, "alpha": 2.0 * rank}) for name in names
    }
    text_lora = {"r": rank * len(names), "alpha": 2.0 * rank * len(names), "folded": True}
    composite, _ = compose(llm, tiny_tokenizer(), specs, text_lora=text_lora)
    composite = composite.to(dtype).eval()
    with torch.no_grad():
        for layer in composite.model.routed_layers():
            for factor in layer.factor_parameters():
                factor.copy_(torch.randn_like(factor) * 0.02)

    # The same composite trading memory for speed: a dense copy of W0 for modality rows.
    dense = copy.deepcopy(composite)
    dense.materialize_original_weights()

    # The reference scheme holding the same composite (same W0 and factors), so that it computes the same outputs.
    reference = copy.deepcopy(plain)
    masks = _Masks()
    for layer, routed_layer in zip(reference.layers, composite.model.language_model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear, twin = getattr(layer.self_attn, name), getattr(routed_layer.self_attn, name)
            setattr(layer.self_attn, name, _reference_linear(linear, twin, names, masks))
        mlp, twin = layer.mlp, routed_layer.mlp
        gate, up, down = (
            _reference_linear(getattr(mlp, name), getattr(twin, name), names, masks)
            for name in ("gate_proj", "up_proj", "down_proj")
        )
        layer.mlp = ReferenceMLP(mlp, gate, up, down, masks)
    # A control: the plain model again, copied last like the variants above. Its time over the plain model's is the
    # noise floor of every ratio here (the same work, only other memory and another turn in each round).
    plain_copy = copy.deepcopy(plain)
    return (
        {
            "plain": plain,
            "composite": composite,
            "composite_dense": dense,
            "reference": reference,
            "plain_copy": plain_copy,
        },
        names,
        masks,
    )


def _interleaved_times(
    runs: dict[str, Callable[[], None]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each run per round. The runs take turns (one round = each once, after one warm-up round), so that
    a slow spell of the machine hits every variant of a round alike; ratios are then taken round by round."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            times[label].append(timed_seconds(run, device))
    return times


def _workload(
    fraction: float, tokens: int, names: list[str], masks: _Masks, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The `(1, tokens)` modality index of a prefill whose first `fraction` of tokens are modality tokens, split
    evenly across the modalities; also sets the reference scheme's masks to match. The composite builds its routing
    from the index inside each timed forward, as `CompositeMLLMModel.forward` does."""
    modalities = len(names)
    index = torch.zeros(tokens, dtype=torch.long, device=device)
    count = int(tokens * fraction)
    if count:
        index[:count] = torch.arange(count, device=device) * modalities // count + 1
    # The reference passes no modality mask when the prompt has no modality token (then only its text adapter runs).
    slots = [(index == slot) for slot in range(modalities + 1)]
    masks.value = torch.stack(slots).to(dtype)[..., None] if count else None
    return index[None]


def text_model(model: nn.Module) -> nn.Module:
    """The LLM a variant runs: a composite's text model, or the plain / reference model itself."""
    return model.model.language_model if isinstance(model, CompositeMLLMForCausalLM) else model


def run_text_model(model: nn.Module, index: torch.Tensor | None, **inputs):
    """One forward of a variant's text model: a composite's routed by `index` (as its own forward routes it; None:
    text only), a plain or reference model as it is."""
    if isinstance(model, CompositeMLLMForCausalLM):
        with model.model.routing(index):
            return model.model.language_model(**inputs)
    return model(**inputs)


def _prefills(models: dict[str, nn.Module], embeds: torch.Tensor, index: torch.Tensor):
    """One prefill per variant; the composites plan their routing from the modality index in each call."""
    return {
        label: (lambda model=model: run_text_model(model, index, inputs_embeds=embeds))
        for label, model in models.items()
    }


def measure(
    shape: Shape,
    dtype: torch.dtype,
    repeats: int,
    fractions: list[float],
    device: torch.device,
    gpu_memory: bool = False,
) -> dict:
    """Times of every workload (and, with `gpu_memory`, each prefill's peak GPU memory) on `device`."""
    models, names, masks = build(shape, dtype, device)
    tokens, hidden = shape.tokens, shape.hidden
    embeds = torch.randn(1, tokens, hidden, dtype=dtype, device=device)
    figures: dict = {
        "weights_bytes": {label: weight_bytes(text_model(model)) for label, model in models.items()},
        "huge_page_kib": huge_page_kib(),
    }
    memory: dict = {}
    with torch.inference_mode():
        for fraction in fractions:
            index = _workload(fraction, tokens, names, masks, dtype, device)
            prefills = _prefills(models, embeds, index)
            if gpu_memory:
                memory[f"prefill {int(fraction * 100)}% modality"] = {
                    f"{label}_bytes": _gpu_prefill_peak(run, device) for label, run in prefills.items()
                }
            figures[f"prefill {int(fraction * 100)}% modality"] = {
                **_row(_interleaved_times(prefills, repeats, device)),
                "difference_from_ours": _differences(prefills),
            }
        # One decode step (a text token) on a cache of `tokens` positions.
        masks.value = None  # the reference drops the modality mask whenever there is a cache
        step = torch.randn(1, 1, hidden, dtype=dtype, device=device)
        decodes = {}
        for label, model in models.items():
            cache = DynamicCache()
            # Text-only, as the reference fills its cache once it drops the mask: every variant holds the same cache.
            run_text_model(model, None, inputs_embeds=embeds, use_cache=True, **{CACHE_NAME: cache})

            def decode(model=model, cache=cache):
                # A decoded token is text: no routing.
                output = run_text_model(model, None, inputs_embeds=step, use_cache=True, **{CACHE_NAME: cache})
                cache.crop(-1)  # drop the step again: every timed step sees the same cache
                return output

            decodes[label] = decode
        figures["decode step"] = {
            **_row(_interleaved_times(decodes, repeats * 8, device)),
            "difference_from_ours": _differences(decodes),
        }
    if gpu_memory:
        figures["peak prefill memory"] = {workload: _memory_ratios(row) for workload, row in memory.items()}
    return figures


def _differences(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Relative distance (norm of the difference over norm) of the dense variant's and the reference's last hidden
    states from the routed composite's: all three compute the same function, so this is rounding, and a check that
    the baseline does the composite's work rather than some other."""
    outputs = {
        label: runs[label]().last_hidden_state.float() for label in ("composite", "composite_dense", "reference")
    }
    ours = outputs.pop("composite")
    return {label: float((output - ours).norm() / ours.norm()) for label, output in outputs.items()}


def _gpu_prefill_peak(prefill: Callable[[], None], device: torch.device) -> int:
    """Bytes the caching allocator held at the prefill's peak above what it held before (after a warm-up)."""
    prefill()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    prefill()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _memory_ratios(row: dict[str, int]) -> dict[str, float]:
    return {
        **row,
        "composite/plain": row["composite_bytes"] / max(row["plain_bytes"], 1),
        "composite_dense/plain": row["composite_dense_bytes"] / max(row["plain_bytes"], 1),
    }


def _row(times: dict[str, list[float]]) -> dict[str, float]:
    """Median seconds of each variant, and each ratio as the median of its per-round ratios (a paired estimate:
    both sides of a ratio ran back to back)."""

    def ratio(numerator: str, denominator: str) -> float:
        return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))

    return {
        **{f"{label}_s": statistics.median(times[label]) for label in VARIANTS},
        "composite/plain": ratio("composite", "plain"),
        "composite_dense/plain": ratio("composite_dense", "plain"),
        "reference/composite": ratio("reference", "composite"),
        "reference/composite_dense": ratio("reference", "composite_dense"),
        "plain_copy/plain": ratio("plain_copy", "plain"),
    }


def weight_bytes(model: nn.Module) -> int:
    """Parameters and buffers (the dense W0 copies are buffers) and the reference's adapter factors (plain tensors),
    each tensor counted once."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        if isinstance(module, ReferenceLinear):
            tensors += [factor for slot in module.adapters for pair in slot for factor in pair]
    unique = {id(tensor): tensor for tensor in tensors}
    return sum(tensor.numel() * tensor.element_size() for tensor in unique.values())


def _mib_or_unknown(kib: int | None) -> str:
    return "unknown" if kib is None else f"{kib / 1024:.0f} MiB"


def prefill_peak_memory(shape: Shape, dtype: torch.dtype, variant: str, fractions: list[float]) -> dict[str, int]:
    """Bytes a prefill of `variant` (plain | composite | reference) needs above the resident set before it, per
    workload; meant to run alone in a fresh process (see the module docstring)."""
    cpu = torch.device("cpu")
    models, names, masks = build(shape, dtype, cpu)
    embeds = torch.randn(1, shape.tokens, shape.hidden, dtype=dtype)
    peaks = {}
    with torch.inference_mode():
        for fraction in fractions:
            index = _workload(fraction, shape.tokens, names, masks, dtype, cpu)
            prefill = _prefills({variant: models[variant]}, embeds, index)[variant]
            prefill()  # warm-up: one-time allocations are not the prefill's
            before = proc_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            prefill()
            peaks[f"prefill {int(fraction * 100)}% modality"] = (proc_kib("VmHWM") - before) * 1024
    return peaks


VARIANTS = ("plain", "composite", "composite_dense", "reference", "plain_copy")
# The peak-memory runs leave out the control (the plain model's peak is already measured).
MEMORY_VARIANTS = VARIANTS[:-1]


def measure_memory(shape: Shape, fractions: str, dtype_name: str) -> dict:
    """Peak prefill memory of every variant, each in a fresh subprocess."""
    by_variant = {}
    for variant in MEMORY_VARIANTS:
        command = [
            sys.executable,
            "-m",
            "benchmarks.routing_overhead",
            "--memory-child",
            variant,
            "--dtypes",
            dtype_name,
            "--fractions",
            fractions,
            *shape.command_line(),
        ]
        # A fixed mmap threshold: glibc then returns every block of 64 KiB or more to the system when it is freed
        # (its default threshold grows with use, so a warm-up's freed activations would stay resident and hide the
        # next prefill's peak).
        environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
        by_variant[variant] = json.loads(output.strip().splitlines()[-1])
    return {
        workload: _memory_ratios({f"{variant}_bytes": by_variant[variant][workload] for variant in MEMORY_VARIANTS})
        for workload in by_variant["plain"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="a published LLM's shape (its sizes become the defaults)"
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, help="MLP width (default: 11/4 of --hidden, a multiple of 64)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64, help="width of an attention head (Llama-2: 128)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--modalities", type=int, default=4)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", help="comma-separated (default: float32,bfloat16 on a CPU, bfloat16 on a GPU)")
    parser.add_argument("--fractions", default="0,0.25,0.5,0.9", help="shares of modality tokens in the prefills")
    parser.add_argument("--output", default="outputs/benchmarks/routing_overhead.json")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--memory-child", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    # A preset replaces the defaults; sizes given on the command line still win (`--preset llama-7b --layers 2`).
    parser.set_defaults(**PRESETS.get(parser.parse_known_args()[0].preset, {}))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch sees no CUDA device here")
        if device.index is None:  # `torch.cuda` calls want the index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    # float32 at 7B's shape would need about 145 GB for the four variants.
    args.dtypes = args.dtypes or ("bfloat16" if device.type == "cuda" else "float32,bfloat16")
    fractions = [float(share) for share in args.fractions.split(",")]
    shape = Shape.from_args(args)
    if args.memory_child:  # one variant's peak prefill memory, as JSON on the last line
        peaks = prefill_peak_memory(shape, getattr(torch, args.dtypes), args.memory_child, fractions)
        print(json.dumps(peaks))
        return
    on_gpu = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if on_gpu else f"CPU with {torch.get_num_threads()} threads"
    report = {"settings": vars(args), "threads": torch.get_num_threads(), "device_name": where, "results": {}}
    print(
        f"routing overhead: hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.layers} layers, heads "
        f"of {shape.head_dim}, {shape.tokens} tokens, {shape.modalities} modalities, rank {shape.rank}, {where} "
        f"(medians of {args.repeats})"
    )
    for dtype_name in args.dtypes.split(","):
        figures = measure(
            shape,
            getattr(torch, dtype_name),
            args.repeats,
            fractions,
            device,
            gpu_memory=on_gpu and not args.no_memory,
        )
        report["results"][dtype_name] = figures
        print(f"\n{dtype_name}")
        print(
            f"{'workload':<22} {'plain ms':>9} {'ours ms':>9} {'dense ms':>9} {'ref ms':>9} {'ours/plain':>11} "
            f"{'dense/plain':>12} {'ref/ours':>9} {'ref/dense':>10} {'control':>8}"
        )
        # The timed workloads, apart from the other entries of `figures` (weights, huge pages, GPU memory).
        workloads = {label: row for label, row in figures.items() if isinstance(row, dict) and "plain_s" in row}
        for label, row in workloads.items():
            print(
                f"{label:<22} {row['plain_s'] * 1e3:>9.1f} {row['composite_s'] * 1e3:>9.1f} "
                f"{row['composite_dense_s'] * 1e3:>9.1f} {row['reference_s'] * 1e3:>9.1f} "
                f"{row['composite/plain']:>11.3f} {row['composite_dense/plain']:>12.3f} "
                f"{row['reference/composite']:>9.2f} {row['reference/composite_dense']:>10.2f} "
                f"{row['plain_copy/plain']:>8.3f}"
            )
        differences = [row["difference_from_ours"] for row in workloads.values()]
        print(
            "outputs' relative difference from ours (largest over the workloads): "
            + ", ".join(f"{label} {max(row[label] for row in differences):.1e}" for label in differences[0])
        )
        weights = figures["weights_bytes"]
        print(
            "weights MiB: "
            + ", ".join(f"{label} {size / 2**20:.0f}" for label, size in weights.items())
            + f"; in transparent huge pages: {_mib_or_unknown(figures['huge_page_kib'])}"
        )
        if not args.no_memory:
            if on_gpu:
                memory = figures.pop("peak prefill memory")
            else:
                memory = measure_memory(shape, args.fractions, dtype_name)
            report["results"][dtype_name + " peak prefill memory"] = memory
            mib = 2**20
            how = "allocated on the GPU" if on_gpu else "resident set; fresh process per variant"
            print(f"\n{dtype_name} peak prefill memory (above what was held before it: {how})")
            print(
                f"{'workload':<22} {'plain MiB':>10} {'ours MiB':>9} {'dense MiB':>10} {'ref MiB':>9} "
                f"{'ours/plain':>11} {'dense/plain':>12}"
            )
            for label, row in memory.items():
                print(
                    f"{label:<22} {row['plain_bytes'] / mib:>10.1f} {row['composite_bytes'] / mib:>9.1f} "
                    f"{row['composite_dense_bytes'] / mib:>10.1f} {row['reference_bytes'] / mib:>9.1f} "
                    f"{row['composite/plain']:>11.3f} {row['composite_dense/plain']:>12.3f}"
                )
    print(f"\nwrote {write_figures(report, args.output)}")


if __name__ == "__main__":
    main()
