"""Read the tensors of a checkpoint one at a time, without loading the whole checkpoint into memory.

safetensors files are opened with `safe_open` (memory-mapped: a tensor is read when it is asked for). Pickled `.bin`
files are only ever read with `torch.load(weights_only=True)` (which refuses anything but plain tensors and
containers) and memory-mapped where the file format allows it.
"""

import json
import logging
import pickle
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import ConversionError


logger = logging.getLogger(__name__)

class TensorStore:
    """The tensors of one checkpoint (one or several files), by key."""

    def __init__(self, files: Iterable[Path], label: str):
        self.label = label
        self._location: dict[str, tuple[Path, object]] = {}
        self._handles: dict[Path, object] = {}
        for path in files:
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
            raise ConversionError(f"{label}: {source.name} does not hold a flat dict of name -> tensor where expected.")
        store = cls([], label)
        for key, value in state.items():
            store._add(key, source, value)
        return store

    def _index_safetensors(self, path: Path) -> None:
        try:
            handle = safe_open(str(path), framework="pt")
            keys = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as error:
            raise ConversionError(
                f"{self.label}: {path.name} is not a valid safetensors file ({error}); re-download or re-save it."
            ) from None
        self._handles[path] = handle
        for key in keys:
            self._add(key, path, handle)

    def _index_pickle(self, path: Path) -> None:
        logger.info("%s: reading the pickled checkpoint %s with torch.load(weights_only=True)", self.label, path.name)
        if not zipfile.is_zipfile(path):
            logger.warning(
                "%s: %s uses torch's legacy (pre-1.6) format, which cannot be memory-mapped: it is read into memory "
                "whole. Re-save it (or convert it to safetensors) for large checkpoints.", self.label, path.name
            )
        try:
            # mmap keeps tensors on disk until used; only the zip format (torch >= 1.6) supports it.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConversionError(
                f"{self.label}: {path.name} is not a plain checkpoint of tensors (torch.load with weights_only=True "
                f"refused it: {first_line}); only state dicts of tensors are accepted, never arbitrary pickles."
            ) from None
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
            raise ConversionError(f"{self.label}: tensor {key!r} appears in both {self._location[key][0].name} and {path.name}.")
        self._location[key] = (path, holder)

    def keys(self) -> list[str]:
        return list(self._location)

    def __contains__(self, key: str) -> bool:
        return key in self._location

    def shape(self, key: str) -> tuple[int, ...]:
        path, holder = self._location[key]
        if torch.is_tensor(holder):
            return tuple(holder.shape)
        return tuple(holder.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key`, read now (a copy in memory; the store keeps nothing)."""
        if key not in self._location:
            raise ConversionError(f"{self.label}: the checkpoint has no tensor {key!r}.")
        path, holder = self._location[key]
        try:
            return holder.clone() if torch.is_tensor(holder) else holder.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ConversionError(f"{self.label}: cannot read {key!r} from {path.name} ({error}); the file is damaged.") from None


class Lazy:
    """A tensor to be read later: `store[key]`, optionally transformed (e.g. reshaped) once read."""

    def __init__(self, store: TensorStore, key: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 shape: tuple[int, ...] | None = None):
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
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConversionError(f"{label}: {index_name} is not a valid shard index (no weight_map).") from None
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


def open_model_weights(folder: Path, label: str) -> TensorStore:
    return TensorStore(weight_files(folder, label), label)
