"""Serving throughput of a composite with vLLM (the `serving` plugin), against vLLM serving the plain LLM of the same
composite and against transformers' `generate`, on the same requests.

Run in an environment with vLLM and the plugin (`make test` builds `.venv-vllm`):

    .venv-vllm/bin/python -m benchmarks.serve_throughput [--requests 32] [--new-tokens 32] [--eager]

It builds a small random DAMC composite (image + audio, Llama text model of width 256, 4 layers, heads of 64; routed
deltas of rank 16 per modality and 32 for the text), a NaiveMC composite of the same parts (no routed layers: what the
Transformers backend and the encoders cost alone), and the plain LLM they were composed from (the same text weights),
then serves each with vLLM, each engine in a process of its own, on two workloads:

- `text`: text-only prompts, the same for both;
- `modal`: prompts with an image and an audio clip each; the plain LLM gets the composite's expanded prompt with
  every placeholder position replaced by a text token (the same number of positions, no encoders, no routing).

Greedy decoding, `--new-tokens` tokens per request (end-of-sequence ignored), all requests submitted at once
(continuous batching), after a warm-up batch of as many other requests. Engine start-up (and compilation) is not
timed. The transformers baseline generates the same
requests with the composite in left-padded batches of `--hf-batch-size`. Prints one table: requests/s and generated
tokens/s, and the composite's throughput relative to the plain LLM's.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


TEXT = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
KINDS = ("image", "audio")


def build(root: Path) -> dict[str, Path]:
    """The DAMC composite, a NaiveMC composite of the same parts (no routed layers), and their plain LLM, saved under
    `root`."""
    from composition.saving import save_composite
    from fixtures.tiny_composite import build_tiny_composite, tiny_llm, tiny_tokenizer

    folders = {name: root / name for name in ("damc", "naive", "plain")}
    for name, lora_rank in (("damc", 16), ("naive", None)):
        composite, processor = build_tiny_composite(
            kinds=KINDS, lora_rank=lora_rank, text_rank=32, text_overrides=TEXT
        )
        save_composite(composite, processor, folders[name])
    plain = tiny_llm("llama", seed=0, **TEXT)  # the weights the composites' text model was built from
    plain.save_pretrained(folders["plain"])
    tiny_tokenizer().save_pretrained(folders["plain"])
    return folders


def workload(kind: str, count: int, first: int = 0) -> list[dict]:
    """`count` distinct requests, numbered from `first` (the warm-up takes other numbers: no prefix-cache hits)."""
    rng = np.random.default_rng(first)
    requests = []
    for index in range(first, first + count):
        question = f"USER: question {index}: what do you see and hear, and what do they share? ASSISTANT:"
        if kind == "text":
            requests.append({"prompt": question, "data": {}})
        else:
            image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            audio = (rng.standard_normal(16000) * 0.1).astype(np.float32)
            prompt = "USER: <image> <audio> " + question.removeprefix("USER: ")
            requests.append({"prompt": prompt, "data": {"image": image, "audio": audio}})
    return requests


def _plain_prompts(composite: str, requests: list[dict]) -> list[dict]:
    """The composite's expanded prompts as token ids, every placeholder position replaced by a text token."""
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(composite, trust_remote_code=True)
    config = AutoConfig.from_pretrained(composite, trust_remote_code=True)
    placeholder_ids = {entry.placeholder_id for entry in config.modalities.values()}
    filler = processor.tokenizer.convert_tokens_to_ids("a")
    prompts = []
    for request in requests:
        ids = processor.tokenizer(processor.expand_placeholders(request["prompt"]))["input_ids"]
        prompts.append({"prompt_token_ids": [filler if token in placeholder_ids else token for token in ids]})
    return prompts


def run_vllm(model: str, kind: str, count: int, new_tokens: int, eager: bool, plain: str | None) -> dict:
    """One engine, one workload: the timed `generate` of every request at once."""
    from vllm import LLM, SamplingParams

    requests, warmup = workload(kind, count), workload(kind, count, first=count)
    if plain is not None:
        batch, warmup_batch = _plain_prompts(plain, requests), _plain_prompts(plain, warmup)
        llm = LLM(model, dtype="float32", enforce_eager=eager, kv_cache_memory_bytes=2**30, max_num_seqs=count)
    else:
        batch, warmup_batch = (
            [{"prompt": request["prompt"], "multi_modal_data": request["data"]} for request in group]
            for group in (requests, warmup)
        )
        llm = LLM(
            model,
            trust_remote_code=True,
            dtype="float32",
            enforce_eager=eager,
            kv_cache_memory_bytes=2**30,
            max_num_seqs=count,
            limit_mm_per_prompt={"image": 1, "audio": 1},
        )
    sampling = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate(warmup_batch, sampling, use_tqdm=False)  # the same shapes, other requests
    start = time.perf_counter()
    outputs = llm.generate(batch, sampling, use_tqdm=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "requests": count, "tokens": sum(len(out.outputs[0].token_ids) for out in outputs)}


def run_transformers(model: str, kind: str, count: int, new_tokens: int, batch_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    composite = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)
    requests = workload(kind, count)
    batches = [requests[start : start + batch_size] for start in range(0, count, batch_size)]
    inputs = []
    for group in batches:
        arguments = {"text": [request["prompt"] for request in group], "padding": True}
        if kind != "text":
            arguments.update(images=[r["data"]["image"] for r in group], audio=[r["data"]["audio"] for r in group])
        inputs.append(processor(**arguments))
    generation = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    with torch.no_grad():
        composite.generate(**inputs[0], **{**generation, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        start = time.perf_counter()
        tokens = 0
        for batch in inputs:
            generated = composite.generate(**batch, **generation)
            tokens += (generated.shape[1] - batch["input_ids"].shape[1]) * generated.shape[0]
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "requests": count, "tokens": tokens}


def _phase(arguments: list[str]) -> dict:
    """Run one measurement in a fresh process (one vLLM engine per process)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as output:
        environment = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
        subprocess.run(
            [sys.executable, "-m", "benchmarks.serve_throughput", "--phase", *arguments, "--output", output.name],
            check=True,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return json.loads(Path(output.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hf-batch-size", type=int, default=8)
    parser.add_argument("--eager", action="store_true", help="vLLM without compilation (enforce_eager)")
    parser.add_argument("--phase", nargs=3, metavar=("ENGINE", "MODEL", "WORKLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--plain-of", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        engine, model, kind = args.phase
        if engine == "vllm":
            result = run_vllm(model, kind, args.requests, args.new_tokens, args.eager, args.plain_of)
        else:
            result = run_transformers(model, kind, args.requests, args.new_tokens, args.hf_batch_size)
        Path(args.output).write_text(json.dumps(result))
        return

    common = [
        "--requests",
        str(args.requests),
        "--new-tokens",
        str(args.new_tokens),
        "--hf-batch-size",
        str(args.hf_batch_size),
    ] + (["--eager"] if args.eager else [])
    with tempfile.TemporaryDirectory() as root:
        folders = {name: str(folder) for name, folder in build(Path(root)).items()}
        rows = []
        for kind in ("text", "modal"):
            measured = {
                "vLLM, plain LLM": _phase(["vllm", folders["plain"], kind, "--plain-of", folders["damc"], *common]),
                "vLLM + plugin, DAMC composite": _phase(["vllm", folders["damc"], kind, *common]),
                "vLLM + plugin, NaiveMC composite": _phase(["vllm", folders["naive"], kind, *common]),
                "transformers generate, DAMC": _phase(["transformers", folders["damc"], kind, *common]),
            }
            baseline = measured["vLLM, plain LLM"]["tokens"] / measured["vLLM, plain LLM"]["seconds"]
            for name, result in measured.items():
                rate = result["tokens"] / result["seconds"]
                rows.append((kind, name, result["requests"] / result["seconds"], rate, rate / baseline))
    mode = "eager" if args.eager else "compiled"
    print(f"{args.requests} requests x {args.new_tokens} new tokens, vLLM {mode}, threads {os.cpu_count()}")
    print(f"{'workload':<9} {'engine':<34} {'requests/s':>11} {'tokens/s':>9} {'vs plain vLLM':>14}")
    for kind, name, requests_per_second, tokens_per_second, ratio in rows:
        print(f"{kind:<9} {name:<34} {requests_per_second:>11.2f} {tokens_per_second:>9.1f} {ratio:>13.2f}x")


if __name__ == "__main__":
    main()
