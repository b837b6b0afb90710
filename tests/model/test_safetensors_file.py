"""The safetensors reader: zero-copy views, sharded folders, and malformed files rejected."""

import json
import mmap
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.model.loader import load_checkpoint, require
from engine.model.safetensors_file import (
    SafetensorsFile, ShardedSafetensors, open_safetensors_folder,
)

UP = "model.layers.0.mlp.up_proj.weight"


def write_raw(path, header: dict, data: bytes, header_size: int | None = None) -> str:
    """A safetensors file from a header dict and data bytes, with no checks: for malformed files."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    size = len(raw) if header_size is None else header_size
    with open(path, "wb") as f:
        f.write(size.to_bytes(8, "little") + raw + data)
    return str(path)


def valid_header(rows=3, cols=4):
    nbytes = rows * cols * 4
    return {"__metadata__": {"format": "pt"},
            UP: {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, nbytes]}}, nbytes


@pytest.fixture
def tensors(rng):
    return {
        "model.embed_tokens.weight": rng.standard_normal((17, 8)).astype(np.float32),
        UP: rng.standard_normal((8, 3)).astype(ml_dtypes.bfloat16),
        "model.norm.weight": rng.standard_normal(8).astype(np.float16),
        "position_ids": np.arange(5, dtype=np.int64)[None],
        "mask": np.array([True, False, True]),
        "bytes": np.arange(7, dtype=np.uint8),
        "ids32": np.arange(3, dtype=np.int32),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_reads_every_dtype_zero_copy(tmp_path, tensors):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    f = SafetensorsFile(path)
    assert set(f) == set(tensors) and len(f) == len(tensors)
    for name, expected in tensors.items():
        got = f[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected)
        assert not got.flags.owndata and not got.flags.writeable
        assert type(got) is np.ndarray
        assert np.shares_memory(got, f._data) or got.size == 0
    assert f[UP].dtype == ml_dtypes.bfloat16
    assert f.metadata == {}


def test_sharded_equals_single(tmp_path, tensors):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single.mkdir(), sharded.mkdir()
    save_file(tensors, str(single / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:3],
              "model-00002-of-00002.safetensors": names[3:]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(sharded / shard))
        weight_map.update({n: shard for n in shard_names})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    a, b = open_safetensors_folder(single), open_safetensors_folder(sharded)
    assert isinstance(b, ShardedSafetensors) and set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name], b[name])


def make_sharded(tmp_path, weight_map, shard_contents):
    for shard, names in shard_contents.items():
        save_file({n: np.ones(2, np.float32) for n in names}, str(tmp_path / shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path


def test_missing_shard(tmp_path):
    make_sharded(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"},
                 {"s1.safetensors": ["a"]})
    with pytest.raises(ValueError, match=r"s2\.safetensors.*'b'.*missing"):
        open_safetensors_folder(tmp_path)


def test_index_names_tensor_the_shard_lacks(tmp_path):
    make_sharded(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"},
                 {"s1.safetensors": ["a"]})
    with pytest.raises(ValueError, match=r"'b'.*s1\.safetensors.*does not contain"):
        open_safetensors_folder(tmp_path)


def test_index_shard_outside_folder(tmp_path):
    make_sharded(tmp_path, {"a": "../s1.safetensors"}, {})
    with pytest.raises(ValueError, match=r"'a'.*invalid shard name"):
        open_safetensors_folder(tmp_path)


def test_truncated_file(tmp_path):
    header, nbytes = valid_header()
    path = write_raw(tmp_path / "model.safetensors", header, bytes(nbytes - 1))
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{UP}' has data_offsets "
                                         rf"\[0, 48\] past the end of the file"):
        SafetensorsFile(path)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x10\x00\x00")
    with pytest.raises(ValueError, match=r"short\.safetensors: file is 3 bytes"):
        SafetensorsFile(short)


@pytest.mark.parametrize("header_size, match", [
    (10**6, "runs past the end of the file"),
    (2**64 - 1, "exceeds the"),
    (200 * 2**20, "exceeds the"),
])
def test_header_length(tmp_path, header_size, match):
    header, nbytes = valid_header()
    path = write_raw(tmp_path / "model.safetensors", header, bytes(nbytes), header_size)
    with pytest.raises(ValueError, match=rf"model\.safetensors: header length \d+ {match}"):
        SafetensorsFile(path)


@pytest.mark.parametrize("raw", [b"not json", b"\xff\xfe{}", b"[1, 2]", b'{"a": 1, "a": 2}',
                                 b"[" * 100000])
def test_header_not_a_json_object(tmp_path, raw):
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(ValueError, match=r"model\.safetensors: (header|duplicate)"):
        SafetensorsFile(path)


@pytest.mark.parametrize("entry, match", [
    ({"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 4000]}, "past the end of the file"),
    ({"dtype": "F32", "shape": [3, 5], "data_offsets": [0, 48]}, "spanning 48 bytes.*needs 60"),
    ({"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 48]}, "spanning 48 bytes.*needs 32"),
    ({"dtype": "Q4_K", "shape": [3, 4], "data_offsets": [0, 48]}, "unknown dtype 'Q4_K'"),
    ({"dtype": "F32", "shape": [3, 4], "data_offsets": [-8, 40]}, "invalid data_offsets"),
    ({"dtype": "F32", "shape": [3, 4], "data_offsets": [48, 0]}, "invalid data_offsets"),
    ({"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 2**64 + 48]}, "past the end"),
    ({"dtype": "F32", "shape": [3, 4], "data_offsets": [0.0, 48]}, "invalid data_offsets"),
    ({"dtype": "F32", "shape": [-3, -4], "data_offsets": [0, 48]}, "invalid shape"),
    ({"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 48]}, "needs"),
    ({"dtype": ["F32"], "shape": [3, 4], "data_offsets": [0, 48]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [3, 4]}, "must be an object"),
    ([1, 2], "must be an object"),
])
def test_bad_tensor_entry(tmp_path, entry, match):
    path = write_raw(tmp_path / "model.safetensors", {UP: entry}, bytes(48))
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{UP}'.*{match}"):
        SafetensorsFile(path)


def test_overlapping_offsets(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    path = write_raw(tmp_path / "model.safetensors", header, bytes(24))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'b'.*overlap tensor 'a'"):
        SafetensorsFile(path)


def test_folder_checkpoint(tmp_path, tensors):
    with pytest.raises(ValueError, match=rf"{tmp_path}.*expected config\.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=rf"{tmp_path}: no weights found: expected "
                                         r"model\.safetensors"):
        load_checkpoint(tmp_path)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.format == "safetensors" and checkpoint.path == os.fspath(tmp_path)
    assert checkpoint.config["architectures"] == ["LlamaForCausalLM"]
    assert require(checkpoint.weights, UP, (8, 3), "f").dtype == ml_dtypes.bfloat16
    with pytest.raises(ValueError, match=rf"f: tensor '{UP}' has shape \(8, 3\), but "
                                         r"config\.json implies \(3, 8\)"):
        require(checkpoint.weights, UP, (3, 8), "f")
    with pytest.raises(ValueError, match=r"f: tensor 'lm_head\.weight' is missing \(expected "
                                         r"shape \(17, 8\)"):
        require(checkpoint.weights, "lm_head.weight", (17, 8), "f")


def resident_pages(view: np.ndarray) -> int:
    """Resident pages of this process's mapping under a (page-sized or larger) view."""
    start = view.__array_interface__["data"][0]
    begin = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (start + view.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    count = 0
    with open("/proc/self/pagemap", "rb") as f:
        for page in range(begin // mmap.PAGESIZE, end // mmap.PAGESIZE):
            f.seek(page * 8)
            count += int.from_bytes(f.read(8), "little") >> 63  # bit 63: present
    return count


@pytest.mark.parametrize("sharded", [False, True])
def test_release_drops_the_mapped_pages_and_keeps_the_data(tmp_path, rng, sharded):
    """After a copy, release() unmaps the tensor's pages; a later read still sees the data."""
    big = rng.standard_normal((256, 1024)).astype(np.float32)  # 1 MiB: whole pages
    small = rng.standard_normal((3, 5)).astype(np.float32)
    save_file({"big": big, "small": small}, str(tmp_path / "a.safetensors"))
    if sharded:
        save_file({"other": small}, str(tmp_path / "b.safetensors"))
        with open(tmp_path / "model.safetensors.index.json", "w") as f:
            json.dump({"weight_map": {"big": "a.safetensors", "small": "a.safetensors",
                                      "other": "b.safetensors"}}, f)
        weights = ShardedSafetensors(tmp_path / "model.safetensors.index.json")
    else:
        weights = SafetensorsFile(tmp_path / "a.safetensors")
    view = weights["big"]
    copy = np.array(view)  # touches every page
    assert resident_pages(view) > 200
    weights.release("big")
    assert resident_pages(view) == 0
    np.testing.assert_array_equal(weights["big"], big)  # read back from the page cache
    np.testing.assert_array_equal(copy, big)
    np.testing.assert_array_equal(weights["small"], small)
