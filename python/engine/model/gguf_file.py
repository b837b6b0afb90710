"""GGUF files: one validated parser for the metadata, the tensor infos and the tensor bytes.

`gguf.GGUFReader` trusts the lengths and counts it reads (a truncated or lying file makes it
raise assorted exceptions, loop over a count it never checks, or build views that do not
reach the bytes they claim), and it parses every field one element at a time: seconds for a
49k-token vocabulary. `read_gguf` parses the header itself with `struct` and numpy, checking
every length, count, offset and size against the file size before using it.

Layout (all little-endian):
    magic "GGUF", version u32 (2 or 3), tensor_count u64, kv_count u64
    kv_count  x  key: string, value_type u32, value
    tensor_count  x  name: string, n_dims u32, dims u64[n_dims] (innermost first),
                     ggml_type u32, offset u64 (relative to the data section)
    padding to general.alignment (default 32), then the data section
string = length u64 + UTF-8 bytes; array = item_type u32 + count u64 + items.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8
DEFAULT_ALIGNMENT = 32
# GGUFValueType -> (struct format, numpy dtype) of the fixed-size types.
_SCALARS = {0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"),
            4: ("<I", "<u4"), 5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "?"),
            10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8")}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
VOCAB_KEYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                        "tokenizer.ggml.token_type", "tokenizer.ggml.merges"})


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file.

    Attributes:
        name: the GGUF tensor name (`blk.0.attn_q.weight`).
        shape: row-major, i.e. the GGUF dims reversed: (out_features, in_features).
        ggml_type: the storage type.
        offset: the absolute byte offset of the data in the file.
        nbytes: the size of the stored (possibly quantised) data.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int
    nbytes: int


@dataclasses.dataclass(eq=False)  # no element-wise comparison of the memory map
class GGUFFile:
    """A parsed and validated GGUF file; tensor bytes stay in a read-only memory map."""

    path: str
    metadata: dict[str, object]           # key -> int | float | bool | str | list
    tensors: dict[str, TensorInfo]        # GGUF name -> info, in file order
    data: np.memmap = dataclasses.field(repr=False)  # [file_size] uint8, read-only

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor: a zero-copy read-only uint8 view of the file.

        Args:
            name: the GGUF tensor name.

        Returns:
            [nbytes] uint8.
        """
        info = self.tensors[name]
        return np.asarray(self.data[info.offset:info.offset + info.nbytes])


class _Cursor:
    """Bounds-checked sequential reads over the file's bytes."""

    def __init__(self, buf: mmap.mmap | bytes, name: str):
        self.buf, self.name, self.pos, self.size = buf, name, 0, len(buf)

    def need(self, num_bytes: int, what: str) -> None:
        if num_bytes > self.size - self.pos:
            raise ValueError(f"{self.name}: truncated: {what} at byte {self.pos} needs "
                             f"{num_bytes} bytes, past the end of the file "
                             f"({self.size - self.pos} bytes left)")

    def scalar(self, fmt: str, what: str) -> int | float | bool:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        length = self.scalar("<Q", what)
        self.need(length, what)
        raw = self.buf[self.pos:self.pos + length]  # a copy: no view outlives the mmap
        self.pos += length
        return self._decode(raw, what)

    def _decode(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.name}: {what} is not valid UTF-8: {e}") from e

    def value(self, value_type: int, what: str, depth: int = 0):
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type][0], what)
        if value_type == _STRING:
            return self.string(what)
        if value_type != _ARRAY or depth >= MAX_NESTING:
            raise ValueError(f"{self.name}: {what} has unknown value type {value_type}")
        item_type = self.scalar("<I", what)
        count = self.scalar("<Q", what)
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type][1])
            self.need(count * dtype.itemsize, f"{what} ({count} items)")
            items = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
            self.pos += count * dtype.itemsize
            return items
        # Strings take at least 8 bytes each, arrays 12: a lying count fails here, not in a loop.
        self.need(count * (8 if item_type == _STRING else 12), f"{what} ({count} items)")
        if item_type == _STRING:
            return self._strings(count, what)
        return [self.value(item_type, f"{what}[{idx}]", depth + 1) for idx in range(count)]

    def _strings(self, count: int, what: str) -> list[str]:
        """`count` strings, inlined: the vocabulary's tens of thousands of tokens."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out = []
        for idx in range(count):
            if size - pos < 8:
                break
            (length,) = unpack(buf, pos)
            if length > size - pos - 8:
                break
            raw = buf[pos + 8:pos + 8 + length]
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                self._decode(raw, f"{what}[{idx}]")
            pos += 8 + length
        self.pos = pos
        if len(out) != count:  # re-read the failing item for the truncation message
            self.string(f"{what}[{len(out)}]")
        return out


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse a GGUF file, checking its whole layout against the file size.

    Args:
        path: the .gguf file.

    Returns:
        The metadata as plain Python values, the tensor infos, and the file memory-mapped.

    Raises:
        ValueError: the file is missing, truncated or malformed; the message names the file
            and, where one is involved, the tensor.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ValueError(f"{name}: file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                meta, tensors = _parse(buf, name)
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise ValueError(f"{path}: cannot read GGUF file: {e}") from e
    return GGUFFile(path, meta, tensors, data)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, object]:
    """The metadata of a GGUF file (see `read_gguf`): key -> int | float | bool | str | list."""
    return read_gguf(path).metadata


def _parse(buf: mmap.mmap | bytes, name: str) -> tuple[dict, dict[str, TensorInfo]]:
    cur = _Cursor(buf, name)
    cur.need(24, "header")
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{name}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in (2, 3):
        raise ValueError(f"{name}: unsupported GGUF version {version} (expected 2 or 3, "
                         f"little-endian)")
    tensor_count = cur.scalar("<Q", "tensor count")
    kv_count = cur.scalar("<Q", "metadata count")
    # Each key/value takes at least 13 bytes, each tensor info at least 24.
    cur.need(kv_count * 13 + tensor_count * 24, f"{kv_count} metadata entries and "
                                                f"{tensor_count} tensor infos")
    meta = {}
    for idx in range(kv_count):
        key = cur.string(f"metadata key #{idx}")
        if key in meta:
            raise ValueError(f"{name}: duplicate metadata key {key!r}")
        meta[key] = cur.value(cur.scalar("<I", f"type of {key!r}"), f"metadata {key!r}")
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{name}: general.alignment {alignment!r} is not a power of two")
    infos = [_read_tensor_info(cur, idx) for idx in range(tensor_count)]
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for tensor_name, shape, ggml_type, offset, num_bytes in infos:
        if tensor_name in tensors:
            raise ValueError(f"{name}: duplicate tensor {tensor_name!r}")
        if offset % alignment:
            raise ValueError(f"{name}: tensor {tensor_name!r} offset {offset} is not a multiple "
                             f"of the alignment {alignment}")
        start = data_start + offset
        if start + num_bytes > len(buf):
            raise ValueError(f"{name}: tensor {tensor_name!r} data [{start}, "
                             f"{start + num_bytes}) lies past the end of the file "
                             f"({len(buf)} bytes)")
        tensors[tensor_name] = TensorInfo(tensor_name, shape, ggml_type, start, num_bytes)
    return meta, tensors


def _read_tensor_info(cur: _Cursor, idx: int) -> tuple:
    """(name, row-major shape, ggml type, offset in the data section, nbytes)."""
    tensor_name = cur.string(f"name of tensor #{idx}")
    where = f"tensor {tensor_name!r}"
    num_dims = cur.scalar("<I", where)
    if not 1 <= num_dims <= MAX_DIMS:
        raise ValueError(f"{cur.name}: {where} has {num_dims} dimensions (expected 1..{MAX_DIMS})")
    dims = [cur.scalar("<Q", where) for _ in range(num_dims)]
    raw_type = cur.scalar("<I", where)
    offset = cur.scalar("<Q", where)
    try:
        ggml_type = GGMLQuantizationType(raw_type)
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise ValueError(f"{cur.name}: {where} has unknown tensor type {raw_type}") from None
    if dims[0] % block_size:
        raise ValueError(f"{cur.name}: {where} row length {dims[0]} is not a multiple of the "
                         f"{ggml_type.name} block size {block_size}")
    num_bytes = math.prod(dims) // block_size * type_size
    return tensor_name, tuple(reversed(dims)), ggml_type, offset, num_bytes


def metadata(gguf_file: GGUFFile, include_vocab: bool = True) -> dict[str, object]:
    """All metadata key/values as plain Python values (str, int, float, bool, lists).

    Args:
        gguf_file: a parsed GGUF.
        include_vocab: False leaves out the large tokenizer arrays (tokens, scores, types,
            merges).
    """
    if include_vocab:
        return dict(gguf_file.metadata)
    return {k: v for k, v in gguf_file.metadata.items() if k not in VOCAB_KEYS}
