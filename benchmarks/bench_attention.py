"""paged_attention timings on SmolLM2-135M's attention shape (9 query / 3 KV heads, head_dim 64).

Prints one table per instruction set: decode of 1 sequence over 4096 cached tokens,
decode of 16 sequences over 1024 each, and a 512-token fresh prefill, with the
effective KV bandwidth of the decodes and a ratio against the numpy reference.
Run: PYTHONPATH=python python benchmarks/bench_attention.py
"""

import os
import platform
import time

import numpy as np

from engine import ops
from engine.ops import reference

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16


def batch(seqs, rng):
    used = [-(-seq_len // BLOCK_SIZE) for seq_len, _ in seqs]
    num_blocks = sum(used)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = rng.standard_normal(shape, np.float32)
    v_cache = rng.standard_normal(shape, np.float32)
    ids = rng.permutation(num_blocks).astype(np.int32)
    tables = np.full((len(seqs), max(used)), -1, np.int32)
    pos = 0
    for s, n in enumerate(used):
        tables[s, :n] = ids[pos:pos + n]
        pos += n
    seq_lens = np.array([n for n, _ in seqs], np.int32)
    qsl = np.concatenate([[0], np.cumsum([m for _, m in seqs])]).astype(np.int32)
    q = rng.standard_normal((int(qsl[-1]), NUM_Q_HEADS, HEAD_DIM), np.float32)
    out = np.empty_like(q)
    return q, k_cache, v_cache, tables, seq_lens, qsl, HEAD_DIM ** -0.5, out


def best_of(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    rng = np.random.default_rng(0)
    cases = {
        "decode 1 seq x 4096 ctx": [(4096, 1)],
        "decode 16 seqs x 1024 ctx": [(1024, 1)] * 16,
        "prefill 512 tokens": [(512, 512)],
    }
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, numpy {np.__version__}")
    for name, seqs in cases.items():
        args = batch(seqs, rng)
        q, k_cache, v_cache, tables, seq_lens, qsl, scale, out = args
        kv_bytes = 2 * 4 * int(seq_lens.sum()) * NUM_KV_HEADS * HEAD_DIM
        ref_out = np.empty(out.shape, np.float64)
        t_ref = best_of(lambda: reference.paged_attention(*args[:-1], out=ref_out), 2)
        for isa in ops.available_isas():
            ops.set_isa(isa)
            t = best_of(lambda: ops.paged_attention(*args[:-1], out=out), 20)
            err = float(np.max(np.abs(out - ref_out)))
            print(f"{name:28s} {isa:9s} {t * 1e3:8.3f} ms  {kv_bytes / t / 1e9:6.2f} GB/s KV  "
                  f"x{t_ref / t:7.1f} vs numpy reference ({t_ref * 1e3:.1f} ms)  max|err| {err:.1e}")
    ops.set_isa(ops.best_isa())


if __name__ == "__main__":
    main()
