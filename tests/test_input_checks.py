"""Bad inputs to the model and the processor: each class of mistake is a `ValueError` (`CompositeInputError`) that
names the input or modality and the numbers, raised before any encoder runs; legitimate inputs still pass; decode
steps pay for no value check."""

import logging

import numpy as np
import pytest
import torch

from fixtures.tiny_composite import IMAGE_SIZE, MEL_BINS
from modeling_composite.input_checks import NORMALISED_PIXEL_BOUND, CompositeInputError, check_modality_items


@pytest.fixture
def no_encoder_runs(composite):
    """Fails the test if any encoder runs: a malformed input must be refused before."""
    model, _ = composite
    ran = []
    hooks = [
        encoder.register_forward_pre_hook(lambda *_, name=name: ran.append(name))
        for name, encoder in model.model.encoders.items()
    ]
    yield
    for hook in hooks:
        hook.remove()
    assert not ran, f"encoders ran on a refused input: {ran}"


def _refused(model, message: str, **inputs) -> None:
    with pytest.raises(CompositeInputError, match=message), torch.no_grad():
        model(**inputs)


def _with(batch: dict, **changes) -> dict:
    return {**batch, **changes}


# Text inputs --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda b: {"input_ids": b["input_ids"].float()},
            r"input_ids must hold integer token ids \(torch.long\), got torch.float32",
        ),
        (lambda b: {"input_ids": b["input_ids"].bool()}, r"got torch.bool"),
        (
            lambda b: {"input_ids": b["input_ids"][0]},
            r"input_ids must be a \(batch, sequence\) tensor .*\(input_ids\[None\]\)",
        ),
        (
            lambda b: {"input_ids": b["input_ids"].index_fill(1, torch.tensor([2]), 5000)},
            r"input_ids holds ids from \d+ to 5000, but the vocabulary has \d+ tokens",
        ),
        (
            lambda b: {"input_ids": b["input_ids"].index_fill(1, torch.tensor([0]), -100)},
            r"input_ids holds ids from -100 to \d+.*not -100",
        ),
        (
            lambda b: {"attention_mask": b["attention_mask"].repeat(2, 1)},
            (
                r"attention_mask must be a \(batch, sequence\) tensor for the batch of 1 prompt\(s\), "
                r"got .* shape \(2, \d+\)"
            ),
        ),
        (
            lambda b: {"attention_mask": b["attention_mask"][:, :-3]},
            r"attention_mask covers \d+ positions but the model sees \d+ \(0 cached \+ \d+ new\)",
        ),
    ],
)
def test_bad_text_inputs_are_refused_naming_the_input(change, message, composite, batch_all, no_encoder_runs):
    model, _ = composite
    _refused(model, message, **_with(batch_all, **change(batch_all)))


def test_bad_inputs_embeds_are_refused(composite, batch_all):
    model, _ = composite
    embeds = model.get_input_embeddings()(batch_all["input_ids"])
    _refused(model, r"inputs_embeds must be a \(batch, sequence, 64\) tensor", inputs_embeds=embeds[..., :32])
    _refused(model, r"inputs_embeds must be floating point", inputs_embeds=embeds.long())


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (
            lambda ids: ids[:, :-1],
            r"labels must be an integer tensor of the inputs' shape \(1, \d+\), got .*\(1, \d+\)",
        ),
        (lambda ids: ids.float(), r"labels must be an integer tensor"),
        (lambda ids: ids.index_fill(1, torch.tensor([1]), -5), r"labels holds values from -5 to \d+"),
        (lambda ids: ids.index_fill(1, torch.tensor([1]), 9999), r"labels holds values from -?\d+ to 9999"),
    ],
)
def test_bad_labels_are_refused(labels, message, composite, batch_all, no_encoder_runs):
    model, _ = composite
    _refused(model, message, **_with(batch_all, labels=labels(batch_all["input_ids"])))


def test_labels_with_ignored_positions_are_fine(composite, batch_all):
    model, _ = composite
    labels = batch_all["input_ids"].clone()
    labels[:, :10] = -100
    with torch.no_grad():
        assert torch.isfinite(model(**batch_all, labels=labels).loss)


def test_modality_inputs_that_do_not_match_the_batch_are_refused(composite, batch_all, no_encoder_runs):
    model, _ = composite
    two_images = batch_all["pixel_values"].repeat(2, 1, 1, 1)
    message = r"Modality 'image': the prompt has \d+ placeholder positions but 2 input\(s\)"
    with pytest.raises(ValueError, match=message):
        model(**_with(batch_all, pixel_values=two_images))


# Modality inputs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "change", "message"),
    [
        (
            "pixel_values",
            lambda t: t[..., : IMAGE_SIZE // 2, : IMAGE_SIZE // 2],
            rf"Modality 'image' \(image\): each item must have shape \(3, {IMAGE_SIZE}, {IMAGE_SIZE}\) "
            rf"\(channels, height, width\), got \(3, {IMAGE_SIZE // 2}, {IMAGE_SIZE // 2}\)",
        ),
        (
            "pixel_values",
            lambda t: t[:, :1],
            r"Modality 'image' \(image\): each item must have shape \(3, 32, 32\).* got \(1, 32, 32\)",
        ),
        ("pixel_values", lambda t: t.permute(0, 2, 3, 1), r"got \(32, 32, 3\)"),
        (
            "pixel_values_videos",
            lambda t: t[:, :1],
            r"Modality 'video' \(video\): each item must have shape \(2, 3, 32, 32\)",
        ),
        (
            "input_features",
            lambda t: t[:, : MEL_BINS // 2],
            rf"Modality 'audio' \(audio\): each item must have shape \({MEL_BINS}, 100\)",
        ),
        (
            "input_features",
            lambda t: t[..., :50],
            rf"each item must have shape \({MEL_BINS}, 100\) .* got \({MEL_BINS}, 50\)",
        ),
        ("point_clouds", lambda t: t[..., :3], r"Modality 'point' \(point\): each item must have shape \('any', 6\)"),
        ("point_clouds", lambda t: t[:, :4], r"Modality 'point' \(point\): each cloud needs at least 8 points, got 4"),
        (
            "pixel_values",
            lambda t: (t * 60 + 120).round().to(torch.uint8),
            r"Modality 'image' \(image\) takes normalised pixel values, got torch.uint8",
        ),
        (
            "point_clouds",
            lambda t: t.double().long(),
            r"Modality 'point' \(point\) takes floating-point values, got torch.int64",
        ),
    ],
)
def test_wrong_modality_shapes_and_dtypes_are_refused_before_the_encoder(
    key, change, message, composite, batch_all, no_encoder_runs
):
    model, _ = composite
    _refused(model, message, **_with(batch_all, **{key: change(batch_all[key])}))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("point_clouds", float("nan")),
        ("pixel_values", float("inf")),
        ("input_features", float("nan")),
        ("pixel_values_videos", -float("inf")),
    ],
)
def test_non_finite_modality_inputs_are_refused(key, value, composite, batch_all, no_encoder_runs):
    model, _ = composite
    damaged = batch_all[key].clone()
    damaged.view(-1)[7] = value
    name = {
        "point_clouds": "point",
        "pixel_values": "image",
        "input_features": "audio",
        "pixel_values_videos": "video",
    }[key]
    message = rf"Modality '{name}' \({name}\): the input holds 1 NaN or infinite value\(s\) of {damaged.numel()}"
    _refused(model, message, **_with(batch_all, **{key: damaged}))


def test_raw_pixel_values_are_refused_but_every_normalised_range_passes(composite, batch_all, no_encoder_runs):
    model, _ = composite
    raw = torch.randint(0, 256, batch_all["pixel_values"].shape).float()
    _refused(
        model,
        r"Modality 'image' \(image\): pixel values reach 2\d\d.*look like raw 0-255 values",
        **_with(batch_all, pixel_values=raw),
    )
    entry = model.config.modalities["image"]
    encoder_config = model.model.encoders["image"].config
    # The extreme values of black and white pixels under the normalisations in use, and a std as small as 0.1.
    for mean, std in ((0.48145466, 0.26862954), (0.485, 0.229), (0.5, 0.5), (0.0, 1.0), (0.5, 0.1)):
        for pixel in (0.0, 1.0):
            normalised = torch.full((1, 3, IMAGE_SIZE, IMAGE_SIZE), (pixel - mean) / std)
            check_modality_items("image", "image", entry, encoder_config, normalised)
    assert NORMALISED_PIXEL_BOUND >= 0.5 / 0.1


def test_the_processor_output_of_black_and_white_images_runs(composite):
    model, processor = composite
    images = [np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, np.uint8)]
    batch = processor(text="USER: <image> <image> ASSISTANT:", images=images)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_value_checks_run_once_per_prompt_and_never_on_decode_steps(composite, monkeypatch):
    """The range check of token ids needs a host sync (torch.aminmax): a prefill pays one, a decode step none."""
    model, processor = composite
    calls = []
    original = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    prompt = processor(text="USER: hello there ASSISTANT:")
    model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert len(calls) == 1


# The processor ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 20, 3), (1, 20, 1), (3, 3, 3)])
def test_an_image_array_whose_layout_is_ambiguous_is_refused_unless_stated(shape, composite):
    _, processor = composite
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    message = (
        rf"Modality 'image': the image array of shape \({shape[0]}, {shape[1]}, {shape[2]}\) could be "
        r"channels-first or channels-last; pass images_kwargs"
    )
    with pytest.raises(ValueError, match=message):
        processor(text="<image>", images=[image])
    stated = processor(text="<image>", images=[image], images_kwargs={"input_data_format": "channels_last"})
    assert stated["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_video_frames_with_an_ambiguous_layout_are_refused(composite):
    _, processor = composite
    video = np.random.default_rng(0).integers(0, 255, (4, 3, 20, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"Modality 'video': the image array of shape \(3, 20, 3\) could be"):
        processor(text="<video>", videos=[video])
    stated = processor(text="<video>", videos=[video], videos_kwargs={"input_data_format": "channels_last"})
    assert stated["pixel_values_videos"].shape[:2] == (1, 2)


def test_image_arrays_in_either_clear_layout_and_without_channels_of_1_or_3(composite):
    _, processor = composite
    rng = np.random.default_rng(0)
    last = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
    both = processor(text="<image> <image>", images=[last, np.ascontiguousarray(last.transpose(2, 0, 1))])
    torch.testing.assert_close(both["pixel_values"][0], both["pixel_values"][1])
    message = r"shape \(20, 24, 4\) has no channel dimension of size 1 or 3 .*\(drop an alpha"
    with pytest.raises(ValueError, match=message):
        processor(text="<image>", images=[rng.integers(0, 255, (20, 24, 4), dtype=np.uint8)])


def test_audio_longer_than_the_window_is_cut_with_a_warning(composite, caplog):
    _, processor = composite
    rate = processor.feature_extractor.sampling_rate
    window = processor.feature_extractor.n_samples
    short, long = np.zeros(window // 2, np.float32), np.zeros(window * 3, np.float32)
    with caplog.at_level(logging.WARNING):
        processor(text="<audio> <audio>", audio=[short, long])
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [
        f"Modality 'audio': audio clip 1 is {3 * window / rate:.1f} s long but the composite reads a fixed window of "
        f"{window / rate:.1f} s; everything after that is cut off. Split long audio into clips of at most that length."
    ]


def test_the_beats_extractor_names_its_window_like_whisper():
    from modeling_composite.feature_extraction_beats import CompositeBeatsFeatureExtractor

    extractor = CompositeBeatsFeatureExtractor(num_mel_bins=16, max_length=100)

    def frames(samples: int) -> int:
        waveform = np.zeros(samples, np.float32)
        features = extractor(waveform, sampling_rate=16000, padding=False, truncation=False, return_tensors="np")
        return features["input_features"].shape[1]

    assert frames(extractor.n_samples) == 100 and frames(extractor.n_samples + 160) == 101
