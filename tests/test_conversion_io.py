"""The converter's own tensor I/O: safetensors read with positioned reads (no memory map) and shards streamed to
disk; checked against the safetensors library itself, which is what transformers loads with."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conversion.errors import ConversionError
from conversion.tensors import TensorStore, non_finite_count, open_model_weights, recording_reads
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


def _file(header: object, data: bytes = b"", raw: bytes | None = None) -> bytes:
    """A safetensors file from a header (JSON-encoded unless `raw` gives its bytes) and a data buffer."""
    encoded = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def _f32(shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


# Headers the safetensors library refuses; ours must refuse each of them too (no tensor may read another's bytes).
MALFORMED = {
    "trailing bytes after the last tensor": _file({"a": _f32([2], 0, 8)}, bytes(12)),
    "a gap between tensors": _file({"a": _f32([1], 0, 4), "b": _f32([2], 8, 16)}, bytes(16)),
    "two tensors on the same bytes": _file({"a": _f32([2], 0, 8), "b": _f32([2], 0, 8)}, bytes(8)),
    "a tensor inside another": _file({"a": _f32([4], 0, 16), "b": _f32([2], 8, 16)}, bytes(16)),
    "data not starting at 0": _file({"a": _f32([2], 8, 16)}, bytes(16)),
    "offsets reversed": _file({"a": _f32([0], 8, 0)}, bytes(8)),
    "bytes that do not fit dtype x shape": _file({"a": _f32([3], 0, 8)}, bytes(8)),
    "offsets beyond the file": _file({"a": _f32([4], 0, 16)}, bytes(8)),
    "a negative dimension": _file({"a": _f32([-2], 0, 8)}, bytes(8)),
    "a fractional dimension": _file({"a": _f32([2.0], 0, 8)}, bytes(8)),
    "a boolean dimension": _file({"a": _f32([True], 0, 4)}, bytes(4)),
    "three offsets": _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, bytes(8)),
    "an unknown dtype": _file({"a": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "an entry that is not a mapping": _file({"a": 3}),
    "metadata that is not strings": _file({"__metadata__": {"step": 1}, "a": _f32([2], 0, 8)}, bytes(8)),
    "a header that is a list": _file([1]),
    "a header that is not JSON": _file(None, raw=b"nope"),
    "a header that is not UTF-8": _file(None, raw=b'{"\xff": 1}'),
    "a header longer than the file": struct.pack("<Q", 1000) + b"{}",
    "a file shorter than its length prefix": b"\x02\x00\x00",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_header_the_safetensors_library_refuses_is_refused_naming_the_file(case, tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(MALFORMED[case])
    with pytest.raises(Exception):  # noqa: B017 (the oracle: the library that transformers loads with refuses it)
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)
    with pytest.raises(ConversionError, match=r"^source: bad\.safetensors is not a valid safetensors file \("):
        TensorStore([path], "source")


def test_duplicate_names_are_refused(tmp_path):
    path = tmp_path / "twice.safetensors"
    entry = b'{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    path.write_bytes(_file(None, bytes(8), raw=b'{"a":' + entry + b',"a":' + entry + b"}"))
    with pytest.raises(ConversionError, match="its header names 'a' twice"):
        TensorStore([path], "source")


# Unusual but valid: both readers accept them and read the same values.
VALID = {
    "entries out of offset order": _file({"b": _f32([1], 4, 8), "a": _f32([1], 0, 4)}, struct.pack("<2f", 1.0, 2.0)),
    "zero-size tensors": _file({"e": _f32([0, 3], 0, 0), "a": _f32([1], 0, 4)}, struct.pack("<f", 3.0)),
    "whitespace around the header": _file(
        None, struct.pack("<f", 4.0), raw=b'  {"a":' + json.dumps(_f32([1], 0, 4)).encode() + b"}   "
    ),
    "null metadata and extra fields": _file(
        {"__metadata__": None, "a": {**_f32([1], 0, 4), "note": 1}}, struct.pack("<f", 5.0)
    ),
    "no tensors": _file({}),
}


@pytest.mark.parametrize("case", list(VALID))
def test_unusual_valid_headers_read_as_the_library_reads_them(case, tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(VALID[case])
    expected = load_file(str(path))
    store = TensorStore([path], "source")
    assert sorted(store.keys()) == sorted(expected)
    assert all(torch.equal(store.get(key), tensor) for key, tensor in expected.items())


@pytest.mark.parametrize(
    "shard",
    [
        "../other/model.safetensors",
        "/etc/model.safetensors",
        "sub/../../x.safetensors",
        "C:\\models\\model.safetensors",
    ],
)
def test_a_shard_index_pointing_outside_its_folder_is_refused(shard, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="points at shards outside its folder"):
        open_model_weights(folder, "source")


def test_a_shard_index_may_name_files_in_subfolders(tmp_path):
    (tmp_path / "shards").mkdir()
    save_file({"a": torch.ones(2)}, str(tmp_path / "shards" / "part.safetensors"))
    index = {"weight_map": {"a": "shards/part.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(open_model_weights(tmp_path, "source").get("a"), torch.ones(2))


@pytest.mark.parametrize(
    ("dtype", "value"),
    [
        (torch.float32, float("nan")),
        (torch.float32, float("inf")),
        (torch.bfloat16, -float("inf")),
        (torch.float16, float("nan")),
        (torch.float16, float("inf")),
        (torch.float64, -float("inf")),
        (torch.float8_e4m3fn, float("nan")),  # float8_e4m3fn has no infinity
    ],
)
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_a_read_tells_its_nan_or_inf_naming_the_checkpoint_and_the_tensor(dtype, value, suffix, tmp_path):
    """The writer checks what it writes; when that is not finite, the reads it came from name the culprit."""
    clean, damaged = torch.randn(70, 5), torch.randn(70, 5)
    damaged[33, 2] = value
    tensors = {"clean": clean.to(dtype), "layers.3.weight": damaged.to(dtype)}
    path = tmp_path / f"model{suffix}"
    save_file(tensors, str(path)) if suffix == ".safetensors" else torch.save(tensors, path)
    store = TensorStore([path], "sources[2] (mine)")
    with recording_reads() as reads:
        assert torch.equal(store.get("clean").float(), tensors["clean"].float())
        assert non_finite_count(store.get("layers.3.weight")) == 1
    assert reads[0].non_finite_message() is None
    assert reads[1].non_finite_message() == (
        f"sources[2] (mine): tensor 'layers.3.weight' in model{suffix} holds 1 NaN or infinite value(s) of 350; the "
        "checkpoint is damaged or was saved from a diverged run. Use a sound checkpoint."
    )
    assert len(reads) == 2, "reading again to name a culprit is not itself recorded"


def test_non_finite_values_are_counted_in_every_chunk(monkeypatch):
    monkeypatch.setattr("conversion.tensors._FINITE_CHECK_CHUNK", 7)
    tensor = torch.zeros(10, 5)
    tensor[0, 0], tensor[4, 2], tensor[9, 4] = float("nan"), float("inf"), -float("inf")
    assert non_finite_count(tensor) == 3 and non_finite_count(tensor.bfloat16()) == 3
    assert non_finite_count(torch.arange(5)) == 0 and non_finite_count(torch.zeros(0)) == 0


def test_every_read_is_recorded_with_its_dtype(tmp_path):
    save_file({"a": torch.ones(2), "b": torch.arange(3, dtype=torch.int32)}, str(tmp_path / "m.safetensors"))
    store = TensorStore([tmp_path / "m.safetensors"], "source")
    with recording_reads() as reads:
        store.get("b")
        store.get("a")
    assert [(read.key, read.dtype, read.file) for read in reads] == [
        ("b", torch.int32, "m.safetensors"),
        ("a", torch.float32, "m.safetensors"),
    ]
    assert reads[0].describe() == "source: tensor 'b' in m.safetensors"
    store.get("a")  # outside the block: nothing recorded
    assert len(reads) == 2


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
