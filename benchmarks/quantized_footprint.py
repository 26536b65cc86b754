"""Quantized footprint: a random mid-size DAMC composite loaded in bfloat16 and in 4-bit (bitsandbytes, CPU): weights
memory 4-bit / bf16 and prefill time 4-bit / bf16.

    python -m benchmarks.quantized_footprint [--hidden 1024 --layers 8 --vocab 32000 --tokens 128 --repeats 5]

The composite: a Llama text model (`--hidden`, `--layers`, intermediate 11/4 of the width, `--vocab`) with an image
modality (a CLIP-style vision tower of the same width, 4 layers, 224 px / 14 px patches) and an audio modality (a
Qwen2-Audio-style encoder, 4 layers, 5 s clips), both with their own rank-64 LoRA and 2 + 2 prefix/suffix tokens, and a
stacked text delta of rank 128 (two sources): every low-rank factor random. It is saved with `save_composite`, then
loaded with `CompositeMLLMForCausalLM.from_pretrained` in bf16 and with
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)` (plus `dtype=torch.bfloat16` for what
stays unquantized), and once more with `llm_int8_skip_modules=[r".*lora_[AB]", "lm_head"]`: the low-rank factors kept
in bf16. Every quantized Linear has in_features % 64 == 0 and out_features % 32 == 0, as bitsandbytes' CPU
kernel needs.

Weights memory is given two ways: `get_memory_footprint()` (parameters and buffers as transformers counts them: a
4-bit weight as its packed uint8 bytes) and a sum by hand that also counts each 4-bit weight's quantization state
(absmax scales, code book); the table splits it into quantized linear weights and what stays unquantized. The forward
is one prefill of an image, a clip and `--tokens` text tokens (medians of `--repeats` after one warm-up, one process).
"""

import argparse
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    WhisperFeatureExtractor,
)

from benchmarks import timed_seconds, write_figures
from composition import ModalitySpec, compose, save_composite
from composition.image_processor import clip_image_processor
from fixtures.tiny_composite import tiny_tokenizer
from modeling_composite.modeling_composite import CompositeMLLMForCausalLM


MODALITY_RANK, TEXT_RANK = 64, 128
AUDIO_SECONDS, SAMPLING_RATE, MEL_BINS = 5, 16000, 128
IMAGE_SIZE, PATCH_SIZE = 224, 14


def build_composite(hidden: int, layers: int, vocab: int):
    """The random composite and its processor (bf16)."""
    torch.manual_seed(0)
    heads = max(hidden // 64, 1)
    llm = (
        LlamaForCausalLM(
            LlamaConfig(
                hidden_size=hidden,
                intermediate_size=hidden * 11 // 4 // 64 * 64,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=heads,
                vocab_size=vocab,
                max_position_embeddings=4096,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=3,
                tie_word_embeddings=False,
            )
        )
        .to(torch.bfloat16)
        .eval()
    )
    vision = AutoModel.from_config(
        AutoConfig.for_model(
            "clip_vision_model",
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=4,
            num_attention_heads=heads,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
        )
    )
    audio = AutoModel.from_config(
        AutoConfig.for_model(
            "qwen2_audio_encoder",
            num_mel_bins=MEL_BINS,
            encoder_layers=4,
            encoder_attention_heads=heads,
            encoder_ffn_dim=4 * hidden,
            d_model=hidden,
            max_source_positions=AUDIO_SECONDS * SAMPLING_RATE // 160 // 2,
        )
    )
    lora = {"r": MODALITY_RANK, "alpha": 2.0 * MODALITY_RANK}
    specs = {
        "image": ModalitySpec(
            kind="image",
            encoder=vision,
            feature_layer=-2,
            feature_select="patch",
            prefix_tokens=2,
            suffix_tokens=2,
            lora=lora,
        ),
        "audio": ModalitySpec(kind="audio", encoder=audio, prefix_tokens=2, suffix_tokens=2, lora=lora),
    }
    model, processor = compose(
        llm,
        tiny_tokenizer(),
        specs,
        image_processor=clip_image_processor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=MEL_BINS, sampling_rate=SAMPLING_RATE, chunk_length=AUDIO_SECONDS
        ),
        text_lora={"r": TEXT_RANK, "alpha": float(TEXT_RANK), "folded": True},
        composition={"method": "damc", "note": "random benchmark composite"},
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.routed_layers():
            for factor in layer.factor_parameters():
                factor.copy_(torch.randn(factor.shape, generator=generator) * 0.02)
        for name in specs:
            projector = model.model.projectors[name]
            for part in (projector.prefix, projector.suffix):
                part.copy_(torch.randn(part.shape, generator=generator) * 0.02)
    return model.eval(), processor


def prefill_batch(processor, tokens: int) -> dict:
    rng = np.random.default_rng(0)
    from PIL import Image

    image = Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    clip = (rng.standard_normal(AUDIO_SECONDS * SAMPLING_RATE) * 0.1).astype(np.float32)
    text = "USER: <image> <audio> " + "x" * max(tokens - 10, 1) + " ASSISTANT:"
    return dict(processor(text=text, images=[image], audio=[clip], return_tensors="pt"))


def weights_breakdown(model) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """Bytes of parameters and buffers by hand, by category (a 4-bit weight counts its packed bytes plus its
    quantization state: absmax, code book, nested absmax), and the largest tensors left unquantized."""
    import bitsandbytes as bnb

    def state_bytes(state) -> int:
        total = 0
        for name in ("absmax", "code", "offset"):
            value = getattr(state, name, None)
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
        nested = getattr(state, "state2", None)
        return total + (state_bytes(nested) if nested is not None else 0)

    parts: dict[str, int] = defaultdict(int)
    unquantized: list[tuple[str, int]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            size = tensor.numel() * tensor.element_size()
            full = f"{module_name}.{name}"
            factor = ".lora_" in full or ".text_lora_" in full
            if isinstance(module, bnb.nn.Linear4bit) and name == "weight":
                label = "4-bit low-rank factors (+ quant state)" if factor else "4-bit linear weights (+ quant state)"
                parts[label] += size + state_bytes(tensor.quant_state)
                continue
            unquantized.append((full, size))
            if factor:
                parts["low-rank factors"] += size
            elif isinstance(module, torch.nn.Linear) and name == "weight":
                label = "lm_head" if full.startswith("lm_head") else "unquantized linear weights"
                parts[label] += size
            elif "embed_tokens" in full:
                parts["token embeddings"] += size
            elif name in ("prefix", "suffix"):
                parts["prefix/suffix tokens"] += size
            else:
                parts["norms, biases, convs, position tables"] += size
    return dict(parts), sorted(unquantized, key=lambda item: -item[1])[:8]


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up (bitsandbytes also repacks its CPU weights on the first call)
    times = []
    for _ in range(repeats):
        times.append(timed_seconds(run))
    return statistics.median(times)


def measure(folder: Path, batch: dict, repeats: int, quant_type: str) -> dict:
    results = {}
    settings = {"load_in_4bit": True, "bnb_4bit_quant_type": quant_type, "bnb_4bit_compute_dtype": torch.bfloat16}
    variants = {
        "bf16": {},
        "4-bit": {"quantization_config": BitsAndBytesConfig(**settings)},
        # The factors kept in bf16, as for training on a 4-bit base ("lm_head": transformers' default skip).
        "4-bit, bf16 factors": {
            "quantization_config": BitsAndBytesConfig(**settings, llm_int8_skip_modules=[r".*lora_[AB]", "lm_head"])
        },
    }
    for label, extra in variants.items():
        model = CompositeMLLMForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **extra).eval()
        footprint = model.get_memory_footprint()
        breakdown, largest_unquantized = weights_breakdown(model)
        with torch.inference_mode():
            seconds = _median_seconds(lambda model=model: model(**batch), repeats)
        results[label] = {
            "get_memory_footprint": footprint,
            "footprint_after_forward": model.get_memory_footprint(),
            "by_hand": sum(breakdown.values()),
            "breakdown": breakdown,
            "largest_unquantized": largest_unquantized,
            "prefill_s": seconds,
            "linear4bit_modules": sum(type(module).__name__ == "Linear4bit" for module in model.modules()),
            "unquantized_linears": sorted(
                {name.split(".")[-1] for name, module in model.named_modules() if type(module) is torch.nn.Linear}
            ),
        }
        del model
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=128, help="text tokens of the prefill (plus image and audio)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--quant-type",
        default="nf4",
        choices=("fp4", "nf4"),
        help="bnb_4bit_quant_type (nf4, as the model cards load composites)",
    )
    parser.add_argument("--output", default="outputs/benchmarks/quantized_footprint.json")
    args = parser.parse_args()
    if args.hidden % 64:
        parser.error("--hidden must be a multiple of 64 (bitsandbytes' CPU 4-bit kernel)")
    model, processor = build_composite(args.hidden, args.layers, args.vocab)
    batch = prefill_batch(processor, args.tokens)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "composite"
        save_composite(model, processor, folder)
        del model
        results = measure(folder, batch, args.repeats, args.quant_type)
    bf16 = results["bf16"]
    quantized_labels = [label for label in results if label != "bf16"]
    ratios = {
        f"{kind} {label}/bf16": results[label][key] / bf16[key]
        for label in quantized_labels
        for kind, key in (("footprint", "get_memory_footprint"), ("by hand", "by_hand"), ("prefill time", "prefill_s"))
    }
    report = {
        "settings": vars(args),
        "threads": torch.get_num_threads(),
        "positions": batch["input_ids"].shape[1],
        "results": results,
        "ratios": ratios,
    }
    mib = 2**20
    print(
        f"quantized footprint: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; image + audio "
        f"(4-layer encoders) with rank-{MODALITY_RANK} LoRAs, text rank {TEXT_RANK}; prefill of "
        f"{batch['input_ids'].shape[1]} positions, CPU with {torch.get_num_threads()} threads, median of "
        f"{args.repeats}, 4-bit {args.quant_type}"
    )
    columns = ["bf16", *quantized_labels]
    print(
        f"{'':<40}"
        + "".join(f"{label + ' MiB':>26}" for label in columns)
        + "".join(f"{label + '/bf16':>26}" for label in quantized_labels)
    )
    for label, key in (("get_memory_footprint()", "get_memory_footprint"), ("by hand (with quant state)", "by_hand")):
        print(
            f"{label:<40}"
            + "".join(f"{results[column][key] / mib:>26.1f}" for column in columns)
            + "".join(f"{results[column][key] / bf16[key]:>26.3f}" for column in quantized_labels)
        )
    for part in sorted({part for column in columns for part in results[column]["breakdown"]}):
        sizes = [results[column]["breakdown"].get(part, 0) / mib for column in columns]
        print(f"  {part:<38}" + "".join(f"{size:>26.1f}" for size in sizes))
    print(
        f"{'prefill ms':<40}"
        + "".join(f"{results[column]['prefill_s'] * 1e3:>26.1f}" for column in columns)
        + "".join(f"{results[column]['prefill_s'] / bf16['prefill_s']:>26.3f}" for column in quantized_labels)
    )
    quantized = results["4-bit"]
    met = ratios["by hand 4-bit/bf16"] <= 0.35
    print(
        f"\n4-bit: {quantized['linear4bit_modules']} Linear4bit modules; nn.Linear left unquantized: "
        f"{quantized['unquantized_linears']}. Target 4-bit/bf16 weights <= 0.35: "
        f"{'met' if met else 'missed'} ({ratios['by hand 4-bit/bf16']:.3f})"
    )
    print(
        "largest tensors left unquantized in 4-bit: "
        + ", ".join(f"{name} {size / mib:.1f} MiB" for name, size in quantized["largest_unquantized"])
    )
    print(f"wrote {write_figures(report, args.output)}")


if __name__ == "__main__":
    main()
