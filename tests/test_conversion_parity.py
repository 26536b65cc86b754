"""A composite converted from one transformers-native source with weight 1 is that source: same logits, same greedy
generation, against transformers' own LLaVA / Video-LLaVA / Qwen2-Audio classes."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    Qwen2AudioForConditionalGeneration,
    VideoLlavaForConditionalGeneration,
)

from conversion import compose
from fixtures.tiny_sources import video_llava_batch
from modeling_composite import CompositeMLLMForCausalLM, CompositeMLLMProcessor


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def _convert(tmp_path, base, source) -> tuple[CompositeMLLMForCausalLM, CompositeMLLMProcessor]:
    output = compose(
        {"base": str(base), "sources": [{"path": str(source), "weight": 1.0}]}, tmp_path / "out", verify=False
    )
    return CompositeMLLMForCausalLM.from_pretrained(output).eval(), CompositeMLLMProcessor.from_pretrained(output)


def _assert_same_model(reference, reference_batch, composite, composite_batch, vocab: int):
    """Logits on the base vocabulary match everywhere (placeholder positions included: their features are the same);
    greedy generation gives the same tokens."""
    with torch.no_grad():
        expected = reference(**reference_batch).logits
        got = composite(**composite_batch).logits
    torch.testing.assert_close(got[..., :vocab], expected[..., :vocab], rtol=1e-4, atol=1e-5)
    generated = reference.generate(**reference_batch, max_new_tokens=6, do_sample=False)
    ours = composite.generate(**composite_batch, max_new_tokens=6, do_sample=False)
    assert (
        ours[:, composite_batch["input_ids"].shape[1] :].tolist()
        == generated[:, reference_batch["input_ids"].shape[1] :].tolist()
    )


@pytest.mark.parametrize("layout", ["legacy", "current"])
def test_llava_source_with_weight_one_reproduces_llava(tiny_sources, tmp_path, rng, layout):
    source = tiny_sources["llava"] if layout == "current" else tiny_sources["llava_legacy"]
    model, processor = _convert(tmp_path, tiny_sources["base"], source)
    reference = LlavaForConditionalGeneration.from_pretrained(source).eval()
    reference_processor = AutoProcessor.from_pretrained(source)
    image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    prompt = "USER: <image>\nWhat is shown? ASSISTANT:"
    reference_batch = reference_processor(images=[image], text=prompt, return_tensors="pt")
    batch = processor(images=[image], text=prompt)
    # Same processing: the composite took LLaVA's image processor, and `<image>` expands to as many positions.
    torch.testing.assert_close(batch["pixel_values"], reference_batch["pixel_values"])
    assert batch["input_ids"].tolist() == reference_batch["input_ids"].tolist()
    _assert_same_model(reference, reference_batch, model, batch, vocab=len(processor.tokenizer))


def test_video_llava_source_reproduces_video_llava_on_images_and_videos(tiny_sources, tmp_path, rng):
    source = tiny_sources["video_llava"]
    model, processor = _convert(tmp_path, tiny_sources["base"], source)
    assert {name: entry.kind for name, entry in model.config.modalities.items()} == {
        "image": "image",
        "video": "video",
    }
    reference = VideoLlavaForConditionalGeneration.from_pretrained(source).eval()
    image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    video = rng.integers(0, 255, (2, 36, 36, 3), dtype=np.uint8)
    prompt = "USER: <image> <video>\nAre they alike? ASSISTANT:"
    reference_batch = video_llava_batch(source, prompt, images=[image], videos=[video])
    batch = processor(images=[image], videos=[video], text=prompt)
    assert batch["input_ids"].tolist() == reference_batch["input_ids"].tolist()
    torch.testing.assert_close(batch["pixel_values"], reference_batch["pixel_values"])
    torch.testing.assert_close(batch["pixel_values_videos"], reference_batch["pixel_values_videos"])
    _assert_same_model(reference, reference_batch, model, batch, vocab=len(processor.tokenizer))


def test_qwen2_audio_source_reproduces_qwen2_audio(tiny_sources, tmp_path, rng):
    source = tiny_sources["qwen2_audio"]
    model, processor = _convert(tmp_path, tiny_sources["qwen2_base"], source)
    entry = model.config.modalities["audio"]
    # <|audio_bos|> / <|audio_eos|> became the modality's one-token prefix and suffix.
    assert (entry.prefix_tokens, entry.suffix_tokens) == (1, 1)
    reference = Qwen2AudioForConditionalGeneration.from_pretrained(source).eval()
    reference_processor = AutoProcessor.from_pretrained(source)
    # A full-length clip: the composite's audio path is fixed-length (see the issue note on variable-length audio).
    audio = (rng.standard_normal(16000) * 0.1).astype(np.float32)
    reference_batch = reference_processor(
        text="<|audio_bos|><|AUDIO|><|audio_eos|>What is this sound?",
        audio=[audio],
        sampling_rate=16000,
        return_tensors="pt",
    )
    batch = processor(text="<audio>What is this sound?", audio=[audio], sampling_rate=16000)
    torch.testing.assert_close(batch["input_features"], reference_batch["input_features"])
    _assert_same_model(reference, reference_batch, model, batch, vocab=len(processor.tokenizer))
