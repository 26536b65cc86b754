"""A composite with two modalities of one kind (two image sources, `image` and `chart`) plus audio: the processor
matches `images=` to both image modalities in text order, gives them as `modality_inputs`, applies per-modality
image settings, and its output drives the model, `generate()`, the chat template and a save/load round trip."""

import numpy as np
import pytest
import torch
from jinja2.exceptions import TemplateError
from PIL import Image

from composition import ModalitySpec, compose
from fixtures.tiny_composite import (
    tiny_audio_encoder,
    tiny_feature_extractor,
    tiny_image_processor,
    tiny_llm,
    tiny_tokenizer,
    tiny_vision_encoder,
)
from modeling_composite import CompositeMLLMProcessor


CHART_MEAN = [0.5, 0.25, 0.75]
CHART_STD = [0.2, 0.4, 0.1]


@pytest.fixture(scope="module")
def two_image_composite() -> tuple:
    """DAMC composite of two image sources (different encoders, positions and normalisation) and one audio source."""
    lora = {"r": 4, "alpha": 8.0}
    specs = {
        "image": ModalitySpec(
            kind="image",
            encoder=tiny_vision_encoder(),
            feature_layer=-2,
            feature_select="patch",
            prefix_tokens=1,
            lora=lora,
        ),
        "chart": ModalitySpec(
            kind="image", encoder=tiny_vision_encoder(seed=5), feature_select="patch", placeholder="<chart>", lora=lora
        ),
        "audio": ModalitySpec(kind="audio", encoder=tiny_audio_encoder()),
    }
    model, composed = compose(
        tiny_llm(),
        tiny_tokenizer(),
        specs,
        image_processor=tiny_image_processor(),
        feature_extractor=tiny_feature_extractor(),
        text_lora={"r": 4, "alpha": 4.0, "folded": True},
    )
    # Non-zero deltas, so that routing a token to `image` or to `chart` changes the logits.
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.model.routed_layers():
            for factor in layer.factor_parameters():
                factor.copy_(torch.randn(factor.shape, generator=generator) * 0.1)
    processor = CompositeMLLMProcessor(
        image_processor=composed.image_processor,
        feature_extractor=composed.feature_extractor,
        tokenizer=composed.tokenizer,
        modalities=model.config.processor_modalities({"chart": {"image_mean": CHART_MEAN, "image_std": CHART_STD}}),
        chat_template=composed.chat_template,
    )
    return model.eval(), processor


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(4)]


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return np.random.default_rng(4).standard_normal(8000).astype(np.float32) * 0.1


def _pixels(processor: CompositeMLLMProcessor, images: list, **settings) -> torch.Tensor:
    pixels = processor.image_processor(images, return_tensors="np", **settings)["pixel_values"]
    return torch.from_numpy(np.asarray(pixels))


def _chart_pixels(processor: CompositeMLLMProcessor, images: list) -> torch.Tensor:
    return _pixels(processor, images, image_mean=CHART_MEAN, image_std=CHART_STD)


def test_images_fill_the_placeholders_of_both_image_modalities_in_text_order(two_image_composite, pictures, clip):
    _, processor = two_image_composite
    photo, plot = pictures[:2]
    batch = processor(text="USER: <image> and <chart> <audio> ASSISTANT:", images=[photo, plot], audio=[clip])
    assert set(batch) == {"input_ids", "attention_mask", "input_features", "modality_inputs"}
    assert set(batch["modality_inputs"]) == {"image", "chart"}
    torch.testing.assert_close(batch["modality_inputs"]["image"], _pixels(processor, [photo]), rtol=0, atol=0)
    torch.testing.assert_close(batch["modality_inputs"]["chart"], _chart_pixels(processor, [plot]), rtol=0, atol=0)
    swapped = processor(text="USER: <chart> and <image> <audio> ASSISTANT:", images=[photo, plot], audio=[clip])
    torch.testing.assert_close(swapped["modality_inputs"]["chart"], _chart_pixels(processor, [photo]), rtol=0, atol=0)
    torch.testing.assert_close(swapped["modality_inputs"]["image"], _pixels(processor, [plot]), rtol=0, atol=0)
    torch.testing.assert_close(swapped["input_features"], batch["input_features"], rtol=0, atol=0)


def test_matching_runs_sample_by_sample_and_only_modalities_with_inputs_appear(two_image_composite, pictures):
    _, processor = two_image_composite
    batch = processor(text=["<chart> then <image>", "<image> <image>"], images=pictures, padding=True)
    chart, image = batch["modality_inputs"]["chart"], batch["modality_inputs"]["image"]
    torch.testing.assert_close(chart, _chart_pixels(processor, pictures[:1]), rtol=0, atol=0)
    torch.testing.assert_close(image, _pixels(processor, pictures[1:]), rtol=0, atol=0)
    only_image = processor(text="<image>", images=pictures[:1])
    assert set(only_image["modality_inputs"]) == {"image"}
    assert "pixel_values" not in only_image


def test_expansion_gives_each_placeholder_its_own_positions(two_image_composite, pictures):
    model, processor = two_image_composite
    batch = processor(text="<image> <chart> <chart>", images=pictures[:3])
    for name, items in (("image", 1), ("chart", 2)):
        placeholder_id = model.config.modalities[name].placeholder_id
        expected = items * model.config.positions_per_item(name)
        assert int((batch["input_ids"] == placeholder_id).sum()) == expected
    assert model.config.positions_per_item("image") != model.config.positions_per_item("chart")


@pytest.mark.parametrize(
    "text, count, given",
    [("<image> and <chart>", 2, 1), ("<chart>", 1, 2), ("no picture", 0, 1), ("<image> <chart> <image>", 3, 2)],
)
def test_count_mismatches_name_the_kind_the_placeholders_and_both_numbers(
    two_image_composite, pictures, text, count, given
):
    _, processor = two_image_composite
    message = (
        rf"image modalities \['image', 'chart'\] share `images=`: the text has {count} of their placeholders "
        rf"\(<image>, <chart>\) but {given} image input\(s\)"
    )
    with pytest.raises(ValueError, match=message):
        processor(text=text, images=pictures[:given])


def test_placeholders_without_inputs_are_refused(two_image_composite):
    _, processor = two_image_composite
    with pytest.raises(ValueError, match="the text has 1 of their placeholders .* but 0 image input"):
        processor(text="<chart> hi")


def test_per_modality_normalisation(two_image_composite, pictures):
    """`chart` normalises with its own mean and std: from the same picture, its pixels are `image`'s pixels taken
    back to [0, 1] with the image processor's mean/std and normalised again with the chart's."""
    _, processor = two_image_composite
    batch = processor(text="<image> <chart>", images=[pictures[0], pictures[0]])
    image, chart = batch["modality_inputs"]["image"], batch["modality_inputs"]["chart"]
    default_mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    default_std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    chart_mean, chart_std = torch.tensor(CHART_MEAN).view(1, 3, 1, 1), torch.tensor(CHART_STD).view(1, 3, 1, 1)
    expected = ((image * default_std + default_mean) - chart_mean) / chart_std
    torch.testing.assert_close(chart, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(chart, image)


def test_per_modality_resolution(two_image_composite, pictures):
    """Sources trained at different input sizes each get their own resize and crop."""
    model, processor = two_image_composite
    modalities = model.config.processor_modalities(
        {"chart": {"size": {"shortest_edge": 48}, "crop_size": {"height": 48, "width": 48}}}
    )
    resized = CompositeMLLMProcessor(
        processor.image_processor, processor.feature_extractor, processor.tokenizer, modalities
    )
    batch = resized(text="<image> <chart>", images=pictures[:2])
    assert tuple(batch["modality_inputs"]["image"].shape) == (1, 3, 32, 32)
    assert tuple(batch["modality_inputs"]["chart"].shape) == (1, 3, 48, 48)


def test_processor_output_equals_explicit_modality_inputs(two_image_composite, pictures, clip):
    model, processor = two_image_composite
    photo, plot = pictures[:2]
    batch = processor(text="USER: <chart> <audio> vs <image>? ASSISTANT:", images=[plot, photo], audio=[clip])
    explicit = {
        "image": _pixels(processor, [photo]),
        "chart": _chart_pixels(processor, [plot]),
        "audio": torch.from_numpy(
            processor.feature_extractor(
                [clip], sampling_rate=16000, padding="max_length", truncation=True, return_tensors="np"
            )["input_features"]
        ),
    }
    with torch.no_grad():
        from_processor = model(**batch).logits
        by_hand = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], modality_inputs=explicit
        ).logits
        # The same pictures sent to the other modality give other logits: the two sources really are told apart.
        exchanged = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            modality_inputs={
                **explicit,
                "image": _pixels(processor, [plot]),
                "chart": _chart_pixels(processor, [photo]),
            },
        ).logits
    torch.testing.assert_close(from_processor, by_hand, rtol=0, atol=0)
    assert not torch.allclose(from_processor, exchanged)


def test_generate_with_modality_inputs(two_image_composite, pictures, clip):
    model, processor = two_image_composite
    batch = processor(
        text=["USER: <image> <chart> ASSISTANT:", "USER: <audio> <chart> then <chart> ASSISTANT:"],
        images=pictures[:4],
        audio=[clip],
        padding=True,
    )
    output = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert tuple(output.shape) == (2, batch["input_ids"].shape[1] + 3)


def test_batch_to_moves_and_casts_the_modality_inputs(two_image_composite, pictures, clip):
    _, processor = two_image_composite
    batch = processor(text="<image> <chart> <audio>", images=pictures[:2], audio=[clip])
    batch = batch.to(torch.float16)
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_features"].dtype == torch.float16
    assert all(value.dtype == torch.float16 for value in batch["modality_inputs"].values())
    batch = batch.to("cpu")
    assert all(isinstance(value, torch.Tensor) for value in batch["modality_inputs"].values())
    as_numpy = processor(text="<image> <chart>", images=pictures[:2], return_tensors="np")
    assert all(isinstance(value, np.ndarray) for value in as_numpy["modality_inputs"].values())


def test_model_input_names_list_modality_inputs_for_the_shared_kind(two_image_composite):
    _, processor = two_image_composite
    assert processor.model_input_names == ["input_ids", "attention_mask", "input_features", "modality_inputs"]


def test_chat_template_picks_the_modality_named_by_the_item(two_image_composite):
    _, processor = two_image_composite
    content = [
        {"type": "image", "modality": "chart"},
        {"type": "image"},
        {"type": "image", "modality": "image"},
        {"type": "audio"},
        {"type": "text", "text": "Compare."},
    ]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert prompt == "USER: <chart>\n<image>\n<image>\n<audio>\nCompare. ASSISTANT:"
    with pytest.raises(TemplateError, match="names modality audio, which is not one of the image modalities"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image", "modality": "audio"}]}])


def test_chat_with_pictures_sends_each_to_its_modality(two_image_composite, pictures):
    _, processor = two_image_composite
    photo, plot = pictures[:2]
    content = [
        {"type": "image", "image": plot, "modality": "chart"},
        {"type": "image", "image": photo},
        {"type": "text", "text": "Same thing?"},
    ]
    batch = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    torch.testing.assert_close(batch["modality_inputs"]["chart"], _chart_pixels(processor, [plot]), rtol=0, atol=0)
    torch.testing.assert_close(batch["modality_inputs"]["image"], _pixels(processor, [photo]), rtol=0, atol=0)


def test_round_trip_keeps_modalities_settings_and_template(two_image_composite, pictures, clip, tmp_path):
    _, processor = two_image_composite
    processor.save_pretrained(tmp_path)
    loaded = CompositeMLLMProcessor.from_pretrained(tmp_path)
    assert loaded.modalities == processor.modalities
    assert loaded.modalities["chart"]["image_processor_kwargs"] == {"image_mean": CHART_MEAN, "image_std": CHART_STD}
    assert loaded.chat_template == processor.chat_template
    kwargs = {"text": "<chart> <image> <audio>", "images": pictures[:2], "audio": [clip]}
    before, after = processor(**kwargs), loaded(**kwargs)
    assert set(after) == set(before)
    for key in ("input_ids", "attention_mask", "input_features"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    for name in ("image", "chart"):
        torch.testing.assert_close(after["modality_inputs"][name], before["modality_inputs"][name], rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"chart": {"placeholder": "<image>"}}, "distinct placeholders"),
        ({"audio": {"image_processor_kwargs": {"size": 8}}}, "only applies to image and video"),
        ({"chart": {"image_processor_kwargs": [1, 2]}}, "must be a dict"),
        ({"chart": {"kind": "picture"}}, "kind in"),
    ],
)
def test_bad_processor_modalities_are_refused(two_image_composite, change, message):
    _, processor = two_image_composite
    modalities = {name: {**entry, **change.get(name, {})} for name, entry in processor.modalities.items()}
    with pytest.raises(ValueError, match=message):
        CompositeMLLMProcessor(processor.image_processor, processor.feature_extractor, processor.tokenizer, modalities)


def test_processor_modalities_refuses_settings_for_unknown_modalities(two_image_composite):
    model, _ = two_image_composite
    with pytest.raises(ValueError, match=r"image_processor_kwargs names \['diagram'\]"):
        model.config.processor_modalities({"diagram": {"size": {"shortest_edge": 48}}})
