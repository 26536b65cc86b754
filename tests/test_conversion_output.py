"""The output folder: a conversion never destroys a user's files, refuses outputs that overlap its inputs, runs once
per output at a time, and whatever a killed run leaves beside the output, the next run of that output removes (putting
back a previous output that an interrupted --force had moved aside).

Runs are killed at exact points through the converter's test hook (`COMPOSITE_CONVERT_TEST_HOLD=<stage>:<flag>`, see
`conversion/output.py`): the run creates the flag file when it reaches the stage and waits there until the flag is
deleted or the run is killed.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conversion.__main__ import main
from conversion.output import TEST_HOLD_VARIABLE


ROOT = Path(__file__).resolve().parents[1]


def _write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _run(args: list, capsys) -> tuple[int, str]:
    code = main([str(arg) for arg in args])
    return code, capsys.readouterr().err


def _leftovers(folder: Path, name: str = "out") -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(f".{name}."))


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _is_composite(folder: Path) -> bool:
    return json.loads((folder / "config.json").read_text())["model_type"] == "composite_mllm"


class _HeldRun:
    """`python -m conversion` in a process group of its own, held at `stage` by the test hook."""

    def __init__(self, args: list, stage: str, flag: Path):
        environment = {**os.environ, TEST_HOLD_VARIABLE: f"{stage}:{flag}"}
        self.flag = flag
        self.process = subprocess.Popen(
            [sys.executable, "-m", "conversion", *map(str, args)],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def wait_for_hold(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not self.flag.exists():
            if self.process.poll() is not None:
                pytest.fail(f"the run ended before its hold point: {self.process.communicate()[1][-3000:]}")
            assert time.monotonic() < deadline, "the run never reached its hold point"
            time.sleep(0.05)

    def kill(self) -> None:
        """kill -9 the run and every process it started (the verification's child process too)."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.communicate(timeout=60)

    def resume(self, timeout: float = 300) -> tuple[int, str]:
        self.flag.unlink()
        _, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, err


@pytest.fixture
def recipe(tiny_sources, tmp_path) -> Path:
    return _write_recipe(tmp_path, {"base": str(tiny_sources["base"]), "sources": [str(tiny_sources["llava"])]})


@pytest.mark.parametrize("stage", ["shard-written", "written", "verifying"])
def test_a_run_killed_at_any_point_leaves_nothing_that_the_next_run_does_not_remove(stage, recipe, tmp_path, capsys):
    output = tmp_path / "out"
    options = ["--max-shard-size", "4KB"] + ([] if stage == "verifying" else ["--no-verify"])
    run = _HeldRun([recipe, output, *options], stage, tmp_path / "held")
    run.wait_for_hold()
    run.kill()
    assert not output.exists()
    left = _leftovers(tmp_path)
    assert ".out.lock" in left and any(".out.partial-" in name for name in left), left

    code, err = _run([recipe, output, "--no-verify"], capsys)
    assert code == 0, err
    assert _is_composite(output)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("stage", ["replacing", "replaced"])
def test_an_interrupted_force_keeps_the_old_or_the_new_output(stage, recipe, tiny_sources, tmp_path, capsys):
    output = tmp_path / "out"
    assert _run([recipe, output, "--no-verify"], capsys)[0] == 0
    (output / "old-output.txt").write_text("the previous composite")
    run = _HeldRun([recipe, output, "--no-verify", "--force"], stage, tmp_path / "held")
    run.wait_for_hold()
    run.kill()
    if stage == "replacing":  # killed between moving the old output aside and moving the new one in
        assert not output.exists()
        (old,) = [path for path in tmp_path.iterdir() if path.name.startswith(".out.old-")]
        assert (old / "old-output.txt").is_file()
    else:
        assert _is_composite(output) and not (output / "old-output.txt").exists()

    # The next run of that output puts things right even though it fails itself (its source is missing).
    missing = {"base": str(tiny_sources["base"]), "sources": [str(tmp_path / "gone")]}
    failing = _write_recipe(tmp_path, missing, "bad.yaml")
    code, err = _run([failing, output, "--no-verify", "--force"], capsys)
    assert code == 2 and "does not exist" in err.splitlines()[-1]
    assert _is_composite(output)
    assert (output / "old-output.txt").exists() == (stage == "replacing")
    assert _leftovers(tmp_path) == []


def test_sigterm_cleans_up_at_once(recipe, tmp_path):
    output = tmp_path / "out"
    run = _HeldRun([recipe, output, "--no-verify", "--max-shard-size", "4KB"], "shard-written", tmp_path / "held")
    run.wait_for_hold()
    run.process.send_signal(signal.SIGTERM)
    _, err = run.process.communicate(timeout=60)
    assert run.process.returncode == 130 and err.splitlines()[-1] == "interrupted: nothing was written"
    assert not output.exists() and _leftovers(tmp_path) == []


def test_a_second_conversion_of_the_same_output_is_refused_while_the_first_runs(recipe, tmp_path, capsys):
    """The first run holds the lock and is then killed before it writes anything: the next run cleans up after it."""
    output = tmp_path / "out"
    first = _HeldRun([recipe, output, "--no-verify"], "locked", tmp_path / "held")
    first.wait_for_hold()
    try:
        code, err = _run([recipe, output, "--no-verify", "--force"], capsys)
        assert code == 2
        assert err.splitlines() == [
            f"error: The output {str(output)!r} is being written by another conversion (process "
            f"{first.process.pid}); wait for it to finish or pick another output."
        ]
        assert not output.exists()
    finally:
        first.kill()
    assert _leftovers(tmp_path) == [".out.lock"]
    assert _run([recipe, output, "--no-verify"], capsys)[0] == 0
    assert _leftovers(tmp_path) == []


def test_a_full_disk_while_the_tokenizer_is_saved_exits_2_and_leaves_nothing(recipe, tmp_path):
    """A real ENOSPC: the run is held once its weights are written, and the file the tokenizer is saved to is made a
    link to /dev/full, where every write fails with 'No space left on device'."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    output = tmp_path / "out"
    run = _HeldRun([recipe, output, "--no-verify"], "shard-written", tmp_path / "held")
    run.wait_for_hold()
    (partial,) = [path for path in tmp_path.iterdir() if path.name.startswith(".out.partial-")]
    (partial / "tokenizer.json").symlink_to("/dev/full")
    code, err = run.resume()
    assert code == 2, err
    last = err.splitlines()[-1]
    assert last.startswith("error: Writing the composite failed (") and "No space left on device" in last
    assert "Traceback" not in err
    assert not output.exists() and _leftovers(tmp_path) == []


@pytest.fixture
def layout(tiny_sources, tmp_path, capsys):
    """Copies of the sources in a tree of their own, a composite that contains a source, and a recipe over them."""
    inputs = tmp_path / "inputs"
    for name in ("base", "llava", "paper_damc_a", "clip"):
        shutil.copytree(tiny_sources[name], inputs / name)
    recipe = _write_recipe(tmp_path, {"base": str(inputs / "base"), "sources": [str(inputs / "llava")]})
    composite = tmp_path / "composite"
    assert _run([recipe, composite, "--no-verify"], capsys)[0] == 0
    return {"inputs": inputs, "composite": composite, "recipe": recipe}


def _overlap_cases(layout: dict, tmp_path: Path) -> dict[str, tuple[dict, str, list[str], str]]:
    """case -> (recipe, output, options, expected message part)."""
    inputs, composite = layout["inputs"], layout["composite"]
    base, llava = str(inputs / "base"), str(inputs / "llava")
    inner = composite / "inner-source"
    paper = {"path": str(inputs / "paper_damc_a"), "encoder": str(inputs / "clip")}
    return {
        "output is a source (a composite), with --force": (
            {"base": base, "sources": [str(composite)]},
            str(composite),
            ["--force"],
            "is sources[0]",
        ),
        "output is the base, with --force": (
            {"base": base, "sources": [llava]},
            base,
            ["--force"],
            "is not a composite",
        ),
        "output inside a source": (
            {"base": base, "sources": [llava]},
            f"{llava}/sub/out",
            [],
            "lies inside sources[0]",
        ),
        "output inside the base": ({"base": base, "sources": [llava]}, f"{base}/out", [], "lies inside base"),
        "output contains a source, with --force": (
            {"base": base, "sources": [str(inner)]},
            str(composite),
            ["--force"],
            "contains sources[0]",
        ),
        "output inside an encoder": (
            {"method": "damc", "base": base, "sources": [paper]},
            str(inputs / "clip" / "out"),
            [],
            "lies inside sources[0]",
        ),
        "output is the current directory": ({"base": base, "sources": [llava]}, ".", [], "is the current directory"),
        "output contains the current directory": (
            {"base": base, "sources": [llava]},
            "..",
            ["--force"],
            "a parent of the current directory",
        ),
        "output is a dangling link": (
            {"base": base, "sources": [llava]},
            str(tmp_path / "dangling"),
            [],
            "is a dangling symbolic link",
        ),
        "output is a link to a composite, with --force": (
            {"base": base, "sources": [llava]},
            str(tmp_path / "link"),
            ["--force"],
            "is a symbolic link",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "output is a source (a composite), with --force",
        "output is the base, with --force",
        "output inside a source",
        "output inside the base",
        "output contains a source, with --force",
        "output inside an encoder",
        "output is the current directory",
        "output contains the current directory",
        "output is a dangling link",
        "output is a link to a composite, with --force",
    ],
)
def test_an_output_that_overlaps_an_input_or_the_current_directory_is_refused(
    case, layout, tmp_path, capsys, monkeypatch
):
    shutil.copytree(layout["inputs"] / "llava", layout["composite"] / "inner-source")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "link").symlink_to(layout["composite"])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    recipe, output, options, message = _overlap_cases(layout, tmp_path)[case]
    recipe_file = _write_recipe(tmp_path, recipe, "case.yaml")
    before = _snapshot(tmp_path)
    code, err = _run([recipe_file, output, "--no-verify", *options], capsys)
    assert code == 2
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert _snapshot(tmp_path) == before, "nothing may change, nothing may be left"


def test_force_replaces_a_composite_or_an_empty_folder_but_never_another_folder(layout, tmp_path, capsys):
    recipe, composite = layout["recipe"], layout["composite"]
    code, err = _run([recipe, composite, "--no-verify"], capsys)
    assert code == 2 and "already exists; pass --force to replace it" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, err = _run([recipe, mine, "--no-verify", "--force"], capsys)
    assert code == 2 and "is not a composite" in err and "--force only replaces a composite" in err
    assert (mine / "thesis.tex").read_text() == "years of work"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run([recipe, empty, "--no-verify", "--force"], capsys)[0] == 0 and _is_composite(empty)

    (composite / "stale.txt").write_text("from the last run")
    assert _run([recipe, composite, "--no-verify", "--force"], capsys)[0] == 0
    assert _is_composite(composite) and not (composite / "stale.txt").exists()
    assert _leftovers(tmp_path, "composite") == [] and _leftovers(tmp_path, "empty") == []


def test_a_failed_run_removes_the_parent_folders_it_created(layout, tmp_path, capsys):
    missing = {"base": str(layout["inputs"] / "base"), "sources": [str(tmp_path / "gone")]}
    bad = _write_recipe(tmp_path, missing, "bad.yaml")
    code, _ = _run([bad, tmp_path / "new" / "deeper" / "out", "--no-verify"], capsys)
    assert code == 2 and not (tmp_path / "new").exists()


def test_the_composite_gets_normal_permissions_and_publishes_no_local_path(layout, tmp_path, capsys):
    inputs = layout["inputs"]
    recipe = _write_recipe(
        tmp_path,
        {
            "name": "private-paths",
            "base": str(inputs / "base"),
            "sources": [
                {"path": str(inputs / "llava"), "weight": 0.5},
                {
                    "path": str(inputs / "paper_damc_a"),
                    "encoder": str(inputs / "clip"),
                    "weight": 0.5,
                    "rename": {"image": "chart"},
                },
            ],
        },
        "paths.yaml",
    )
    output = tmp_path / "published"
    umask = os.umask(0o022)
    os.umask(umask)
    code, err = _run([recipe, output, "--no-verify"], capsys)
    assert code == 0, err
    assert output.stat().st_mode & 0o777 == 0o777 & ~umask
    for path in output.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
        if path.suffix != ".safetensors":
            assert str(tmp_path) not in path.read_text(), f"{path.name} publishes a local path"
    composition = json.loads((output / "config.json").read_text())["composition"]
    assert composition["base"]["reference"] == "base"
    assert [source["reference"] for source in composition["sources"]] == ["llava", "paper_damc_a"]
    published = yaml.safe_load((output / "composite_recipe.yaml").read_text())
    assert published["base"] == "base" and published["sources"][1] == {
        "path": "paper_damc_a",
        "encoder": "clip",
        "weight": 0.5,
        "rename": {"image": "chart"},
    }
