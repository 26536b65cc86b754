"""The demo: a real conversion from tiny local sources, then the result used the way a user would.

1. Writes tiny random source models into a work folder beside the output (`outputs/tiny-sources/` by default), in
   the formats people publish: the shared base LLM (a Llama), a LLaVA-1.5 (image), a Video-LLaVA (of which only the
   video modality is taken), and, for audio and point clouds, a NaiveMC composite of our own built from that base
   folder with `composition.compose` (a composite is itself a source, of format `composite`).
2. Writes a recipe YAML next to them (method naive, merge rule linear, one weight per source, float32), prints it,
   and runs the conversion through its command line in a subprocess, exactly as a user would:
   `python -m conversion RECIPE OUTPUT --force` (its log ends with the fresh-process verification).
3. Reloads the composite in a fresh process that never imports this package, in 4-bit through
   `pipeline("image-text-to-text", ...)`, and answers one prompt per modality mix (image through the pipeline;
   video, audio, point and all four through `generate()`).

The weights are random, so the answers are noise; what the demo shows is the whole conversion path working. (`make
demo`, the tiny world, composes sources that have learned something.)

    python demo.py [--output outputs/tiny-composite]
"""

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path


LOADER = r"""
import sys
import numpy as np
import torch
from PIL import Image
from transformers import BitsAndBytesConfig, pipeline

folder = sys.argv[1]
quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
chat = pipeline(
    "image-text-to-text", model=folder, trust_remote_code=True, model_kwargs={"quantization_config": quantization}
)
model, processor = chat.model, chat.processor
quantized = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
print(f"loaded {type(model).__name__} in 4-bit: {quantized} Linear4bit layers, "
      f"{model.get_memory_footprint() / 2**20:.2f} MiB")

rng = np.random.default_rng(0)
image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
video = rng.integers(0, 255, (3, 36, 36, 3), dtype=np.uint8)
audio = (rng.standard_normal(8000) * 0.1).astype(np.float32)
cloud = rng.standard_normal((200, 6)).astype(np.float32)

messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "What is this?"}]}]
answer = chat(text=messages, max_new_tokens=8)[0]["generated_text"][-1]["content"]
print(f"[pipeline image-text-to-text] image           -> {answer!r}")

mixes = {
    "video": {"videos": [video]},
    "audio": {"audio": [audio]},
    "point": {"point_clouds": [cloud]},
    "image + audio + video + point": {"images": [image], "audio": [audio], "videos": [video], "point_clouds": [cloud]},
}
placeholders = {"images": "<image>", "videos": "<video>", "audio": "<audio>", "point_clouds": "<point>"}
for label, inputs in mixes.items():
    prompt = "USER: " + " ".join(placeholders[key] for key in inputs) + " What do these share? ASSISTANT:"
    batch = processor(text=prompt, **inputs)
    output = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answer = processor.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"[generate] {label:<29} -> {answer!r}")
"""


def write_audio_point_composite(folder: Path) -> Path:
    """For audio and point clouds: a NaiveMC composite of our own, made from the same tiny base (`tiny_llm(seed=0)`
    is what `save_tiny_base(seed=0)` writes), so the conversion can take it as a `composite` source."""
    from composition.saving import save_composite
    from fixtures.tiny_composite import build_tiny_composite

    model, processor = build_tiny_composite(kinds=("audio", "point"), lora_rank=None, seed=0)
    save_composite(model, processor, folder)
    return folder


def write_sources(folder: Path) -> Path:
    """The tiny sources and a recipe that composes them; returns the recipe's path."""
    from fixtures.tiny_sources import save_tiny_base, save_tiny_llava, save_tiny_video_llava

    base = save_tiny_base(folder / "base-llama", seed=0)
    save_tiny_llava(folder / "llava", base_folder=base)
    save_tiny_video_llava(folder / "video-llava", base_folder=base)
    write_audio_point_composite(folder / "audio-point-composite")

    recipe = folder / "recipe.yaml"
    recipe.write_text(
        "name: tiny-composite\n"
        "method: naive\n"
        f"base: {base.resolve()}\n"
        "merge: {rule: linear}\n"
        "sources:\n"
        f"  - path: {(folder / 'llava').resolve()}\n"
        "    weight: 0.4\n"
        f"  - path: {(folder / 'video-llava').resolve()}\n"
        "    weight: 0.3\n"
        "    modalities: [video]\n"
        f"  - path: {(folder / 'audio-point-composite').resolve()}\n"
        "    weight: 0.3\n"
        "dtype: float32\n"
    )
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/tiny-composite", help="where to write the composite folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # writing the tiny sources: no bars for 21-tensor files
    output = Path(args.output)
    work = output.parent / "tiny-sources"

    recipe = write_sources(work)
    sources = ", ".join(sorted(path.name for path in work.iterdir() if path.is_dir()))
    print(f"wrote tiny random sources to {work}: {sources}")
    print(f"recipe {recipe}:\n{recipe.read_text()}")

    command = [sys.executable, "-m", "conversion", str(recipe), str(output), "--force"]
    print("$ " + " ".join(command), flush=True)
    # stdin closed: the run must never wait on a question (its error, if any, is one line on stderr).
    if subprocess.run(command, stdin=subprocess.DEVNULL).returncode:
        sys.exit("the conversion failed; see the error above")
    files = sorted(path.name for path in output.iterdir())
    print(f"{output}: {', '.join(files)}")

    print("\nreloading it in a fresh process (random weights: the answers are noise)", flush=True)
    # A fresh process that never imports this package: the folder's remote code is all it has.
    with tempfile.TemporaryDirectory() as hf_home:
        environment = {**os.environ, "HF_HOME": hf_home, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        subprocess.run(
            [sys.executable, "-c", LOADER, str(output.resolve())],
            cwd=hf_home,
            env=environment,
            check=True,
        )


if __name__ == "__main__":
    main()
