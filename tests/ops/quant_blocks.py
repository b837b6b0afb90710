"""Random GGUF weight blocks for the quantised-kernel tests, and memory with a guard page."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

from engine.ops.quantized import FORMATS
from engine.ops import reference

# Byte offsets of each format's f16 fields and a typical size for them.
HALF_FIELDS = {"q8_0": [(0, 0.01)], "q4_0": [(0, 0.01)], "q4_1": [(0, 0.01), (2, 0.05)],
               "q4_k": [(0, 0.002), (2, 0.002)], "q6_k": [(208, 0.001)]}
# The f16 fields that hold a min (zeroing them leaves the scale part, and vice versa).
MIN_FIELDS = {"q4_1": (2, 0), "q4_k": (2, 0)}  # (min offset, scale offset)


def random_blocks(rng, fmt: str, rows: int, in_features: int) -> np.ndarray:
    """[rows, row_bytes] uint8: random codes (every byte value, q8_0's -128 included) and
    finite f16 scales."""
    block_values, block_bytes, _ = FORMATS[fmt]
    num_blocks = in_features // block_values
    raw = rng.integers(0, 256, (rows, num_blocks, block_bytes), dtype=np.uint8)
    for offset, size in HALF_FIELDS[fmt]:
        half = (rng.standard_normal((rows, num_blocks)) * size).astype(np.float16)
        raw[:, :, offset:offset + 2] = half.view(np.uint8).reshape(rows, num_blocks, 2)
    return raw.reshape(rows, num_blocks * block_bytes)


def magnitude(w: np.ndarray, fmt: str) -> np.ndarray:
    """|scale * q| + |min| per weight value: what float32 rounding in a kernel is relative to
    (d * q + m can cancel to 0 while the kernel still sums both parts)."""
    if fmt not in MIN_FIELDS:
        return np.abs(reference.dequantize_blocks(w, fmt))
    block_bytes = FORMATS[fmt][1]
    blocks = w.reshape(w.shape[0], -1, block_bytes)
    parts = []
    for zeroed in MIN_FIELDS[fmt]:
        b = blocks.copy()
        b[:, :, zeroed:zeroed + 2] = 0
        parts.append(np.abs(reference.dequantize_blocks(b.reshape(w.shape), fmt)))
    return parts[0] + parts[1]


class GuardedBuffer:
    """Bytes that end exactly where an inaccessible page begins: a read past them faults."""

    PAGE = mmap.PAGESIZE

    def __init__(self, num_bytes: int):
        data_pages = -(-num_bytes // self.PAGE)
        self.map = mmap.mmap(-1, (data_pages + 1) * self.PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(base + data_pages * self.PAGE, self.PAGE, 0) != 0:  # PROT_NONE
            raise OSError(ctypes.get_errno(), "mprotect failed")
        whole = np.frombuffer(self.map, np.uint8)
        self.array = whole[data_pages * self.PAGE - num_bytes:data_pages * self.PAGE]

    def holding(self, values: np.ndarray) -> np.ndarray:
        """values copied to the end of the buffer, as an array of the same dtype and shape."""
        view = self.array.view(values.dtype).reshape(values.shape)
        view[...] = values
        return view
