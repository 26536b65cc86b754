"""Streamed, sharded safetensors output: `ShardedWriter` streams tensors to disk as they come (memory holds one
tensor, never a shard), starting a new shard when the next tensor would pass the size cap. (The folder it writes into,
and how that becomes the output, is `output.py`'s.)
"""

import json
import logging
import os
import re
import struct
from pathlib import Path

import torch

from .errors import ConversionError
from .output import hold_for_test
from .tensors import SAFETENSORS_DTYPES


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
    that gets a shard of its own) plus `model.safetensors.index.json`; a single shard is `model.safetensors`.

    Each tensor goes to disk as it is added, so memory never holds more than the tensor in hand. A shard file opens
    with room for its header, sized from `shapes` (every key that may be written, with its shape) for the longest
    header any shard could need; the tensors' bytes follow, and the header is written into that room when the shard
    is closed, padded with spaces (JSON whitespace, which safetensors readers accept as they pad headers themselves).
    """

    def __init__(self, folder: Path, max_shard_bytes: int, shapes: dict[str, tuple[int, ...]]):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.shapes = shapes
        self._header_room = _header_room(shapes)
        self._file = None
        self._entries: dict[str, dict] = {}
        self._shard_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self.shapes or tuple(tensor.shape) != tuple(self.shapes[key]):
            raise ConversionError(
                f"Tensor {key!r} has shape {tuple(tensor.shape)}, not the planned {self.shapes.get(key)}."
            )
        if tensor.dtype not in _DTYPE_NAMES:
            raise ConversionError(f"Tensor {key!r} has dtype {tensor.dtype}, which safetensors cannot store.")
        size = tensor.numel() * tensor.element_size()
        if self._file is not None and self._entries and self._shard_bytes + size > self.max_shard_bytes:
            self._close_shard()
        if self._file is None:
            name = f"shard-{len(self._shards):05d}.tmp.safetensors"
            self._file = open(self.folder / name, "wb")
            self._file.write(b"\0" * (8 + self._header_room))
            self._shards.append((name, []))
        data = tensor.detach().contiguous().reshape(-1)
        if size:
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._entries[key] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._shard_bytes, self._shard_bytes + size],
        }
        self._shards[-1][1].append(key)
        self._shard_bytes += size
        self.total_bytes += size

    def _close_shard(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        if len(header) > self._header_room:
            raise ConversionError(f"Internal error: a shard header of {len(header)} bytes outgrew its room.")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self._header_room) + header + b" " * (self._header_room - len(header)))
        self._file.close()
        self._file, self._entries, self._shard_bytes = None, {}, 0
        hold_for_test("shard-written")

    def close(self) -> list[str]:
        """Close the last shard, give the shards their final names and write the index. Returns the file names."""
        if self._file is None and not self._shards:
            self._file = open(self.folder / "shard-00000.tmp.safetensors", "wb")
            self._file.write(b"\0" * (8 + self._header_room))
            self._shards.append(("shard-00000.tmp.safetensors", []))
        if self._file is not None:
            self._close_shard()
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
        (self.folder / "model.safetensors.index.json").write_text(
            json.dumps(index_file, indent=2, sort_keys=True) + "\n"
        )
        return [*names, "model.safetensors.index.json"]


_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def _header_room(shapes: dict[str, tuple[int, ...]]) -> int:
    """Bytes that hold the header of any shard of these tensors: every entry at its widest (longest dtype name,
    offsets of 16 digits), plus the metadata, rounded up to 8 (safetensors aligns the data that follows)."""
    widest = 10**15
    room = len(json.dumps({"__metadata__": {"format": "pt"}}, separators=(",", ":")))
    for key, shape in shapes.items():
        entry = {key: {"dtype": "F8_E4M3", "shape": list(shape), "data_offsets": [widest, widest]}}
        room += len(json.dumps(entry, separators=(",", ":")))
    return (room + 7) // 8 * 8
