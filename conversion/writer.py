"""Streamed, sharded safetensors output, and an output folder that appears only when it is complete.

`ShardedWriter` keeps at most one shard in memory: tensors are appended until the next one would pass the size cap,
then the shard is written and dropped. `atomic_output` hands out a temporary folder beside the destination and
renames it into place only when the work inside succeeded; on any error, Ctrl-C or SIGTERM, the temporary folder is
removed and the destination is untouched.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import ConversionError


logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_size(size: str | int) -> int:
    """Bytes in `size`: an integer, or a string like "2GB", "500MB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ConversionError(f"The shard size must be positive, got {size}.")
        return size
    match = _SIZE.match(str(size))
    if match is None or float(match.group(1)) <= 0:
        raise ConversionError(f"Cannot read the shard size {size!r}; write it like 2GB or 500MB.")
    unit = match.group(2).upper() if match.group(2) else None
    return int(float(match.group(1)) * _UNITS[unit])


class ShardedWriter:
    """Writes tensors into `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes` (a tensor larger than
    that gets a shard of its own) plus `model.safetensors.index.json`; a single shard is `model.safetensors`."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[key] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        name = f"shard-{len(self._shards):05d}.tmp.safetensors"
        save_file(self._pending, str(self.folder / name), metadata={"format": "pt"})
        self._shards.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give the shards their final names and write the index. Returns the file names."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(self.folder / self._shards[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for index, (temporary, keys) in enumerate(self._shards, start=1):
            final = f"model-{index:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / temporary, self.folder / final)
            weight_map.update(dict.fromkeys(keys, final))
            names.append(final)
        index_file = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2, sort_keys=True) + "\n")
        return [*names, "model.safetensors.index.json"]


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that the temporary folder is cleaned up as on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def check_destination(destination: Path, force: bool) -> None:
    """Refuse an existing output without `force`, and one that is not a folder in any case."""
    if destination.exists() and not force:
        raise ConversionError(f"The output {str(destination)!r} already exists; pass --force to replace it.")
    if destination.exists() and not destination.is_dir():
        raise ConversionError(f"The output {str(destination)!r} exists and is not a folder; remove it or pick another path.")


@contextlib.contextmanager
def atomic_output(destination: Path, force: bool) -> Iterator[Path]:
    """A temporary folder that becomes `destination` when the block succeeds. An existing `destination` is refused
    unless `force`, in which case it is replaced only at the very end."""
    destination = Path(destination)
    check_destination(destination, force)
    parent = destination.parent.resolve()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConversionError(f"Cannot create the output's parent folder {str(parent)!r} ({error}).") from None
    # Beside the destination, so that the final rename stays on one file system (and is atomic).
    try:
        temporary = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=parent))
    except OSError as error:
        raise ConversionError(f"Cannot write beside the output in {str(parent)!r} ({error.strerror}); pick a writable place.") from None
    previous_handler = None
    if _in_main_thread():
        previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield temporary
        if destination.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=parent))
            os.replace(destination, backup / destination.name)
            os.replace(temporary, destination)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(temporary, destination)
    except _Terminated:
        shutil.rmtree(temporary, ignore_errors=True)
        raise KeyboardInterrupt("terminated") from None
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
