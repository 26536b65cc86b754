"""BEATs, the paper's audio encoder: its fbank front end, the encoder, and reading the released checkpoint layout."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from conversion.encoder_beats import read_beats_encoder
from conversion.errors import ConversionError
from fixtures.tiny_sources import beats_checkpoint_state
from modeling_composite.configuration_beats import CompositeBeatsConfig
from modeling_composite.feature_extraction_beats import CompositeBeatsFeatureExtractor, kaldi_mel_scale
from modeling_composite.modeling_beats import BeatsGateLinear, CompositeBeatsEncoder


RATE = 16000
# A BEATs cfg as the released checkpoints write it, at toy sizes.
TINY_CFG = {
    "input_patch_size": 16,
    "embed_dim": 48,
    "conv_bias": False,
    "encoder_layers": 2,
    "encoder_embed_dim": 32,
    "encoder_ffn_embed_dim": 64,
    "encoder_attention_heads": 2,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "deep_norm": True,
    "conv_pos": 8,
    "conv_pos_groups": 4,
    "relative_position_embedding": True,
    "num_buckets": 32,
    "max_distance": 64,
    "gru_rel_pos": True,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.05,
    "dropout_input": 0.0,
    "layer_wise_gradient_decay_ratio": 0.6,
    "finetuned_model": True,
    "predictor_dropout": 0.0,
    "predictor_class": 5,
}

LAYER_1_POSITION_TABLE = "encoder.layers.1.self_attn.relative_attention_bias.weight"  # a copy of layer 0's


@pytest.fixture(scope="module")
def extractor() -> CompositeBeatsFeatureExtractor:
    return CompositeBeatsFeatureExtractor()


def frames_of(samples: int) -> int:
    """Whole 25 ms frames every 10 ms (Kaldi's snip-edges)."""
    return 1 + (samples - 400) // 160


def tone(frequency: float, seconds: float) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * frequency * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


def test_fbank_pads_and_truncates_clips_to_1024_frames(extractor):
    rng = np.random.default_rng(0)
    short = rng.standard_normal(RATE).astype(np.float32) * 0.1
    long = rng.standard_normal(12 * RATE).astype(np.float32) * 0.1
    features = extractor([short, long], sampling_rate=RATE, padding="max_length", truncation=True, return_tensors="np")
    batch = features["input_features"]
    assert batch.shape == (2, 1024, 128) and batch.dtype == np.float32
    real = frames_of(RATE)
    assert real == 98
    assert (batch[0, real:] == 0).all() and (batch[0, :real] != 0).any(axis=1).all()
    # Truncation keeps the first 1024 frames: the same as featurizing only the samples they cover.
    covered = extractor(long[: 400 + 160 * 1023], sampling_rate=RATE, return_tensors="np")["input_features"][0]
    np.testing.assert_array_equal(batch[1], covered)


def test_fbank_padding_modes(extractor):
    clips = [tone(440, 0.5), tone(440, 1.0)]
    longest = extractor(clips, sampling_rate=RATE, padding="longest", return_tensors="np")["input_features"]
    assert longest.shape == (2, frames_of(RATE), 128)
    unpadded = extractor(clips, sampling_rate=RATE, padding=False)["input_features"]
    assert [len(f) for f in unpadded] == [frames_of(RATE // 2), frames_of(RATE)]
    with pytest.raises(ValueError, match="different lengths"):
        extractor(clips, sampling_rate=RATE, padding=False, return_tensors="np")
    # A clip shorter than one frame has no frames: all padding.
    assert (extractor(np.ones(100, np.float32), sampling_rate=RATE, return_tensors="np")["input_features"] == 0).all()


@pytest.mark.parametrize("frequency", [440.0, 1000.0, 3000.0])
def test_pure_tone_puts_its_energy_in_the_mel_bins_around_it(extractor, frequency):
    fbank = extractor.log_mel_fbank(tone(frequency, 0.5))
    loudest = int(fbank.mean(axis=0).argmax())
    # Kaldi's 128 triangles are evenly spaced in mel between 20 Hz and 8 kHz; bin i peaks at edge i + 1.
    low, high = kaldi_mel_scale(20.0), kaldi_mel_scale(8000.0)
    step = (high - low) / 129
    to_hz = lambda mel: 700.0 * (math.exp(mel / 1127.0) - 1.0)  # noqa: E731
    assert to_hz(low + loudest * step) < frequency < to_hz(low + (loudest + 2) * step)
    assert fbank.mean(axis=0)[loudest] > fbank.mean(axis=0)[(loudest + 40) % 128] + 5  # far bins are much quieter


def test_fbank_normalisation_is_beats_published_one(extractor):
    clip = tone(1000, 1.0)
    raw = extractor.log_mel_fbank(clip)
    normalised = extractor(clip, sampling_rate=RATE, return_tensors="np")["input_features"][0, : len(raw)]
    np.testing.assert_allclose(normalised, (raw - 15.41663) / (2 * 6.55582), rtol=0, atol=1e-6)
    # Digital silence sits at the log floor (float32 epsilon) in every bin.
    silent = extractor.log_mel_fbank(np.zeros(RATE, np.float32))
    np.testing.assert_allclose(silent, np.log(np.finfo(np.float32).eps), rtol=1e-6)


def test_fbank_refuses_another_sampling_rate_and_bad_clips(extractor):
    with pytest.raises(ValueError, match="44100 Hz.*16000 Hz.*resample"):
        extractor(tone(440, 1.0), sampling_rate=44100)
    with pytest.raises(ValueError, match="sampling_rate must be 16000"):
        CompositeBeatsFeatureExtractor(sampling_rate=8000)
    with pytest.raises(ValueError, match="mono waveform"):
        extractor(np.zeros((2, RATE), np.float32), sampling_rate=RATE)


def test_feature_extractor_round_trips_save_and_load(tmp_path, extractor):
    custom = CompositeBeatsFeatureExtractor(max_length=64)
    custom.save_pretrained(tmp_path)
    saved = (tmp_path / "preprocessor_config.json").read_text()
    assert "mel_filters" not in saved and '"max_length": 64' in saved
    loaded = CompositeBeatsFeatureExtractor.from_pretrained(tmp_path)
    assert loaded.sampling_rate == RATE and loaded.max_length == 64
    clip = tone(700, 2.0)
    np.testing.assert_array_equal(
        loaded(clip, sampling_rate=RATE, return_tensors="np")["input_features"],
        custom(clip, sampling_rate=RATE, return_tensors="np")["input_features"],
    )


def tiny_config() -> CompositeBeatsConfig:
    return CompositeBeatsConfig(
        patch_embedding_dim=48,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
        num_relative_buckets=32,
        max_relative_distance=64,
    )


def test_encoder_output_shapes_and_hidden_states():
    torch.manual_seed(0)
    model = CompositeBeatsEncoder(tiny_config()).eval()
    features = torch.randn(3, 64, 128)
    with torch.no_grad():
        output = model(features, output_hidden_states=True)
        plain = model(features, return_dict=False)
    assert output.last_hidden_state.shape == (3, (64 // 16) * (128 // 16), 32)
    assert len(output.hidden_states) == 3 and torch.equal(output.hidden_states[-1], output.last_hidden_state)
    assert isinstance(plain, tuple) and torch.equal(plain[0], output.last_hidden_state)
    with pytest.raises(ValueError, match=r"\(clips, frames, 128\)"):
        model(torch.randn(3, 64, 80))
    # The gate's 8-wide linear must stay out of bitsandbytes' reach (it converts exact nn.Linear only).
    gates = [module for module in model.modules() if isinstance(module, BeatsGateLinear)]
    assert len(gates) == 2 and all(type(module) is not nn.Linear for module in gates)


def test_config_refuses_inconsistent_sizes():
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        CompositeBeatsConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="gated_relative_position needs"):
        CompositeBeatsConfig(relative_position_embedding=False)


def save_checkpoint(path, cfg: dict, state: dict) -> str:
    torch.save({"cfg": cfg, "model": state}, path)
    return str(path)


def test_released_layout_converts_completely_and_loads_strictly(tmp_path):
    state = beats_checkpoint_state(TINY_CFG)
    assert len(state) == 5 + 5 + 20 * TINY_CFG["encoder_layers"] + 2
    encoder = read_beats_encoder(save_checkpoint(tmp_path / "BEATs_tiny.pt", TINY_CFG, state), "audio")
    assert isinstance(encoder.image_processor, CompositeBeatsFeatureExtractor)
    assert encoder.config.hidden_size == 32 and encoder.config.num_hidden_layers == 2
    model = CompositeBeatsEncoder(encoder.config).eval()
    model.load_state_dict({name: lazy.load() for name, lazy in encoder.weights.items()}, strict=True)
    conv = model.encoder.pos_conv[0].parametrizations.weight
    torch.testing.assert_close(conv.original0, state["encoder.pos_conv.0.weight_g"], rtol=0, atol=0)
    torch.testing.assert_close(conv.original1, state["encoder.pos_conv.0.weight_v"], rtol=0, atol=0)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 32, 128)).last_hidden_state).all()
    # A folder holding the one checkpoint works the same way.
    assert set(read_beats_encoder(str(tmp_path), "audio").weights) == set(encoder.weights)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda state: state.update({"encoder.extra.weight": torch.zeros(1)}), "encoder.extra.weight"),
        (lambda state: state.pop("encoder.layers.1.fc2.bias"), "lacks 1 tensor.*encoder.layers.1.fc2.bias"),
        (lambda state: state.update({"encoder.layers.1.fc1.bias": torch.zeros(3)}), "layers.1.fc1.bias.*shape"),
        (
            lambda state: state[LAYER_1_POSITION_TABLE].add_(1.0),
            "differs from",
        ),
    ],
)
def test_unexpected_missing_or_mismatched_tensors_fail(tmp_path, change, message):
    state = beats_checkpoint_state(TINY_CFG)
    change(state)
    with pytest.raises(ConversionError, match=message):
        read_beats_encoder(save_checkpoint(tmp_path / "BEATs_tiny.pt", TINY_CFG, state), "audio")


def test_reader_refuses_ambiguous_folders_and_non_beats_files(tmp_path):
    save_checkpoint(tmp_path / "a.pt", TINY_CFG, beats_checkpoint_state(TINY_CFG))
    save_checkpoint(tmp_path / "b.pt", TINY_CFG, beats_checkpoint_state(TINY_CFG))
    with pytest.raises(ConversionError, match="exactly one BEATs checkpoint"):
        read_beats_encoder(str(tmp_path), "audio")
    torch.save({"state_dict": {}}, tmp_path / "other.bin")
    with pytest.raises(ConversionError, match="not a BEATs checkpoint"):
        read_beats_encoder(str(tmp_path / "other.bin"), "audio")
    with pytest.raises(ConversionError, match="layer_norm_first"):
        read_beats_encoder(save_checkpoint(tmp_path / "c.pt", {**TINY_CFG, "layer_norm_first": True}, {}), "audio")
