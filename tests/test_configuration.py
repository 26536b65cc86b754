import json

import pytest
import torch
from transformers import AutoConfig

from fixtures.tiny_composite import tiny_modality_specs
from modeling_composite import CompositeMLLMConfig
from modeling_composite.configuration_modality import ModalityConfig


def _entries():
    entries = {}
    for index, (name, spec) in enumerate(tiny_modality_specs().items()):
        entries[name] = {
            "kind": spec.kind,
            "encoder": spec.encoder.config.to_dict(),
            "feature_layer": spec.feature_layer,
            "feature_select": spec.feature_select,
            "placeholder": f"<{name}>",
            "placeholder_id": 300 + index,
            "tokens_per_item": 32 if spec.kind == "video" else 16,
            "num_frames": spec.num_frames,
            "prefix_tokens": 5,
            "suffix_tokens": 5,
            "lora": {"r": 4, "alpha": 8},
        }
    return entries


@pytest.mark.parametrize("text_model_type", ["llama", "qwen2"])
def test_config_round_trip_is_lossless(tmp_path, text_model_type):
    text_config = AutoConfig.for_model(text_model_type, vocab_size=320, hidden_size=64, num_hidden_layers=2)
    config = CompositeMLLMConfig(
        text_config=text_config.to_dict(),
        modalities=_entries(),
        text_lora={"r": 8, "alpha": 8, "folded": True},
        composition={"method": "damc", "rule": "linear", "sources": [{"id": "a/b", "revision": "abc", "weight": 0.5}]},
    )
    assert type(config.text_config).model_type == text_model_type
    again = CompositeMLLMConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = CompositeMLLMConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.modalities == config.modalities
    assert loaded.encoder_config("audio").to_dict() == config.encoder_config("audio").to_dict()
    assert loaded.positions_per_item("video") == 5 + 32 + 5
    assert loaded.has_routed_deltas


def test_naive_composite_has_no_routed_deltas():
    entries = _entries()
    for entry in entries.values():
        entry["lora"] = None
    config = CompositeMLLMConfig(text_config={"model_type": "llama", "vocab_size": 320}, modalities=entries)
    assert not config.has_routed_deltas


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "smell"}, "kind 'smell'"),
        ({"projector": "mlp2x_relu"}, "Unknown projector spec"),
        ({"feature_select": "cls"}, "feature_select"),
        ({"placeholder_id": 10_000}, "outside the text vocabulary"),
        ({"lora": {"r": 0}}, "must be an integer >= 1"),
        ({"colour": "red"}, "unknown fields"),
        ({"num_frames": 3}, "num_frames"),
    ],
)
def test_bad_modality_entries_name_the_modality(change, message):
    entries = _entries()
    entries["image"].update(change)
    with pytest.raises(ValueError, match=message) as error:
        CompositeMLLMConfig(text_config={"model_type": "llama", "vocab_size": 320}, modalities=entries)
    assert "'image'" in str(error.value)


def test_placeholder_ids_must_differ():
    entries = _entries()
    entries["audio"]["placeholder_id"] = entries["image"]["placeholder_id"]
    with pytest.raises(ValueError, match="distinct placeholder ids"):
        CompositeMLLMConfig(text_config={"model_type": "llama", "vocab_size": 320}, modalities=entries)


def test_model_round_trip_gives_identical_logits(composite, batch_all, tmp_path):
    model, processor = composite
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch_all).logits, model(**batch_all).logits, rtol=0, atol=0)


# One modality as config.json stored it before `ModalityConfig` (a plain JSON object of its 14 fields; the tiny
# audio modality of a converted composite): composites saved then load unchanged and save the same JSON.
_STORED_AUDIO_ENTRY = {
    "encoder": {
        "activation_dropout": 0.0,
        "activation_function": "gelu",
        "attention_dropout": 0.0,
        "d_model": 64,
        "dropout": 0.0,
        "encoder_attention_heads": 4,
        "encoder_ffn_dim": 128,
        "encoder_layerdrop": 0.0,
        "encoder_layers": 2,
        "initializer_range": 0.02,
        "max_source_positions": 50,
        "model_type": "qwen2_audio_encoder",
        "num_mel_bins": 16,
        "scale_embedding": False,
    },
    "feature_layer": "last",
    "feature_select": "full",
    "kind": "audio",
    "lora": {"r": 4, "alpha": 8.0},
    "num_frames": None,
    "placeholder": "<audio>",
    "placeholder_id": 262,
    "prefix_tokens": 2,
    "projector": "mlp2x_gelu",
    "projector_bias": True,
    "projector_options": None,
    "suffix_tokens": 1,
    "tokens_per_item": 25,
}


def test_a_config_json_saved_before_typed_modalities_loads_and_saves_unchanged(tmp_path):
    stored = {
        "model_type": "composite_mllm",
        "text_config": {"model_type": "llama", "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 2},
        "modalities": {"audio": _STORED_AUDIO_ENTRY},
        "lora_layout": "stacked",
        "text_lora": {"r": 8, "alpha": 8.0, "folded": True},
    }
    (tmp_path / "config.json").write_text(json.dumps(stored))
    config = CompositeMLLMConfig.from_pretrained(tmp_path)
    entry = config.modalities["audio"]
    assert isinstance(entry, ModalityConfig)
    assert (entry.kind, entry.placeholder_id, entry.tokens_per_item, entry.lora) == (
        "audio",
        262,
        25,
        {"r": 4, "alpha": 8.0},
    )
    assert config.positions_per_item("audio") == 2 + 25 + 1
    assert config.encoder_config("audio").d_model == 64
    config.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["modalities"] == {"audio": _STORED_AUDIO_ENTRY}
    assert CompositeMLLMConfig.from_pretrained(tmp_path / "again").modalities == config.modalities


def test_modality_configs_and_their_json_form_make_the_same_config():
    typed = {name: ModalityConfig.from_dict(name, entry) for name, entry in _entries().items()}
    text_config = {"model_type": "llama", "vocab_size": 320}
    from_typed = CompositeMLLMConfig(text_config=text_config, modalities=typed)
    from_json = CompositeMLLMConfig(text_config=text_config, modalities=_entries())
    assert from_typed.to_dict()["modalities"] == from_json.to_dict()["modalities"]
    assert all(isinstance(value, dict) for value in from_json.to_dict()["modalities"].values())


def test_modality_configs_of_a_composite_folders_own_class_are_taken(saved_composite):
    """vLLM loads a composite's config with the folder's remote code, whose `ModalityConfig` is another class than
    the installed package's; the package's config and the serving plugin read those entries by their fields."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from serving.modalities import config_modalities

    folder_class = get_class_from_dynamic_module("configuration_composite.CompositeMLLMConfig", saved_composite)
    remote = folder_class.from_pretrained(saved_composite)
    foreign = remote.modalities
    assert all(type(entry) is not ModalityConfig for entry in foreign.values())
    expected = {
        name: entry.to_dict()
        for name, entry in CompositeMLLMConfig.from_pretrained(saved_composite).modalities.items()
    }
    assert {name: entry.to_dict() for name, entry in config_modalities(remote).items()} == expected
    config = CompositeMLLMConfig(text_config=remote.text_config.to_dict(), modalities=foreign)
    assert all(type(entry) is ModalityConfig for entry in config.modalities.values())
    assert {name: entry.to_dict() for name, entry in config.modalities.items()} == expected
