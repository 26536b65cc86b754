"""Read the tensors of a checkpoint one at a time, without loading the whole checkpoint into memory.

safetensors files are read with positioned reads, not memory maps: only the header is parsed up front, and a tensor
is read into memory of its own when it is asked for, so a tensor that has been used and dropped leaves nothing
resident (pages of a memory map that were touched would stay in the process's RSS until the map is closed, which for
a 7B source is its whole size). Pickled `.bin` files are only ever read with `torch.load(weights_only=True)` (which
refuses anything but plain tensors and containers) and memory-mapped where the file format allows it.
"""

import contextlib
import json
import logging
import math
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from .errors import ConversionError
from .locate import record_input


logger = logging.getLogger(__name__)

# safetensors' dtype names.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
# The safetensors library refuses headers beyond 100 MB; so do we, before reading one.
_MAX_HEADER_BYTES = 100_000_000


class SafetensorsFile:
    """The tensors of one safetensors file, read with positioned reads (see the module docstring).

    The header is checked as strictly as the safetensors library checks it (the library refuses every file this
    refuses, and this refuses every file it refuses): a UTF-8 JSON object of entries with a known dtype, a shape of
    non-negative integers and two data offsets; sorted by offset, the tensors' bytes start at 0, follow each other
    with no gap and no overlap, each spans exactly dtype size x elements bytes, and the last ends where the file ends.
    Duplicate names are refused too. So one tensor can never read another's bytes.
    """

    def __init__(self, path: Path, label: str):
        self.path = path
        self.label = label
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            header_bytes = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 0 < header_bytes <= min(_MAX_HEADER_BYTES, size - 8):
                self._invalid("its header length is out of range")
            try:
                header = json.loads(handle.read(header_bytes).decode("utf-8"), object_pairs_hook=_refuse_duplicates)
            except (UnicodeDecodeError, json.JSONDecodeError):
                self._invalid("its header is not JSON")
            except _DuplicateKey as error:
                self._invalid(f"its header names {error.args[0]!r} twice")
        if not isinstance(header, dict):
            self._invalid("its header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())
        ):
            self._invalid("its __metadata__ is not a mapping of strings")
        data_start, data_bytes = 8 + header_bytes, size - 8 - header_bytes
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        spans = []
        for key, entry in header.items():
            dtype, shape, begin, end = self._entry(key, entry)
            if end < begin or end - begin != math.prod(shape) * dtype.itemsize:
                self._invalid(
                    f"tensor {key!r} has offsets {[begin, end]} that do not fit its dtype and shape {list(shape)}"
                )
            spans.append((begin, end, key))
            self.entries[key] = (dtype, shape, data_start + begin, end - begin)
        covered = 0
        for begin, end, key in sorted(spans):
            if begin != covered:
                problem = "overlap another tensor's" if begin < covered else "leave a gap before them"
                self._invalid(f"tensor {key!r} has offsets {[begin, end]} whose bytes {problem}")
            covered = end
        if covered != data_bytes:
            self._invalid(f"its tensors cover {covered} bytes of data but the file holds {data_bytes}")

    def _entry(self, key: str, entry: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        """An entry's dtype, shape and offsets, each of the type the format requires."""
        if not isinstance(entry, dict):
            self._invalid(f"tensor {key!r} has a malformed entry {entry!r}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            self._invalid(f"tensor {key!r} has the dtype {dtype!r}, which is unknown or not supported")
        if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
            self._invalid(f"tensor {key!r} has the shape {shape!r}, not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(offset) for offset in offsets):
            self._invalid(f"tensor {key!r} has the data offsets {offsets!r}, not two non-negative integers")
        return SAFETENSORS_DTYPES[dtype], tuple(shape), offsets[0], offsets[1]

    def _invalid(self, reason: str):
        raise ConversionError(
            f"{self.label}: {self.path.name} is not a valid safetensors file ({reason}); re-download or re-save it."
        )

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def get(self, key: str) -> torch.Tensor:
        dtype, shape, offset, length = self.entries[key]
        if length == 0:
            return torch.empty(shape, dtype=dtype)
        # torch.empty, not bytearray: the bytes are read straight into memory that is never zeroed first.
        buffer = torch.empty(length, dtype=torch.uint8)
        try:
            with open(self.path, "rb", buffering=0) as handle:
                handle.seek(offset)
                view, done = memoryview(buffer.numpy()), 0
                while done < length:
                    count = handle.readinto(view[done:])
                    if not count:
                        raise OSError("the file ends early")
                    done += count
        except OSError as error:
            raise ConversionError(
                f"{self.label}: cannot read {key!r} from {self.path.name} ({error}); the file is damaged."
            ) from None
        return buffer.view(dtype).reshape(shape)


class _DuplicateKey(Exception):
    pass


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_pickle(path: Path, label: str) -> object:
    """A pickled checkpoint, read only with `torch.load(weights_only=True)` (plain tensors and containers, never
    arbitrary objects), memory-mapped where the file's format allows it."""
    logger.info("%s: reading the pickled checkpoint %s with torch.load(weights_only=True)", label, path.name)
    if not zipfile.is_zipfile(path):
        logger.warning(
            "%s: %s uses torch's legacy (pre-1.6) format, which cannot be memory-mapped: it is read into memory "
            "whole. Re-save it (or convert it to safetensors) for large checkpoints.",
            label,
            path.name,
        )
    try:
        # mmap keeps tensors on disk until used; only the zip format (torch >= 1.6) supports it.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(
            f"{label}: {path.name} is not a plain checkpoint of tensors (torch.load with weights_only=True refused "
            f"it: {first_line}); only tensors in plain containers are accepted, never arbitrary pickles."
        ) from error


# Elements checked per pass for NaN / Inf: bounds the memory the check adds, whatever the tensor's size.
_FINITE_CHECK_CHUNK = 1 << 24


def non_finite_count(tensor: torch.Tensor) -> int:
    """How many elements of a floating tensor are NaN or infinite (0 for other dtypes). Fast path: a min/max per
    chunk (about 2 G elements/s on 2 cores), which NaN and Inf propagate to; elements are counted only when that
    finds one."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    flat = tensor.detach().reshape(-1)
    needs_upcast = tensor.dtype.itemsize == 1  # float8: no min/max kernels on CPU
    found = 0
    for chunk in flat.split(_FINITE_CHECK_CHUNK):
        chunk = chunk.float() if needs_upcast else chunk
        low, high = torch.aminmax(chunk)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            found += int((~torch.isfinite(chunk)).sum())
    return found


@dataclass(frozen=True)
class TensorRead:
    """One tensor read from a checkpoint: whose (`label`), which file and key, and its dtype."""

    store: "TensorStore"
    file: str
    key: str
    dtype: torch.dtype

    def describe(self) -> str:
        return f"{self.store.label}: tensor {self.key!r} in {self.file}"

    def non_finite_message(self) -> str | None:
        """Read the tensor again and say how many NaN / Inf it holds, or None when it is finite. (The writer checks
        what it writes; only when that is not finite are the tensors it came from read again, to name the culprit:
        a check of every read would cost a full extra pass over every source.)"""
        tensor = self.store.get(self.key, record=False)
        bad = non_finite_count(tensor)
        if not bad:
            return None
        return (
            f"{self.describe()} holds {bad} NaN or infinite value(s) of {tensor.numel()}; the checkpoint is damaged "
            "or was saved from a diverged run. Use a sound checkpoint."
        )


# The reads of the tensor being produced in this context (see `recording_reads`).
_READS: ContextVar[list[TensorRead] | None] = ContextVar("tensor_reads", default=None)


@contextlib.contextmanager
def recording_reads() -> Iterator[list[TensorRead]]:
    """Collect every tensor read from a checkpoint inside the block, so that a tensor computed from several sources
    can name the one that does not fit (integers where the composite needs floating-point weights, NaN or Inf)."""
    reads: list[TensorRead] = []
    token = _READS.set(reads)
    try:
        yield reads
    finally:
        _READS.reset(token)


class TensorStore:
    """The tensors of one checkpoint (one or several files), by key. Every read is noted for `recording_reads`."""

    def __init__(self, files: Iterable[Path], label: str):
        self.label = label
        self._location: dict[str, tuple[Path, object]] = {}
        for path in files:
            record_input(path, label)
            if path.suffix == ".safetensors":
                self._index_safetensors(path)
            else:
                self._index_pickle(path)

    @classmethod
    def from_state_dict(cls, state: object, source: Path, label: str) -> "TensorStore":
        """A store over a state dict already in memory (e.g. the `model` entry of a checkpoint that nests its tensors
        beside other data); `source` is the file it came from, named in messages."""
        if not isinstance(state, dict) or not all(
            isinstance(key, str) and torch.is_tensor(value) for key, value in state.items()
        ):
            raise ConversionError(
                f"{label}: {source.name} does not hold a flat dict of name -> tensor where expected."
            )
        store = cls([], label)
        for key, value in state.items():
            store._add(key, source, value)
        return store

    def _index_safetensors(self, path: Path) -> None:
        handle = SafetensorsFile(path, self.label)
        for key in handle.entries:
            self._add(key, path, handle)

    def _index_pickle(self, path: Path) -> None:
        state = load_pickle(path, self.label)
        if not isinstance(state, dict) or not all(
            isinstance(key, str) and torch.is_tensor(value) for key, value in state.items()
        ):
            raise ConversionError(
                f"{self.label}: {path.name} does not hold a flat dict of name -> tensor; convert it to a plain state "
                "dict (or safetensors) first."
            )
        for key, value in state.items():
            self._add(key, path, value)

    def _add(self, key: str, path: Path, holder: object) -> None:
        if key in self._location:
            raise ConversionError(
                f"{self.label}: tensor {key!r} appears in both {self._location[key][0].name} and {path.name}."
            )
        self._location[key] = (path, holder)

    def keys(self) -> list[str]:
        return list(self._location)

    def __contains__(self, key: str) -> bool:
        return key in self._location

    def shape(self, key: str) -> tuple[int, ...]:
        path, holder = self._location[key]
        return tuple(holder.shape) if torch.is_tensor(holder) else holder.shape(key)

    def get(self, key: str, record: bool = True) -> torch.Tensor:
        """The tensor `key`, read now (a copy in memory; the store keeps nothing), noted for `recording_reads` unless
        `record` is False."""
        if key not in self._location:
            raise ConversionError(f"{self.label}: the checkpoint has no tensor {key!r}.")
        path, holder = self._location[key]
        if not torch.is_tensor(holder):
            tensor = holder.get(key)
        else:
            try:
                tensor = holder.clone()
            except RuntimeError as error:
                raise ConversionError(
                    f"{self.label}: cannot read {key!r} from {path.name} ({error}); the file is damaged."
                ) from None
        reads = _READS.get()
        if record and reads is not None:
            reads.append(TensorRead(self, path.name, key, tensor.dtype))
        return tensor


class Lazy:
    """A tensor to be read later: `store[key]`, optionally transformed (e.g. reshaped) once read."""

    def __init__(
        self,
        store: TensorStore,
        key: str,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        shape: tuple[int, ...] | None = None,
    ):
        self.store = store
        self.key = key
        self.transform = transform
        self._shape = shape

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape if self._shape is not None else self.store.shape(self.key)

    def load(self) -> torch.Tensor:
        tensor = self.store.get(self.key)
        return self.transform(tensor) if self.transform is not None else tensor


# Weight files in the order transformers prefers them: safetensors over pickles, sharded index over single files.
_WEIGHT_FILE_CANDIDATES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def weight_files(folder: Path, label: str) -> list[Path]:
    """The files holding a transformers model's weights in `folder` (sharded or not)."""
    for index_name, single_name in _WEIGHT_FILE_CANDIDATES:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ConversionError(f"{label}: {index_name} is not a valid shard index (no weight_map).") from error
            if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
                raise ConversionError(f"{label}: {index_name} has a weight_map that does not map names to files.")
            escaping = sorted({name for name in weight_map.values() if not _stays_inside(name)})
            if escaping:
                raise ConversionError(
                    f"{label}: {index_name} points at shards outside its folder {escaping[:3]}; a shard index may "
                    "only name files inside the model's folder. The checkpoint is not trustworthy as it is."
                )
            shards = sorted({folder / name for name in weight_map.values()})
            missing = [shard.name for shard in shards if not shard.is_file()]
            if missing:
                raise ConversionError(f"{label}: shards {missing} listed in {index_name} are missing; download them.")
            return shards
        if (folder / single_name).is_file():
            return [folder / single_name]
    raise ConversionError(
        f"{label}: no weights found in {folder} (looked for model.safetensors[.index.json] and "
        "pytorch_model.bin[.index.json])."
    )


def _stays_inside(name: str) -> bool:
    """A shard name relative to its index's folder that cannot leave it (no absolute path, drive or `..`)."""
    for flavour in (PurePosixPath, PureWindowsPath):
        path = flavour(name)
        if not name or path.is_absolute() or path.anchor or ".." in path.parts:
            return False
    return True


def open_model_weights(folder: Path, label: str) -> TensorStore:
    return TensorStore(weight_files(folder, label), label)
