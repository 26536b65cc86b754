"""Tiny random composites shared by the tests (built once per session; no downloads)."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


# Set before transformers is imported: every test runs offline, and remote code loaded in-process (composites saved by
# the tests) lands in a throwaway Hugging Face home, never in the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="composite-tests-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from composition.saving import save_composite  # noqa: E402
from fixtures.tiny_composite import build_tiny_composite, tiny_inputs  # noqa: E402


PROMPT_ALL = "USER: <image> <video> <audio> <point> What do they share? ASSISTANT:"


@pytest.fixture(scope="session")
def composite():
    """A 4-modality DAMC composite with random (non-zero) routed deltas, and its processor."""
    return build_tiny_composite()


@pytest.fixture(scope="session")
def raw_inputs():
    return tiny_inputs()


@pytest.fixture(scope="session")
def batch_all(composite, raw_inputs):
    _, processor = composite
    return processor(
        text=PROMPT_ALL,
        images=[raw_inputs["image"]],
        videos=[raw_inputs["video"]],
        audio=[raw_inputs["audio"]],
        point_clouds=[raw_inputs["point"]],
    )


@pytest.fixture(scope="session")
def saved_composite(composite, raw_inputs, batch_all, tmp_path_factory):
    """The composite saved as a folder, plus what fresh-process checks compare with: the raw inputs and the batch
    the processor makes of them, the logits, greedy tokens and generation settings."""
    model, processor = composite
    folder = tmp_path_factory.mktemp("composite")
    save_composite(model, processor, folder)
    with torch.no_grad():
        logits = model(**batch_all).logits
        generated = model.generate(**batch_all, max_new_tokens=3, do_sample=False)
    generation = {
        name: getattr(model.generation_config, name) for name in ("eos_token_id", "pad_token_id", "suppress_tokens")
    }
    reference = {
        "prompt": PROMPT_ALL,
        "raw_inputs": raw_inputs,
        "batch": dict(batch_all),
        "logits": logits,
        "generated": generated,
        "generation": generation,
    }
    torch.save(reference, folder.parent / "reference.pt")
    return folder


# `make test` sets this to the interpreter of a second environment holding the oldest transformers the remote code
# supports (`tests/requirements-oldest.txt`): the remote-code tests then also load the composites this environment
# saves there, as a user with an older transformers loads a composite published with current tools.
OLDEST_PYTHON_VARIABLE = "COMPOSITE_OLDEST_PYTHON"


def remote_code_python(environment: str) -> str:
    """The interpreter that loads saved composites: this one (`current`) or the oldest-transformers one (`oldest`,
    skipped when `COMPOSITE_OLDEST_PYTHON` is unset)."""
    if environment == "current":
        return sys.executable
    python = os.environ.get(OLDEST_PYTHON_VARIABLE)
    if not python:
        pytest.skip(f"{OLDEST_PYTHON_VARIABLE} is unset (`make test` sets it): no run under the oldest transformers")
    return python


@pytest.fixture(params=["current", "oldest"])
def remote_python(request) -> str:
    """Each remote-code test runs under this environment's transformers and under the oldest supported one."""
    return remote_code_python(request.param)


def run_fresh_python(script: str, *args: str, hf_home: Path, timeout: int = 300, python: str = sys.executable) -> str:
    """Run `script` in a new interpreter (`python`, by default this one) that cannot import this package (other cwd,
    no PYTHONPATH), offline, with its own HF_HOME. Returns stdout; fails the test with stderr on a non-zero exit."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    environment.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH="", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [python, "-I", "-c", script, *args],
        cwd=hf_home,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        pytest.fail(f"fresh process failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory):
    """Tiny source models on disk, in the formats people publish, all fine-tuned from one tiny base (a Qwen2 base
    for Qwen2-Audio). Returns name -> folder."""
    from fixtures import tiny_sources as make

    root = tmp_path_factory.mktemp("sources")
    base = make.save_tiny_base(root / "base")
    qwen2_base = make.save_tiny_base(root / "qwen2_base", model_type="qwen2")
    return {
        "base": base,
        "qwen2_base": qwen2_base,
        "llava": make.save_tiny_llava(root / "llava", base),
        "llava_legacy": make.save_tiny_llava(root / "llava_legacy", base, legacy_layout=True),
        "llava_2": make.save_tiny_llava(root / "llava_2", base, seed=11),
        "video_llava": make.save_tiny_video_llava(root / "video_llava", base),
        "qwen2_audio": make.save_tiny_qwen2_audio(root / "qwen2_audio", qwen2_base),
        "clip": make.save_tiny_clip(root / "clip"),
        "paper_damc_a": make.save_tiny_modelcompose(root / "paper_damc_a", base_folder=base, seed=21),
        "paper_damc_b": make.save_tiny_modelcompose(root / "paper_damc_b", base_folder=base, seed=22),
        "paper_naive": make.save_tiny_modelcompose(root / "paper_naive", method="naive", base_folder=base, seed=23),
        "peft": make.save_tiny_peft(root / "peft", base),
    }
