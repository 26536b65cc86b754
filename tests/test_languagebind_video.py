"""LanguageBind video encoder: output layout, use of the temporal path, and reading the published checkpoint layout."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPAttention

from conversion.encoder_languagebind import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, read_languagebind_video_encoder
from conversion.errors import ConversionError
from modeling_composite.configuration_languagebind_video import CompositeLanguageBindVideoConfig
from modeling_composite.modeling_languagebind_video import CompositeLanguageBindVideoEncoder


FRAMES = 4
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=14,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    num_frames=FRAMES,
    add_time_attn=True,
)
TOKENS = (28 // 14) ** 2 + 1
# One layer's tensors in LanguageBind_Video_merge, as its LanguageBindVideo class saves them (written out here rather
# than taken from our model, so that the reader is checked against the published layout, not against itself).
PUBLISHED_LAYER_KEYS = (
    [
        f"{module}.{projection}.{kind}"
        for module in ("self_attn", "temporal_attn")
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj")
        for kind in ("weight", "bias")
    ]
    + [
        f"{norm}.{kind}"
        for norm in ("layer_norm1", "layer_norm2", "temporal_layer_norm1")
        for kind in ("weight", "bias")
    ]
    + ["mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "temporal_embedding"]
)
PUBLISHED_VISION_KEYS = [
    "embeddings.class_embedding",
    "embeddings.patch_embedding.weight",
    "embeddings.position_embedding.weight",
    "pre_layrnorm.weight",
    "pre_layrnorm.bias",
    "post_layernorm.weight",
    "post_layernorm.bias",
] + [f"encoder.layers.{index}.{name}" for index in range(TINY["num_hidden_layers"]) for name in PUBLISHED_LAYER_KEYS]


def tiny_encoder(seed: int = 0, **overrides) -> CompositeLanguageBindVideoEncoder:
    """A tiny encoder with every parameter random (temporal ones included), in eval mode."""
    torch.manual_seed(seed)
    model = CompositeLanguageBindVideoEncoder(CompositeLanguageBindVideoConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def per_frame_clip(model: CompositeLanguageBindVideoEncoder) -> CLIPVisionModel:
    """transformers' CLIP vision model holding the encoder's non-temporal weights (loads strictly: same layout)."""
    config = model.config
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            **{
                name: getattr(config, name)
                for name in (
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "image_size",
                    "patch_size",
                    "hidden_act",
                    "layer_norm_eps",
                )
            }
        )
    ).eval()
    spatial = {name: tensor for name, tensor in model.state_dict().items() if ".temporal_" not in name}
    clip.load_state_dict(spatial, strict=True)
    return clip


def silence_temporal_path(model: CompositeLanguageBindVideoEncoder) -> None:
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.temporal_embedding.zero_()
            layer.temporal_attn.out_proj.weight.zero_()
            layer.temporal_attn.out_proj.bias.zero_()


def test_outputs_are_frames_of_each_video_in_order():
    model = tiny_encoder()
    videos = torch.randn(3, FRAMES, 3, 28, 28)
    with torch.no_grad():
        together = model(videos, output_hidden_states=True)
        alone = [model(videos[index : index + 1], output_hidden_states=True) for index in range(3)]
    assert together.last_hidden_state.shape == (3 * FRAMES, TOKENS, 32)
    assert len(together.hidden_states) == TINY["num_hidden_layers"] + 1
    assert all(state.shape == (3 * FRAMES, TOKENS, 32) for state in together.hidden_states)
    assert together.pooler_output.shape == (3, 32)
    for index, single in enumerate(alone):  # rows v * frames .. v * frames + frames - 1 are video v
        rows = slice(index * FRAMES, (index + 1) * FRAMES)
        torch.testing.assert_close(together.hidden_states[-2][rows], single.hidden_states[-2], rtol=1e-5, atol=1e-5)
    # The composite's reshape gives each video's tokens frame after frame.
    features = together.hidden_states[-2].reshape(3, FRAMES * TOKENS, 32)
    torch.testing.assert_close(features[1, 2 * TOKENS : 3 * TOKENS], together.hidden_states[-2][FRAMES + 2])


def test_without_temporal_attention_row_v_f_is_clip_on_frame_f_of_video_v():
    model = tiny_encoder()
    silence_temporal_path(model)
    clip = per_frame_clip(model)
    videos = torch.randn(2, FRAMES, 3, 28, 28)
    with torch.no_grad():
        ours = model(videos, output_hidden_states=True).hidden_states[-2]
        for video in range(2):
            for frame in range(FRAMES):
                expected = clip(videos[video, frame : frame + 1], output_hidden_states=True).hidden_states[-2][0]
                torch.testing.assert_close(ours[video * FRAMES + frame], expected, rtol=1e-5, atol=1e-5)


def test_temporal_attention_changes_the_features():
    model = tiny_encoder()
    clip = per_frame_clip(model)
    videos = torch.randn(1, FRAMES, 3, 28, 28)
    with torch.no_grad():
        ours = model(videos, output_hidden_states=True).hidden_states[-2]
        per_frame = clip(videos[0], output_hidden_states=True).hidden_states[-2]
        # Frames now see each other: changing one frame changes the features of another.
        changed = videos.clone()
        changed[0, 0] = torch.randn(3, 28, 28)
        other_frame = model(changed, output_hidden_states=True).hidden_states[-2][1]
    assert (ours - per_frame).abs().max() > 1e-2
    assert (other_frame - ours[1]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frame_attention_is_clip_attention_on_the_same_weights(dtype):
    """The attention across frames is CLIP's attention (transformers' class as the oracle), only laid out
    differently."""
    model = tiny_encoder().to(dtype)
    ours = model.encoder.layers[0].temporal_attn
    clip = CLIPAttention(CLIPVisionConfig(hidden_size=32, num_attention_heads=4)).to(dtype).eval()
    clip.load_state_dict(ours.state_dict(), strict=True)
    sequences = torch.randn(5, FRAMES, 32, dtype=dtype)
    with torch.no_grad():
        expected, _ = clip(sequences, attention_mask=None)
        torch.testing.assert_close(ours(sequences), expected)


def test_single_frame_video_and_bad_inputs():
    model = tiny_encoder()
    with torch.no_grad():
        image_as_video = model(torch.randn(2, 1, 3, 28, 28), output_hidden_states=True)
    assert image_as_video.hidden_states[-2].shape == (2, TOKENS, 32)
    with pytest.raises(ValueError, match="frames"):
        model(torch.randn(1, FRAMES - 1, 3, 28, 28))
    with pytest.raises(ValueError, match="videos, frames, channels"):
        model(torch.randn(FRAMES, 3, 28, 28))


def test_bfloat16_forward():
    model = tiny_encoder().to(torch.bfloat16)
    with torch.no_grad():
        output = model(torch.randn(1, FRAMES, 3, 28, 28), output_hidden_states=True)
    assert output.hidden_states[-2].dtype == torch.bfloat16
    assert torch.isfinite(output.hidden_states[-2].float()).all()


def save_published_layout(folder, model: CompositeLanguageBindVideoEncoder, extra: dict | None = None) -> dict:
    """A LanguageBind_Video_merge-style folder: config.json (model_type LanguageBindVideo, text and vision configs as
    LanguageBind's classes serialise them) and both towers' weights under their published names."""
    text_config = CLIPTextConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision_config = {
        **TINY,
        "model_type": "clip_vision_model",
        "num_channels": 3,
        "projection_dim": 16,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "force_patch_dropout": 0.0,
        "lora_r": 0,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "num_mel_bins": 0.0,
        "target_length": 0.0,
        "video_decode_backend": "decord",
        "output_hidden_states": False,
        "architectures": None,
    }
    config = {
        "model_type": "LanguageBindVideo",
        "architectures": ["LanguageBindVideo"],
        "projection_dim": 16,
        "logit_scale_init_value": 2.6592,
        "text_config": text_config.to_dict(),
        "vision_config": vision_config,
    }
    (folder / "config.json").write_text(json.dumps(config))
    ours = model.state_dict()
    assert sorted(ours) == sorted(PUBLISHED_VISION_KEYS)
    weights = {f"vision_model.{name}": ours[name].clone() for name in PUBLISHED_VISION_KEYS}
    weights.update({f"text_model.{name}": tensor for name, tensor in CLIPTextModel(text_config).state_dict().items()})
    weights.update(
        {
            "text_projection.weight": torch.randn(16, 16),
            "visual_projection.weight": torch.randn(16, 32),
            "logit_scale": torch.tensor(2.6592),
            "vision_model.embeddings.position_ids": torch.arange(TOKENS)[None],
            **(extra or {}),
        }
    )
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(folder / "model.safetensors"))
    return weights


def test_published_layout_converts_every_vision_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = tiny_encoder(seed=1)
    save_published_layout(tmp_path, source)
    encoder = read_languagebind_video_encoder(str(tmp_path), "video source")
    assert isinstance(encoder.config, CompositeLanguageBindVideoConfig)
    assert (encoder.config.num_frames, encoder.config.add_time_attn, encoder.config.hidden_act) == (
        FRAMES,
        True,
        "gelu",
    )
    assert sorted(encoder.weights) == sorted(PUBLISHED_VISION_KEYS)
    loaded = CompositeLanguageBindVideoEncoder(encoder.config).eval()
    loaded.load_state_dict({name: lazy.load() for name, lazy in encoder.weights.items()}, strict=True)
    videos = torch.randn(1, FRAMES, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(videos).last_hidden_state, source(videos).last_hidden_state, rtol=0, atol=0)
    processor = encoder.image_processor
    # LanguageBind's frame transform at the tower's own size (224 for the released one).
    assert processor.size.shortest_edge == 28 and (processor.crop_size.height, processor.crop_size.width) == (28, 28)
    assert list(processor.image_mean) == OPENAI_CLIP_MEAN and list(processor.image_std) == OPENAI_CLIP_STD


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"vision_model.encoder.layers.0.temporal_mlp.fc1.weight": torch.zeros(64, 32)}, "temporal_mlp"),
        ({"some_head.weight": torch.zeros(2, 2)}, "some_head"),
    ],
)
def test_unknown_tensor_is_refused_by_name(tmp_path, extra, message):
    save_published_layout(tmp_path, tiny_encoder(), extra=extra)
    with pytest.raises(ConversionError, match=message):
        read_languagebind_video_encoder(str(tmp_path), "video source")


def test_missing_tensor_and_wrong_model_type_are_refused(tmp_path):
    weights = save_published_layout(tmp_path, tiny_encoder())
    del weights["vision_model.encoder.layers.1.temporal_embedding"]
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"layers\.1\.temporal_embedding"):
        read_languagebind_video_encoder(str(tmp_path), "video source")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "clip"}))
    with pytest.raises(ConversionError, match="LanguageBindVideo"):
        read_languagebind_video_encoder(str(tmp_path), "video source")
    with pytest.raises(ConversionError, match="LanguageBind_Video_merge"):
        read_languagebind_video_encoder(None, "video source")
