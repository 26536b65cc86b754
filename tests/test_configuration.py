import pytest
import torch
from transformers import AutoConfig

from modeling_composite import CompositeMLLMConfig
from modeling_composite.tiny import tiny_modality_specs


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
