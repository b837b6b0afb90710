"""Reader for the safetensors format: memory-mapped, zero-copy, validated before any data is read.

Layout of a file:
    [8 bytes]  header_size, unsigned little-endian
    [header_size bytes]  UTF-8 JSON object:
        {"__metadata__": {str: str},                       (optional)
         name: {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [begin, end]}, ...}
    [rest]  the data section; offsets are relative to its start

Every tensor is returned as a read-only numpy view of the memory map: nothing is copied, and
a bf16 tensor stays `ml_dtypes.bfloat16`. Every number in the header is checked against the
file size before a view is made, so a malformed file raises ValueError instead of reading out
of bounds.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

HEADER_SIZE_LIMIT = 100 * 1024 * 1024  # the reference implementation's limit
SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"

# Little-endian always: the format is defined little-endian whatever the host.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def _is_count(value: object) -> bool:
    """A non-negative int that is not a bool (JSON true would pass isinstance(int))."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFile(Mapping[str, np.ndarray]):
    """One .safetensors file as a read-only mapping `name -> numpy view`.

    Args:
        path: the file.

    Raises:
        ValueError: the file is malformed; the message names the file and the tensor.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        try:
            self.file_size = os.path.getsize(self.path)
        except OSError as e:
            raise ValueError(f"{self.path}: cannot open safetensors file: {e}") from e
        header = self._read_header()
        self.metadata: dict[str, str] = self._check_metadata(header.pop("__metadata__", {}))
        self._specs: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {
            name: self._check_entry(name, entry) for name, entry in header.items()
        }
        self._check_no_overlap()
        # Mapping an empty range is an error for mmap; a file of only a header has no data.
        # Plain ndarray views (not np.memmap subclasses); each view keeps the map alive.
        self._map, self._skew = None, 0
        if self.file_size > self.data_start:
            mapped = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start)
            self._data = mapped.view(np.ndarray)
            # np.memmap maps from the allocation boundary below data_start
            self._map = getattr(mapped, "_mmap", None)
            self._skew = self.data_start % mmap.ALLOCATIONGRANULARITY
        else:
            self._data = np.zeros(0, np.uint8)

    # -- header -------------------------------------------------------------------------------

    def _read_header(self) -> dict:
        if self.file_size < 8:
            raise ValueError(f"{self.name}: file is {self.file_size} bytes, too short for the "
                             f"8-byte header length")
        with open(self.path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if header_size > HEADER_SIZE_LIMIT:
                raise ValueError(f"{self.name}: header length {header_size} exceeds the "
                                 f"{HEADER_SIZE_LIMIT}-byte limit")
            if 8 + header_size > self.file_size:
                raise ValueError(f"{self.name}: header length {header_size} runs past the end "
                                 f"of the file ({self.file_size} bytes)")
            raw = f.read(header_size)
        self.data_start = 8 + header_size
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ValueError(f"{self.name}: header is not valid UTF-8 JSON: {e}") from e
        if not isinstance(header, dict):
            raise ValueError(f"{self.name}: header must be a JSON object, "
                             f"got {type(header).__name__}")
        return header

    def _check_metadata(self, metadata: object) -> dict[str, str]:
        if not isinstance(metadata, dict) or not all(
                isinstance(v, str) for v in metadata.values()):
            raise ValueError(f"{self.name}: __metadata__ must be an object of strings")
        return metadata

    def _check_entry(self, name: str, entry: object) -> tuple[np.dtype, tuple[int, ...], int, int]:
        where = f"{self.name}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ValueError(f"{where} must be an object with dtype, shape and data_offsets, "
                             f"got {entry!r}"[:500])
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise ValueError(f"{where} has unknown dtype {dtype_name!r} "
                             f"(known: {', '.join(DTYPES)})")
        dtype = DTYPES[dtype_name]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ValueError(f"{where} has invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]):
            raise ValueError(f"{where} has invalid data_offsets {offsets!r}: expected "
                             f"[begin, end] with 0 <= begin <= end")
        begin, end = offsets
        data_size = self.file_size - self.data_start
        if end > data_size:
            raise ValueError(f"{where} has data_offsets {offsets} past the end of the file "
                             f"({self.file_size} bytes, data section {data_size} bytes)")
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise ValueError(f"{where} has data_offsets {offsets} spanning {end - begin} bytes, "
                             f"but {dtype_name} {shape} needs {expected}")
        return dtype, tuple(shape), begin, end

    def _check_no_overlap(self) -> None:
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in self._specs.items()
                       if end > begin)
        for (_, prev_end, prev_name), (begin, end, name) in zip(spans, spans[1:]):
            if begin < prev_end:
                raise ValueError(f"{self.name}: tensor {name!r} data_offsets [{begin}, {end}] "
                                 f"overlap tensor {prev_name!r} (ends at {prev_end})")

    # -- mapping ------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._specs[name]
        view = self._data[begin:end].view(dtype).reshape(shape)
        view.flags.writeable = False
        return view

    def release(self, name: str) -> None:
        """Drop this process's mapped pages of a tensor it has copied (they stay in the page
        cache; a later access reads them back): the copy alone then counts in its memory."""
        _, _, begin, end = self._specs[name]
        start = -(-(self._skew + begin) // mmap.PAGESIZE) * mmap.PAGESIZE
        stop = (self._skew + end) // mmap.PAGESIZE * mmap.PAGESIZE
        if self._map is not None and stop > start and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of a tensor, without making a view."""
        return self._specs[name][1]

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self)} tensors)"


class ShardedSafetensors(Mapping[str, np.ndarray]):
    """A checkpoint split over shards named by model.safetensors.index.json.

    Args:
        index_path: the index file; shards are looked up beside it.

    Raises:
        ValueError: the index is malformed, a shard is missing, or a shard lacks a tensor the
            index assigns to it.
    """

    def __init__(self, index_path: str | os.PathLike[str]):
        self.path = os.fspath(index_path)
        folder = os.path.dirname(self.path)
        index_name = os.path.basename(self.path)
        weight_map = self._read_weight_map(index_name)
        self.shards: dict[str, SafetensorsFile] = {}
        for shard_name in sorted(set(weight_map.values())):
            shard_path = os.path.join(folder, shard_name)
            if not os.path.isfile(shard_path):
                first = next(t for t, s in weight_map.items() if s == shard_name)
                raise ValueError(f"{index_name}: shard {shard_name!r} (holding tensor {first!r})"
                                 f" is missing from {folder or '.'}")
            self.shards[shard_name] = SafetensorsFile(shard_path)
        for tensor_name, shard_name in weight_map.items():
            if tensor_name not in self.shards[shard_name]:
                raise ValueError(f"{index_name}: tensor {tensor_name!r} is mapped to shard "
                                 f"{shard_name!r}, but that shard does not contain it")
        self._weight_map = weight_map

    def _read_weight_map(self, index_name: str) -> dict[str, str]:
        try:
            with open(self.path, encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{index_name}: cannot read the index: {e}") from e
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_name}: expected an object with a 'weight_map' object")
        for tensor_name, shard_name in weight_map.items():
            # A shard must be a plain file name beside the index: no paths, no escaping the folder.
            if (not isinstance(shard_name, str) or not shard_name
                    or os.path.basename(shard_name) != shard_name or shard_name in (".", "..")):
                raise ValueError(f"{index_name}: tensor {tensor_name!r} maps to invalid shard "
                                 f"name {shard_name!r}")
        return weight_map

    def __getitem__(self, name: str) -> np.ndarray:
        return self.shards[self._weight_map[name]][name]

    def release(self, name: str) -> None:
        self.shards[self._weight_map[name]].release(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def __len__(self) -> int:
        return len(self._weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    def file_of(self, name: str) -> str:
        """The shard file name holding a tensor (for error messages)."""
        return self._weight_map[name]


def open_safetensors_folder(folder: str | os.PathLike[str]) -> Mapping[str, np.ndarray]:
    """The weights of a Hugging Face folder: model.safetensors, or the shards of its index.

    Args:
        folder: the model folder.

    Returns:
        A read-only mapping `name -> numpy view` over memory-mapped files.

    Raises:
        ValueError: neither file exists, or a file is malformed.
    """
    folder = os.fspath(folder)
    index_path = os.path.join(folder, INDEX_FILE_NAME)
    if os.path.isfile(index_path):
        return ShardedSafetensors(index_path)
    single_path = os.path.join(folder, SINGLE_FILE_NAME)
    if os.path.isfile(single_path):
        return SafetensorsFile(single_path)
    raise ValueError(f"{folder}: no weights found: expected {SINGLE_FILE_NAME} or "
                     f"{INDEX_FILE_NAME} with its shards")
