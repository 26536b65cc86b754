"""Check a written composite the way a user will load it: in a fresh Python process, through the auto classes with
`trust_remote_code=True`, one forward pass with an input for every modality."""

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import ConversionError
from .output import hold_for_test


logger = logging.getLogger(__name__)

# Runs in the fresh process; prints one JSON line. Inputs are synthetic: a grey image, a short video, a second of
# silence-free noise and a random point cloud, each through the composite's own processor.
_SCRIPT = r"""
import json, sys
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

folder = sys.argv[1]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
problems = {key: sorted(value) for key, value in info.items() if value and key != "error_msgs"}
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
rng = np.random.default_rng(0)
raw = {
    "image": ("images", lambda: np.full((48, 48, 3), 128, dtype=np.uint8)),
    "video": ("videos", lambda: rng.integers(0, 255, (4, 48, 48, 3), dtype=np.uint8)),
    "audio": ("audio",
              lambda: (rng.standard_normal(processor.feature_extractor.sampling_rate) * 0.1).astype(np.float32)),
    "point": ("point_clouds",
              lambda: rng.standard_normal((256, config.encoder_config(name).point_dims)).astype(np.float32)),
}
inputs, placeholders = {}, []
for name, entry in config.modalities.items():
    argument, make = raw[entry.kind]
    inputs.setdefault(argument, []).append(make())
    placeholders.append(entry.placeholder)
batch = processor(text="USER: " + " ".join(placeholders) + " Describe. ASSISTANT:", **inputs)
with torch.no_grad():
    logits = model(**batch).logits
print(json.dumps({
    "class": type(model).__name__,
    "loading_problems": problems,
    "sequence": int(batch["input_ids"].shape[1]),
    "finite": bool(torch.isfinite(logits).all()),
    "parameters": sum(p.numel() for p in model.parameters()),
}))
"""


# A failed check keeps nothing (the output folder appears only after it passes); this says how to keep the folder.
_KEEP_HINT = "nothing was kept; rerun with --no-verify to keep the folder and inspect it"


def verify_composite(folder: Path, scratch: Path | None = None, timeout: int = 3600) -> dict:
    """Load `folder` in a fresh process and run one forward; raise `ConversionError` when that fails. `scratch` is an
    empty folder for the process's module cache (default: a temporary one), removed afterwards."""
    logger.debug("verifying %s in a fresh process (%s -c <load and run>)", folder, sys.executable)
    with contextlib.ExitStack() as stack:
        if scratch is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        else:
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        # A fresh module cache, so that the folder's own remote code is what runs.
        environment = {**os.environ, "HF_MODULES_CACHE": str(Path(scratch) / "modules"), "HF_HUB_OFFLINE": "1"}
        process = subprocess.Popen(
            [sys.executable, "-c", _SCRIPT, str(Path(folder).resolve())],
            cwd=scratch,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        with process:
            hold_for_test("verifying")
            try:
                stdout, stderr = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                raise ConversionError(
                    f"Verification took over {timeout} s and was stopped; {_KEEP_HINT} by hand."
                ) from None
            except BaseException:
                process.kill()  # interrupted: the check must not outlive the run
                raise
    for line in stderr.strip().splitlines():
        logger.debug("verification: %s", line)
    if process.returncode != 0 or not stdout.strip():
        last_lines = " | ".join(stderr.strip().splitlines()[-3:])
        raise ConversionError(
            f"Verification failed: the written composite does not load and run ({last_lines}); {_KEEP_HINT}."
        )
    report = json.loads(stdout.strip().splitlines()[-1])
    if report["loading_problems"] or not report["finite"]:
        raise ConversionError(f"Verification failed: {report}; {_KEEP_HINT}.")
    logger.debug("verification report: %s", report)
    return report
