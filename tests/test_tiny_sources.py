"""The tiny source writers (`fixtures/tiny_sources.py`): every source loads back the way its users load it, runs on
inputs from its own processor, and has exactly the documented files and keys."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPModel,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
)

from fixtures.tiny_composite import tiny_vision_encoder
from fixtures.tiny_sources import (
    PROJECTIONS,
    TINY_POINTBERT_WIDTH,
    qformer_projector_shapes,
    save_tiny_base,
    save_tiny_clip,
    save_tiny_llava,
    save_tiny_modelcompose,
    save_tiny_peft,
    save_tiny_qwen2_audio,
    save_tiny_video_llava,
    video_llava_batch,
)


LAYERS, HIDDEN, INNER, KV = 2, 64, 128, 32
SHAPES = {  # (in, out) of each projection of the tiny base
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, KV),
    "self_attn.v_proj": (HIDDEN, KV),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INNER),
    "mlp.up_proj": (HIDDEN, INNER),
    "mlp.down_proj": (INNER, HIDDEN),
}
PROMPT = "USER: <image>\nWhat is it? ASSISTANT:"


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    base = save_tiny_base(root / "base")
    qwen2_base = save_tiny_base(root / "qwen2-base", model_type="qwen2")
    return {
        "root": root,
        "base": base,
        "qwen2_base": qwen2_base,
        "llava": save_tiny_llava(root / "llava", base),
        "llava_legacy": save_tiny_llava(root / "llava-legacy", base, legacy_layout=True),
        "video_llava": save_tiny_video_llava(root / "video-llava", base),
        "qwen2_audio": save_tiny_qwen2_audio(root / "qwen2-audio", qwen2_base),
    }


@pytest.fixture(scope="session")
def media():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    frames = [Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)) for _ in range(2)]
    audio = (rng.standard_normal(16000) * 0.1).astype(np.float32)
    return {"image": image, "frames": frames, "audio": audio}


def _keys(file) -> list[str]:
    with safe_open(file, framework="pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_base_loads_with_auto_classes(sources, model_type):
    folder = sources["base" if model_type == "llama" else "qwen2_base"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == model_type
    assert len(tokenizer) == 260
    assert model.get_input_embeddings().weight.shape == (320, HIDDEN)


@pytest.mark.parametrize("name", ["llava", "llava_legacy"])
def test_llava_loads_and_runs_on_its_processors_inputs(sources, media, name):
    processor = AutoProcessor.from_pretrained(sources[name])
    model = LlavaForConditionalGeneration.from_pretrained(sources[name])
    assert isinstance(processor, LlavaProcessor)
    assert model.config.image_token_id == processor.image_token_id == 260
    assert model.config.image_seq_length == 16
    batch = processor(images=media["image"], text=PROMPT, return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert (batch["input_ids"] == 260).sum() == 16
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], 320)
    assert torch.isfinite(logits).all()


def test_llava_chat_template_is_vicuna_like(sources):
    processor = AutoProcessor.from_pretrained(sources["llava"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == PROMPT


def test_llava_legacy_layout_has_hub_keys_and_loads_to_the_same_weights(sources):
    new = {".".join(key.split(".")[:2]) for key in _keys(sources["llava"] / "model.safetensors")}
    old = {".".join(key.split(".")[:2]) for key in _keys(sources["llava_legacy"] / "model.safetensors")}
    assert {prefix.split(".")[0] for prefix in new} == {"model", "lm_head"}
    assert {"model.language_model", "model.vision_tower", "model.multi_modal_projector"} <= new
    assert {prefix for prefix in old if not prefix.startswith("multi_modal_projector.")} == {
        "language_model.model",
        "language_model.lm_head",
        "vision_tower.vision_model",
    }
    assert any(prefix.startswith("multi_modal_projector.") for prefix in old)
    reference = LlavaForConditionalGeneration.from_pretrained(sources["llava"]).state_dict()
    legacy = LlavaForConditionalGeneration.from_pretrained(sources["llava_legacy"]).state_dict()
    assert reference.keys() == legacy.keys()
    for key, value in reference.items():
        assert torch.equal(value, legacy[key]), key


@pytest.mark.parametrize(
    ("name", "base", "model_class"),
    [
        ("llava", "base", LlavaForConditionalGeneration),
        ("video_llava", "base", VideoLlavaForConditionalGeneration),
        ("qwen2_audio", "qwen2_base", Qwen2AudioForConditionalGeneration),
    ],
)
def test_full_finetunes_perturb_every_llm_tensor(sources, name, base, model_class):
    base_state = AutoModelForCausalLM.from_pretrained(sources[base]).state_dict()
    model = model_class.from_pretrained(sources[name])
    tuned = {f"model.{key}": value for key, value in model.model.language_model.state_dict().items()}
    tuned.update({f"lm_head.{key}": value for key, value in model.lm_head.state_dict().items()})
    assert tuned.keys() == base_state.keys()
    for key, value in base_state.items():
        difference = (tuned[key] - value).abs()
        assert 1e-3 < difference.mean() and difference.max() < 0.2, key


def test_video_llava_runs_on_images_and_frame_lists(sources, media):
    folder = sources["video_llava"]
    model = VideoLlavaForConditionalGeneration.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(AutoImageProcessor.from_pretrained(folder), VideoLlavaImageProcessor)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [260, 261]
    assert (model.config.image_token_id, model.config.video_token_id) == (260, 261)
    assert model.config.video_seq_length == 2 * 17
    assert json.loads((folder / "video_preprocessor_config.json").read_text())["num_frames"] == 2

    as_array = np.stack([np.asarray(frame) for frame in media["frames"]])
    for video in (media["frames"], as_array):
        batch = video_llava_batch(
            folder, "USER: <image> <video>\nSame? ASSISTANT:", images=[media["image"]], videos=[video]
        )
        assert batch["pixel_values"].shape == (1, 3, 32, 32)
        assert batch["pixel_values_videos"].shape == (1, 2, 3, 32, 32)
        assert (batch["input_ids"] == 260).sum() == 16
        assert (batch["input_ids"] == 261).sum() == 34  # 2 frames x (16 patches + CLS)
        with torch.no_grad():
            logits = model(**batch).logits
        assert logits.shape == (1, batch["input_ids"].shape[1], 320)
    with pytest.raises(ValueError, match="1 <video>"):
        video_llava_batch(folder, "<video>", videos=[])


def test_video_llava_processor_needs_torchvision(sources):
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match="orchvision"):
            AutoProcessor.from_pretrained(sources["video_llava"])
    else:  # the hand-written processor files are meant for exactly this case
        processor = AutoProcessor.from_pretrained(sources["video_llava"])
        assert processor.video_processor.num_frames == 2


def test_qwen2_audio_loads_and_runs_on_its_processors_inputs(sources, media):
    processor = AutoProcessor.from_pretrained(sources["qwen2_audio"])
    model = Qwen2AudioForConditionalGeneration.from_pretrained(sources["qwen2_audio"])
    assert isinstance(processor, Qwen2AudioProcessor)
    tokens = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
    assert processor.tokenizer.convert_tokens_to_ids(tokens) == [260, 261, 262]
    assert model.config.audio_token_id == 260
    batch = processor(
        text="<|audio_bos|><|AUDIO|><|audio_eos|>What is it?",
        audio=[media["audio"]],
        sampling_rate=16000,
        return_tensors="pt",
    )
    assert batch["input_features"].shape == (1, 16, 100)
    assert batch["feature_attention_mask"].shape == (1, 100)
    assert (batch["input_ids"] == 260).sum() == 25
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], 320)


def _expected_modelcompose(
    method: str, modality: str, prefix: int = 2, suffix: int = 2, encoder_width: int = HIDDEN
) -> dict[str, tuple]:
    adapters = ["default", modality] if method == "damc" else ["default"]
    expected = {}
    for layer in range(LAYERS):
        for projection in PROJECTIONS:
            in_features, out_features = SHAPES[projection]
            for adapter in adapters:
                expected[f"model.layers.{layer}.{projection}.lora_A.{adapter}.weight"] = (4, in_features)
                expected[f"model.layers.{layer}.{projection}.lora_B.{adapter}.weight"] = (out_features, 4)
    if modality == "audio":
        for key, shape in qformer_projector_shapes(encoder_width, HIDDEN).items():
            expected[f"model.modal_projectors.audio.{key}"] = shape
    else:
        expected[f"model.modal_projectors.{modality}.0.weight"] = (HIDDEN, encoder_width)
        expected[f"model.modal_projectors.{modality}.2.weight"] = (HIDDEN, HIDDEN)
        for index in (0, 2):
            expected[f"model.modal_projectors.{modality}.{index}.bias"] = (HIDDEN,)
    if method == "damc":
        expected[f"prefix_tokens.{modality}"] = (1, prefix, HIDDEN)
        expected[f"suffix_tokens.{modality}"] = (1, suffix, HIDDEN)
    return expected


@pytest.mark.parametrize("method", ["damc", "naive"])
def test_modelcompose_vision_checkpoint_has_exactly_the_documented_keys(sources, tmp_path, method):
    folder = save_tiny_modelcompose(tmp_path / method, kind="image", method=method, base_folder=sources["base"])
    assert sorted(path.name for path in folder.iterdir()) == ["adapter_model.bin", "config.json"]
    state = torch.load(folder / "adapter_model.bin", weights_only=True)
    assert {key: tuple(value.shape) for key, value in state.items()} == _expected_modelcompose(method, "vision")
    assert all(value.abs().sum() > 0 for value in state.values())
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["MultimodalLlamaForCausalLM"] and config["model_type"] == "multimodal"
    assert config["lora_strategy"] == ("modal+language" if method == "damc" else "same")
    assert (config["lora_r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.05)
    assert config["local_prefix_tokens"] == config["local_suffix_tokens"] == (2 if method == "damc" else 0)
    assert config["mm_vision_tower"] == config["mm_vision_encoder"]
    assert config["mm_vision_tower"].startswith("/yeesuanAI05/")
    assert (config["mm_hidden_size"], config["mm_projector_type"]) == (64, "mlp2x_gelu")
    assert (config["mm_vision_select_layer"], config["mm_vision_select_feature"]) == (-2, "patch")
    assert config["image_aspect_ratio"] == "pad"
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (HIDDEN, LAYERS, 320)


@pytest.mark.parametrize(
    ("kind", "width", "projector"),
    [
        ("audio", HIDDEN, "qformer_4N_1L"),
        ("video", HIDDEN, "mlp2x_gelu"),
        ("point", TINY_POINTBERT_WIDTH, "mlp2x_gelu"),
    ],
)
def test_modelcompose_other_kinds_use_the_papers_names(sources, tmp_path, kind, width, projector):
    folder = save_tiny_modelcompose(tmp_path / kind, kind=kind, base_folder=sources["base"], prefix_tokens=3)
    state = torch.load(folder / "adapter_model.bin", weights_only=True)
    expected = _expected_modelcompose("damc", kind, prefix=3, encoder_width=width)
    assert {key: tuple(value.shape) for key, value in state.items()} == expected
    config = json.loads((folder / "config.json").read_text())
    assert config[f"mm_{kind}_encoder"].startswith("/yeesuanAI05/")
    assert config[f"mm_{kind}_hidden_size"] == width
    assert config[f"mm_{kind}_projector_type"] == projector
    assert "mm_vision_tower" not in config


def test_modelcompose_is_deterministic_and_keeps_its_dtype(sources, tmp_path):
    first = torch.load(save_tiny_modelcompose(tmp_path / "a") / "adapter_model.bin", weights_only=True)
    again = torch.load(save_tiny_modelcompose(tmp_path / "b") / "adapter_model.bin", weights_only=True)
    other = torch.load(save_tiny_modelcompose(tmp_path / "c", seed=9) / "adapter_model.bin", weights_only=True)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["prefix_tokens.vision"], other["prefix_tokens.vision"])
    half = save_tiny_modelcompose(tmp_path / "d", dtype=torch.bfloat16, base_folder=sources["base"])
    assert {value.dtype for value in torch.load(half / "adapter_model.bin", weights_only=True).values()} == {
        torch.bfloat16
    }
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_clip_is_a_full_clip_model_whose_vision_tower_loads_alone(tmp_path, media):
    folder = save_tiny_clip(tmp_path / "clip")
    tower = CLIPVisionModel.from_pretrained(folder)
    full = CLIPModel.from_pretrained(folder)
    reference = tiny_vision_encoder().config
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size"):
        assert getattr(tower.config, field) == getattr(reference, field), field
    assert tower.config.patch_size == reference.patch_size == 8
    for key, value in full.vision_model.state_dict().items():
        assert torch.equal(tower.state_dict()[key], value), key
    pixels = AutoImageProcessor.from_pretrained(folder)(images=media["image"], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        assert tower(pixels, output_hidden_states=True).hidden_states[-2].shape == (1, 17, HIDDEN)


@pytest.mark.parametrize("projector_file", ["mm_projector.safetensors", "mm_projector.bin"])
def test_peft_adapter_has_peft_keys_and_config(sources, tmp_path, projector_file):
    folder = save_tiny_peft(tmp_path / "peft", sources["base"], projector_file=projector_file)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["bias"]) == (4, 8.0, "none")
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert not config["fan_in_fan_out"] and not config["use_rslora"] and not config["use_dora"]
    assert config["modules_to_save"] is None
    assert AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).config.hidden_size == HIDDEN

    state = load_file(folder / "adapter_model.safetensors")
    expected = {}
    for layer in range(LAYERS):
        for projection in PROJECTIONS:
            in_features, out_features = SHAPES[projection]
            expected[f"base_model.model.model.layers.{layer}.{projection}.lora_A.weight"] = (4, in_features)
            expected[f"base_model.model.model.layers.{layer}.{projection}.lora_B.weight"] = (out_features, 4)
    assert {key: tuple(value.shape) for key, value in state.items()} == expected
    assert all(value.abs().sum() > 0 for value in state.values())

    if projector_file.endswith(".safetensors"):
        projector = load_file(folder / projector_file)
    else:
        projector = torch.load(folder / projector_file, weights_only=True)
    assert {key: tuple(value.shape) for key, value in projector.items()} == {
        "model.mm_projector.0.weight": (HIDDEN, HIDDEN),
        "model.mm_projector.0.bias": (HIDDEN,),
        "model.mm_projector.2.weight": (HIDDEN, HIDDEN),
        "model.mm_projector.2.bias": (HIDDEN,),
    }
