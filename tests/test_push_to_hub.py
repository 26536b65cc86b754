"""`push_folder` against the local fake Hub: the repo is created as asked, the upload is the folder byte for byte."""

import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from conversion.errors import ConversionError
from conversion.hub import push_folder

from fake_hub import FakeHub, fake_hub  # noqa: F401 - fake_hub is the pytest fixture


REPO_ID = "tiny-org/composite-mllm"
ROOT = Path(__file__).resolve().parents[1]
MODEL_CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: any-to-any
tags:
- model-composition
---

# Tiny composite

Our own card: the push must upload it unchanged.
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A finished-composite-like folder: model card, config, real safetensors weights, a file in a sub-folder."""
    folder = tmp_path / "composite"
    (folder / "processor").mkdir(parents=True)
    (folder / "README.md").write_text(MODEL_CARD, encoding="utf-8")
    (folder / "config.json").write_text('{"model_type": "composite_mllm", "hidden_size": 8}\n', encoding="utf-8")
    save_file(
        {"lm_head.weight": torch.arange(32, dtype=torch.float32).reshape(4, 8), "bias": torch.ones(3)},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (folder / "processor" / "tokenizer_config.json").write_text('{"model_max_length": 64}\n', encoding="utf-8")
    return folder


def folder_files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize(
    "private, xet_installed",
    # huggingface_hub takes its streamed (hf_xet) upload path when hf_xet is importable and a single create_commit
    # otherwise: exercise both, since users have either.
    [(True, True), (False, False)],
    ids=["private-streamed", "public-single-commit"],
)
def test_push_uploads_the_folder_exactly(
    fake_hub: FakeHub,  # noqa: F811
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    private: bool,
    xet_installed: bool,
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", not xet_installed)

    url = push_folder(folder, REPO_ID, private=private, token=fake_hub.token, endpoint=fake_hub.endpoint)

    assert [(repo.repo_id, repo.repo_type, repo.private) for repo in fake_hub.created_repos] == [
        (REPO_ID, "model", private)
    ]
    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit.message == "Upload composite model"
    assert url == f"{fake_hub.endpoint}/{REPO_ID}/commit/{commit.oid}"

    uploaded = fake_hub.files(REPO_ID)
    assert uploaded == folder_files(folder)
    assert sorted(uploaded) == ["README.md", "config.json", "model.safetensors", "processor/tokenizer_config.json"]
    assert uploaded["README.md"].decode("utf-8") == MODEL_CARD  # ours, not a generated card
    weights = load_safetensors(uploaded["model.safetensors"])
    torch.testing.assert_close(weights["lm_head.weight"], torch.arange(32, dtype=torch.float32).reshape(4, 8))
    assert fake_hub.unhandled == []


def test_push_into_an_existing_repo_replaces_changed_files(fake_hub: FakeHub, folder: Path) -> None:  # noqa: F811
    fake_hub.add_repo(REPO_ID, private=True)
    push_folder(folder, REPO_ID, token=fake_hub.token, endpoint=fake_hub.endpoint, commit_message="First")
    (folder / "config.json").write_text('{"model_type": "composite_mllm", "hidden_size": 16}\n', encoding="utf-8")

    push_folder(folder, REPO_ID, token=fake_hub.token, endpoint=fake_hub.endpoint, commit_message="Second")

    assert fake_hub.created_repos == []  # it existed: `exist_ok` kept it (and its visibility)
    assert [commit.message for commit in fake_hub.commits] == ["First", "Second"]
    assert set(fake_hub.commits[1].files) == {"config.json"}  # unchanged files are not sent again
    assert fake_hub.files(REPO_ID) == folder_files(folder)


def test_unauthorized_create_becomes_conversion_error(fake_hub: FakeHub, folder: Path) -> None:  # noqa: F811
    fake_hub.fail("create", 401)

    with pytest.raises(ConversionError) as raised:
        push_folder(folder, REPO_ID, token=fake_hub.token, endpoint=fake_hub.endpoint)

    message = str(raised.value)
    assert REPO_ID in message and "hf auth login" in message and "HF_TOKEN" in message
    assert "\n" not in message
    assert fake_hub.commits == []


def test_wrong_token_becomes_conversion_error(fake_hub: FakeHub, folder: Path) -> None:  # noqa: F811
    with pytest.raises(ConversionError, match=f"{REPO_ID}.*not authorized.*hf auth login"):
        push_folder(folder, REPO_ID, token="hf_not_the_right_one", endpoint=fake_hub.endpoint)
    assert fake_hub.created_repos == []


def test_forbidden_commit_becomes_conversion_error(fake_hub: FakeHub, folder: Path) -> None:  # noqa: F811
    fake_hub.fail("commit", 403, "You don't have the rights to create a model under the namespace")

    with pytest.raises(ConversionError, match=f"{REPO_ID}.*forbidden.*write access to the `tiny-org` namespace"):
        push_folder(folder, REPO_ID, token=fake_hub.token, endpoint=fake_hub.endpoint)


def test_invalid_repo_id_becomes_conversion_error(fake_hub: FakeHub, folder: Path) -> None:  # noqa: F811
    with pytest.raises(ConversionError, match="not a valid repo id"):
        push_folder(folder, "tiny-org/bad name!", token=fake_hub.token, endpoint=fake_hub.endpoint)
    assert fake_hub.requests == []  # refused before any request


def test_offline_mode_becomes_conversion_error(
    fake_hub: FakeHub,  # noqa: F811
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(ConversionError, match=f"{REPO_ID}.*unset HF_HUB_OFFLINE"):
        push_folder(folder, REPO_ID, token=fake_hub.token, endpoint=fake_hub.endpoint)
    assert fake_hub.requests == []


def test_subprocess_reaches_the_fake_hub_through_hf_endpoint(fake_hub: FakeHub, folder: Path) -> None:  # noqa: F811
    """What an end-to-end CLI test relies on: HF_ENDPOINT and HF_TOKEN from `environment()`, even when the parent
    runs offline."""
    script = "import sys; from conversion.hub import push_folder; print(push_folder(sys.argv[1], sys.argv[2]))"
    environment = fake_hub.environment({**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})

    result = subprocess.run(
        [sys.executable, "-c", script, str(folder), REPO_ID],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == f"{fake_hub.endpoint}/{REPO_ID}/commit/{fake_hub.commits[0].oid}"
    assert fake_hub.files(REPO_ID) == folder_files(folder)
