"""The saved folder in a fresh process that never imports this package: remote code only, offline."""

import shutil

from modeling_composite.builder import save_composite
from modeling_composite.tiny import build_tiny_composite

from conftest import run_fresh_python


LOAD_AND_COMPARE = r'''
import sys
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor, BitsAndBytesConfig

assert "modeling_composite" not in sys.modules
source, reference = sys.argv[1], torch.load(sys.argv[2], weights_only=False)
config = AutoConfig.from_pretrained(source, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert type(config).__name__ == "CompositeMLLMConfig" and type(processor).__name__ == "CompositeMLLMProcessor"
with torch.no_grad():
    torch.testing.assert_close(model(**reference["batch"]).logits, reference["logits"], rtol=0, atol=0)
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
        logits = quantized(**reference["batch"]).logits
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(), reference["logits"].flatten(), dim=0)
    print(f"4bit cosine {cosine.item():.4f}")
    assert cosine > 0.9, cosine
    generated = quantized.generate(**reference["batch"], max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == reference["batch"]["input_ids"].shape[1] + 3
print("ok")
'''


def test_fresh_process_loads_the_folder_with_identical_logits_and_in_4bit(saved_composite, tmp_path):
    output = run_fresh_python(
        LOAD_AND_COMPARE, str(saved_composite), str(saved_composite.parent / "reference.pt"), "4bit", hf_home=tmp_path
    )
    print(output)  # the 4-bit / full-precision logit cosine, visible with `pytest -s`
    assert "ok" in output


def test_fresh_process_loads_by_repo_id_from_a_hub_cache(saved_composite, tmp_path):
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-composite"
    shutil.copytree(saved_composite, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    output = run_fresh_python(
        LOAD_AND_COMPARE, "tiny-org/tiny-composite", str(saved_composite.parent / "reference.pt"), hf_home=tmp_path
    )
    assert "ok" in output


PIPELINES = r'''
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

anything = pipeline("any-to-any", model=audio_folder, trust_remote_code=True)
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
'''


def test_pipelines_run_on_saved_folders(saved_composite, tmp_path):
    # transformers' any-to-any pipeline demands torchvision when a model takes images or videos, so an audio (and
    # point cloud) composite exercises it where torchvision is absent.
    model, processor = build_tiny_composite(kinds=("audio", "point"))
    audio_folder = tmp_path / "audio-composite"
    save_composite(model, processor, audio_folder)
    output = run_fresh_python(PIPELINES, str(saved_composite), str(audio_folder), hf_home=tmp_path)
    assert "image-text-to-text ok" in output and "any-to-any audio ok" in output
