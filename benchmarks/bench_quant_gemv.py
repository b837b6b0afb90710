"""One-token quantised matmul (decode's GEMV) from cache: the kernel's own rate, per format.

    python benchmarks/bench_quant_gemv.py [--rows 2048] [--cols 2048] [--formats q4_0,q4_k,...]

Random GGUF blocks small enough to stay in cache (2048 x 2048 Q4_0 is 2.4 MB), the same x
each call; prints weight bytes read per second, the median of 7 timings. Memory is not in the
figure: where it is below the machine's read rate (about 30 GB/s on 2 cores here), the kernel's
instructions, not memory, bound decode of that format. Threads: OMP_NUM_THREADS (one thread
gives the steadiest figures on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "ops"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048, help="a multiple of 256")
    parser.add_argument("--formats", default="q8_0,q4_0,q4_1,q4_k,q6_k")
    args = parser.parse_args()
    from quant_blocks import random_blocks

    from engine import ops
    from engine.ops.quantized import QuantizedWeight

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, args.cols)).astype(np.float32)
    out = np.empty((1, args.rows), np.float32)
    print(f"quantised kernels {ops.quant_kernel()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, {args.rows} x {args.cols}")
    for fmt in args.formats.split(","):
        w = QuantizedWeight(random_blocks(rng, fmt, args.rows, args.cols), fmt, args.cols)
        if ops.quant_kernel() == "avx512_vnni" and fmt in ("q8_0", "q4_0", "q4_1"):
            w = w.interleaved()  # as the loader stores them for this kernel
        reps = max(3, int(2e8 // w.nbytes))
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(reps):
                ops.matmul(x, w, out=out)
            times.append((time.perf_counter() - t0) / reps)
        seconds = statistics.median(times)
        print(f"{fmt:6s} {w.nbytes / 1e6:7.2f} MB  {seconds * 1e6:8.1f} us  "
              f"{w.nbytes / seconds / 1e9:6.1f} GB/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
