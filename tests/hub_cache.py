"""Local folders served as Hub repositories: an offline Hugging Face cache laid out as `huggingface_hub` writes it,
so that code which names a model by Hub id (`org/name`, `org/name/sub/folder`) runs unchanged with HF_HUB_OFFLINE=1
and HF_HOME pointing here."""

import hashlib
import shutil
from pathlib import Path


def cache_repos(hf_home: Path, repos: dict[str, Path]) -> dict[str, str]:
    """Copy each folder of `repos` (repo id -> folder) into `hf_home`'s hub cache as the repo's `main` snapshot.
    Returns repo id -> the commit hash recorded for it (40 hex digits, stable for a repo id)."""
    commits = {}
    for repo_id, folder in repos.items():
        repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        shutil.copytree(folder, repo / "snapshots" / commit, dirs_exist_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        commits[repo_id] = commit
    return commits
