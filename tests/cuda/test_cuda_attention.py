"""CUDA paged_attention against ops.reference.paged_attention.

Both kernels: split-KV decode (num_tokens == num_seqs, head_dim 64/128; one split or
several and a merge) and tiled prefill (everything else: mixed batches, chunked prefill,
other head_dims). Caches are f32 or bf16 (the reference reads the same bf16 values);
scattered physical blocks, -1 table padding, NaN in every cache slot no sequence owns
(a read outside a sequence's tokens shows), NaN-poisoned outputs (every row is written).
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine import ops
from engine.ops import gpu_available, reference

pytestmark = pytest.mark.skipif(
    not gpu_available(), reason="no GPU: CUDA kernels run only on a machine with an NVIDIA GPU")

BF16 = ml_dtypes.bfloat16
CACHE_DTYPES = [np.float32, BF16]
# f32 math either way; bf16 cache values are exact after rounding, so the reference sees
# the same numbers. The slack covers exp2 with the scale folded in and summation order.
TOL = {np.dtype(np.float32): 3e-5, np.dtype(BF16): 1e-4}


# ---- batches -----------------------------------------------------------------------

def make_batch(rng, seqs, num_kv_heads, group, head_dim, block_size, cache_dtype=np.float32,
               extra_blocks=3, qk_scale=1.0, table_slack=1):
    """seqs: [(seq_len, num_new)]. Host arrays: q, k_cache, v_cache, block_tables, seq_lens,
    query_start_loc, scale. table_slack extra -1 columns widen the table (more splits)."""
    num_q_heads = num_kv_heads * group
    used = [-(-seq_len // block_size) for seq_len, _ in seqs]
    max_blocks = max(used, default=0) + table_slack
    num_blocks = sum(used) + extra_blocks
    ids = rng.permutation(num_blocks).astype(np.int32)  # scattered physical blocks
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = np.full(cache_shape, np.nan, np.float32)
    v_cache = np.full(cache_shape, np.nan, np.float32)
    block_tables = np.full((len(seqs), max_blocks), -1, np.int32)
    first = 0
    for s, (seq_len, _) in enumerate(seqs):
        block_tables[s, :used[s]] = ids[first:first + used[s]]
        first += used[s]
        pos = np.arange(seq_len)
        blocks, offsets = block_tables[s, pos // block_size], pos % block_size
        k_cache[blocks, offsets] = rng.standard_normal((seq_len, num_kv_heads, head_dim))
        v_cache[blocks, offsets] = rng.standard_normal((seq_len, num_kv_heads, head_dim))
    seq_lens = np.array([seq_len for seq_len, _ in seqs], np.int32)
    query_start_loc = np.concatenate([[0], np.cumsum([n for _, n in seqs])]).astype(np.int32)
    num_tokens = int(query_start_loc[-1])
    q = (rng.standard_normal((num_tokens, num_q_heads, head_dim)) * qk_scale).astype(np.float32)
    scale = float(head_dim) ** -0.5
    return (q, k_cache.astype(cache_dtype), v_cache.astype(cache_dtype), block_tables, seq_lens,
            query_start_loc, scale)


def expected(args):
    q, k_cache, v_cache, block_tables, seq_lens, qsl, scale = args
    want = np.zeros(q.shape, np.float64)
    reference.paged_attention(q, k_cache.astype(np.float32), v_cache.astype(np.float32),
                              block_tables, seq_lens, qsl, scale, out=want)
    return want


def device_q(rng, q, strided):
    """q on the GPU; strided: a view into a wider buffer (token and head strides not packed)."""
    if not strided:
        return ops.to_device(q)
    num_tokens, num_q_heads, head_dim = q.shape
    big = rng.standard_normal((num_tokens, num_q_heads + 2, head_dim + 3)).astype(np.float32)
    big[:, 1:num_q_heads + 1, 2:head_dim + 2] = q
    return ops.to_device(big)[:, 1:num_q_heads + 1, 2:head_dim + 2]


def run_gpu(args, q_strided=False, rng=None):
    q, k_cache, v_cache, block_tables, seq_lens, qsl, scale = args
    out = ops.to_device(np.full(q.shape, np.nan, np.float32))  # poison: every row is written
    ops.paged_attention(device_q(rng, q, q_strided), ops.to_device(k_cache),
                        ops.to_device(v_cache), ops.to_device(block_tables),
                        ops.to_device(seq_lens), ops.to_device(qsl), scale, out=out)
    return ops.to_host(out)


def check(args, q_strided=False, rng=None):
    got = run_gpu(args, q_strided, rng)
    tol = TOL[np.dtype(args[1].dtype)]
    np.testing.assert_allclose(got, expected(args), rtol=tol, atol=tol, equal_nan=False)


# ---- properties --------------------------------------------------------------------

# One sequence: its kind and its size.
sequence = st.one_of(
    st.integers(1, 60).map(lambda n: (n, 1)),                        # decode
    st.integers(1, 40).map(lambda n: (n, n)),                        # fresh prefill
    st.tuples(st.integers(1, 60), st.integers(2, 20)).map(lambda c: (c[0] + c[1], c[1])),  # chunk
    st.integers(1, 30).map(lambda n: (n, 0)),                        # in the batch, nothing new
)


@settings(deadline=None, max_examples=40)
@given(seqs=st.lists(sequence, min_size=1, max_size=5),
       num_kv_heads=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 2, 3, 4, 8]),
       head_dim=st.sampled_from([1, 3, 17, 32, 64, 128, 256]),
       block_size=st.sampled_from([1, 2, 16, 32]), cache_dtype=st.sampled_from(CACHE_DTYPES),
       q_strided=st.booleans(), qk_scale=st.sampled_from([0.1, 1.0, 4.0]),
       seed=st.integers(0, 2**32 - 1))
def test_mixed_batches_match_reference(seqs, num_kv_heads, group, head_dim, block_size,
                                       cache_dtype, q_strided, qk_scale, seed):
    rng = np.random.default_rng(seed)
    args = make_batch(rng, seqs, num_kv_heads, group, head_dim, block_size, cache_dtype,
                      qk_scale=qk_scale)
    check(args, q_strided, rng)


@settings(deadline=None, max_examples=40)
@given(seq_lens=st.lists(st.integers(1, 1300), min_size=1, max_size=9),
       num_kv_heads=st.sampled_from([1, 3]), group=st.sampled_from([1, 2, 3, 8, 12]),
       head_dim=st.sampled_from([64, 128]), block_size=st.sampled_from([1, 16, 32]),
       table_slack=st.sampled_from([1, 40]), cache_dtype=st.sampled_from(CACHE_DTYPES),
       q_strided=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_decode_matches_reference(seq_lens, num_kv_heads, group, head_dim, block_size,
                                  table_slack, cache_dtype, q_strided, seed):
    """One new token per sequence: the split-KV kernel (sequences ending at odd positions,
    empty splits past a sequence's end, GQA chunks of 8 heads for group 12)."""
    rng = np.random.default_rng(seed)
    args = make_batch(rng, [(n, 1) for n in seq_lens], num_kv_heads, group, head_dim,
                      block_size, cache_dtype, qk_scale=2.0, table_slack=table_slack)
    check(args, q_strided, rng)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("seqs,num_kv_heads,group,head_dim,block_size", [
    ([(3000, 1)], 1, 1, 64, 16),                 # one long decode: 47 splits of 64
    ([(1500, 1), (700, 1)], 1, 3, 128, 32),      # two decodes, GQA
    ([(1500, 1), (700, 1)], 1, 3, 17, 32),       # decode shapes, head_dim 17: prefill kernel
    ([(1200, 5)], 3, 3, 64, 16),                 # short chunk after a long prefix (SmolLM2)
    ([(600, 40)], 1, 8, 3, 2),                   # rows that reach different tiles
    ([(4096, 1)], 3, 3, 64, 16),                 # SmolLM2 decode
    ([(8192, 1), (5000, 1), (1, 1), (513, 1)], 8, 4, 128, 16),   # Llama-like, 16 splits
    ([(700, 300), (300, 300), (1000, 1)], 2, 4, 128, 16),        # long prefill + a decode
])
def test_long_context(seqs, num_kv_heads, group, head_dim, block_size, cache_dtype):
    rng = np.random.default_rng(1)
    check(make_batch(rng, seqs, num_kv_heads, group, head_dim, block_size, cache_dtype,
                     extra_blocks=1, qk_scale=3.0))


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_on_the_prefill_kernel(rng, monkeypatch, head_dim, cache_dtype):
    """ENGINE_CUDA_ATTENTION=prefill: decode batches through the tiled kernel, same results."""
    monkeypatch.setenv("ENGINE_CUDA_ATTENTION", "prefill")
    check(make_batch(rng, [(1, 1), (700, 1), (33, 1), (2100, 1)], 3, 3, head_dim, 16,
                     cache_dtype, table_slack=7))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_shapes_with_uneven_new_tokens(rng, head_dim):
    """num_tokens == num_seqs without one token each: the decode kernel loops over them."""
    check(make_batch(rng, [(40, 2), (7, 0), (600, 1)], 2, 2, head_dim, 16))
    check(make_batch(rng, [(9, 0), (1030, 3), (5, 0)], 1, 3, head_dim, 16))


def test_empty_batches(rng):
    for seqs in ([(5, 0)], [(5, 0), (3, 0)]):
        args = make_batch(rng, seqs, 2, 2, 64, 4)
        assert run_gpu(args).shape == (0, 4, 64)


def test_same_buffers_new_values(rng):
    """What a CUDA graph replay does: the same shapes and buffers, new seq_lens and tables."""
    num_kv_heads, group, head_dim, block_size, max_blocks = 3, 3, 64, 16, 80
    bufs = None
    for seq_lens in ([1000, 17, 1, 640], [1001, 18, 2, 1280], [3, 1279, 512, 513]):
        args = make_batch(rng, [(n, 1) for n in seq_lens], num_kv_heads, group, head_dim,
                          block_size, BF16, extra_blocks=0, table_slack=0)
        q, k_cache, v_cache, block_tables, sl, qsl, scale = args
        table = np.full((len(seq_lens), max_blocks), -1, np.int32)
        table[:, :block_tables.shape[1]] = block_tables
        args = (q, k_cache, v_cache, table, sl, qsl, scale)
        num_blocks = k_cache.shape[0]
        k_full = np.full((max_blocks * len(seq_lens),) + k_cache.shape[1:], np.nan, BF16)
        v_full = k_full.copy()
        k_full[:num_blocks], v_full[:num_blocks] = k_cache, v_cache
        host = (q, k_full, v_full, table, sl, qsl)
        if bufs is None:
            bufs = [ops.to_device(a) for a in host] + [ops.empty(q.shape, np.float32, "cuda")]
        else:
            for buf, a in zip(bufs, host):
                buf.copy_from(np.ascontiguousarray(a))
        ops.paged_attention(*bufs[:6], scale, out=bufs[6])
        want = expected((q, k_full, v_full, table, sl, qsl, scale))
        np.testing.assert_allclose(ops.to_host(bufs[6]), want, rtol=1e-4, atol=1e-4,
                                   equal_nan=False)


@pytest.mark.parametrize("head_dim,cache_dtype", [(64, BF16), (128, np.float32), (17, BF16)])
def test_graph_replay_with_new_values(rng, head_dim, cache_dtype):
    """A decode step captured once (split-KV and merge, or the prefill kernel for head_dim 17)
    and replayed after seq_lens / block_tables / q change in place."""
    graph_type = getattr(getattr(ops, "_C_cuda", None), "Graph", None)
    if graph_type is None:
        pytest.skip("engine._C_cuda.Graph is not there")
    num_seqs, max_blocks, block_size = 5, 100, 16
    steps = []
    for seq_lens in ([1, 700, 1599, 16, 33], [2, 701, 1600, 17, 1200], [1400, 3, 512, 513, 1024]):
        args = make_batch(rng, [(n, 1) for n in seq_lens], 2, 3, head_dim, block_size,
                          cache_dtype, extra_blocks=0, table_slack=0)
        q, k_cache, v_cache, block_tables, sl, qsl, scale = args
        table = np.full((num_seqs, max_blocks), -1, np.int32)
        table[:, :block_tables.shape[1]] = block_tables
        k_full = np.full((num_seqs * max_blocks,) + k_cache.shape[1:], np.nan, cache_dtype)
        v_full = k_full.copy()
        k_full[:k_cache.shape[0]], v_full[:v_cache.shape[0]] = k_cache, v_cache
        steps.append((q, k_full, v_full, table, sl, qsl))
    bufs = [ops.to_device(a) for a in steps[0]] + [ops.empty(steps[0][0].shape, np.float32, "cuda")]
    ops.paged_attention(*bufs[:6], scale, out=bufs[6])  # warm-up: sizes the split scratch
    ops.synchronize()
    graph = graph_type()
    graph.capture_begin()
    ops.paged_attention(*bufs[:6], scale, out=bufs[6])
    graph.capture_end()
    for step in steps:
        for buf, a in zip(bufs, step):
            buf.copy_from(np.ascontiguousarray(a))
        bufs[6].copy_from(np.full(step[0].shape, np.nan, np.float32))
        graph.replay()
        want = expected(step + (scale,))
        tol = TOL[np.dtype(cache_dtype)]
        np.testing.assert_allclose(ops.to_host(bufs[6]), want, rtol=tol, atol=tol, equal_nan=False)


@pytest.mark.parametrize("seqs,head_dim", [
    ([(40, 1), (9, 1), (2000, 1)], 64),          # split-KV decode
    ([(40, 1), (9, 3), (41, 2)], 64),            # prefill kernel
    ([(40, 1), (9, 1), (2000, 1)], 16),          # decode shapes on the prefill kernel
])
def test_nan_in_q_gives_nan_rows(rng, seqs, head_dim):
    args = make_batch(rng, seqs, 2, 3, head_dim, 16)
    q = args[0]
    q[1, 4, 5] = np.nan
    q[-1, 0, 0] = np.nan
    got = run_gpu(args)
    assert np.isnan(got[1, 4]).all() and np.isnan(got[-1, 0]).all()
    mask = np.ones(got.shape[:2], bool)
    mask[1, 4] = mask[-1, 0] = False
    assert np.isfinite(got[mask]).all()


def test_nan_in_cache_reaches_rows_that_see_it(rng):
    args = make_batch(rng, [(10, 10)], 1, 2, 64, 4)
    k_cache, block_tables = args[1], args[3]
    k_cache[block_tables[0, 1], 2, 0, 3] = np.nan  # position 6
    got = run_gpu(args)
    assert np.isfinite(got[:6]).all() and np.isnan(got[6:]).all()


# ---- errors: host-side checks, a ValueError naming the op and the argument -------------

def _mutate(case, args):
    q, k_cache, v_cache, block_tables, seq_lens, qsl, scale = args
    out = np.zeros(q.shape, np.float32)
    if case == "q dtype":
        q = q.astype(np.float16)
    elif case == "k_cache dtype":
        k_cache = k_cache.astype(np.float16)
    elif case == "v_cache dtype":
        v_cache = v_cache.astype(BF16)
    elif case == "v_cache shape":
        v_cache = v_cache[:-1]
    elif case == "gqa ratio":
        k_cache, v_cache = k_cache[:, :, :1].repeat(3, 2), v_cache[:, :, :1].repeat(3, 2)
    elif case == "block_tables dtype":
        block_tables = block_tables.view(np.uint32).astype(np.uint64)
    elif case == "seq_lens shape":
        seq_lens = seq_lens[:-1]
    elif case == "query_start_loc shape":
        qsl = qsl[:-1]
    elif case == "out shape":
        out = out[:, :-1]
    elif case == "scale":
        scale = float("nan")
    return q, k_cache, v_cache, block_tables, seq_lens, qsl, scale, out


ERRORS = {
    "q dtype": "q", "k_cache dtype": "k_cache", "v_cache dtype": "v_cache",
    "v_cache shape": "v_cache", "gqa ratio": "heads must be a multiple",
    "block_tables dtype": "block_tables", "seq_lens shape": "seq_lens",
    "query_start_loc shape": "query_start_loc", "out shape": "out", "scale": "scale",
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_rejects(case, rng):
    args = _mutate(case, make_batch(rng, [(20, 4), (9, 3), (17, 1)], 2, 2, 8, 4))
    *arrays, scale, out = args
    arrays = [ops.to_device(a) for a in arrays]
    out = ops.to_device(out)
    with pytest.raises(ValueError, match=r"^paged_attention: .*" + ERRORS[case]):
        ops.paged_attention(*arrays, scale, out=out)


# ---- device values out of range: skipped on the device, never a fault -------------------
# (last in the file: a fault here would poison the context for the tests after it)

@pytest.mark.parametrize("seqs,head_dim", [([(30, 1), (70, 1)], 64), ([(30, 5), (70, 1)], 64)])
def test_bad_device_values_do_not_fault(rng, seqs, head_dim):
    args = make_batch(rng, seqs, 1, 2, head_dim, 16)
    q, k_cache, v_cache, block_tables, seq_lens, qsl, scale = args
    bad_tables = block_tables.copy()
    bad_tables[0, 0] = 1 << 30
    bad_tables[1, 1] = -5
    bad_lens = seq_lens.copy()
    bad_lens[1] = 1 << 30
    for bad in ((q, k_cache, v_cache, bad_tables, seq_lens, qsl, scale),
                (q, k_cache, v_cache, block_tables, bad_lens, qsl, scale),
                (q, k_cache, v_cache, block_tables, seq_lens, np.array([0, 99, -3], np.int32),
                 scale)):
        run_gpu(bad)
    ops.synchronize()
    check(args)  # the context is still healthy
