"""Float weights laid out for the CPU's decode kernel.

Decode (one token) reads every weight once and is bound by memory bandwidth. The matmul
kernel computes 8 rows at a time; on plain rows that is 8 streams a row apart, which the
hardware prefetcher follows less well than one. A `PackedWeight` stores each group of 8 rows
16 columns at a time, so the same tile reads one contiguous stream: row n, column k of the
[out_features, in_features] weight is data[n // 8, k // 16, n % 8, k % 16] (zero padded).
`ops.matmul` runs it with `_C.matmul_packed`, bit-identical to `_C.matmul` on the rows;
`ops.embedding` gathers its rows (a tied embedding table and LM head stay one copy).
"""

from __future__ import annotations

import numpy as np

ROWS, COLS = 8, 16  # rows per group, columns per step


class PackedWeight:
    """A float32/float16/bfloat16 [out_features, in_features] weight, packed (see above).

    Args:
        w: the weight as rows, 2-D; copied.
    """

    __slots__ = ("data", "out_features", "in_features")

    def __init__(self, w: np.ndarray):
        if not (isinstance(w, np.ndarray) and w.ndim == 2
                and w.dtype.name in ("float32", "float16", "bfloat16")):
            got = f"{w.dtype} {w.shape}" if isinstance(w, np.ndarray) else type(w).__name__
            raise ValueError(f"PackedWeight: w must be a 2-D float32, float16 or bfloat16 "
                             f"array, got {got}")
        n, k = w.shape
        groups, steps = -(-n // ROWS), -(-k // COLS)
        self.data = np.empty((groups, steps, ROWS, COLS), w.dtype)
        full = n // ROWS
        if k % COLS == 0:  # whole groups straight from the rows, one pass
            self.data[:full] = w[:full * ROWS].reshape(full, ROWS, steps, COLS).transpose(0, 2, 1, 3)
        else:
            full = 0
        if full < groups:  # the ragged end through a zero-padded copy
            rest = np.zeros(((groups - full) * ROWS, steps * COLS), w.dtype)
            rest[:n - full * ROWS, :k] = w[full * ROWS:]
            self.data[full:] = rest.reshape(groups - full, ROWS, steps, COLS).transpose(0, 2, 1, 3)
        self.out_features, self.in_features = n, k

    @property
    def shape(self) -> tuple[int, int]:
        """The logical (out_features, in_features)."""
        return (self.out_features, self.in_features)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows ids as [len(ids), in_features] of the stored dtype.

        Raises:
            ValueError: an id outside [0, out_features).
        """
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.out_features):
            raise ValueError(f"ids must be in [0, {self.out_features}), got "
                             f"{ids.min()}..{ids.max()}")
        steps = self.data.shape[1]
        rows = self.data[(ids // ROWS)[:, None], np.arange(steps)[None, :], (ids % ROWS)[:, None]]
        return rows.reshape(len(ids), steps * COLS)[:, :self.in_features]

    def unpack(self) -> np.ndarray:
        """The weight as rows, [out_features, in_features] (a copy)."""
        groups, steps = self.data.shape[:2]
        rows = self.data.transpose(0, 2, 1, 3).reshape(groups * ROWS, steps * COLS)
        return np.ascontiguousarray(rows[:self.out_features, :self.in_features])
