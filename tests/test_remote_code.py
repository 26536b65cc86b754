"""The saved folder in a fresh process that never imports this package: remote code only, offline. Each test runs
under this environment's transformers and, with `make test`, under the oldest one the remote code supports (a
composite saved with current tools, loaded by a user with an older transformers)."""

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from conftest import remote_code_python, run_fresh_python

from composition.saving import save_composite
from fixtures.tiny_composite import build_tiny_composite
from modeling_composite.compat import MINIMUM_TRANSFORMERS, TOOLS_MINIMUM_TRANSFORMERS, check_transformers_version


LOAD_AND_COMPARE = r"""
import re
import sys
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor, BitsAndBytesConfig

assert "modeling_composite" not in sys.modules
source, reference = sys.argv[1], torch.load(sys.argv[2], weights_only=False)
batch = reference["batch"]
config = AutoConfig.from_pretrained(source, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert type(config).__name__ == "CompositeMLLMConfig" and type(processor).__name__ == "CompositeMLLMProcessor"
assert type(config.text_config).__name__ == "LlamaConfig", type(config.text_config)
assert type(config.encoder_config("point")).__name__ == "CompositePointEncoderConfig"
raw = reference["raw_inputs"]
processed = processor(text=reference["prompt"], images=[raw["image"]], videos=[raw["video"]], audio=[raw["audio"]],
                      point_clouds=[raw["point"]])
assert set(processed) == set(batch), (set(processed), set(batch))
for name, value in batch.items():
    torch.testing.assert_close(processed[name], value, rtol=0, atol=0)
for name, value in reference["generation"].items():
    assert getattr(model.generation_config, name) == value, (name, getattr(model.generation_config, name), value)
with torch.no_grad():
    torch.testing.assert_close(model(**batch).logits, reference["logits"], rtol=0, atol=0)
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    # A chunked prefill in one chunk (before 5.23 generate() does not call it the first iteration).
    prompt_length = batch["input_ids"].shape[1]
    one_chunk = model.generate(**batch, max_new_tokens=3, do_sample=False, prefill_chunk_size=prompt_length)
torch.testing.assert_close(generated, reference["generated"], rtol=0, atol=0)
torch.testing.assert_close(one_chunk, reference["generated"], rtol=0, atol=0)
# transformers 5.24 renamed the cache `past_key_values` -> `cache`: outputs carry it under the installed release's
# name, and forward takes it under either.
release = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", transformers.__version__).groups())
cache_name = "cache" if release >= (5, 24) else "past_key_values"
prompt = {**batch, "input_ids": batch["input_ids"][:, :-1], "attention_mask": batch["attention_mask"][:, :-1]}
for name in ("past_key_values", "cache"):
    with torch.no_grad():
        cache = getattr(model(**prompt, use_cache=True), cache_name)
        assert cache.get_seq_length() == prompt["input_ids"].shape[1], cache
        step = model(input_ids=batch["input_ids"][:, -1:], attention_mask=batch["attention_mask"], **{name: cache})
    torch.testing.assert_close(step.logits[:, -1], reference["logits"][:, -1], rtol=1e-5, atol=1e-5)
base = AutoModel.from_pretrained(source, trust_remote_code=True)
assert type(base).__name__ == "CompositeMLLMModel"
if len(sys.argv) > 3:
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    quantized = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, quantization_config=quantization)
    q_proj = quantized.model.language_model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit", type(q_proj.base_layer)
    assert all(factor.dtype == torch.float32 for factor in q_proj.factor_parameters())
    assert type(quantized.model.encoders["image"].encoder.layers[0].mlp.fc1).__name__ == "Linear4bit"
    try:
        quantized.materialize_original_weights()
        raise AssertionError("a dense copy of 4-bit weights was made")
    except ValueError as error:
        assert "Linear4bit" in str(error) and "quantization" in str(error), error
    with torch.no_grad():
        logits = quantized(**batch).logits
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(), reference["logits"].flatten(), dim=0)
    print(f"4bit cosine {cosine.item():.4f}")
    assert cosine > 0.9, cosine
    generated = quantized.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3
print("ok", transformers.__version__)
"""


def test_fresh_process_loads_the_folder_with_identical_logits_and_in_4bit(saved_composite, tmp_path, remote_python):
    output = run_fresh_python(
        LOAD_AND_COMPARE,
        str(saved_composite),
        str(saved_composite.parent / "reference.pt"),
        "4bit",
        hf_home=tmp_path,
        python=remote_python,
    )
    print(output)  # the 4-bit / full-precision logit cosine, visible with `pytest -s`
    assert "ok" in output


def test_fresh_process_loads_by_repo_id_from_a_hub_cache(saved_composite, tmp_path, remote_python):
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-composite"
    shutil.copytree(saved_composite, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    output = run_fresh_python(
        LOAD_AND_COMPARE,
        "tiny-org/tiny-composite",
        str(saved_composite.parent / "reference.pt"),
        hf_home=tmp_path,
        python=remote_python,
    )
    assert "ok" in output


PIPELINES = r"""
import importlib.util
import sys
import numpy as np
from PIL import Image
from transformers import pipeline

vision_folder, audio_folder = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
audio = (rng.standard_normal(8000) * 0.1).astype(np.float32)

chat = pipeline("image-text-to-text", model=vision_folder, trust_remote_code=True)
result = chat(text=[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi?"}]}],
              max_new_tokens=3)
assert result[0]["generated_text"][-1]["role"] == "assistant", result
result = chat(images=image, text="USER: <image> Hi? ASSISTANT:", max_new_tokens=3)
assert result[0]["generated_text"].startswith("USER: <image> Hi? ASSISTANT:"), result
video = rng.integers(0, 255, (3, 36, 36, 3), dtype=np.uint8)
result = chat(text=[{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "Hi?"}]}],
              max_new_tokens=3)
assert result[0]["generated_text"][-1]["role"] == "assistant", result
print("image-text-to-text ok")

try:
    anything = pipeline("any-to-any", model=audio_folder, trust_remote_code=True)
except ImportError as error:  # transformers < 5.23 demands librosa for this pipeline, needed or not
    assert "librosa" in str(error) and importlib.util.find_spec("librosa") is None, error
    print("any-to-any needs librosa on this transformers")
else:
    result = anything(text="USER: <audio> Hi? ASSISTANT:", audio=audio, max_new_tokens=3)
    assert isinstance(result[0]["generated_text"], str), result
    print("any-to-any audio ok")

if importlib.util.find_spec("torchvision") is not None:
    anything = pipeline("any-to-any", model=vision_folder, trust_remote_code=True)
    anything(text="USER: <image> <video> Hi? ASSISTANT:", images=image, videos=[video], max_new_tokens=3)
    print("any-to-any image+video ok")
else:
    try:
        pipeline("any-to-any", model=vision_folder, trust_remote_code=True)
    except ImportError as error:
        assert "Torchvision" in str(error), error
        print("any-to-any image+video needs torchvision, which transformers requires for it")
"""


def test_pipelines_run_on_saved_folders(saved_composite, tmp_path, remote_python):
    # transformers' any-to-any pipeline demands torchvision when a model takes images or videos, so an audio (and
    # point cloud) composite exercises it where torchvision is absent.
    model, processor = build_tiny_composite(kinds=("audio", "point"))
    audio_folder = tmp_path / "audio-composite"
    save_composite(model, processor, audio_folder)
    output = run_fresh_python(
        PIPELINES, str(saved_composite), str(audio_folder), hf_home=tmp_path, python=remote_python
    )
    assert "image-text-to-text ok" in output
    assert "any-to-any audio ok" in output or remote_python != sys.executable, output


ROOT = Path(__file__).resolve().parent.parent


def _release(version: str) -> tuple[int, int]:
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())


@pytest.mark.parametrize("version", ["5.5.4", "5.4.0", "5.0.0", "4.57.6"])
def test_an_older_transformers_gets_one_error_naming_both_versions(version):
    with pytest.raises(ImportError, match=rf"needs transformers >= 5\.6, but transformers {re.escape(version)} is"):
        check_transformers_version(version)


@pytest.mark.parametrize("version", ["5.6.0", "5.16.1", "5.19.0", "5.26.0.dev0", "6.0.0", transformers.__version__])
def test_supported_transformers_versions_pass_the_check(version):
    check_transformers_version(version)


@pytest.mark.parametrize(
    "version, refused", [("5.22.2", True), ("5.16.1", True), ("5.23.0", False), ("5.25.0", False)]
)
def test_conversion_and_training_check_their_own_newer_floor(version, refused):
    if refused:
        with pytest.raises(ImportError, match=rf"^Conversion needs transformers >= 5\.23, but transformers {version}"):
            check_transformers_version(version, TOOLS_MINIMUM_TRANSFORMERS, needed_by="Conversion")
    else:
        check_transformers_version(version, TOOLS_MINIMUM_TRANSFORMERS, needed_by="Conversion")


def test_the_oldest_environment_holds_the_lower_bound_of_pyproject():
    """The second environment of `make test` runs exactly the release pyproject.toml and the remote code's check
    name as the oldest supported: the bound is what is tested."""
    python = remote_code_python("oldest")
    installed = subprocess.run(
        [python, "-I", "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    floor = re.search(r'"transformers>=([\d.]+),', (ROOT / "pyproject.toml").read_text()).group(1)
    pinned = re.search(r"^transformers==([\d.]+)$", (ROOT / "tests" / "requirements-oldest.txt").read_text(), re.M)
    assert installed == pinned.group(1)
    assert _release(installed) == _release(floor) == MINIMUM_TRANSFORMERS


def _relative_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}


def _auto_map_files(value) -> set[str]:
    """The remote-code files named by every `auto_map` found in a (nested) JSON value."""
    if isinstance(value, dict):
        named = {ref.split(".")[0] for ref in value.get("auto_map", {}).values() if isinstance(ref, str)}
        return named.union(*(_auto_map_files(item) for key, item in value.items() if key != "auto_map"))
    return set()


def test_every_entry_file_imports_all_the_files_it_needs_itself(saved_composite):
    """transformers 5.8 and 5.9 copy a local folder's remote code per entry file (the file an `auto_map` names) with
    only the files it imports directly, then fail on any file imported further down. Every file reached from an
    entry file must therefore be imported by the entry file itself (and be in the folder)."""
    entries = set()
    for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
        entries |= _auto_map_files(json.loads((saved_composite / name).read_text()))
    assert {"configuration_composite", "modeling_composite", "processing_composite"} <= entries
    for entry in sorted(entries):
        reached, pending = set(), [entry]
        while pending:
            for module in _relative_imports(saved_composite / f"{pending.pop()}.py") - reached:
                assert (saved_composite / f"{module}.py").is_file(), module
                reached.add(module)
                pending.append(module)
        assert reached <= _relative_imports(saved_composite / f"{entry}.py"), (entry, reached)


def test_the_remote_code_is_the_folder_and_imports_only_torch_transformers_and_the_standard_library():
    """Every module of `modeling_composite/` travels inside composite folders (the converter copies them all), so
    each may import only torch, transformers (with numpy, which transformers requires) and the standard library,
    and the other files of the folder relatively (`from .file import Name`); building, converting and test fixtures
    live in other packages."""
    from conversion.composer import REMOTE_CODE_FILES

    folder = ROOT / "modeling_composite"
    modules = {path.name for path in folder.glob("*.py")} - {"__init__.py"}
    assert set(REMOTE_CODE_FILES) == modules
    # accelerate: imported only where a `device_map` load placed modules (offload.py guards the import).
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "numpy", "accelerate"}
    for name in sorted(modules):
        tree = ast.parse((folder / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 1 and (folder / f"{node.module}.py").is_file(), (name, node.module)
                continue
            else:
                continue
            assert roots <= allowed, (name, roots - allowed)
