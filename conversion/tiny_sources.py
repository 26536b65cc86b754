"""Tiny random *source* models written to folders in the formats people publish, so that conversion tests and the
demo have local sources (no downloads).

All sources share one tiny base LLM (`save_tiny_base`): the full fine-tunes (LLaVA-1.5, Video-LLaVA, Qwen2-Audio)
carry its weights plus a small seeded perturbation on every LLM tensor; the adapter formats (ModelCompose's
`adapter_model.bin`, PEFT LoRA) carry only low-rank factors and projectors for it. Every writer takes an output
folder, returns it as a `Path` and is deterministic given its seed.

- `save_tiny_base`: the base LLM and tokenizer (`AutoModelForCausalLM`, `AutoTokenizer`);
- `save_tiny_llava`: llava-hf layout (v5 keys, or the older Hub keys with `legacy_layout`) and a `LlavaProcessor`;
- `save_tiny_video_llava`: Video-LLaVA-hf layout, tokenizer, image processor, hand-written processor files;
- `save_tiny_qwen2_audio`: Qwen2-Audio layout and a `Qwen2AudioProcessor`;
- `save_tiny_modelcompose`: the paper's `adapter_model.bin` (torch pickle) and `config.json`;
- `save_tiny_clip`: a full `CLIPModel` and `CLIPImageProcessor` (the paper's vision encoder);
- `save_tiny_beats`, `save_tiny_languagebind_video`, `save_tiny_pointbert`: the paper's other encoders as they are
  published (a BEATs `.pt`, a LanguageBindVideo folder, PointLLM's `point_bert_v1.2.pt`);
- `save_tiny_peft`: a PEFT LoRA (`adapter_config.json`, `adapter_model.safetensors`) and an original-LLaVA projector.

Video-LLaVA's video processor needs torchvision in transformers 5.x, and `VideoLlavaProcessor` cannot even be
constructed without it, so its processor files are written by hand (and only load where torchvision is installed);
`video_llava_batch` builds model inputs from the tokenizer and the image processor instead.

Used by the tests and the demo; nothing here is remote code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchFeature,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
)

from modeling_composite.tiny import (
    HIDDEN,
    IMAGE_SIZE,
    tiny_audio_encoder,
    tiny_feature_extractor,
    tiny_image_processor,
    tiny_llm,
    tiny_tokenizer,
    tiny_vision_encoder,
)


PATCH_SIZE = 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16 patches; LLaVA drops CLS ("default" strategy)
VIDEO_FRAMES = 2
VIDEO_TOKENS_PER_FRAME = IMAGE_TOKENS + 1  # Video-LLaVA keeps CLS for video frames
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip

# Tiny sizes of the paper's encoders fit bitsandbytes' CPU 4-bit kernels (linear inputs a multiple of 64); PointBERT's
# width must also divide into its 6 heads (the reader cannot see the head count and takes PointLLM's).
TINY_POINTBERT_WIDTH = 192
# Widths of the tiny encoders behind each paper modality (the projector's input).
_PAPER_ENCODER_WIDTH = {"image": HIDDEN, "video": HIDDEN, "audio": HIDDEN, "point": TINY_POINTBERT_WIDTH}
# The paper's modality names (ModelCompose `infer_modals`), keyed by our kinds.
PAPER_MODALITY = {"image": "vision", "audio": "audio", "video": "video", "point": "point"}
_FAKE_ROOT = "/yeesuanAI05/thumt/dyy/model"
_PAPER_ENCODER_FIELDS = {
    "image": {
        "mm_vision_tower": f"{_FAKE_ROOT}/clip-vit-large-patch14-336",
        "mm_vision_encoder": f"{_FAKE_ROOT}/clip-vit-large-patch14-336",
        "mm_hidden_size": HIDDEN,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
    },
    "audio": {
        "mm_audio_encoder": f"{_FAKE_ROOT}/BEATs/BEATs_iter3_plus_AS2M.pt",
        "mm_audio_hidden_size": HIDDEN,
        "mm_audio_projector_type": "qformer_4N_1L",
    },
    "video": {
        "mm_video_encoder": f"{_FAKE_ROOT}/LanguageBind/LanguageBind_Video_merge",
        "mm_video_hidden_size": HIDDEN,
        "mm_video_projector_type": "mlp2x_gelu",
        "mm_video_select_layer": -2,
        "mm_video_select_feature": "patch",
    },
    "point": {
        "mm_point_encoder": f"{_FAKE_ROOT}/PointLLM/point_bert_v1.2.pt",
        "mm_point_hidden_size": TINY_POINTBERT_WIDTH,
        "mm_point_projector_type": "mlp2x_gelu",
    },
}

VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }} "
    "{% else %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] in ('image', 'video', 'audio') %}<{{ item['type'] }}>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %} "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# --- shared helpers -------------------------------------------------------------------------------------------------


def _folder(folder: str | os.PathLike) -> Path:
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _add_special_tokens(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> list[int]:
    """Adds `tokens` as special tokens (ids right after the 260 base tokens, inside the 320 embedding rows)."""
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    for token in tokens:
        if tokenizer.tokenize(token) != [token]:
            raise ValueError(f"{token!r} does not tokenize to a single token")
    return ids


def _tiny_clip_vision_config() -> PreTrainedConfig:
    """The CLIP vision config of `tiny.tiny_vision_encoder` (32x32 images, 8x8 patches, width 64, 2 layers)."""
    config = tiny_vision_encoder().config
    config.architectures = None
    return config


def _perturbed_base(base_folder: str | os.PathLike, seed: int, delta_scale: float) -> dict[str, torch.Tensor]:
    """The state dict of the base LLM in `base_folder` with `delta_scale * randn` added to every tensor (a full
    fine-tune: embeddings, norms and lm_head included)."""
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    return {
        name: tensor + delta_scale * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        for name, tensor in base.state_dict().items()
    }


def _load_llm(model: PreTrainedModel, llm_state: dict[str, torch.Tensor]) -> None:
    """Loads a causal-LM state dict (`model.*`, `lm_head.*`) into a transformers multimodal model whose decoder is
    `model.language_model` and whose head is `lm_head` (LLaVA, Video-LLaVA, Qwen2-Audio in v5)."""
    decoder = {name.removeprefix("model."): value for name, value in llm_state.items() if name.startswith("model.")}
    head = {name.removeprefix("lm_head."): value for name, value in llm_state.items() if name.startswith("lm_head.")}
    if len(decoder) + len(head) != len(llm_state):
        raise ValueError(f"Unexpected keys in the base LLM: {sorted(set(llm_state) - set(decoder) - set(head))}")
    with torch.no_grad():
        model.model.language_model.load_state_dict(decoder, strict=True)
        model.lm_head.load_state_dict(head, strict=True)


def _save_fine_tuned(
    path: Path,
    model_class: type,
    config: PreTrainedConfig,
    llm_state: dict[str, torch.Tensor],
    seed: int,
    legacy_prefixes: list[tuple[str, str]] | None,
) -> None:
    """A transformers multimodal model with fresh (seeded) towers and projector around the fine-tuned LLM, saved in
    the v5 key layout, or renamed to the older Hub layout given by `legacy_prefixes`."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    _load_llm(model, llm_state)
    model.save_pretrained(path, save_original_format=False)  # v5 keys; transformers' default writes legacy ones
    if legacy_prefixes is not None:
        _rename_saved_weights(path, legacy_prefixes)


def _rename_saved_weights(folder: Path, prefixes: list[tuple[str, str]]) -> None:
    """Rewrites every `*.safetensors` file in `folder` (and a shard index, if any) with key prefixes renamed; the
    first matching (old, new) pair wins. Used to write the older llava-hf Hub key layout."""

    def rename(key: str) -> str:
        for old, new in prefixes:
            if key.startswith(old):
                return new + key[len(old) :]
        return key

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
        tensors = load_file(file)
        save_file({rename(key): value for key, value in tensors.items()}, file, metadata=metadata)
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        index = json.loads(index_file.read_text())
        index["weight_map"] = {rename(key): shard for key, shard in index["weight_map"].items()}
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _lora_shapes(config: PreTrainedConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each of the 7 projections of a Llama/Qwen2 decoder layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, inner = config.hidden_size, config.intermediate_size
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {
        "self_attn.q_proj": (hidden, q_out),
        "self_attn.k_proj": (hidden, kv_out),
        "self_attn.v_proj": (hidden, kv_out),
        "self_attn.o_proj": (q_out, hidden),
        "mlp.gate_proj": (hidden, inner),
        "mlp.up_proj": (hidden, inner),
        "mlp.down_proj": (inner, hidden),
    }


def _random(shape: tuple[int, ...], generator: torch.Generator, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * scale


def _mlp2x_projector(prefix: str, in_features: int, hidden: int, generator: torch.Generator) -> dict:
    """`{prefix}.0.*` / `{prefix}.2.*`: the mlp2x_gelu Sequential(Linear(in, hidden), GELU, Linear(hidden, hidden))."""
    return {
        f"{prefix}.0.weight": _random((hidden, in_features), generator),
        f"{prefix}.0.bias": _random((hidden,), generator),
        f"{prefix}.2.weight": _random((hidden, hidden), generator),
        f"{prefix}.2.bias": _random((hidden,), generator),
    }


def qformer_projector_shapes(
    encoder_width: int,
    out_features: int,
    num_queries: int = 4,
    num_layers: int = 1,
    num_positions: int = 1024,
    hidden_size: int = 192,
    intermediate_size: int = 64,
) -> dict[str, tuple[int, ...]]:
    """The paper's audio Q-Former projector tensors (relative to `model.modal_projectors.audio.`) and their shapes:
    learned queries and position embedding, a BLIP-2 BERT without its text path, and the projection into the LLM.
    The width must divide into the paper's 12 heads, which no tensor shape records."""
    hidden, ffn = hidden_size, intermediate_size
    shapes = {
        "audio_query_tokens": (1, num_queries, hidden),
        "audio_position_embedding.weight": (num_positions, encoder_width),
        "audio_llama_proj.weight": (out_features, hidden),
        "audio_llama_proj.bias": (out_features,),
        "audio_Qformer.bert.embeddings.LayerNorm.weight": (hidden,),
        "audio_Qformer.bert.embeddings.LayerNorm.bias": (hidden,),
    }
    for layer in range(num_layers):
        base = f"audio_Qformer.bert.encoder.layer.{layer}."
        for block in ("attention", "crossattention"):
            width_in = encoder_width if block == "crossattention" else hidden
            for name, in_features in (("query", hidden), ("key", width_in), ("value", width_in)):
                shapes[f"{base}{block}.self.{name}.weight"] = (hidden, in_features)
                shapes[f"{base}{block}.self.{name}.bias"] = (hidden,)
            for name, shape in (("dense.weight", (hidden, hidden)), ("dense.bias", (hidden,)),
                                ("LayerNorm.weight", (hidden,)), ("LayerNorm.bias", (hidden,))):
                shapes[f"{base}{block}.output.{name}"] = shape
        shapes[f"{base}intermediate_query.dense.weight"] = (ffn, hidden)
        shapes[f"{base}intermediate_query.dense.bias"] = (ffn,)
        for name, shape in (("dense.weight", (hidden, ffn)), ("dense.bias", (hidden,)),
                            ("LayerNorm.weight", (hidden,)), ("LayerNorm.bias", (hidden,))):
            shapes[f"{base}output_query.{name}"] = shape
    return shapes


def _base_config(base_folder: str | os.PathLike | None) -> PreTrainedConfig:
    return AutoConfig.from_pretrained(base_folder) if base_folder is not None else tiny_llm("llama").config


# --- 1. the base LLM ------------------------------------------------------------------------------------------------


def save_tiny_base(folder: str | os.PathLike, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """The shared base LLM: `tiny_llm(model_type, seed, **overrides)` (LlamaForCausalLM or Qwen2ForCausalLM, 320
    embedding rows) and `tiny_tokenizer()` (260 tokens), saved with `save_pretrained`."""
    path = _folder(folder)
    tiny_llm(model_type, seed=seed, **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


# --- 2. full fine-tunes in transformers' own formats ----------------------------------------------------------------

LLAVA_LEGACY_PREFIXES = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


def save_tiny_llava(
    folder: str | os.PathLike,
    base_folder: str | os.PathLike,
    seed: int = 1,
    delta_scale: float = 0.004,
    legacy_layout: bool = False,
) -> Path:
    """A LLaVA-1.5 style source (`LlavaForConditionalGeneration`): the base LLM fully fine-tuned (every tensor
    perturbed), a random tiny CLIP tower (feature layer -2, CLS dropped) and a biased gelu projector. `<image>` is
    token 260 and expands to 16 positions. With `legacy_layout` the weights use the older llava-hf Hub keys
    (`language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.*`, `multi_modal_projector.*`), which
    transformers renames at load."""
    path = _folder(folder)
    llm_state = _perturbed_base(base_folder, seed, delta_scale)
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    (image_token_id,) = _add_special_tokens(tokenizer, [IMAGE_TOKEN])
    config = LlavaConfig(
        text_config=AutoConfig.from_pretrained(base_folder).to_dict(),
        vision_config=_tiny_clip_vision_config().to_dict(),
        image_token_index=image_token_id,
        image_seq_length=IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    _save_fine_tuned(path, LlavaForConditionalGeneration, config, llm_state, seed, LLAVA_LEGACY_PREFIXES if legacy_layout else None)
    processor = LlavaProcessor(
        image_processor=tiny_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VICUNA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    return path


VIDEO_LLAVA_LEGACY_PREFIXES = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.image_tower.", "image_tower.vision_model."),
    ("model.video_tower.", "video_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


def _video_llava_image_processor() -> VideoLlavaImageProcessor:
    return VideoLlavaImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def save_tiny_video_llava(
    folder: str | os.PathLike,
    base_folder: str | os.PathLike,
    seed: int = 2,
    delta_scale: float = 0.004,
    legacy_layout: bool = False,
) -> Path:
    """A Video-LLaVA source (`VideoLlavaForConditionalGeneration`): the base LLM fully fine-tuned, separate random
    image and video CLIP towers (32x32, patch 8), one shared projector. `<image>` = 260 (16 positions: CLS dropped),
    `<video>` = 261 (2 frames x 17 positions: Video-LLaVA keeps CLS for video).

    No transformers config field sets the frame count: the model takes whatever frames it is given, and
    `video_seq_length` (34 here, 2056 = 8 x 257 on the Hub) only records it. The processor files
    (`processor_config.json` with the image and video processors nested, as transformers 5 writes them) are written
    by hand because `VideoLlavaProcessor` and `VideoLlavaVideoProcessor` need torchvision; the video processor
    carries `num_frames=2`. `preprocessor_config.json` (`VideoLlavaImageProcessor`) and the tokenizer load without
    torchvision; use `video_llava_batch` to build inputs."""
    path = _folder(folder)
    llm_state = _perturbed_base(base_folder, seed, delta_scale)
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    image_token_id, video_token_id = _add_special_tokens(tokenizer, [IMAGE_TOKEN, VIDEO_TOKEN])
    config = VideoLlavaConfig(
        text_config=AutoConfig.from_pretrained(base_folder).to_dict(),
        vision_config=_tiny_clip_vision_config().to_dict(),
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        image_seq_length=IMAGE_TOKENS,
        video_seq_length=VIDEO_FRAMES * VIDEO_TOKENS_PER_FRAME,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    _save_fine_tuned(path, VideoLlavaForConditionalGeneration, config, llm_state, seed, VIDEO_LLAVA_LEGACY_PREFIXES if legacy_layout else None)

    tokenizer.save_pretrained(path)
    image_processor = _video_llava_image_processor()
    image_processor.save_pretrained(path)  # preprocessor_config.json: loads with AutoImageProcessor
    image_dict = image_processor.to_dict()
    video_dict = {key: value for key, value in image_dict.items() if key != "image_processor_type"}
    video_dict.update(
        video_processor_type="VideoLlavaVideoProcessor",
        default_to_square=False,
        do_sample_frames=False,
        num_frames=VIDEO_FRAMES,
    )
    (path / "video_preprocessor_config.json").write_text(json.dumps(video_dict, indent=2, sort_keys=True) + "\n")
    processor_dict = {
        "processor_class": "VideoLlavaProcessor",
        "image_processor": image_dict,
        "video_processor": video_dict,
        "patch_size": PATCH_SIZE,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
        "image_token": IMAGE_TOKEN,
        "video_token": VIDEO_TOKEN,
    }
    (path / "processor_config.json").write_text(json.dumps(processor_dict, indent=2, sort_keys=True) + "\n")
    return path


def _frames(video) -> list:
    """A video as a list of frames (PIL images or HxWxC arrays) from a list/tuple or a (T, H, W, C) array/tensor."""
    if isinstance(video, (list, tuple)):
        return list(video)
    return [frame for frame in np.asarray(video)]


def video_llava_batch(
    folder: str | os.PathLike,
    text: str,
    images: list | None = None,
    videos: list | None = None,
) -> BatchFeature:
    """Model inputs for a `save_tiny_video_llava` folder without torchvision (what `VideoLlavaProcessor` would
    produce): each `<image>` becomes 16 image tokens and each `<video>` frames x 17 video tokens;
    `pixel_values` is (images, 3, 32, 32) and `pixel_values_videos` (videos, frames, 3, 32, 32), all frames run
    through the image processor. Videos are lists of frames or (T, H, W, C) arrays; all must have the same length."""
    image_processor = VideoLlavaImageProcessor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    images, videos = list(images or []), list(videos or [])
    if text.count(IMAGE_TOKEN) != len(images) or text.count(VIDEO_TOKEN) != len(videos):
        raise ValueError(
            f"{text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} and {text.count(VIDEO_TOKEN)} {VIDEO_TOKEN} in the text, but "
            f"{len(images)} images and {len(videos)} videos were given."
        )
    data = {}
    if images:
        data["pixel_values"] = image_processor(
            images=images, return_tensors="pt", return_legacy_image_output=False
        )["pixel_values"]
    if videos:
        clips = [
            image_processor(images=_frames(video), return_tensors="pt", return_legacy_image_output=False)[
                "pixel_values"
            ]
            for video in videos
        ]
        data["pixel_values_videos"] = torch.stack(clips)
        text = text.replace(VIDEO_TOKEN, VIDEO_TOKEN * (clips[0].shape[0] * VIDEO_TOKENS_PER_FRAME))
    text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * IMAGE_TOKENS)
    data.update(tokenizer(text, return_tensors="pt"))
    return BatchFeature(data)


QWEN2_AUDIO_LEGACY_PREFIXES = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


def save_tiny_qwen2_audio(
    folder: str | os.PathLike,
    base_folder: str | os.PathLike,
    seed: int = 3,
    delta_scale: float = 0.004,
    legacy_layout: bool = False,
) -> Path:
    """A Qwen2-Audio source (`Qwen2AudioForConditionalGeneration`) on a Qwen2 base (`save_tiny_base(...,
    model_type="qwen2")`): the base fully fine-tuned, a random tiny Qwen2-Audio encoder (16 mel bins; 1 s -> 25
    features), a linear projector. Tokens: `<|AUDIO|>` 260, `<|audio_bos|>` 261, `<|audio_eos|>` 262. Saved with a
    `Qwen2AudioProcessor` (`tiny_feature_extractor()`: 16 kHz, padded to 1 s)."""
    path = _folder(folder)
    llm_state = _perturbed_base(base_folder, seed, delta_scale)
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    audio_token_id, _, _ = _add_special_tokens(tokenizer, [AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS])
    audio_config = tiny_audio_encoder().config
    audio_config.architectures = None
    config = Qwen2AudioConfig(
        audio_config=audio_config.to_dict(),
        text_config=AutoConfig.from_pretrained(base_folder).to_dict(),
        audio_token_index=audio_token_id,
    )
    _save_fine_tuned(path, Qwen2AudioForConditionalGeneration, config, llm_state, seed, QWEN2_AUDIO_LEGACY_PREFIXES if legacy_layout else None)
    Qwen2AudioProcessor(feature_extractor=tiny_feature_extractor(), tokenizer=tokenizer).save_pretrained(path)
    return path


# --- 3. the paper's released format (THUNLP-MT/ModelCompose) --------------------------------------------------------


def save_tiny_modelcompose(
    folder: str | os.PathLike,
    kind: str = "image",
    method: str = "damc",
    seed: int = 4,
    rank: int = 4,
    alpha: float = 8.0,
    prefix_tokens: int = 2,
    suffix_tokens: int = 2,
    base_folder: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A unimodal checkpoint as ModelCompose releases them (`Adu2021/ModelCompose`): `adapter_model.bin` (a
    `torch.save`d plain dict, no LLM weights) and `config.json` (the base's Llama fields, transformers-4.31 style,
    plus the multimodal fields). Keys, with m the paper's modality name (`vision` for kind "image"):

    - `model.layers.{i}.{self_attn.{q,k,v,o}_proj,mlp.{gate,up,down}_proj}.lora_{A,B}.default.weight`
      (A: (rank, in), B: (out, rank)), and for DAMC the same with `.{m}.` instead of `.default.`;
    - `model.modal_projectors.{m}.{0,2}.{weight,bias}` (mlp2x_gelu: encoder width -> hidden -> hidden), except for
      audio: the Q-Former of `qformer_projector_shapes` (`qformer_4N_1L`, as the paper's `qformer_32N_2L`);
    - DAMC only: `prefix_tokens.{m}` (1, prefix_tokens, hidden) and `suffix_tokens.{m}` (1, suffix_tokens, hidden).

    All tensors are random and non-zero (scale 0.1). The encoder paths in the config are fake absolute paths, as in
    the released configs; the tiny encoders they stand for are `save_tiny_clip`, `save_tiny_beats`,
    `save_tiny_languagebind_video` and `save_tiny_pointbert`."""
    if kind not in PAPER_MODALITY:
        raise ValueError(f"kind must be one of {sorted(PAPER_MODALITY)}, not {kind!r}")
    if method not in ("damc", "naive"):
        raise ValueError(f"method must be 'damc' or 'naive', not {method!r}")
    path = _folder(folder)
    base = _base_config(base_folder)
    modality = PAPER_MODALITY[kind]
    adapters = ["default", modality] if method == "damc" else ["default"]
    generator = torch.Generator().manual_seed(seed)

    state: dict[str, torch.Tensor] = {}
    shapes = _lora_shapes(base)
    for layer in range(base.num_hidden_layers):
        for projection in PROJECTIONS:
            in_features, out_features = shapes[projection]
            for adapter in adapters:
                prefix = f"model.layers.{layer}.{projection}"
                state[f"{prefix}.lora_A.{adapter}.weight"] = _random((rank, in_features), generator)
                state[f"{prefix}.lora_B.{adapter}.weight"] = _random((out_features, rank), generator)
    projector = f"model.modal_projectors.{modality}"
    if kind == "audio":  # the paper's audio projector is a Q-Former (`qformer_4N_1L` here, `qformer_32N_2L` there)
        for key, shape in qformer_projector_shapes(HIDDEN, base.hidden_size).items():
            state[f"{projector}.{key}"] = _random(shape, generator)
    else:
        state.update(_mlp2x_projector(projector, _PAPER_ENCODER_WIDTH[kind], base.hidden_size, generator))
    if method == "damc":
        state[f"prefix_tokens.{modality}"] = _random((1, prefix_tokens, base.hidden_size), generator)
        state[f"suffix_tokens.{modality}"] = _random((1, suffix_tokens, base.hidden_size), generator)
    torch.save({key: value.to(dtype).contiguous() for key, value in state.items()}, path / "adapter_model.bin")

    config = {
        "architectures": ["MultimodalLlamaForCausalLM"],
        "bos_token_id": base.bos_token_id,
        "eos_token_id": base.eos_token_id,
        "pad_token_id": base.pad_token_id,
        "hidden_act": base.hidden_act,
        "hidden_size": base.hidden_size,
        "initializer_range": base.initializer_range,
        "intermediate_size": base.intermediate_size,
        "max_position_embeddings": base.max_position_embeddings,
        "model_type": "multimodal",
        "num_attention_heads": base.num_attention_heads,
        "num_hidden_layers": base.num_hidden_layers,
        "num_key_value_heads": base.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": base.rms_norm_eps,
        "rope_scaling": None,
        "tie_word_embeddings": bool(getattr(base, "tie_word_embeddings", False)),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.31.0",
        "use_cache": True,
        "vocab_size": base.vocab_size,
        "lora_strategy": "modal+language" if method == "damc" else "same",
        "lora_r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "local_prefix_tokens": prefix_tokens if method == "damc" else 0,
        "local_suffix_tokens": suffix_tokens if method == "damc" else 0,
        **_PAPER_ENCODER_FIELDS[kind],
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def save_tiny_clip(folder: str | os.PathLike, seed: int = 5) -> Path:
    """The vision encoder a paper vision source names (openai/clip-vit-large-patch14-336, in tiny): a full
    `CLIPModel` (vision tower = `tiny_vision_encoder`'s config; a small text tower) and a `CLIPImageProcessor`, so
    `CLIPVisionModel.from_pretrained` and `AutoImageProcessor.from_pretrained` load from the folder."""
    path = _folder(folder)
    text_config = {
        "vocab_size": 320,
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 32,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }
    config = CLIPConfig(
        text_config=text_config, vision_config=_tiny_clip_vision_config().to_dict(), projection_dim=HIDDEN
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(path)
    tiny_image_processor().save_pretrained(path)
    return path


# The paper's BEATs `cfg` (the `.pt`'s config dict) at a tiny size: 16 x 16 patches of the 1024 x 128 fbank give 512
# tokens of width HIDDEN. Training-only fields are there as the released file has them.
TINY_BEATS_CFG = {
    "input_patch_size": 16, "embed_dim": 128, "conv_bias": False, "encoder_layers": 1, "encoder_embed_dim": HIDDEN,
    "encoder_ffn_embed_dim": 128, "encoder_attention_heads": 2, "activation_fn": "gelu", "layer_norm_first": False,
    "deep_norm": True, "conv_pos": 8, "conv_pos_groups": 4, "relative_position_embedding": True, "num_buckets": 32,
    "max_distance": 64, "gru_rel_pos": True, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
    "encoder_layerdrop": 0.05, "dropout_input": 0.0, "layer_wise_gradient_decay_ratio": 0.6, "finetuned_model": True,
    "predictor_dropout": 0.0, "predictor_class": 5,
}  # fmt: skip
def beats_checkpoint_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under exactly the keys of the paper's BEATs module as a released `.pt` stores them: weight norm
    as `weight_g` / `weight_v`, the shared relative position table under every layer, the AudioSet classifier."""
    generator = torch.Generator().manual_seed(seed)
    embed, width, ffn = cfg["embed_dim"], cfg["encoder_embed_dim"], cfg["encoder_ffn_embed_dim"]
    heads, patch, kernel = cfg["encoder_attention_heads"], cfg["input_patch_size"], cfg["conv_pos"]
    shapes = {
        "patch_embedding.weight": (embed, 1, patch, patch),
        "layer_norm.weight": (embed,), "layer_norm.bias": (embed,),
        "post_extract_proj.weight": (width, embed), "post_extract_proj.bias": (width,),
        "encoder.pos_conv.0.bias": (width,),
        "encoder.pos_conv.0.weight_g": (1, 1, kernel),
        "encoder.pos_conv.0.weight_v": (width, width // cfg["conv_pos_groups"], kernel),
        "encoder.layer_norm.weight": (width,), "encoder.layer_norm.bias": (width,),
        "predictor.weight": (cfg["predictor_class"], width), "predictor.bias": (cfg["predictor_class"],),
    }  # fmt: skip
    for layer in range(cfg["encoder_layers"]):
        prefix = f"encoder.layers.{layer}."
        for projection in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{prefix}self_attn.{projection}.weight"] = (width, width)
            shapes[f"{prefix}self_attn.{projection}.bias"] = (width,)
        shapes[f"{prefix}self_attn.grep_a"] = (1, heads, 1, 1)
        shapes[f"{prefix}self_attn.grep_linear.weight"] = (8, width // heads)
        shapes[f"{prefix}self_attn.grep_linear.bias"] = (8,)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[f"{prefix}{norm}.weight"] = (width,)
            shapes[f"{prefix}{norm}.bias"] = (width,)
        shapes[f"{prefix}fc1.weight"], shapes[f"{prefix}fc1.bias"] = (ffn, width), (ffn,)
        shapes[f"{prefix}fc2.weight"], shapes[f"{prefix}fc2.bias"] = (width, ffn), (width,)
    state = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    table = torch.randn(cfg["num_buckets"], heads, generator=generator)
    for layer in range(cfg["encoder_layers"]):  # one module shared by every layer, saved under each
        state[f"encoder.layers.{layer}.self_attn.relative_attention_bias.weight"] = table.clone()
    return state


def save_tiny_beats(path: str | os.PathLike, cfg: dict | None = None, seed: int = 0) -> Path:
    """A BEATs checkpoint as Microsoft releases it (e.g. BEATs_iter3_plus_AS2M.pt), in tiny: one `torch.save`d dict
    `{"cfg": ..., "model": state dict}`. Returns the file's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg or TINY_BEATS_CFG)
    torch.save({"cfg": cfg, "model": beats_checkpoint_state(cfg, seed)}, path)
    return path


def pointbert_checkpoint_state(
    depth: int = 1, hidden: int = TINY_POINTBERT_WIDTH, encoder_dims: int = 64, point_dims: int = 6, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random tensors under exactly the keys and shape pattern of PointLLM's `point_bert_v1.2.pt` (the state dict of
    the paper's `PointTransformer`), at a tiny size; BatchNorm statistics are plausible (positive variances)."""
    shapes = {}
    for conv, (inputs, middle, hidden_out, out) in {
        "first_conv": (point_dims, 128, 128, 256),
        "second_conv": (512, 512, 512, encoder_dims),
    }.items():
        shapes[f"encoder.{conv}.0.weight"], shapes[f"encoder.{conv}.0.bias"] = (middle, inputs, 1), (middle,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"encoder.{conv}.1.{name}"] = (hidden_out,)
        shapes[f"encoder.{conv}.1.num_batches_tracked"] = ()
        shapes[f"encoder.{conv}.3.weight"], shapes[f"encoder.{conv}.3.bias"] = (out, hidden_out, 1), (out,)
    shapes.update({
        "reduce_dim.weight": (hidden, encoder_dims), "reduce_dim.bias": (hidden,),
        "cls_token": (1, 1, hidden), "cls_pos": (1, 1, hidden),
        "pos_embed.0.weight": (128, 3), "pos_embed.0.bias": (128,),
        "pos_embed.2.weight": (hidden, 128), "pos_embed.2.bias": (hidden,),
    })  # fmt: skip
    for index in range(depth):
        block = f"blocks.blocks.{index}"
        shapes.update({
            f"{block}.norm1.weight": (hidden,), f"{block}.norm1.bias": (hidden,),
            f"{block}.attn.qkv.weight": (3 * hidden, hidden),
            f"{block}.attn.proj.weight": (hidden, hidden), f"{block}.attn.proj.bias": (hidden,),
            f"{block}.norm2.weight": (hidden,), f"{block}.norm2.bias": (hidden,),
            f"{block}.mlp.fc1.weight": (4 * hidden, hidden), f"{block}.mlp.fc1.bias": (4 * hidden,),
            f"{block}.mlp.fc2.weight": (hidden, 4 * hidden), f"{block}.mlp.fc2.bias": (hidden,),
        })  # fmt: skip
    shapes["norm.weight"], shapes["norm.bias"] = (hidden,), (hidden,)
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(shape, generator=generator) * 0.1 for key, shape in shapes.items()}
    for key in state:
        if key.endswith("running_var"):
            state[key] = state[key].abs() + 0.5
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
    return state


def save_tiny_pointbert(path: str | os.PathLike, seed: int = 0, **sizes: int) -> Path:
    """PointLLM's `point_bert_v1.2.pt` in tiny: a flat `torch.save`d state dict. Returns the file's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pointbert_checkpoint_state(seed=seed, **sizes), path)
    return path


def save_tiny_languagebind_video(
    folder: str | os.PathLike, seed: int = 0, num_frames: int = 2, extra: dict[str, torch.Tensor] | None = None
) -> Path:
    """LanguageBind/LanguageBind_Video_merge in tiny: `config.json` (model_type `LanguageBindVideo`, text and vision
    configs as LanguageBind's classes write them) and `model.safetensors` with both towers under their published names
    (`vision_model.*` with the temporal attention, `text_model.*`, projections, `logit_scale`, the stale
    `vision_model.embeddings.position_ids`). Every vision parameter is random and non-zero. `extra` adds tensors."""
    from modeling_composite.configuration_languagebind_video import CompositeLanguageBindVideoConfig
    from modeling_composite.modeling_languagebind_video import CompositeLanguageBindVideoEncoder

    path = _folder(folder)
    vision = {
        "hidden_size": HIDDEN, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        "num_frames": num_frames, "add_time_attn": True,
    }  # fmt: skip
    text_config = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=8, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0)
    vision_config = {
        **vision, "model_type": "clip_vision_model", "num_channels": 3, "projection_dim": 16, "attention_dropout": 0.0,
        "initializer_range": 0.02, "initializer_factor": 1.0, "force_patch_dropout": 0.0, "lora_r": 0,
        "lora_alpha": 16, "lora_dropout": 0.0, "video_decode_backend": "decord",
    }  # fmt: skip
    config = {"model_type": "LanguageBindVideo", "architectures": ["LanguageBindVideo"], "projection_dim": 16,
              "logit_scale_init_value": 2.6592, "text_config": text_config.to_dict(), "vision_config": vision_config}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.manual_seed(seed)
    encoder = CompositeLanguageBindVideoEncoder(CompositeLanguageBindVideoConfig(**vision))
    generator = torch.Generator().manual_seed(seed)
    weights = {f"vision_model.{name}": tensor + _random(tensor.shape, generator, 0.05)
               for name, tensor in encoder.state_dict().items()}
    weights.update({f"text_model.{name}": tensor for name, tensor in CLIPTextModel(text_config).state_dict().items()})
    tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1
    weights.update({
        "text_projection.weight": _random((16, 16), generator),
        "visual_projection.weight": _random((16, HIDDEN), generator),
        "logit_scale": torch.tensor(2.6592), "vision_model.embeddings.position_ids": torch.arange(tokens)[None],
        **(extra or {}),
    })  # fmt: skip
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(path / "model.safetensors"))
    return path


# --- 4. PEFT LoRA (+ an original-LLaVA projector) -------------------------------------------------------------------


def save_tiny_peft(
    folder: str | os.PathLike,
    base_folder: str | os.PathLike,
    seed: int = 6,
    rank: int = 4,
    alpha: float = 8.0,
    projector_file: str | None = "mm_projector.safetensors",
) -> Path:
    """A PEFT LoRA adapter on the base, written by hand in PEFT's on-disk format: `adapter_config.json` and
    `adapter_model.safetensors` with keys `base_model.model.model.layers.{i}.{proj}.lora_{A,B}.weight` (A: (rank,
    in), B: (out, rank), random non-zero). With `projector_file`, also an original-LLaVA projector
    (`model.mm_projector.{0,2}.{weight,bias}`, 64 -> 64 -> 64): safetensors, or `torch.save` for a `.bin` name."""
    path = _folder(folder)
    base = AutoConfig.from_pretrained(base_folder)
    generator = torch.Generator().manual_seed(seed)
    shapes = _lora_shapes(base)
    state = {}
    for layer in range(base.num_hidden_layers):
        for projection in PROJECTIONS:
            in_features, out_features = shapes[projection]
            prefix = f"base_model.model.model.layers.{layer}.{projection}"
            state[f"{prefix}.lora_A.weight"] = _random((rank, in_features), generator)
            state[f"{prefix}.lora_B.weight"] = _random((out_features, rank), generator)
    save_file(state, path / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": str(Path(base_folder).resolve()),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": [projection.split(".")[1] for projection in PROJECTIONS],
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    if projector_file is not None:
        projector = _mlp2x_projector("model.mm_projector", HIDDEN, base.hidden_size, generator)
        if projector_file.endswith(".safetensors"):
            save_file(projector, path / projector_file, metadata={"format": "pt"})
        else:
            torch.save(projector, path / projector_file)
    return path


__all__ = [
    "save_tiny_base",
    "save_tiny_llava",
    "save_tiny_video_llava",
    "video_llava_batch",
    "save_tiny_qwen2_audio",
    "save_tiny_modelcompose",
    "save_tiny_clip",
    "save_tiny_beats",
    "save_tiny_languagebind_video",
    "save_tiny_pointbert",
    "save_tiny_peft",
]
