"""The demo: build a tiny random 4-modality DAMC composite, save it as a self-contained folder, reload it in 4-bit
through the auto classes with `trust_remote_code=True` (in a fresh process, as a user would), and answer one prompt
per modality mix through `pipeline()` / `generate()`.

The weights are random, so the answers are noise; what the demo shows is the whole path working. (The tiny world of
a later issue replaces this with a composite that has learned something.)

    python demo.py [--output outputs/tiny-composite]
"""

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path


LOADER = r'''
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

messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}]
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
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/tiny-composite", help="where to write the composite folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from modeling_composite.builder import save_composite
    from modeling_composite.tiny import build_tiny_composite

    model, processor = build_tiny_composite()
    save_composite(model, processor, args.output)
    files = sorted(path.name for path in Path(args.output).iterdir())
    print(f"saved a tiny 4-modality DAMC composite to {args.output}: {', '.join(files)}")

    # A fresh process that never imports this package: the folder's remote code is all it has.
    with tempfile.TemporaryDirectory() as hf_home:
        environment = {**os.environ, "HF_HOME": hf_home, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        subprocess.run(
            [sys.executable, "-c", LOADER, str(Path(args.output).resolve())],
            cwd=hf_home,
            env=environment,
            check=True,
        )


if __name__ == "__main__":
    main()
