"""Weights kept in GGUF block formats, the bits llama.cpp reads.

A `QuantizedWeight` is a [out_features, row_bytes] uint8 array of blocks laid along
in_features, plus the format's name; `ops.matmul` and `ops.embedding` run it natively
(`_C.quant_matmul`, `_C.quant_embedding`). A `RowStack` stacks weights of different
formats by rows (a fused QKV whose V is Q6_K while Q and K are Q4_K), run part by part.

`interleaved()` lays the 32-value formats (q8_0, q4_0, q4_1) out in 4-row tiles (interleave
4) for the one-token AVX-512 kernel: each group of 4 rows, quad of 4 blocks at a time, with the
16 (block, row) pairs side by side in vector lanes, so that each lane's dot product is one
block's and needs no reduction (see csrc/kernels/quant_kernels.h). The same bits, the same
results; every kernel reads both layouts.
"""

from __future__ import annotations

import numpy as np

# name -> (values per block, bytes per block, GGML type id)
FORMATS = {
    "q8_0": (32, 34, 8),
    "q4_0": (32, 18, 2),
    "q4_1": (32, 20, 3),
    "q4_k": (256, 144, 12),
    "q6_k": (256, 210, 14),
}
# What engine can quantise a float weight to at load time (gguf's numpy quantisers).
QUANTIZABLE = ("q8_0", "q4_0", "q4_1")


def format_of_ggml_type(ggml_type: int) -> str | None:
    """"q4_k" for GGML type 12, None for a type the kernels do not run."""
    for name, (_, _, type_id) in FORMATS.items():
        if type_id == int(ggml_type):
            return name
    return None


def row_bytes(format: str, in_features: int) -> int:
    """Bytes of one row of in_features values; ValueError if they do not fill whole blocks."""
    if format not in FORMATS:
        raise ValueError(f"unknown quantisation format {format!r}; expected one of "
                         f"{', '.join(FORMATS)}")
    block_values, block_bytes, _ = FORMATS[format]
    if in_features <= 0 or in_features % block_values:
        raise ValueError(f"{format}: in_features must be a positive multiple of {block_values}, "
                         f"got {in_features}")
    return in_features // block_values * block_bytes


def _regroup(data: np.ndarray, format: str, to_tiles: bool) -> np.ndarray:
    """A copy of [n, row_bytes] q8_0 / q4_0 / q4_1 rows laid out in 4-row tiles, or (to_tiles
    False) tiles put back as rows (`_C.quant_tiles`; the layout is in its source file)."""
    from engine import _C

    out = np.empty_like(data)
    _C.quant_tiles(np.ascontiguousarray(data), format, to_tiles, out)
    return out


class QuantizedWeight:
    """A [out_features, in_features] weight stored as GGUF blocks.

    Args:
        data: [out_features, row_bytes] uint8, C-contiguous (a view of a memory-mapped file
            is fine).
        format: "q8_0", "q4_0", "q4_1", "q4_k" or "q6_k".
        in_features: values per row.
        interleave: 1, rows one after another (GGUF's layout); or 4 (q8_0, q4_0 and q4_1):
            4-row tiles, as `interleaved()` makes them.
    """

    __slots__ = ("data", "format", "in_features", "interleave")

    def __init__(self, data: np.ndarray, format: str, in_features: int, interleave: int = 1):
        expected = row_bytes(format, in_features)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == expected and data.flags.c_contiguous):
            got = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray)
                   else type(data).__name__)
            raise ValueError(f"QuantizedWeight: data must be C-contiguous uint8 [rows, {expected}] "
                             f"({in_features} values of {format}), got {got}")
        if interleave not in (1, 4) or (interleave == 4 and FORMATS[format][0] != 32):
            raise ValueError(f"QuantizedWeight: interleave must be 1, or 4 for q8_0, q4_0 or "
                             f"q4_1; got {interleave!r} for {format}")
        self.data, self.format, self.in_features = data, format, int(in_features)
        self.interleave = int(interleave)

    @property
    def shape(self) -> tuple[int, int]:
        """The logical (out_features, in_features)."""
        return (self.data.shape[0], self.in_features)

    @property
    def dtype(self) -> np.dtype:
        """The storage dtype (uint8 blocks)."""
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def __repr__(self) -> str:
        layout = f", interleave={self.interleave}" if self.interleave != 1 else ""
        return f"QuantizedWeight({self.format}, shape={self.shape}{layout})"

    def interleaved(self) -> "QuantizedWeight":
        """A copy in 4-row tiles for q8_0, q4_0 and q4_1 (decode's dot products then need no
        shuffling); other formats, or one already tiled, as a plain copy."""
        if self.interleave == 4 or FORMATS[self.format][0] != 32:
            return QuantizedWeight(np.array(self.data), self.format, self.in_features,
                                   self.interleave)
        return QuantizedWeight(_regroup(self.data, self.format, True), self.format,
                               self.in_features, 4)

    def rows(self) -> np.ndarray:
        """The blocks as GGUF lays them out, [out_features, row_bytes] (self.data, or a copy
        when tiled)."""
        if self.interleave == 1:
            return self.data
        return _regroup(self.data, self.format, False)

    def dequantize(self) -> np.ndarray:
        """float32 [out_features, in_features], with gguf's numpy dequantisers."""
        from gguf.quants import dequantize

        type_id = FORMATS[self.format][2]
        return np.asarray(dequantize(self.rows(), type_id), np.float32).reshape(self.shape)

    @classmethod
    def quantize(cls, w: np.ndarray, format: str) -> "QuantizedWeight":
        """Quantise a float [rows, in_features] weight as llama.cpp's converter does.

        Args:
            w: float32, float16 or bfloat16.
            format: one of QUANTIZABLE.
        """
        from gguf.quants import quantize

        if format not in QUANTIZABLE:
            raise ValueError(f"engine can quantise to {', '.join(QUANTIZABLE)}, not {format!r}")
        if w.ndim != 2:
            raise ValueError(f"quantize: expected a 2-D weight, got shape {w.shape}")
        row_bytes(format, w.shape[1])
        rows = []
        for start in range(0, w.shape[0], 1024):  # bounded float32 temporaries
            part = np.asarray(w[start:start + 1024], dtype=np.float32)
            rows.append(quantize(part, FORMATS[format][2]))
        return cls(np.ascontiguousarray(np.concatenate(rows)), format, w.shape[1])

    def take_rows(self, order: np.ndarray) -> "QuantizedWeight":
        """The rows in the given order (a copy): whole rows, so blocks stay intact."""
        return QuantizedWeight(np.ascontiguousarray(self.rows()[order]), self.format,
                               self.in_features)


class RowStack:
    """Weights stacked by rows without a common format; matmul runs each into its columns."""

    def __init__(self, parts: list):
        in_features = {p.shape[1] for p in parts}
        if len(in_features) != 1:
            raise ValueError(f"RowStack: parts have different in_features {sorted(in_features)}")
        self.parts = list(parts)
        self.bounds = np.cumsum([0] + [p.shape[0] for p in parts]).tolist()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.bounds[-1], self.parts[0].shape[1])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.parts[0].dtype)


def private_copy(w):
    """A copy of one weight (an array or a QuantizedWeight) in this process's memory, not
    the file's pages."""
    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(np.array(w.data), w.format, w.in_features, w.interleave)
    return np.array(w)


def stack_rows(parts: list):
    """Row-concatenate weights: one array, one QuantizedWeight (same format), or a RowStack.

    Args:
        parts: numpy arrays and/or QuantizedWeights with the same in_features.
    """
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    formats = {p.format if isinstance(p, QuantizedWeight) else None for p in parts}
    if len(formats) == 1 and None not in formats:
        return QuantizedWeight(np.concatenate([p.rows() for p in parts]), parts[0].format,
                               parts[0].in_features)
    return RowStack(parts)
