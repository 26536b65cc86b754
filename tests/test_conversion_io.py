"""The converter's own tensor I/O: safetensors read with positioned reads (no memory map) and shards streamed to
disk; checked against the safetensors library itself, which is what transformers loads with."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conversion.errors import ConversionError
from conversion.tensors import TensorStore
from conversion.writer import ShardedWriter


TENSORS = {
    "embed.weight": torch.randn(7, 5).to(torch.bfloat16),
    "counts": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "mask": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
    "half": torch.randn(9, dtype=torch.float16),
    "layers.0.weight": torch.randn(16, 8),
}


def test_tensors_read_back_exactly_as_safetensors_wrote_them(tmp_path):
    save_file(TENSORS, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    store = TensorStore([tmp_path / "model.safetensors"], "source")
    assert sorted(store.keys()) == sorted(TENSORS)
    for key, tensor in TENSORS.items():
        assert store.shape(key) == tuple(tensor.shape)
        read = store.get(key)
        assert read.dtype == tensor.dtype and torch.equal(read, tensor)
    read = store.get("layers.0.weight")
    read.add_(1.0)  # a tensor of its own: changing it changes neither the file nor the next read
    assert torch.equal(store.get("layers.0.weight"), TENSORS["layers.0.weight"])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[:6], "header length"),
        (lambda data: struct.pack("<Q", 4) + b"nope", "not JSON"),
        (lambda data: data[:-3], "do not fit"),
    ],
)
def test_damaged_files_are_refused_naming_the_file(tmp_path, damage, reason):
    save_file(TENSORS, str(tmp_path / "ok.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(damage((tmp_path / "ok.safetensors").read_bytes()))
    with pytest.raises(ConversionError, match=rf"bad\.safetensors is not a valid safetensors file \(.*{reason}"):
        TensorStore([tmp_path / "bad.safetensors"], "source")


def test_streamed_shards_load_with_safetensors_and_split_at_the_cap(tmp_path):
    shapes = {key: tuple(tensor.shape) for key, tensor in TENSORS.items()}
    writer = ShardedWriter(tmp_path, max_shard_bytes=300, shapes=shapes)
    for key, tensor in TENSORS.items():
        writer.add(key, tensor)
    files = writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert files[-1] == "model.safetensors.index.json" and len(files) > 2
    loaded = {}
    for name in files[:-1]:
        shard = load_file(str(tmp_path / name))
        assert all(index["weight_map"][key] == name for key in shard)
        nbytes = sum(tensor.numel() * tensor.element_size() for tensor in shard.values())
        assert nbytes <= 300 or len(shard) == 1
        with safe_open(str(tmp_path / name), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
        loaded.update(shard)
    assert loaded.keys() == TENSORS.keys() and all(torch.equal(loaded[key], TENSORS[key]) for key in TENSORS)
    assert index["metadata"]["total_size"] == writer.total_bytes


def test_one_shard_is_model_safetensors_and_shapes_are_checked(tmp_path):
    writer = ShardedWriter(tmp_path, max_shard_bytes=10**9, shapes={"a": (2, 2)})
    with pytest.raises(ConversionError, match=r"'a' has shape \(3,\), not the planned \(2, 2\)"):
        writer.add("a", torch.zeros(3))
    with pytest.raises(ConversionError, match="'b' has shape"):
        writer.add("b", torch.zeros(2, 2))
    writer.add("a", torch.ones(2, 2))
    assert writer.close() == ["model.safetensors"]
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["a"], torch.ones(2, 2))
