"""Conversion speed and memory: our converter (NaiveMC-linear, DAMC and routed) on three synthetic sources of a
~1B-parameter LLM, and the same linear merge of the three LLMs through mergekit, in one run.

    python -m benchmarks.conversion_speed [--params 1e9] [--workdir /tmp/composite-conversion-bench] [--small]

Sources (written once into `--workdir` and reused; writing them is not timed), all bf16 safetensors in size-capped
shards with a `model.safetensors.index.json`, sharing one random base LLM (TinyLlama-1.1B's shape for 1e9):

- `base/`: the base `LlamaForCausalLM` and its tokenizer;
- `llava_{i}/`: three LLaVA-1.5 checkpoints (transformers' `LlavaForConditionalGeneration` layout, a small CLIP tower):
  full fine-tunes of the base (every LLM tensor perturbed), what the NaiveMC-linear and the routed recipe (rank
  `ROUTED_RANK`: one truncated SVD per projection per source; the `linear` text block stacks those factors) read;
- `llm_{i}/`: the same three fine-tuned LLMs (bit-identical tensors) as plain `LlamaForCausalLM` folders, what
  mergekit reads (it does not read LLaVA checkpoints);
- `damc_{i}/`: three decoupled sources as our trainer (`python -m training --stage 2`) writes them: a one-modality
  composite holding the frozen base LLM (`base_layer` weights), an unfolded text LoRA, the modality's own LoRA, an
  encoder, projector and prefix/suffix tokens. The DAMC recipe reads these.

Each tool runs in its own subprocess: wall time; peak RSS from `os.wait4` (the kernel's high-water mark of the child,
file-backed pages of memory-mapped inputs included) and peak anonymous RSS (`RssAnon`, polled every 50 ms from
/proc/<pid>/status: the memory the process really allocated); bytes read from /proc/<pid>/io (`rchar`: read(2)
calls; `read_bytes`: from the block device) just before the child is reaped. safetensors inputs are memory-mapped by
both tools, so neither counter sees page-cache hits: the throughput column is input bytes (the weight files the tool
has to read) / wall time. Page cache: before every timed run the tool's input files are read once (warm, the
default) or dropped from the cache with posix_fadvise (`--cold`), so both tools start from the same state. Our
converter runs with `--no-verify` (mergekit does not load its result either); mergekit with `--no-cuda` and
`--lazy-unpickle` (inputs are safetensors, so it changes nothing), computing in float32 and writing bfloat16 like ours,
with output shards of `--shard-size` (ours `--max-shard-size`, mergekit `--out-shard-size`).

mergekit is installed on first use into `benchmarks/.mergekit-venv` (torch==2.13.0 first, then mergekit, from PyPI).
"""

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from benchmarks import write_figures


REPOSITORY = Path(__file__).resolve().parent.parent
MERGEKIT_VENV = REPOSITORY / "benchmarks" / ".mergekit-venv"
SOURCES = 3
# The rank of the full fine-tunes' routed deltas in the `ours routed` leg.
ROUTED_RANK = 64
DELTA_SCALE = 0.004  # a fine-tune's change of each LLM weight, relative to weights of scale 0.02
LORA_RANK = 64
_FORMAT_VERSION = 3  # bump when the synthetic sources change, so a stale workdir is rewritten (3: factor keys)


@dataclass(frozen=True)
class LlmShape:
    """The Llama shape of the synthetic base LLM."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int

    def parameters(self) -> int:
        head = self.hidden_size // self.num_attention_heads
        attention = 2 * self.hidden_size**2 + 2 * self.hidden_size * self.num_key_value_heads * head
        layer = attention + 3 * self.hidden_size * self.intermediate_size + 2 * self.hidden_size
        return self.num_hidden_layers * layer + 2 * self.vocab_size * self.hidden_size + self.hidden_size


def llm_shape(parameters: float) -> LlmShape:
    """TinyLlama-1.1B's width (2048, GQA 32/4 heads, vocab 32000) with as many layers as reach `parameters`; below
    3e8 a narrower family (width 512, vocab 8000), for quick checks."""
    if parameters >= 3e8:
        shape = LlmShape(2048, 5632, 1, 32, 4, 32000)
    else:
        shape = LlmShape(512, 1408, 1, 8, 2, 8000)
    per_layer = LlmShape(**{**asdict(shape), "num_hidden_layers": 2}).parameters() - shape.parameters()
    layers = max(1, round((parameters - (shape.parameters() - per_layer)) / per_layer))
    return LlmShape(**{**asdict(shape), "num_hidden_layers": layers})


# --- synthetic sources -----------------------------------------------------------------------------------------------


class StreamedCheckpoint:
    """Writes one checkpoint's tensors straight to safetensors shards, one tensor in memory at a time: every key,
    shape and dtype is known up front, so each shard's header is written first and the tensors are appended in order.
    Shards are capped at `shard_bytes` and listed in `model.safetensors.index.json` (one shard:
    `model.safetensors`)."""

    _DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64", torch.float16: "F16"}

    def __init__(self, folder: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], shard_bytes: int):
        self.folder = folder
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in entries:
            nbytes = _nbytes(entry[1], entry[2])
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        count = len(shards)
        self.names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{index:05d}-of-{count:05d}.safetensors" for index in range(1, count + 1)]
        )
        self._shards = shards
        self._order = [(shard, key) for shard, members in enumerate(shards) for key, _, _ in members]
        self._next = 0
        self._file = None
        self._open_shard = -1
        if count > 1:
            index = {
                "metadata": {"total_size": sum(_nbytes(shape, dtype) for _, shape, dtype in entries)},
                "weight_map": {key: self.names[shard] for shard, key in self._order},
            }
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def _start_shard(self, shard: int) -> None:
        if self._file is not None:
            self._file.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape, dtype in self._shards[shard]:
            nbytes = _nbytes(shape, dtype)
            header[key] = {
                "dtype": self._DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
        self._file = open(self.folder / self.names[shard], "wb")
        self._file.write(len(text).to_bytes(8, "little") + text)
        self._open_shard = shard

    def write(self, key: str, tensor: torch.Tensor) -> None:
        shard, expected = self._order[self._next]
        if key != expected:
            raise ValueError(f"{self.folder.name}: wrote {key!r} where {expected!r} comes next.")
        if shard != self._open_shard:
            self._start_shard(shard)
        self._file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"{self.folder.name}: {len(self._order) - self._next} tensors were not written.")
        if self._file is not None:
            self._file.close()


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()


def _random(key: str, salt: int, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    """Deterministic noise for tensor `key` of source `salt`, whatever order the tensors are written in."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()) * 131 + salt)
    return torch.randn(shape, generator=generator) * scale


def _random_as(key: str, salt: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """`_random` at the scale of a fine-tune's extra tensors (projectors, low-rank factors), in `dtype`."""
    return _random(key, salt, shape, 0.02).to(dtype)


def _base_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key.endswith("norm.weight"):
        return torch.ones(shape)
    return _random(key, 0, shape, 0.02)


def _meta_state(model_class, config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every persistent tensor of `model_class(config)` with its shape, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_class(config)
    return {key: (tuple(value.shape), value.dtype) for key, value in model.state_dict().items()}


def _template_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def _copy_metadata(template: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file in template.iterdir():
        if file.is_file() and not file.name.startswith("model") and file.suffix != ".safetensors":
            shutil.copyfile(file, folder / file.name)


def _set_text_config(folder: Path, text_config: dict) -> None:
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["text_config"] = {**config["text_config"], **text_config}
    config["dtype"] = "bfloat16"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def write_sources(workdir: Path, shape: LlmShape, shard_bytes: int) -> dict[str, Path]:
    """The base, three LLaVA sources, the same three LLMs for mergekit and three DAMC sources, in `workdir` (kept when
    a previous run wrote the same ones). Returns name -> folder."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    from composition import ModalitySpec, compose, save_composite
    from fixtures.tiny_composite import tiny_image_processor, tiny_llm, tiny_tokenizer, tiny_vision_encoder
    from fixtures.tiny_sources import save_tiny_base, save_tiny_llava
    from modeling_composite.configuration_composite import CompositeMLLMConfig
    from modeling_composite.modeling_composite import CompositeMLLMForCausalLM

    folders = {"base": workdir / "base"}
    for index in range(SOURCES):
        for kind in ("llava", "llm", "damc"):
            folders[f"{kind}_{index}"] = workdir / f"{kind}_{index}"
    stamp = {"version": _FORMAT_VERSION, "shape": asdict(shape), "shard_bytes": shard_bytes}
    stamp_file = workdir / "sources.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return folders
    for folder in [*folders.values(), workdir / "templates"]:
        shutil.rmtree(folder, ignore_errors=True)
    stamp_file.unlink(missing_ok=True)

    # Tiny templates give every file but the weights (tokenizer, processors, configs to widen) and the encoder.
    templates = workdir / "templates"
    save_tiny_base(templates / "base")
    save_tiny_llava(templates / "llava", templates / "base")
    lora = {"r": LORA_RANK, "alpha": 2.0 * LORA_RANK}
    model, processor = compose(
        tiny_llm(),
        tiny_tokenizer(),
        {
            "image": ModalitySpec(
                kind="image",
                encoder=tiny_vision_encoder(),
                feature_layer=-2,
                feature_select="patch",
                prefix_tokens=2,
                suffix_tokens=2,
                lora=lora,
            )
        },
        image_processor=tiny_image_processor(),
        text_lora={**lora, "folded": False},
        composition={"method": "source", "note": "synthetic benchmark source"},
    )
    save_composite(model, processor, templates / "damc")

    llm_config = LlamaConfig(
        **asdict(shape),
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    text_fields = json.loads(llm_config.to_json_string())
    for name in ("base", *(f"llm_{index}" for index in range(SOURCES))):
        folders[name].mkdir(parents=True)
        llm_config.save_pretrained(folders[name])
        tiny_tokenizer().save_pretrained(folders[name])
    for index in range(SOURCES):
        _copy_metadata(templates / "llava", folders[f"llava_{index}"])
        _set_text_config(folders[f"llava_{index}"], text_fields)
        _copy_metadata(templates / "damc", folders[f"damc_{index}"])
        _set_text_config(folders[f"damc_{index}"], text_fields)
    llm_keys = _meta_state(LlamaForCausalLM, llm_config)
    llava_keys = _meta_state(LlavaForConditionalGeneration, LlavaConfig.from_pretrained(folders["llava_0"]))
    damc_keys = _meta_state(CompositeMLLMForCausalLM, CompositeMLLMConfig.from_pretrained(folders["damc_0"]))
    extras = {"llava": _template_tensors(templates / "llava"), "damc": _template_tensors(templates / "damc")}

    # Write operations in one order: per base LLM tensor, the base, then every source's version of it; then each
    # checkpoint's own extra tensors (towers, projectors, low-rank factors).
    operations: list[tuple[str, str, tuple[int, ...], torch.dtype, object]] = []
    cache: dict[str, torch.Tensor] = {}

    def base_of(key: str, shape) -> torch.Tensor:
        if key not in cache:
            cache.clear()
            cache[key] = _base_tensor(key, shape)
        return cache[key]

    def tuned(key: str, shape, index: int):
        return lambda: (base_of(key, shape) + _random(key, index + 1, shape, DELTA_SCALE)).to(torch.bfloat16)

    damc_owner = {}
    for key in damc_keys:
        if key.startswith("model.language_model.") and key.endswith(".base_layer.weight"):
            damc_owner["model." + key[len("model.language_model.") :].replace(".base_layer.weight", ".weight")] = key
        elif key.startswith("model.language_model."):
            damc_owner["model." + key[len("model.language_model.") :]] = key
        elif key == "lm_head.weight":
            damc_owner[key] = key
    for key, (shape, _) in llm_keys.items():
        llava_key = "model.language_model." + key[len("model.") :] if key.startswith("model.") else key
        operations.append(
            ("base", key, shape, torch.bfloat16, lambda k=key, s=shape: base_of(k, s).to(torch.bfloat16))
        )
        for index in range(SOURCES):
            produce = tuned(key, shape, index)
            holder: dict[str, torch.Tensor] = {}

            def once(produce=produce, holder=holder) -> torch.Tensor:
                # The LLaVA and the plain-LLM copy of a source are written one after the other: compute it once.
                if "value" in holder:
                    return holder.pop("value")
                holder["value"] = produce()
                return holder["value"]

            operations.append((f"llava_{index}", llava_key, shape, torch.bfloat16, once))
            operations.append((f"llm_{index}", key, shape, torch.bfloat16, once))
        for index in range(SOURCES):
            # Training freezes the base LLM: a decoupled source holds W0 itself; its text delta is the text LoRA.
            operations.append(
                (
                    f"damc_{index}",
                    damc_owner[key],
                    shape,
                    torch.bfloat16,
                    lambda k=key, s=shape: base_of(k, s).to(torch.bfloat16),
                )
            )
    for kind, keys in (("llava", llava_keys), ("damc", damc_keys)):
        covered = {op[1] for op in operations if op[0] == f"{kind}_0"}
        missing = covered - set(keys)
        if missing:
            raise ValueError(f"{kind} sources: the model has no tensors {sorted(missing)[:3]}")
        for key, (shape, dtype) in keys.items():
            if key in covered:
                continue
            dtype = torch.bfloat16 if dtype.is_floating_point else dtype
            template = extras[kind].get(key)
            for index in range(SOURCES):
                if template is not None and tuple(template.shape) == shape:
                    produce = functools.partial(template.to, dtype)
                else:  # projectors and low-rank factors: their shapes follow the LLM's width
                    produce = functools.partial(_random_as, key, 100 + index, shape, dtype)
                operations.append((f"{kind}_{index}", key, shape, dtype, produce))

    writers = {
        name: StreamedCheckpoint(
            folder, [(key, shape, dtype) for owner, key, shape, dtype, _ in operations if owner == name], shard_bytes
        )
        for name, folder in folders.items()
    }
    for owner, key, _, _, produce in operations:
        writers[owner].write(key, produce())
    for writer in writers.values():
        writer.close()
    shutil.rmtree(templates)
    stamp_file.write_text(json.dumps(stamp))
    return folders


# --- running and measuring -------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    wall_s: float
    peak_rss_bytes: int
    peak_anon_rss_bytes: int
    rchar: int
    read_bytes: int


def _status_bytes(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def run_measured(command: list[str], log: Path) -> Measurement:
    """Run `command`, measuring wall time, peak RSS (wait4), peak RssAnon (polled) and /proc io counters."""
    with open(log, "w") as output:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPOSITORY)
        peak_anon = [0]
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                value = _status_bytes(process.pid, "RssAnon")
                if value is not None:
                    peak_anon[0] = max(peak_anon[0], value)
                done.wait(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        # Wait without reaping, so that /proc/<pid>/io still holds the child's final counters.
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        wall = time.perf_counter() - start
        done.set()
        poller.join()
        io = dict(line.split(": ") for line in Path(f"/proc/{process.pid}/io").read_text().splitlines())
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed with status {process.returncode}; see {log}:\n" + log.read_text()[-3000:]
        )
    return Measurement(wall, usage.ru_maxrss * 1024, peak_anon[0], int(io["rchar"]), int(io["read_bytes"]))


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def prepare_cache(files: list[Path], cold: bool) -> None:
    """Put every input file in the page cache (warm) or drop it from there (cold), so each tool starts alike."""
    for file in files:
        descriptor = os.open(file, os.O_RDONLY)
        try:
            if cold:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(descriptor, 64 << 20):
                    pass
        finally:
            os.close(descriptor)


def ensure_mergekit() -> Path:
    """`mergekit-yaml` from its own virtual environment, created on first use (torch==2.13.0 first, so that pip keeps
    the CPU build, then mergekit)."""
    executable = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if executable.is_file():
        return executable
    print(f"installing mergekit into {MERGEKIT_VENV} (once)")
    subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
    pip = [str(MERGEKIT_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "mergekit"], check=True)
    return executable


def _yaml(data: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _same_merge(ours: Path, theirs: Path) -> float:
    """Max |ours - mergekit| over a few LLM tensors of both outputs (they compute the same mean of the three LLMs)."""

    def tensors(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
        found = {}
        for file in _weight_files(folder):
            with safe_open(str(file), framework="pt") as handle:
                found.update({name: handle.get_tensor(key).float() for name, key in names if key in handle.keys()})
        return found

    names = ["layers.0.self_attn.q_proj.weight", "layers.0.mlp.down_proj.weight", "norm.weight"]
    mine = tensors(ours, [(name, f"model.language_model.{name}") for name in names])
    other = tensors(theirs, [(name, f"model.{name}") for name in names])
    return max((mine[name] - other[name]).abs().max().item() for name in names)


def measure(folders: dict[str, Path], workdir: Path, shard_size: str, repeats: int, cold: bool) -> dict:
    outputs = workdir / "outputs"
    outputs.mkdir(exist_ok=True)
    renames = [{"image": f"image_{index}"} for index in range(SOURCES)]
    recipes = {
        "ours naive-linear": {
            "method": "naive",
            "base": str(folders["base"]),
            "merge": {"rule": "linear"},
            "dtype": "bfloat16",
            "sources": [{"path": str(folders[f"llava_{i}"]), "rename": renames[i]} for i in range(SOURCES)],
        },
        "ours damc": {
            "method": "damc",
            "base": str(folders["base"]),
            "merge": {"rule": "linear"},
            "dtype": "bfloat16",
            "sources": [{"path": str(folders[f"damc_{i}"]), "rename": renames[i]} for i in range(SOURCES)],
        },
        # The NaiveMC sources again, each image's tokens with a rank-64 SVD of its own source's delta.
        "ours routed": {
            "method": "routed",
            "base": str(folders["base"]),
            "merge": {"rule": "linear"},
            "dtype": "bfloat16",
            "rank": ROUTED_RANK,
            "sources": [{"path": str(folders[f"llava_{i}"]), "rename": renames[i]} for i in range(SOURCES)],
        },
    }
    mergekit_config = {
        "merge_method": "linear",
        "models": [{"model": str(folders[f"llm_{i}"]), "parameters": {"weight": 1.0}} for i in range(SOURCES)],
        "parameters": {"normalize": True},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    shard_parameters = f"{int(float(shard_size.upper().removesuffix('GB')) * 1e9 / 2)}"  # bf16: 2 bytes a parameter
    commands: dict[str, tuple[list[str], list[Path]]] = {}
    for label, recipe in recipes.items():
        path = _yaml(recipe, workdir / f"{label.split()[1]}.yaml")
        inputs = _weight_files(folders["base"]) + [
            f for s in recipe["sources"] for f in _weight_files(Path(s["path"]))
        ]
        commands[label] = (
            [
                sys.executable,
                "-m",
                "conversion",
                str(path),
                str(outputs / label.replace(" ", "_")),
                "--force",
                "--no-verify",
                "--max-shard-size",
                shard_size,
            ],
            inputs,
        )
    mergekit = ensure_mergekit()
    path = _yaml(mergekit_config, workdir / "mergekit.yaml")
    commands["mergekit linear"] = (
        [
            str(mergekit),
            str(path),
            str(outputs / "mergekit_linear"),
            "--no-cuda",
            "--lazy-unpickle",
            "--quiet",
            "--out-shard-size",
            shard_parameters,
        ],
        [f for i in range(SOURCES) for f in _weight_files(folders[f"llm_{i}"])],
    )
    results = {}
    for label, (command, inputs) in commands.items():
        runs = []
        for _ in range(repeats):
            shutil.rmtree(command[2] if label.startswith("mergekit") else command[4], ignore_errors=True)
            prepare_cache(inputs, cold)
            runs.append(run_measured(command, workdir / f"{label.replace(' ', '_')}.log"))
        input_bytes = sum(file.stat().st_size for file in inputs)
        wall = statistics.median(run.wall_s for run in runs)
        results[label] = {
            "wall_s": wall,
            "runs_wall_s": [run.wall_s for run in runs],
            "input_bytes": input_bytes,
            "throughput_bytes_per_s": input_bytes / wall,
            "peak_rss_bytes": max(run.peak_rss_bytes for run in runs),
            "peak_anon_rss_bytes": max(run.peak_anon_rss_bytes for run in runs),
            "rchar": runs[-1].rchar,
            "read_bytes": runs[-1].read_bytes,
            "command": command,
        }
    results["check"] = {
        "max_abs_diff_ours_vs_mergekit": _same_merge(outputs / "ours_naive-linear", outputs / "mergekit_linear")
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1e9, help="size of the synthetic base LLM (default 1e9)")
    parser.add_argument("--small", action="store_true", help="a quick check: a 3e7-parameter LLM, 20MB shards")
    parser.add_argument("--workdir", default="/tmp/composite-conversion-bench", help="sources and outputs (reused)")
    parser.add_argument("--shard-size", default=None, help="input and output shard size (default 2GB; --small 20MB)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per tool (median)")
    parser.add_argument("--cold", action="store_true", help="drop the inputs from the page cache before each run")
    parser.add_argument("--output", default="outputs/benchmarks/conversion_speed.json")
    args = parser.parse_args()
    parameters = 3e7 if args.small else args.params
    shard_size = args.shard_size or ("20MB" if args.small else "2GB")
    if not shard_size.upper().endswith("GB") and not shard_size.upper().endswith("MB"):
        parser.error("--shard-size must be given in MB or GB, e.g. 2GB")
    shard_bytes = int(float(shard_size[:-2]) * (1e9 if shard_size.upper().endswith("GB") else 1e6))
    shard_size = f"{shard_bytes / 1e9}GB"
    shape = llm_shape(parameters)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    folders = write_sources(workdir, shape, shard_bytes)
    print(
        f"sources ready in {time.perf_counter() - start:.0f} s (not timed below): {shape.parameters() / 1e9:.3f}B "
        f"parameters, {shape}"
    )
    largest = max(shape.vocab_size * shape.hidden_size, shape.hidden_size * shape.intermediate_size) * 2
    results = measure(folders, workdir, shard_size, args.repeats, args.cold)
    target = 1.5 * 2**30 + 2 * largest
    report = {
        "settings": {
            **vars(args),
            "parameters": shape.parameters(),
            "shape": asdict(shape),
            "shard_size": shard_size,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "results": results,
        "largest_tensor_bytes_bf16": largest,
        "rss_target_bytes": target,
        "ours/mergekit": {
            "wall": results["ours naive-linear"]["wall_s"] / results["mergekit linear"]["wall_s"],
            "peak_rss": results["ours naive-linear"]["peak_rss_bytes"] / results["mergekit linear"]["peak_rss_bytes"],
            "peak_anon_rss": (
                results["ours naive-linear"]["peak_anon_rss_bytes"] / results["mergekit linear"]["peak_anon_rss_bytes"]
            ),
        },
    }
    gib = 2**30
    print(
        f"\nconversion: {SOURCES} sources of a {shape.parameters() / 1e9:.3f}B LLM, bf16, {shard_size} shards, "
        f"{'cold' if args.cold else 'warm'} page cache, {os.cpu_count()} CPUs, median of {args.repeats}"
    )
    print(
        f"{'tool':<18} {'wall s':>8} {'read GB':>8} {'GB/s':>6} {'peak RSS GiB':>13} {'anon GiB':>9} "
        f"{'rchar GB':>9} {'disk GB':>8}"
    )
    for label in ("ours naive-linear", "ours damc", "ours routed", "mergekit linear"):
        row = results[label]
        print(
            f"{label:<18} {row['wall_s']:>8.1f} {row['input_bytes'] / 1e9:>8.2f} "
            f"{row['throughput_bytes_per_s'] / 1e9:>6.2f} {row['peak_rss_bytes'] / gib:>13.2f} "
            f"{row['peak_anon_rss_bytes'] / gib:>9.2f} {row['rchar'] / 1e9:>9.2f} {row['read_bytes'] / 1e9:>8.2f}"
        )
    ratios = report["ours/mergekit"]
    print(
        f"\nours / mergekit (naive-linear vs linear): time {ratios['wall']:.2f} (target <= 1.0), peak RSS "
        f"{ratios['peak_rss']:.2f}, peak anonymous RSS {ratios['peak_anon_rss']:.2f}"
    )
    print(
        f"peak RSS target: 1.5 GiB + 2 x largest tensor ({largest / 1e6:.0f} MB) = {target / gib:.2f} GiB; "
        + ", ".join(
            f"{label}: {'met' if results[label]['peak_rss_bytes'] <= target else 'missed'}"
            for label in ("ours naive-linear", "ours damc", "ours routed")
        )
    )
    print(
        f"same merge: max |ours - mergekit| over sampled LLM tensors = "
        f"{results['check']['max_abs_diff_ours_vs_mergekit']:.2e}"
    )
    print(f"wrote {write_figures(report, args.output)}")


if __name__ == "__main__":
    main()
