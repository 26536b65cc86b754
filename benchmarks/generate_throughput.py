"""Generation throughput: composites against transformers' `LlavaForConditionalGeneration` of the same shape.

    python -m benchmarks.generate_throughput [--hidden 1024 --layers 8 --batch 4 --new-tokens 32]
    python -m benchmarks.generate_throughput --preset llava-7b --device cuda    # LLaVA-1.5-7B's shape, on a GPU

Three models built from one random LLaVA (Llama LLM, CLIP tower, 2-layer MLP projector), random weights:
- `llava`: `LlavaForConditionalGeneration`, the baseline;
- `parts`: the composite of that LLaVA's parts (`compose`, no low-rank deltas): what the composite's own plumbing
  costs (splicing, routing state, the processor's placeholders). Greedy decoding must give llava's tokens; the table
  says how many agree;
- `damc`: the same parts with the routed layers of a DAMC composite of `--sources` sources: the image modality's
  rank-64 delta on image tokens, and the sources' text deltas folded into the weights (stacked rank sources x 64,
  taken off again on image rows).

A batch of `--batch` prompts of different lengths (left padding), each with one image, generates exactly
`--new-tokens` tokens greedily (`min_new_tokens` keeps every row going). The models take turns within each round
(one warm-up round first); times are medians, ratios medians of the per-round ratios. Per model and round: the
prefill alone (`generate` with one new token) and right after it the whole `generate` (tokens/s = batch x new tokens /
time); their difference is the decode (the rate of the other new tokens). Prints a table and writes its figures to
`--output` (JSON).
"""

import argparse
import statistics
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from benchmarks import huge_page_kib, timed_seconds, write_figures
from composition import ModalitySpec, compose
from composition.image_processor import clip_image_processor
from fixtures.tiny_composite import tiny_tokenizer


RANK = 64

# LLaVA-1.5-7B: Vicuna-7B (Llama-2-7B's shape) and CLIP ViT-L/14 at 336 px (576 image tokens).
PRESETS = {
    "llava-7b": {
        "hidden": 4096,
        "intermediate": 11008,
        "layers": 32,
        "vocab": 32064,
        "vision_hidden": 1024,
        "vision_layers": 24,
        "image_size": 336,
    },
}


def build_models(args: argparse.Namespace, dtype: torch.dtype) -> tuple[dict[str, torch.nn.Module], object, int]:
    """The baseline LLaVA and the two composites of its parts (on `args.device`), the composites' processor, and
    the image placeholder id."""
    tokenizer = tiny_tokenizer()
    image_token_id = len(tokenizer)  # where `compose` puts `<image>`; LLaVA is told the same id
    heads = max(args.hidden // 128, 1)  # Llama-2's heads are 128 wide
    text_config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=max(args.vision_hidden // 64, 1),
        image_size=args.image_size,
        patch_size=14,
        projection_dim=args.vision_hidden,
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration._from_config(
        LlavaConfig(
            vision_config=vision_config.to_dict(),
            text_config=text_config.to_dict(),
            image_token_index=image_token_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        ),
        dtype=dtype,
    ).eval()
    llm = LlamaForCausalLM._from_config(text_config, dtype=dtype).eval()
    llm.model.load_state_dict(llava.model.language_model.state_dict())
    llm.lm_head.load_state_dict(llava.lm_head.state_dict())
    image_processor = clip_image_processor(
        size={"shortest_edge": args.image_size}, crop_size={"height": args.image_size, "width": args.image_size}
    )

    def composite(lora: dict | None, text_lora: dict | None):
        spec = ModalitySpec(
            kind="image",
            encoder=llava.model.vision_tower,
            feature_layer=-2,
            feature_select="patch",
            projector_state_dict=llava.model.multi_modal_projector.state_dict(),
            lora=lora,
        )
        return compose(
            llm,
            tokenizer,
            {"image": spec},
            image_processor=image_processor,
            text_lora=text_lora,
            composition={"method": "damc" if lora else "naive", "note": "random benchmark composite"},
        )

    parts, processor = composite(None, None)
    damc, _ = composite(
        {"r": RANK, "alpha": 2.0 * RANK},
        {"r": RANK * args.sources, "alpha": 2.0 * RANK * args.sources, "folded": True},
    )
    generator = torch.Generator().manual_seed(1)  # a CPU generator: draw on the CPU, whatever the default device
    with torch.no_grad():
        for layer in damc.model.routed_layers():
            for factor in layer.factor_parameters():
                random = torch.randn(factor.shape, generator=generator, device="cpu") * 0.02
                factor.copy_(random.to(device=factor.device, dtype=factor.dtype))
    models = {
        label: model.to(device=args.device, dtype=dtype).eval()
        for label, model in (("llava", llava), ("parts", parts), ("damc", damc))
    }
    return models, processor, image_token_id


def prompt_batch(processor, batch: int, image_size: int, device: str) -> dict[str, torch.Tensor]:
    """`batch` prompts of different lengths, one random image each, left-padded."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)) for _ in range(batch)]
    texts = [f"USER: <image>\nDescribe the picture{' in detail' * (2 * row)}. ASSISTANT:" for row in range(batch)]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    return {key: value.to(device) for key, value in inputs.items()}


def _interleaved_times(
    models: list[str], generate: Callable[[str, int], object], new_tokens: int, repeats: int, device: str
) -> dict[str, dict[str, list[float]]]:
    """Per model and round: seconds of the prefill alone (one new token), of the whole generation, and their
    difference (the decode). The models take turns within a round, after one warm-up round; a model's prefill and
    whole generation run back to back, so that their difference is not two slow spells apart."""
    for label in models:
        generate(label, new_tokens)
    times = {label: {"prefill": [], "generate": [], "decode": []} for label in models}
    for _ in range(repeats):
        for label in models:
            prefill = timed_seconds(lambda: generate(label, 1), device)
            whole = timed_seconds(lambda: generate(label, new_tokens), device)
            for key, value in (("prefill", prefill), ("generate", whole), ("decode", whole - prefill)):
                times[label][key].append(value)
    return times


def hidden_differences(models: dict[str, torch.nn.Module], inputs: dict, llava_inputs: dict) -> list[float]:
    """Largest |parts - llava| of each hidden state of one prefill (embeddings first, then every layer's output):
    where the two first differ is where their computations part (equal embeddings mean the same LLM inputs)."""
    with torch.inference_mode():
        ours = models["parts"](**inputs, output_hidden_states=True).hidden_states
        theirs = models["llava"](**llava_inputs, output_hidden_states=True).hidden_states
    return [float((a.float() - b.float()).abs().max()) for a, b in zip(ours, theirs)]


def measure(args: argparse.Namespace) -> dict:
    dtype = getattr(torch, args.dtype)
    # Made on the device: random initialisation of three 7B models is minutes on a CPU, seconds on a GPU. Only while
    # they are made, since a `torch.device` context intercepts every torch call (the timed ones too).
    with torch.device(args.device):
        models, processor, image_token_id = build_models(args, dtype)
    inputs = prompt_batch(processor, args.batch, args.image_size, args.device)
    llava_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values")}

    def generate(label: str, new_tokens: int) -> torch.Tensor:
        model = models[label]
        with torch.inference_mode():
            return model.generate(
                **(llava_inputs if label == "llava" else inputs),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=3,
            )

    outputs = {label: generate(label, args.new_tokens) for label in models}
    prompt_length = inputs["input_ids"].shape[1]
    new = {label: output[:, prompt_length:] for label, output in outputs.items()}
    figures: dict = {
        "prompt_positions": prompt_length,
        "image_positions": int((inputs["input_ids"][0] == image_token_id).sum()),
        "generated_shape": list(new["llava"].shape),
        "parts_tokens_equal_to_llava": float((new["parts"] == new["llava"]).float().mean()),
        # The control: llava against itself, run again (a nondeterministic kernel would show here).
        "llava_tokens_equal_to_llava_again": float(
            (generate("llava", args.new_tokens)[:, prompt_length:] == new["llava"]).float().mean()
        ),
        "prefill_hidden_max_difference_by_layer": hidden_differences(models, inputs, llava_inputs),
        "huge_page_kib": huge_page_kib(),
    }
    times = _interleaved_times(list(models), generate, args.new_tokens, args.repeats, args.device)
    for label in models:
        median = {key: statistics.median(values) for key, values in times[label].items()}
        figures[label] = {
            "generate_s": median["generate"],
            "prefill_s": median["prefill"],
            "decode_s": median["decode"],
            "tokens_per_s": args.batch * args.new_tokens / median["generate"],
            "decode_tokens_per_s": args.batch * (args.new_tokens - 1) / max(median["decode"], 1e-9),
        }
    for label in ("parts", "damc"):
        figures[f"{label}/llava"] = {
            f"{key}_time": statistics.median(a / b for a, b in zip(times[label][key], times["llava"][key]))
            for key in ("generate", "prefill", "decode")
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="a published model's shape (its sizes become the defaults)"
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32064)
    parser.add_argument("--vision-hidden", type=int, default=1024)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224, help="pixels; 14-pixel patches")
    parser.add_argument("--sources", type=int, default=4, help="DAMC sources folded into the text weights")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--output", default="outputs/benchmarks/generate_throughput.json")
    # A preset replaces the defaults; sizes given on the command line still win (`--preset llava-7b --layers 2`).
    parser.set_defaults(**PRESETS.get(parser.parse_known_args()[0].preset, {}))
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the decode rate is taken past the first token)")
    figures = measure(args)
    threads = f"{torch.get_num_threads()} threads" if args.device == "cpu" else torch.cuda.get_device_name(args.device)
    print(
        f"generate throughput: Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"vocab {args.vocab}; CLIP width {args.vision_hidden}, {args.vision_layers} layers, {args.image_size} px "
        f"({figures['image_positions']} image positions); DAMC: {args.sources} sources, rank {RANK}; batch "
        f"{args.batch}, {figures['prompt_positions']} prompt positions (left-padded), {args.new_tokens} new tokens, "
        f"{args.dtype} on {args.device} ({threads}), medians of {args.repeats}"
    )
    print(
        f"{'model':<8} {'generate s':>11} {'tokens/s':>9} {'prefill s':>10} {'decode tokens/s':>16} "
        f"{'generate/llava':>15} {'prefill/llava':>14} {'decode/llava':>13}"
    )
    for label in ("llava", "parts", "damc"):
        row = figures[label]
        ratios = figures.get(f"{label}/llava", {"generate_time": 1.0, "prefill_time": 1.0, "decode_time": 1.0})
        print(
            f"{label:<8} {row['generate_s']:>11.3f} {row['tokens_per_s']:>9.1f} {row['prefill_s']:>10.3f} "
            f"{row['decode_tokens_per_s']:>16.1f} {ratios['generate_time']:>15.3f} {ratios['prefill_time']:>14.3f} "
            f"{ratios['decode_time']:>13.3f}"
        )
    print(
        f"parts' greedy tokens equal to llava's: {figures['parts_tokens_equal_to_llava']:.1%} ({args.dtype}; llava "
        f"run again: {figures['llava_tokens_equal_to_llava_again']:.1%})"
    )
    differences = figures["prefill_hidden_max_difference_by_layer"]
    parted = next((layer for layer, difference in enumerate(differences) if difference > 0), None)
    print(
        "prefill hidden states, parts against llava: "
        + (
            "bitwise equal at every layer"
            if parted is None
            else f"equal up to layer {parted - 1}, then max |difference| {differences[parted]:.3g} at layer {parted} "
            f"(0 = embeddings), {differences[-1]:.3g} at the last"
        )
    )
    if figures["huge_page_kib"] is not None:
        print(f"memory in transparent huge pages: {figures['huge_page_kib'] / 1024:.0f} MiB")
    report = {"settings": vars(args), "device_name": threads, "results": figures}
    print(f"wrote {write_figures(report, args.output)}")


if __name__ == "__main__":
    main()
