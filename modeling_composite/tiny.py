"""Tiny random parts for tests and the demo: a byte-level tokenizer, a small LLM and one small encoder per modality.

Every `nn.Linear` has in_features % 64 == 0 and out_features % 32 == 0, the shapes bitsandbytes' fast 4-bit CPU
kernels need. Not remote code.
"""

import dataclasses
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    WhisperFeatureExtractor,
)

from .builder import ModalitySpec, clip_image_processor, compose
from .configuration_point_encoder import CompositePointEncoderConfig
from .modeling_composite import CompositeMLLMForCausalLM
from .modeling_point_encoder import CompositePointEncoder
from .processing_composite import CompositeMLLMProcessor


HIDDEN = 64
IMAGE_SIZE = 32
SAMPLING_RATE = 16000
AUDIO_SECONDS = 1
MEL_BINS = 16
POINTS = 64


# Ids 0-3 of every tiny vocabulary, the ids `tiny_llm`'s config names.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def wrap_tokenizer(backend: Tokenizer, **kwargs) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a `tokenizers` backend whose vocabulary starts with `SPECIAL_TOKENS`;
    left padding, for batched generation."""
    unk, bos, eos, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, padding_side="left", **kwargs
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (every byte is a token, no merges) with BOS/EOS/PAD/UNK: any text round-trips."""
    # `alphabet()` comes from a hash set, in no fixed order: sort it, so every call builds the same vocabulary.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return wrap_tokenizer(backend, model_input_names=["input_ids", "attention_mask"])


def tiny_llm(model_type: str = "llama", vocab_size: int = 320, seed: int = 0, **overrides) -> PreTrainedModel:
    """A 2-layer causal LM of width 64 (Llama or Qwen2), randomly initialised from `seed`."""
    settings = {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "tie_word_embeddings": False,
    }
    settings.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings)).eval()


def tiny_vision_encoder(seed: int = 1) -> PreTrainedModel:
    """CLIP vision tower: 32x32 images, 8x8 patches (16 patches + CLS), width 64, 2 layers."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "clip_vision_model",
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    return AutoModel.from_config(config).eval()


def tiny_audio_encoder(seed: int = 2) -> PreTrainedModel:
    """Qwen2-Audio (Whisper-style) encoder on 1 s of 16 mel bins: 100 frames -> 50 positions -> 25 features."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "qwen2_audio_encoder",
        num_mel_bins=MEL_BINS,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        d_model=HIDDEN,
        max_source_positions=AUDIO_SECONDS * SAMPLING_RATE // 160 // 2,
    )
    return AutoModel.from_config(config).eval()


def tiny_point_encoder(seed: int = 3) -> CompositePointEncoder:
    """Point encoder on 64 xyz+rgb points: 8 groups of 8 points (+ CLS = 9 features), width 64, 2 layers."""
    torch.manual_seed(seed)
    config = CompositePointEncoderConfig(
        num_points=POINTS,
        num_groups=8,
        group_size=8,
        encoder_dims=HIDDEN,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2.0,
    )
    return CompositePointEncoder(config).eval()


def tiny_image_processor():
    return clip_image_processor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def tiny_feature_extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=MEL_BINS, sampling_rate=SAMPLING_RATE, chunk_length=AUDIO_SECONDS)


def tiny_modality_specs(
    kinds: tuple[str, ...] = ("image", "video", "audio", "point"),
    lora_rank: int | None = 4,
    prefix_tokens: int = 2,
    suffix_tokens: int = 1,
) -> dict[str, ModalitySpec]:
    """One spec per kind, named after the kind. With `lora_rank`, each modality gets a routed delta (DAMC)."""
    lora = {"r": lora_rank, "alpha": 2.0 * lora_rank} if lora_rank else None
    vision = tiny_vision_encoder()
    builders = {
        "image": lambda: ModalitySpec(kind="image", encoder=vision, feature_layer=-2, feature_select="patch"),
        "video": lambda: ModalitySpec(
            kind="video", encoder=tiny_vision_encoder(seed=4), feature_layer=-2, feature_select="patch", num_frames=2
        ),
        "audio": lambda: ModalitySpec(kind="audio", encoder=tiny_audio_encoder()),
        "point": lambda: ModalitySpec(kind="point", encoder=tiny_point_encoder()),
    }
    specs = {}
    for kind in kinds:
        spec = builders[kind]()
        spec.prefix_tokens, spec.suffix_tokens, spec.lora = prefix_tokens, suffix_tokens, lora
        specs[kind] = spec
    return specs


def build_tiny_composite(
    kinds: tuple[str, ...] = ("image", "video", "audio", "point"),
    lora_rank: int | None = 4,
    text_rank: int = 4,
    text_model_type: str = "llama",
    randomize_deltas: bool = True,
    seed: int = 0,
    spec_overrides: dict[str, dict[str, Any]] | None = None,
    text_overrides: dict | None = None,
) -> tuple[CompositeMLLMForCausalLM, CompositeMLLMProcessor]:
    """A tiny random composite of the given modality kinds. With `randomize_deltas`, the low-rank deltas (which
    start at zero) get random values so that routing changes outputs. `spec_overrides` sets fields of a kind's
    `ModalitySpec` (e.g. `{"audio": {"projector": "qformer_2N_1L", "projector_options": {...}}}`); `text_overrides`
    change the text config (e.g. `num_attention_heads=2, num_key_value_heads=1` for heads of 32, the smallest vLLM's
    CPU attention runs)."""
    specs = tiny_modality_specs(kinds, lora_rank)
    for kind, fields in (spec_overrides or {}).items():
        specs[kind] = dataclasses.replace(specs[kind], **fields)
    # Fresh projectors are initialised from the global generator: seed it, so the composite does not depend on
    # what ran before.
    torch.manual_seed(seed)
    text_lora = {"r": text_rank, "alpha": float(text_rank), "folded": True} if lora_rank and text_rank else None
    model, processor = compose(
        tiny_llm(text_model_type, seed=seed, **(text_overrides or {})),
        tiny_tokenizer(),
        specs,
        image_processor=tiny_image_processor(),
        feature_extractor=tiny_feature_extractor(),
        text_lora=text_lora,
        composition={"method": "damc" if lora_rank else "naive", "note": "tiny random composite"},
    )
    if randomize_deltas:
        generator = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for layer in model.model.routed_layers():
                for factor in layer.factor_parameters():
                    factor.copy_(torch.randn(factor.shape, generator=generator) * 0.1)
    return model.eval(), processor


def tiny_inputs(seed: int = 0) -> dict[str, object]:
    """Raw inputs for every kind: a PIL image, a 3-frame video, 0.5 s of audio, a point cloud."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    video = rng.integers(0, 255, (3, 36, 36, 3), dtype=np.uint8)
    audio = rng.standard_normal(SAMPLING_RATE // 2).astype(np.float32) * 0.1
    points = rng.standard_normal((200, 6)).astype(np.float32)
    return {"image": image, "video": video, "audio": audio, "point": points}
