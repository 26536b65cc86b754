"""Find a model folder from a recipe reference: a local folder, or a Hub repository `org/name[/sub/folder][@revision]`
(fetched with `huggingface_hub.snapshot_download`, which also serves it from the local cache when offline)."""

import contextlib
import logging
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from .errors import ConversionError


logger = logging.getLogger(__name__)

_HUB_REFERENCE = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<sub>(?:/[\w.-]+)*)(?:@(?P<revision>[\w./-]+))?$"
)
# Weight formats the conversion never reads; skipping them keeps a Hub download to what is needed.
_IGNORED_DOWNLOADS = ["*.msgpack", "*.h5", "*.onnx", "*.ot", "*.tflite", "*.gguf", "flax_model*", "tf_model*"]


# The inputs (folders and files) the conversion running in this context has read: its output must stay clear of them.
_RECORDED_INPUTS: ContextVar[list[tuple[Path, str]] | None] = ContextVar("recorded_inputs", default=None)


@contextlib.contextmanager
def recording_inputs() -> Iterator[list[tuple[Path, str]]]:
    """Collect, as (path, what) pairs, every folder `locate` finds and every file read through `record_input` inside
    the block."""
    inputs: list[tuple[Path, str]] = []
    token = _RECORDED_INPUTS.set(inputs)
    try:
        yield inputs
    finally:
        _RECORDED_INPUTS.reset(token)


def record_input(path: Path, what: str) -> None:
    """Note `path` as an input of the running conversion (no-op outside `recording_inputs`)."""
    inputs = _RECORDED_INPUTS.get()
    if inputs is not None:
        inputs.append((Path(path), what))


@dataclass
class Location:
    """Where a model's files are, and where they came from (for the model card)."""

    reference: str
    folder: Path
    hub_id: str | None = None
    revision: str | None = None


def locate(reference: str, what: str) -> Location:
    """Resolve `reference` to a local folder. `what` names it in errors (e.g. "sources[1]")."""
    path = Path(reference).expanduser()
    if path.is_dir():
        logger.debug("%s: local folder %s", what, path.resolve())
        record_input(path, what)
        return Location(reference=reference, folder=path.resolve())
    if path.exists():
        raise ConversionError(f"{what}: {reference!r} is a file; give the folder that holds the model's files.")
    match = _HUB_REFERENCE.match(reference)
    looks_local = reference.startswith(("/", ".", "~")) or "\\" in reference
    if match is None or looks_local:
        raise ConversionError(f"{what}: the folder {reference!r} does not exist; check the path (or give a Hub id).")
    repo_id, revision = match.group("repo"), match.group("revision")
    sub_folder = match.group("sub").strip("/")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=[f"{sub_folder}/*"] if sub_folder else None,
                ignore_patterns=_IGNORED_DOWNLOADS,
            )
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise ConversionError(
            f"{what}: {reference!r} is neither a local folder nor a Hub repository/revision ({type(error).__name__})."
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConversionError(
            f"{what}: {reference!r} is not a local folder and could not be fetched from the Hub ({problem}); "
            "check the id, your network and login (`hf auth login`), or download it and give the local path."
        ) from error
    folder = snapshot / sub_folder if sub_folder else snapshot
    if not folder.is_dir():
        raise ConversionError(f"{what}: the Hub repository {repo_id!r} has no folder {sub_folder!r}.")
    logger.info("%s: %s at %s", what, reference, folder)
    record_input(folder, what)
    return Location(reference=reference, folder=folder, hub_id=repo_id, revision=snapshot.name)


CHECKPOINT_SUFFIXES = (".pt", ".bin")


def locate_checkpoint_file(reference: str, what: str, encoder: str, example: str) -> tuple[Location, Path]:
    """The single-file checkpoint `reference` names (the paper's BEATs and PointBERT encoders are published as one
    `.pt`): the file itself, or a folder (local or Hub) holding exactly one `.pt` / `.bin`. `encoder` and `example`
    (its published file name) are for the messages."""
    path = Path(reference).expanduser()
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ConversionError(f"{what}: {reference!r} is not a .pt or .bin checkpoint ({encoder}'s is {example}).")
        record_input(path, what)
        return Location(reference=reference, folder=path.resolve().parent), path.resolve()
    location = locate(reference, what)
    candidates = sorted(
        file for file in location.folder.iterdir() if file.is_file() and file.suffix in CHECKPOINT_SUFFIXES
    )
    if len(candidates) != 1:
        raise ConversionError(
            f"{what}: expected exactly one {encoder} checkpoint (.pt or .bin) in {location.folder}, found "
            f"{[file.name for file in candidates]}; give the path of the file itself (e.g. .../{example})."
        )
    return location, candidates[0]
