"""What a new user of the converter meets: a fast and informative command line, recipes whose relative paths start
from their own folder, weights that never mix given and default values, a Hub push checked before any work and
recoverable when it fails, and errors that say what an `encoder:` should have been."""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml

from conversion import compose
from conversion.__main__ import main
from conversion.errors import ConversionError
from conversion.hub import check_push_access
from conversion.recipe import (
    _MERGE_KEYS,
    _SOURCE_KEYS,
    _TOP_LEVEL_KEYS,
    _WEIGHT_SEARCH_KEYS,
    load_recipe,
    parse_recipe,
)
from conversion.recipe_reference import EXAMPLE_RECIPE
from conversion.verify import verify_composite
from fake_hub import FakeHub, fake_hub  # noqa: F401 - fake_hub is the pytest fixture
from warning_capture import captured_warnings


ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, recipe: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------------------------
# The command line teaches


_IMPORTS_AFTER = r"""
import sys
from conversion.__main__ import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted(name for name in ("torch", "transformers", "huggingface_hub", "safetensors") if name in sys.modules)
print("HEAVY:", ",".join(heavy))
"""


@pytest.mark.parametrize("argument", ["--help", "--example-recipe"])
def test_help_and_the_example_recipe_import_nothing_heavy(argument):
    """Both answer without importing torch or transformers (which take seconds), in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AFTER, argument], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("HEAVY:"), result.stdout[-300:]
    if argument == "--help":
        assert "--example-recipe" in result.stdout and "recipe file's folder" in result.stdout
        assert "--no-verify" in result.stdout and "is not kept" in result.stdout
    else:
        assert result.stdout.startswith("# A composite recipe")


def test_the_example_recipe_is_valid_and_documents_every_key():
    recipe = parse_recipe(yaml.safe_load(EXAMPLE_RECIPE), EXAMPLE_RECIPE)
    assert recipe.base == "lmsys/vicuna-7b-v1.5" and len(recipe.sources) == 2
    # Every key a recipe may hold appears as a key, set or commented out, at the start of a line.
    for key in (*_TOP_LEVEL_KEYS, *_SOURCE_KEYS, *_MERGE_KEYS, *_WEIGHT_SEARCH_KEYS):
        assert re.search(rf"^[\s#-]*{key}:", EXAMPLE_RECIPE, re.M), f"--example-recipe does not document {key!r}"


def test_verbose_logs_every_step_and_the_default_weights(tiny_sources, tmp_path, capsys, caplog):
    recipe = _write(
        tmp_path / "recipe.yaml",
        {
            "base": str(tiny_sources["base"]),
            "sources": [
                str(tiny_sources["llava"]),
                {"path": str(tiny_sources["video_llava"]), "modalities": ["video"]},
            ],
        },
    )
    caplog.set_level(logging.DEBUG, logger="conversion")
    assert main([str(recipe), str(tmp_path / "quiet"), "--no-verify"]) == 0
    quiet = [record for record in caplog.records if record.name.startswith("conversion")]
    caplog.clear()
    assert main([str(recipe), str(tmp_path / "verbose"), "--no-verify", "-v"]) == 0
    verbose = [record for record in caplog.records if record.name.startswith("conversion")]
    assert not any(record.levelno == logging.DEBUG for record in quiet)
    details = "\n".join(record.getMessage() for record in verbose if record.levelno == logging.DEBUG)
    assert "read as format llava (detected)" in details and "read as format video_llava (detected)" in details
    assert "text delta: full weights" in details and "modality video (video): encoder clip_vision_model" in details
    # Without -v too: the λ the default gave every source.
    assert any("λ = 1/N = 0.5 for each of the 2 sources" in record.getMessage() for record in quiet)


def test_a_failed_verification_says_how_to_keep_the_folder(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "composite_mllm"}')
    with pytest.raises(ConversionError, match="nothing was kept; rerun with --no-verify to keep the folder"):
        verify_composite(folder, timeout=300)


# --------------------------------------------------------------------------------------------------------------------
# Relative paths start from the recipe's folder


def test_relative_paths_start_from_the_recipe_folder_whatever_the_current_directory(
    tiny_sources, tmp_path, monkeypatch
):
    """A recipe beside its models converts from any directory; Hub ids stay Hub ids."""
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    for name in ("base", "paper_damc_a", "clip"):
        (project / "models" / name).symlink_to(tiny_sources[name], target_is_directory=True)
    recipe = _write(
        project / "recipes" / "recipe.yaml",
        {
            "method": "damc",
            "base": "../models/base",
            "sources": [{"path": "../models/paper_damc_a", "encoder": "../models/clip"}],
        },
    )
    parsed = load_recipe(recipe)
    assert parsed.base == str(project / "models" / "base")
    assert parsed.sources[0].encoder == str(project / "models" / "clip")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    output = compose(recipe, "out", verify=False)
    assert (elsewhere / "out" / "config.json").is_file() and output == Path("out")
    # The composite records a local base by its folder's name only (it publishes no local path).
    config = json.loads((elsewhere / "out" / "config.json").read_text())
    assert config["composition"]["base"]["reference"] == "base"

    hub = _write(project / "hub.yaml", {"base": "org/base", "sources": ["org/llava@v1", "org/repo/sub/folder"]})
    parsed = load_recipe(hub)
    assert (parsed.base, [source.path for source in parsed.sources]) == (
        "org/base",
        ["org/llava@v1", "org/repo/sub/folder"],
    )


def test_a_missing_relative_path_is_named_from_the_recipe_folder(tmp_path, capsys):
    recipe = _write(tmp_path / "recipes" / "recipe.yaml", {"base": "./models/base", "sources": ["./models/llava"]})
    assert main([str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"the folder '{tmp_path / 'recipes' / 'models' / 'base'}' does not exist" in err
    assert err.count("\n") == 1


# --------------------------------------------------------------------------------------------------------------------
# Weights: all given or none


@pytest.mark.parametrize("given", [[0.5, None, None], [None, 0.25, 0.75], [1.0, 1.0, None]])
def test_weights_are_given_for_every_source_or_for_none(given):
    sources = [
        {"path": f"org/source-{index}", **({} if weight is None else {"weight": weight})}
        for index, weight in enumerate(given)
    ]
    with pytest.raises(ConversionError) as raised:
        parse_recipe({"base": "org/base", "sources": sources})
    message = str(raised.value)
    missing = [f"sources[{index}] (org/source-{index})" for index, weight in enumerate(given) if weight is None]
    assert message.startswith(", ".join(missing)) and "give every source a weight" in message
    assert "1/N = 0.333333" in message and "\n" not in message


def test_weights_given_for_all_or_none_are_used_as_they_are():
    none_given = parse_recipe({"base": "b/b", "sources": ["o/a", "o/b", "o/c", "o/d"]})
    assert none_given.weights() == [0.25] * 4
    all_given = parse_recipe(
        {"base": "b/b", "sources": [{"path": "o/a", "weight": 0.5}, {"path": "o/b", "weight": -1}]}
    )
    assert all_given.weights() == [0.5, -1.0]


# --------------------------------------------------------------------------------------------------------------------
# --push-to-hub: checked before any work, recoverable after


@pytest.mark.parametrize(
    ("hub_options", "repo_id", "token", "message"),
    [
        ({}, "fake-user/x", None, "no Hub token is set; log in with `hf auth login` or set HF_TOKEN"),
        ({}, "fake-user/x", "hf_wrong", "not authorized"),
        ({"role": "read"}, "fake-user/x", "token", "is read-only"),
        (
            {"orgs": ("my-lab",)},
            "other-lab/x",
            "token",
            "who can write to ['fake-user', 'my-lab'] but not to 'other-lab'",
        ),
        ({}, "fake-user/bad name!", "token", "is not a valid repo id"),
    ],
    ids=["no token", "wrong token", "read-only token", "foreign namespace", "bad repo id"],
)
def test_push_access_is_refused_before_anything_is_read(hub_options, repo_id, token, message, tmp_path, monkeypatch):
    """The recipe's base and source do not even exist: the push problem is what the user hears about first."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with FakeHub(**hub_options) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        recipe = {"base": "/no/such/base", "sources": ["/no/such/source"]}
        with pytest.raises(ConversionError, match=re.escape(message)):
            compose(recipe, tmp_path / "out", push_to_hub=repo_id, token=hub.token if token == "token" else token)
        assert hub.commits == [] and hub.created_repos == []
    assert not (tmp_path / "out").exists()


def test_push_access_offline_or_unreachable_is_named(fake_hub, monkeypatch):  # noqa: F811
    with pytest.raises(ConversionError, match="unreachable.*cannot be reached.*check the network or HF_ENDPOINT"):
        check_push_access("fake-user/x", token=fake_hub.token, endpoint="http://127.0.0.1:9/unreachable")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConversionError, match="unset HF_HUB_OFFLINE"):
        check_push_access("fake-user/x", token=fake_hub.token, endpoint=fake_hub.endpoint)
    assert fake_hub.requests == []


def test_a_push_that_fails_keeps_the_folder_and_gives_the_upload_command(
    tiny_sources,
    tmp_path,
    fake_hub,  # noqa: F811
    monkeypatch,
    capsys,
):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake_hub.endpoint)
    # Access looked fine before converting (a write token of the namespace's owner), but the commit is refused.
    fake_hub.fail("commit", 403, "The repository is read-only for maintenance")
    recipe = _write(
        tmp_path / "recipe.yaml", {"base": str(tiny_sources["base"]), "sources": [str(tiny_sources["llava"])]}
    )
    output = tmp_path / "my composite"
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    assert main([str(recipe), str(output), "--no-verify", "--push-to-hub", "fake-user/tiny", "--private"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "forbidden (The repository is read-only for maintenance)" in err
    assert f"The composite is kept in {output}; upload it with: hf upload fake-user/tiny '{output}' --private" in err
    assert (output / "model.safetensors").is_file() and (output / "README.md").is_file()
    assert '"fake-user/tiny"' in (output / "README.md").read_text()  # the card already names the repo


# --------------------------------------------------------------------------------------------------------------------
# An `encoder:` that is not an encoder


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (
            "llava",
            "is a whole multimodal model (llava: a language model with its own encoder and projector whose "
            "encoder is a clip_vision_model), where an encoder belongs",
        ),
        ("qwen2_audio", "is a whole multimodal model (qwen2_audio"),
        ("base", "is a language model (llama), where an encoder belongs"),
    ],
)
def test_an_encoder_that_is_a_whole_model_is_named_as_such(wrong, message, tiny_sources, tmp_path, capsys):
    recipe = _write(
        tmp_path / "recipe.yaml",
        {
            "base": str(tiny_sources["base"]),
            "sources": [{"path": str(tiny_sources["paper_naive"]), "encoder": str(tiny_sources[wrong])}],
        },
    )
    assert main([str(recipe), str(tmp_path / "out"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert "CLIP or SigLIP checkpoint" in err


# --------------------------------------------------------------------------------------------------------------------
# A correct conversion warns about nothing


def test_a_correct_conversion_prints_no_warning(tiny_sources, tmp_path):
    """The sources a newcomer combines: a LLaVA, a paper checkpoint whose encoder is a full CLIP folder, and a
    composite of ours (re-read through its own processor), verified in a fresh process."""
    video = compose(
        {
            "base": str(tiny_sources["base"]),
            "sources": [{"path": str(tiny_sources["video_llava"]), "modalities": ["video"]}],
        },
        tmp_path / "video",
        verify=False,
    )
    recipe = {
        "base": str(tiny_sources["base"]),
        "sources": [
            str(tiny_sources["llava"]),
            {
                "path": str(tiny_sources["paper_naive"]),
                "encoder": str(tiny_sources["clip"]),
                "rename": {"image": "photo"},
            },
            {"path": str(video)},
        ],
    }
    with captured_warnings() as found:
        compose(recipe, tmp_path / "out", verify=True)
    assert found == []
    assert set(json.loads((tmp_path / "out" / "config.json").read_text())["modalities"]) == {"image", "photo", "video"}
