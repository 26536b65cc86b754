"""Every code block of README.md runs as written, and so does the usage of the model card a conversion writes.

The README names real Hub ids (`lmsys/vicuna-7b-v1.5`, `openai/clip-vit-large-patch14-336`, ...). Here each one is a
tiny model built in the test and served from an offline Hugging Face cache under that id (`hub_cache.py`), and the
files the commands read (a recipe, an encoder file, training data, question files) are made in their working folder;
the blocks themselves run unchanged, in README order, with `python` on the PATH. A block that cannot run here carries
a `<!-- readme-test: skip: why -->` comment, and the test reports that reason. Commands of ours must not print any
warning on these correct runs.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from doc_snippets import RUNNER, code_blocks
from fake_hub import fake_hub  # noqa: F401 - the pytest fixture
from hub_cache import cache_repos
from PIL import Image

from composition.saving import save_composite
from conversations.media import write_wav
from conversion import compose
from fixtures import tiny_sources as make
from fixtures.tiny_composite import build_tiny_composite


ROOT = Path(__file__).resolve().parents[1]
README_BLOCKS = code_blocks((ROOT / "README.md").read_text())
COMPOSITE_ID = "your-org/damc-image-audio-video-point"
# Lines by which our commands, transformers and Python announce a warning on stderr (our commands log INFO lines as
# bare messages; transformers prints only warnings and errors at its default verbosity, each prefixed like this).
_WARNING_MARKERS = ("[transformers]", "Warning:", " WARNING ", "warnings.warn")


def _stand_ins(models: Path) -> dict[str, Path]:
    """Hub id -> tiny local folder, for every Hub id the README's blocks use."""
    base = make.save_tiny_base(models / "vicuna", max_position_embeddings=1024)
    paper = models / "ModelCompose"
    make.save_tiny_modelcompose(
        paper / "multimodal-vicuna-7b-v1.5-audio-naivemc", kind="audio", method="naive", base_folder=base, seed=31
    )
    model, processor = build_tiny_composite()
    save_composite(model, processor, models / "composite")
    return {
        "lmsys/vicuna-7b-v1.5": base,
        "llava-hf/llava-1.5-7b-hf": make.save_tiny_llava(models / "llava", base),
        "LanguageBind/Video-LLaVA-7B-hf": make.save_tiny_video_llava(models / "video_llava", base),
        "Adu2021/ModelCompose": paper,
        "openai/clip-vit-large-patch14-336": make.save_tiny_clip(models / "clip"),
        COMPOSITE_ID: models / "composite",
    }


def _local_files(work: Path) -> None:
    """The files the README's commands read from their working folder, besides models: the audio encoder the recipe
    names, training data with its images, and MCUB-format questions with their media."""
    rng = np.random.default_rng(0)
    make.save_tiny_beats(work / "encoders" / "BEATs_iter3_plus_AS2M.pt")
    (work / "media").mkdir()
    samples = []
    for index, colour in enumerate(("red", "blue")):
        pixel = (220, 30, 30) if colour == "red" else (30, 30, 220)
        Image.fromarray(np.full((32, 32, 3), pixel, dtype=np.uint8)).save(work / "media" / f"{index}.png")
        samples.append(
            {
                "id": f"s{index}",
                "modal_inputs": {"image": [f"{index}.png"]},
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is it?"},
                    {"from": "gpt", "value": colour},
                ],
            }
        )
    for name in ("captions.json", "instructions.json"):
        (work / name).write_text(json.dumps(samples))
    data = work / "data"
    data.mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(data / "cat.png")
    write_wav(data / "bark.wav", rng.standard_normal(8000).astype(np.float32) * 0.1, 16000)
    np.save(data / "spin.npy", rng.integers(0, 255, (3, 36, 36, 3), dtype=np.uint8))
    np.save(data / "chair.npy", rng.standard_normal((200, 6)).astype(np.float32))
    question = "What do they have in common?\nA. red\nB. round\nC. large\nD. loud\nAnswer with the option's letter."
    (work / "MCUB-4.json").write_text(
        json.dumps(
            [
                {
                    "id": "q1",
                    "conversations": [
                        {"from": "human", "value": f"<image> <audio> <video> <point> {question}"},
                        {"from": "gpt", "value": None},
                    ],
                    "modal_inputs": {
                        "vision": ["cat.png"],
                        "audio": ["bark.wav"],
                        "video": ["spin.npy"],
                        "point": ["chair.npy"],
                    },
                }
            ]
        )
    )
    (work / "MCUB-answer.json").write_text(
        json.dumps([{"id": "q1", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "B"}]}])
    )


def _environment(hf_home: Path, bin_dir: Path) -> dict[str, str]:
    """Offline, with the stand-in cache as HF_HOME, this checkout importable (as once installed), and `python` being
    the interpreter that runs the tests."""
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    environment.update(
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT),
        TOKENIZERS_PARALLELISM="false",
        PATH=f"{bin_dir}{os.pathsep}{environment.get('PATH', '')}",
    )
    return environment


@pytest.fixture(scope="module")
def readme_world(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The README's working folder (with its recipe files written) and the environment its blocks run in."""
    root = tmp_path_factory.mktemp("readme")
    cache_repos(root / "hf_home", _stand_ins(root / "models"))
    work = root / "work"
    work.mkdir()
    _local_files(work)
    for block in README_BLOCKS:
        if block.file and not block.skip:
            (work / block.file).write_text(block.code)
    return work, _environment(root / "hf_home", root / "bin")


@pytest.fixture(scope="module")
def python_runs(readme_world) -> tuple[set[str], str]:
    """All the README's Python blocks, each in a fresh namespace, in one fresh process (in README order; it stops at
    the first failure). Returns the blocks that ran and the process's stderr."""
    work, environment = readme_world
    scripts = []
    for block in README_BLOCKS:
        if block.language == "python" and not block.skip:
            script = work.parent / f"readme_line_{block.line}.py"
            script.write_text(block.code)
            scripts.append(str(script))
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, *scripts],
        cwd=work,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    ran = {line.removeprefix("ran ") for line in result.stdout.splitlines() if line.startswith("ran ")}
    return ran, result.stderr


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(marker in line for marker in _WARNING_MARKERS)]


def _check_conversion(work: Path) -> None:
    """The recipe block, converted: three sources with their weights, the renamed video modality, a model card."""
    config = json.loads((work / "vision-video-audio" / "config.json").read_text())
    assert {name: entry["kind"] for name, entry in config["modalities"].items()} == {
        "image": "image",
        "film": "video",
        "audio": "audio",
    }
    sources = config["composition"]["sources"]
    assert [source["weight"] for source in sources] == [0.4, 0.3, 0.3]
    assert [source["hub_id"] for source in sources] == [
        "llava-hf/llava-1.5-7b-hf",
        "LanguageBind/Video-LLaVA-7B-hf",
        "Adu2021/ModelCompose",
    ]
    assert (work / "vision-video-audio" / "README.md").is_file()


def _check_benchmark(work: Path) -> None:
    results = json.loads((work / "results" / "mcub4" / "results.json").read_text())
    assert results["counts"]["evaluated"] == 1 and results["model"] == COMPOSITE_ID


def _check_training(work: Path) -> None:
    """Both stages wrote a source; stage 1 recorded its base and encoder by Hub id (they are not local paths)."""
    stage1 = json.loads((work / "out" / "image-stage1" / "config.json").read_text())
    assert stage1["composition"]["base"] == "lmsys/vicuna-7b-v1.5"
    assert stage1["composition"]["encoder"] == "openai/clip-vit-large-patch14-336"
    stage2 = json.loads((work / "out" / "image-damc" / "config.json").read_text())
    assert stage2["modalities"]["image"]["lora"] == {"r": 128, "alpha": 256.0}


# What each command block must leave behind, keyed by the command it starts with.
_CHECKS = {
    "python -m conversion": _check_conversion,
    "python -m benchmarks.mcub": _check_benchmark,
    "python -m training": _check_training,
}


@pytest.mark.parametrize("block", README_BLOCKS, ids=[block.label for block in README_BLOCKS])
def test_readme_block_runs_as_written(block, readme_world, python_runs):
    if block.skip:
        pytest.skip(f"README.md {block.label} is marked not to run here: {block.skip}")
    work, environment = readme_world
    if block.language == "yaml":
        assert block.file, f"README.md {block.label}: a YAML block must be a file the commands read (`file:`)"
        return  # written by the fixture; the command that reads it is the block that checks it
    if block.language == "python":
        ran, stderr = python_runs
        assert str(work.parent / f"readme_line_{block.line}.py") in ran, stderr[-6000:]
        if "save_composite(" in block.code:
            assert (work / "my-composite" / "config.json").is_file()
        return
    assert block.language == "bash", f"README.md {block.label}: no runner for {block.language!r} blocks"
    checks = [check for command, check in _CHECKS.items() if block.code.lstrip().startswith(command)]
    assert len(checks) == 1, f"README.md {block.label}: say in _CHECKS what this command must produce"
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.code],
        cwd=work,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    assert _warnings(result.stderr) == [], result.stderr[-6000:]
    checks[0](work)


# --------------------------------------------------------------------------------------------------------------------
# The model card's usage snippets


def _usage_blocks(card: str) -> list[str]:
    usage = card.split("\n## Usage\n", 1)[1].split("\n## ", 1)[0]
    return [block.code for block in code_blocks(usage) if block.language == "python"]


def _run_card_snippets(blocks: list[str], hf_home: Path, cwd: Path | None = None) -> None:
    """Every usage block of a card, each in a fresh namespace, in a process that cannot import this package (run in
    `cwd`, by default `hf_home`)."""
    scripts = []
    for index, code in enumerate(blocks):
        script = hf_home / f"card_snippet_{index}.py"
        script.write_text(code)
        scripts.append(str(script))
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    environment.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH="", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-I", "-c", RUNNER, *scripts],
        cwd=cwd or hf_home,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    assert result.stdout.count("ran ") == len(blocks)


def test_a_local_composite_card_runs_as_written(tiny_sources, tmp_path):
    """The card of a composite with two image-kind modalities loads its own folder and gives both images through
    `images=`, in placeholder order."""
    recipe = {
        "base": str(tiny_sources["base"]),
        "sources": [
            str(tiny_sources["llava"]),
            {"path": str(tiny_sources["llava_2"]), "rename": {"image": "chart"}},
            {"path": str(tiny_sources["video_llava"]), "modalities": ["video"]},
        ],
    }
    output = compose(recipe, tmp_path / "composite", verify=False)
    card = (output / "README.md").read_text()
    blocks = _usage_blocks(card)
    assert len(blocks) == 3  # generate, 4-bit, pipeline
    # By the folder's name, run from the folder that holds it: the card publishes no local path.
    assert 'from_pretrained("composite", trust_remote_code=True)' in blocks[0]
    assert str(tmp_path) not in card
    assert "images=[image, chart_image]" in blocks[0] and "videos=[video]" in blocks[0]
    assert "modality_inputs" not in card
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    _run_card_snippets(blocks, hf_home, cwd=output.parent)


def test_a_pushed_composite_card_runs_as_written_by_repo_id(tiny_sources, tmp_path, fake_hub, monkeypatch):  # noqa: F811
    """What --push-to-hub uploads: a card whose snippets load the repo id, and do so once the repo is downloaded."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake_hub.endpoint)
    repo_id = f"{fake_hub.user}/tiny-damc"
    recipe = {
        "method": "damc",
        "base": str(tiny_sources["base"]),
        "sources": [{"path": str(tiny_sources["paper_damc_a"]), "encoder": str(tiny_sources["clip"])}],
    }
    compose(recipe, tmp_path / "composite", verify=False, push_to_hub=repo_id, token=fake_hub.token)
    uploaded = fake_hub.files(repo_id)
    blocks = _usage_blocks(uploaded["README.md"].decode())
    assert len(blocks) == 4  # generate, 4-bit, the dense original weights (DAMC), pipeline
    assert all(f'"{repo_id}"' in code for code in blocks)
    download = tmp_path / "download"
    for name, content in uploaded.items():
        (download / name).parent.mkdir(parents=True, exist_ok=True)
        (download / name).write_bytes(content)
    hf_home = tmp_path / "hf_home"
    cache_repos(hf_home, {repo_id: download})
    shutil.rmtree(tmp_path / "composite")  # nothing local remains: the snippets must use the repo
    _run_card_snippets(blocks, hf_home)
