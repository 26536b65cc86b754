"""What the vLLM tests share with the engines they start (each engine runs in a process of its own): the tiny
composites vLLM can serve, the requests, and the engine runner itself (`python tests/vllm_support.py FOLDER OUT`)."""

import json
import os
import sys
from pathlib import Path

import numpy as np


# vLLM's CPU attention runs heads of 32, 64, 80, ...; the tiny LLM's width is 64.
SERVABLE_TEXT = {"num_attention_heads": 2, "num_key_value_heads": 1}
MAX_NEW_TOKENS = 6
# A second image-kind modality, addressed by its name in vLLM requests.
SHARED_KIND = "chart"


def build_servable_composite(folder: Path, method: str) -> Path:
    """A tiny DAMC or NaiveMC composite of image, chart (a second image modality), video, audio and point, saved in
    `folder`."""
    import torch

    from composition.compose import ModalitySpec, compose
    from composition.saving import save_composite
    from fixtures.tiny_composite import (
        tiny_feature_extractor,
        tiny_image_processor,
        tiny_llm,
        tiny_modality_specs,
        tiny_tokenizer,
        tiny_vision_encoder,
    )

    lora_rank = 4 if method == "damc" else None
    specs = tiny_modality_specs(("image", "video", "audio", "point"), lora_rank)
    specs[SHARED_KIND] = ModalitySpec(
        kind="image",
        encoder=tiny_vision_encoder(seed=5),
        feature_layer=-2,
        feature_select="patch",
        prefix_tokens=1,
        suffix_tokens=1,
        lora={"r": 4, "alpha": 8.0} if lora_rank else None,
    )
    torch.manual_seed(0)
    model, processor = compose(
        tiny_llm("llama", seed=0, **SERVABLE_TEXT),
        tiny_tokenizer(),
        specs,
        image_processor=tiny_image_processor(),
        feature_extractor=tiny_feature_extractor(),
        text_lora={"r": 4, "alpha": 4.0, "folded": True} if lora_rank else None,
        composition={"method": method, "note": "tiny random composite for the vLLM tests"},
    )
    generator = torch.Generator().manual_seed(100)
    with torch.no_grad():
        for layer in model.model.routed_layers():
            for factor in layer.factor_parameters():
                factor.copy_(torch.randn(factor.shape, generator=generator) * 0.3)
        # Placeholders would win wherever the text-only request's first answer token is likely: only their masking
        # (transformers: suppress_tokens) keeps them out of the answers.
        prompt = processor(text=requests()[5]["prompt"])
        first = int(model(**prompt).logits[0, -1].argmax())
        for entry in model.config.modalities.values():
            model.lm_head.weight[entry.placeholder_id] = 10 * model.lm_head.weight[first]
    save_composite(model.eval(), processor, folder)
    return folder


def requests() -> list[dict]:
    """Offline requests: each modality alone, mixes, two images of each image modality, and text only. `data` is
    vLLM's `multi_modal_data` (by modality key); `hf` the composite processor's arguments for the same inputs (the
    items of one kind in the order of their placeholders)."""
    rng = np.random.default_rng(0)
    image = lambda: rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)  # noqa: E731
    video = rng.integers(0, 255, (3, 36, 36, 3), dtype=np.uint8)
    audio = (rng.standard_normal(12000) * 0.1).astype(np.float32)
    cloud = rng.standard_normal((200, 6)).astype(np.float32)
    photo, plot, other = image(), image(), image()
    return [
        {"prompt": "USER: <image> What is it? ASSISTANT:", "data": {"image": photo}, "hf": {"images": [photo]}},
        {"prompt": "USER: <chart> Read it. ASSISTANT:", "data": {SHARED_KIND: plot}, "hf": {"images": [plot]}},
        {"prompt": "USER: <video> What moves? ASSISTANT:", "data": {"video": video}, "hf": {"videos": [video]}},
        {"prompt": "USER: <audio> What sound? ASSISTANT:", "data": {"audio": audio}, "hf": {"audio": [audio]}},
        {"prompt": "USER: <point> What shape? ASSISTANT:", "data": {"point": cloud}, "hf": {"point_clouds": [cloud]}},
        {"prompt": "USER: tell me a story ASSISTANT:", "data": {}, "hf": {}},
        {
            "prompt": "USER: <chart> <image> <audio> <image> Same? ASSISTANT:",
            "data": {"image": [photo, other], SHARED_KIND: plot, "audio": audio},
            "hf": {"images": [plot, photo, other], "audio": [audio]},
        },
        {
            "prompt": "USER: <point> <video> <image> <chart> All? ASSISTANT:",
            "data": {"point": cloud, "video": video, "image": other, SHARED_KIND: photo},
            "hf": {"point_clouds": [cloud], "videos": [video], "images": [other, photo]},
        },
    ]


def run_engine(folder: str, output: str, eager: bool) -> None:
    """Generate every request greedily in one batch; write the token ids (and the prompt ids vLLM built) as JSON."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        folder,
        trust_remote_code=True,
        dtype="float32",
        enforce_eager=eager,
        max_model_len=512,
        max_num_seqs=8,
        gpu_memory_utilization=0.08,
        limit_mm_per_prompt={"image": 2, SHARED_KIND: 1, "video": 1, "audio": 1, "point": 1},
    )
    batch = [{"prompt": request["prompt"], "multi_modal_data": request["data"]} for request in requests()]
    outputs = llm.generate(batch, SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0, logprobs=1))
    result = []
    for out in outputs:
        answer = out.outputs[0]
        result.append(
            {
                "prompt_ids": list(out.prompt_token_ids),
                "tokens": list(answer.token_ids),
                "logprobs": [step[token].logprob for step, token in zip(answer.logprobs, answer.token_ids)],
            }
        )
    Path(output).write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_engine(sys.argv[1], sys.argv[2], eager=sys.argv[3] == "eager")
