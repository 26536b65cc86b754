"""The tiny world's renderers, media files and report helpers (numpy only; fast)."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.tinyworld.render import (
    instance_rng,
    render,
    render_audio,
    render_image,
    render_points,
    render_video,
    save_media,
)
from benchmarks.tinyworld.report import accuracy, first_letter, format_table, plot_table
from benchmarks.tinyworld.world import MODALITIES, Concept, make_concepts
from conversations.media import MediaError, load_media


BASE = Concept(
    name="blick",
    colour="red",
    shape="round",
    size="medium",
    pitch="low",
    timbre="pure",
    rhythm="steady",
    motion="rising",
)
SHAPES = {"image": (32, 32, 3), "video": (8, 32, 32, 3), "audio": (16000,), "point": (64, 6)}
DTYPES = {"image": np.uint8, "video": np.uint8, "audio": np.float32, "point": np.float32}


def concept(**changes: str) -> Concept:
    return dataclasses.replace(BASE, **changes)


def shape_pixels(image: np.ndarray) -> np.ndarray:
    """The (N, 3) colours of the shape: pixels far brighter than the dark background."""
    return image.reshape(-1, 3)[image.reshape(-1, 3).max(axis=1) > 100].astype(np.float64)


@pytest.mark.parametrize("modality", MODALITIES)
def test_render_is_deterministic_with_documented_shapes(modality):
    for item in make_concepts()[:6]:
        first = render(modality, item, instance_rng("test", item.name, 0))
        again = render(modality, item, instance_rng("test", item.name, 0))
        other = render(modality, item, instance_rng("test", item.name, 1))
        assert first.shape == SHAPES[modality] and first.dtype == DTYPES[modality]
        np.testing.assert_array_equal(first, again)
        assert not np.array_equal(first, other)
        if modality == "audio":
            assert np.all(np.abs(first) <= 1.0) and np.abs(first).max() > 0.2
        if modality == "point":
            assert np.all((first[:, 3:] >= 0) & (first[:, 3:] <= 1))


def test_instance_rng_is_stable_across_processes():
    # Another process with another string-hash salt must draw the same numbers (no use of the salted hash()).
    code = (
        "from benchmarks.tinyworld.render import instance_rng; print(instance_rng('test', 'q1', 0).integers(0, 2**31))"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert int(other.stdout) == instance_rng("test", "q1", 0).integers(0, 2**31)
    assert instance_rng("a").random() != instance_rng("b").random()
    with pytest.raises(ValueError, match="modality"):
        render("smell", BASE, instance_rng(0))


def test_image_colours_and_sizes():
    rng = instance_rng("colours")
    means = {
        colour: shape_pixels(render_image(concept(colour=colour), rng)).mean(axis=0)
        for colour in ("red", "green", "blue")
    }
    assert means["red"][0] > means["red"][2] + 100
    assert means["green"][1] > means["green"][0] + 100
    assert means["blue"][2] > means["blue"][0] + 100
    background = render_image(concept(), rng).reshape(-1, 3)
    assert background.min() >= 0 and np.median(background.max(axis=1)) < 255
    areas = [
        len(shape_pixels(render_image(concept(size=size, shape="boxy"), rng))) for size in ("small", "medium", "big")
    ]
    assert areas[0] < areas[1] < areas[2]
    assert areas[0] > 50 and areas[2] < 32 * 32


@pytest.mark.parametrize("shape", ["round", "boxy", "pointy", "ringed"])
def test_image_shape_stays_inside_the_frame(shape):
    for seed in range(5):
        image = render_image(concept(shape=shape, size="big"), instance_rng("frame", seed))
        bright = image.max(axis=2) > 100
        # Every border row and column is background.
        for border in (bright[0], bright[-1], bright[:, 0], bright[:, -1]):
            assert not border.any()


def test_pitch_spectra_peak_in_order():
    peaks = []
    for pitch in ("deep", "low", "high", "shrill"):
        audio = render_audio(concept(pitch=pitch, timbre="pure", rhythm="steady"), instance_rng("pitch", pitch))
        peaks.append(np.fft.rfftfreq(len(audio), 1 / 16000)[np.abs(np.fft.rfft(audio)).argmax()])
    assert peaks == sorted(peaks) and len(set(peaks)) == 4
    assert peaks[0] > 100 and peaks[-1] < 7500


def test_timbre_adds_harmonics_and_rhythm_gates():
    def spectrum(timbre: str) -> np.ndarray:
        audio = render_audio(concept(pitch="low", timbre=timbre), instance_rng("timbre", timbre))
        return np.abs(np.fft.rfft(audio))  # 1 Hz bins for one second

    fundamental = spectrum("pure").argmax()
    pure, buzzy, brassy = spectrum("pure"), spectrum("buzzy"), spectrum("brassy")
    # Around the 2nd harmonic only the sawtooth has energy; around the 3rd both non-sine waves have.
    second = slice(2 * fundamental - 40, 2 * fundamental + 40)
    third = slice(3 * fundamental - 50, 3 * fundamental + 50)
    assert brassy[second].max() > 20 * buzzy[second].max()
    assert buzzy[third].max() > 20 * pure[third].max()
    steady = render_audio(concept(rhythm="steady"), instance_rng("rhythm"))
    pulsing = render_audio(concept(rhythm="pulsing"), instance_rng("rhythm"))
    quiet = lambda audio: np.mean(np.abs(audio) < 0.05)  # noqa: E731 - fraction of near-silent samples
    assert quiet(steady) < 0.2 < 0.35 < quiet(pulsing)


def test_rising_video_moves_up_and_rightward_moves_right():
    def centroids(motion: str) -> np.ndarray:
        video = render_video(concept(motion=motion, size="small"), instance_rng("video", motion))
        return np.array([np.argwhere(frame.max(axis=2) > 100).mean(axis=0) for frame in video])

    rows = centroids("rising")[:, 0]
    assert np.all(np.diff(rows) < 0) and rows[0] - rows[-1] > 12
    columns = centroids("rightward")[:, 1]
    assert np.all(np.diff(columns) > 0) and columns[-1] - columns[0] > 12
    assert render_video(BASE, instance_rng(0), frames=3).shape == (3, 32, 32, 3)


def test_points_lie_on_their_surfaces():
    rng = instance_rng("points")
    sphere = render_points(concept(shape="round"), rng, num_points=200)
    assert np.allclose(np.linalg.norm(sphere[:, :3], axis=1), 1.0, atol=0.1)
    cube = render_points(concept(shape="boxy"), rng, num_points=200)
    # Turned about z: the z coordinate of a cube surface point is within the box, and the top and bottom are hit.
    assert np.abs(cube[:, 2]).max() < 1.1 and np.mean(np.abs(cube[:, 2]) > 0.9) > 0.2
    torus = render_points(concept(shape="ringed"), rng, num_points=200)
    radial = np.linalg.norm(torus[:, :2], axis=1)
    assert np.all(np.hypot(radial - 1.0, torus[:, 2]) < 0.4)
    red = render_points(concept(colour="red"), rng).mean(axis=0)
    assert red[3] > 0.7 and red[5] < 0.3


def test_save_and_load_round_trip(tmp_path):
    rng = instance_rng("files")
    image = render_image(BASE, rng)
    path = save_media("image", image, tmp_path / "q1.0")
    assert path.name == "q1.0.png"
    loaded = load_media(path, "image")
    assert isinstance(loaded, Image.Image) and loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), image)

    audio = render_audio(BASE, rng)
    path = save_media("audio", audio, tmp_path / "sub" / "sound")
    assert path.suffix == ".wav"
    loaded = load_media(path, "audio")
    assert loaded.dtype == np.float32 and loaded.shape == audio.shape
    assert np.abs(loaded - audio).max() <= 1 / 32767 + 1e-7

    for modality, array in (("video", render_video(BASE, rng)), ("point", render_points(BASE, rng))):
        path = save_media(modality, array, tmp_path / modality)
        assert path.suffix == ".npy"
        np.testing.assert_array_equal(load_media(path, modality), array)

    video = render_video(BASE, rng, frames=3)
    frames = [Image.fromarray(frame) for frame in video]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:])
    gif = load_media(tmp_path / "clip.gif", "video")
    assert gif.shape == (3, 32, 32, 3) and gif.dtype == np.uint8

    with pytest.raises(MediaError, match=r"notes\.txt.*\.wav"):
        load_media(tmp_path / "notes.txt", "audio")
    with pytest.raises(MediaError, match=r"missing\.png: no such file"):
        load_media(tmp_path / "missing.png", "image")


def test_first_letter_and_accuracy():
    assert first_letter(" B because") == "B"
    assert first_letter("\nD") == "D"
    assert first_letter("b") is None
    assert first_letter("") is None
    assert first_letter("   ") is None
    assert first_letter("E") is None
    assert accuracy([" A", "b", "C.", "D"], ["A", "B", "C", "A"]) == 0.5
    with pytest.raises(ValueError):
        accuracy(["A"], ["A", "B"])
    with pytest.raises(ValueError):
        accuracy([], [])


def test_format_table():
    rows = {"composite": {"image": 0.875, "audio": None}, "base": {"image": 1.0}}
    table = format_table(rows, ["image", "audio"])
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["image", "audio"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["composite", "87.5", "-"]
    assert lines[3].split() == ["base", "100.0", "-"]
    # Aligned: every value column ends at the same place on every line.
    assert len({len(line) for line in (lines[0], lines[2])}) == 1
    # A score with a 95% interval reads as the estimate and half the interval's width.
    table = format_table({"composite": {"image": (0.875, 0.8, 0.93), "audio": 0.5}}, ["image", "audio"])
    assert table.splitlines()[2].split() == ["composite", "87.5", "±6.5", "50.0"]


def test_plot_table_writes_a_png(tmp_path):
    rows = {"composite": {"image": (0.875, 0.8, 0.93), "audio": None}, "base": {"image": 0.5, "audio": 0.25}}
    path = plot_table(rows, ["image", "audio"], tmp_path / "plots" / "acc.png", title="tiny MCUB")
    assert path.exists() and path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
