import numpy as np
import pytest
import torch
from PIL import Image

from modeling_composite import CompositeMLLMProcessor
from modeling_composite.processing_composite import normalize_point_cloud, sample_frame_indices


def test_processor_expands_each_placeholder_to_the_positions_the_model_fills(composite, batch_all):
    model, processor = composite
    ids = batch_all["input_ids"][0]
    for name, entry in model.config.modalities.items():
        assert int((ids == entry.placeholder_id).sum()) == model.config.positions_per_item(name)
    assert tuple(batch_all["pixel_values"].shape) == (1, 3, 32, 32)
    assert tuple(batch_all["pixel_values_videos"].shape) == (1, 2, 3, 32, 32)
    assert tuple(batch_all["input_features"].shape) == (1, 16, 100)
    assert tuple(batch_all["point_clouds"].shape) == (1, 64, 6)


def test_processor_round_trip(composite, raw_inputs, batch_all, tmp_path):
    _, processor = composite
    processor.save_pretrained(tmp_path)
    loaded = CompositeMLLMProcessor.from_pretrained(tmp_path)
    assert loaded.modalities == processor.modalities
    assert loaded.chat_template == processor.chat_template
    again = loaded(
        text="USER: <image> <video> <audio> <point> What do they share? ASSISTANT:",
        images=[raw_inputs["image"]],
        videos=[raw_inputs["video"]],
        audio=[raw_inputs["audio"]],
        point_clouds=[raw_inputs["point"]],
    )
    assert set(again) == set(batch_all)
    for key in batch_all:
        np.testing.assert_array_equal(again[key].numpy(), batch_all[key].numpy())


def test_chat_template_renders_every_modality(composite, raw_inputs):
    _, processor = composite
    content = [{"type": kind} for kind in ("image", "video", "audio", "point")] + [{"type": "text", "text": "Hi?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert prompt == "USER: <image>\n<video>\n<audio>\n<point>\nHi? ASSISTANT:"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"text": "USER: <image> <image>", "images": [Image.new("RGB", (8, 8))]}, "2 <image> placeholder"),
        ({"text": "USER: hi", "images": [Image.new("RGB", (8, 8))]}, "0 <image> placeholder"),
        ({"text": "USER: <image>", "images": [np.zeros((0, 5, 3), dtype=np.uint8)]}, "empty or malformed image"),
        ({"text": "USER: <audio>", "audio": [np.zeros(0, dtype=np.float32)]}, "non-empty, finite mono"),
        ({"text": "USER: <audio>", "audio": [np.zeros((2, 100), dtype=np.float32)]}, "mono waveform"),
        ({"text": "USER: <audio>", "audio": [np.zeros(100)], "sampling_rate": 8000}, "8000 Hz"),
        ({"text": "USER: <point>", "point_clouds": [np.zeros((10, 3))]}, r"shape \(num_points > 0, 6\)"),
        ({"text": "USER: <point>", "point_clouds": [np.full((10, 6), np.nan)]}, "NaN"),
        ({"text": "USER: <video>", "videos": [np.zeros((0, 8, 8, 3), dtype=np.uint8)]}, "no frames"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_modality(composite, kwargs, message):
    _, processor = composite
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_input_for_a_missing_modality_is_refused():
    from fixtures.tiny_composite import build_tiny_composite

    _, processor = build_tiny_composite(kinds=("image",))
    with pytest.raises(ValueError, match="no audio modality"):
        processor(text="<audio>", audio=[np.zeros(100, dtype=np.float32)])


def test_frame_sampling_spans_the_clip_and_repeats_short_clips():
    # LanguageBind's and Video-LLaVA's rule: np.linspace(0, N - 1, frames) rounded down, both ends included.
    assert sample_frame_indices(100, 8) == [0, 14, 28, 42, 56, 70, 84, 99]
    assert sample_frame_indices(8, 4) == [0, 2, 4, 7]
    assert sample_frame_indices(3, 8) == [0, 0, 0, 0, 1, 1, 1, 2]
    assert sample_frame_indices(1, 8) == [0] * 8
    assert sample_frame_indices(100, 1) == [0]


def test_point_normalisation_centres_scales_and_resamples():
    rng = np.random.default_rng(0)
    cloud = np.concatenate([rng.normal(5.0, 3.0, (500, 3)), rng.uniform(0, 1, (500, 3))], axis=1)
    normalized = normalize_point_cloud(cloud, 64, 6)
    assert normalized.shape == (64, 6)
    full = normalize_point_cloud(cloud, 500, 6)
    np.testing.assert_allclose(full[:, :3].mean(axis=0), 0.0, atol=1e-5)
    assert np.sqrt((full[:, :3] ** 2).sum(axis=1)).max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(full[:, 3:], cloud[:, 3:].astype(np.float32))
    assert normalize_point_cloud(cloud[:10], 64, 6).shape == (64, 6)


def test_per_sample_nested_inputs_match_flat_inputs(composite, raw_inputs):
    """`apply_chat_template` passes images and videos as per-sample lists; they mean the same as flat lists."""
    _, processor = composite
    text = "<image> <video> <video>"
    video = raw_inputs["video"]
    flat = processor(text=text, images=[raw_inputs["image"]], videos=[video, video[:2]])
    nested = processor(text=text, images=[[raw_inputs["image"]]], videos=[[video, list(video[:2])]])
    for key in flat:
        np.testing.assert_array_equal(nested[key].numpy(), flat[key].numpy())


def test_batched_chat_with_a_video_in_only_some_conversations(composite, raw_inputs):
    """`apply_chat_template` passes `videos=[[video], []]`: the empty list is a sample without videos."""
    _, processor = composite
    conversations = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": raw_inputs["video"]},
                    {"type": "text", "text": "What?"},
                ],
            }
        ],
        [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
    ]
    batch = processor.apply_chat_template(
        conversations, tokenize=True, return_dict=True, add_generation_prompt=True, padding=True
    )
    alone = processor(text="<video>", videos=[raw_inputs["video"]])
    np.testing.assert_array_equal(batch["pixel_values_videos"].numpy(), alone["pixel_values_videos"].numpy())


def test_torch_tensor_images_and_videos_are_read_like_arrays(composite, raw_inputs):
    _, processor = composite
    image = np.array(raw_inputs["image"])
    video = np.stack([np.asarray(frame) for frame in raw_inputs["video"]])
    from_arrays = processor(text="<image> <video>", images=[image], videos=[video])
    from_tensors = processor(
        text="<image> <video>", images=[torch.from_numpy(image).permute(2, 0, 1)], videos=[torch.from_numpy(video)]
    )
    for key in ("pixel_values", "pixel_values_videos"):
        np.testing.assert_allclose(from_tensors[key].numpy(), from_arrays[key].numpy(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="empty or malformed image"):
        processor(text="<image>", images=[torch.zeros(0, 3, 3)])
