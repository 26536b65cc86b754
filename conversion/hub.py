"""Publish a finished composite folder to the Hugging Face Hub.

The folder is uploaded exactly as it is on disk: the caller has already written its own model card (README.md), and
nothing here writes or rewrites one. Every failure the user can fix (no or bad token, bad repo id, no write access,
offline mode, unreachable endpoint) becomes a one-line `ConversionError` naming the repo and the fix.
"""

from __future__ import annotations

import importlib
import logging
import os
import shlex
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .errors import ConversionError


logger = logging.getLogger(__name__)

_LOGIN_FIX = "log in with `hf auth login` or set HF_TOKEN to a token with write access"


def check_push_access(repo_id: str, *, token: str | None = None, endpoint: str | None = None) -> None:
    """What a push needs and can be checked in a second, before hours of conversion: a valid repo id, a token that the
    Hub accepts (which also proves the network and the endpoint), write access, and a namespace the token's user may
    write to (their own or one of their organizations'). Raises `ConversionError` naming the fix. Fine-grained tokens
    are not inspected further: the upload itself reports what they lack."""
    api = HfApi(endpoint=endpoint, token=token)
    try:
        validate_repo_id(repo_id)
        identity = api.whoami()
    except Exception as error:  # noqa: BLE001 - translated below, anything unknown is re-raised unchanged
        conversion_error = _as_conversion_error(error, repo_id, api.endpoint)
        if conversion_error is None:
            raise
        raise conversion_error from error
    where = f"cannot push to {repo_id} on {api.endpoint}"
    user = identity.get("name", "")
    role = ((identity.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise ConversionError(f"{where}: the token of {user!r} is read-only; {_LOGIN_FIX}")
    namespace = repo_id.split("/")[0] if "/" in repo_id else user
    namespaces = [user, *(org.get("name") for org in identity.get("orgs") or [])]
    if namespace not in namespaces:
        raise ConversionError(
            f"{where}: the token belongs to {user!r}, who can write to {namespaces} but not to {namespace!r}; use a "
            f"repo id in one of those namespaces or a token of a member of {namespace!r}"
        )
    logger.debug("Hub access checked: %s may push to %s on %s", user, repo_id, api.endpoint)


def upload_command(folder: str | os.PathLike, repo_id: str, private: bool) -> str:
    """The `hf` command that uploads `folder` as `push_folder` would (for a push that failed)."""
    return shlex.join(["hf", "upload", repo_id, str(folder), *(["--private"] if private else [])])


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload composite model",
) -> str:
    """Create the model repo `repo_id` if needed and upload every file of `folder` to it in one push.

    Args:
        folder: The composite folder to publish (its README.md is uploaded unchanged).
        repo_id: `namespace/name` on the Hub (a bare `name` goes to the token owner's namespace).
        private: Make the repo private when it is created (an existing repo keeps its visibility).
        token: A Hub token with write access; `None` uses HF_TOKEN or the token saved by `hf auth login`.
        endpoint: The Hub URL; `None` uses HF_ENDPOINT or https://huggingface.co.
        commit_message: The summary of the commit.

    Returns:
        The URL of the commit that holds the upload.

    Raises:
        ConversionError: The folder is missing, or the Hub refused or could not be reached; the message names the
            repo and the fix.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"cannot push {folder} to {repo_id}: it is not a folder; build the composite first")

    api = HfApi(endpoint=endpoint, token=token)
    logger.info("Pushing %s to %s/%s (%s)", folder, api.endpoint, repo_id, "private" if private else "public")
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        # The Hub may have resolved a bare name to `user/name`: upload to the repo it actually created.
        resolved_id = getattr(repo_url, "repo_id", None) or repo_id
        commit = api.upload_folder(
            folder_path=folder, repo_id=resolved_id, repo_type="model", commit_message=commit_message
        )
    except Exception as error:  # noqa: BLE001 - translated below, anything unknown is re-raised unchanged
        conversion_error = _as_conversion_error(error, repo_id, api.endpoint)
        if conversion_error is None:
            raise
        raise conversion_error from error

    commit_url = str(commit.commit_url)
    logger.info("Pushed %s to %s", folder, commit_url)
    return commit_url


def _as_conversion_error(error: Exception, repo_id: str, endpoint: str) -> ConversionError | None:
    """The one-line `ConversionError` for a Hub failure, or `None` for an error that is not the user's to fix."""
    where = f"cannot push to {repo_id} on {endpoint}"
    if isinstance(error, LocalTokenNotFoundError):
        return ConversionError(f"{where}: no Hub token is set; {_LOGIN_FIX}")
    if isinstance(error, OfflineModeIsEnabled):
        return ConversionError(f"{where}: offline mode is on; unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE)")
    if isinstance(error, HFValidationError):
        return ConversionError(
            f"{where}: {repo_id!r} is not a valid repo id ({_one_line(str(error))}); use `namespace/name` with "
            "letters, digits, '-', '_' and '.'"
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        detail = _one_line(error.server_message or "") or f"HTTP {status}"
        # The Hub answers 401 both for a bad token and for a repo the token cannot see: both are fixed by logging in
        # with the right account.
        if status == 401 or isinstance(error, RepositoryNotFoundError):
            return ConversionError(f"{where}: not authorized ({detail}); {_LOGIN_FIX}")
        if status == 403:
            return ConversionError(
                f"{where}: forbidden ({detail}); use a token with write access to the `{repo_id.split('/')[0]}` "
                "namespace (`hf auth login` or HF_TOKEN)"
            )
        return ConversionError(f"{where}: the Hub answered HTTP {status} ({detail}); check the repo id and retry")
    if isinstance(error, _transport_errors()):
        return ConversionError(
            f"{where}: the Hub cannot be reached ({_one_line(str(error)) or type(error).__name__}); check the "
            "network or HF_ENDPOINT"
        )
    if isinstance(error, ValueError):
        # huggingface_hub raises plain ValueError for what the Hub rejects before any upload, e.g. an invalid YAML
        # header in README.md ("Invalid metadata in README.md").
        return ConversionError(f"{where}: {_one_line(str(error))}; fix the folder and push again")
    return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection/timeout errors: huggingface_hub 2.x uses `httpx2`, 1.x `httpx`."""
    errors: list[type[BaseException]] = []
    for name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        errors.append(module.TransportError)
    return tuple(errors)


def _one_line(text: str) -> str:
    """`text` with its lines joined, so that the command line can print the error on one line."""
    return " ".join(text.split())
