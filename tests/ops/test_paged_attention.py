"""paged_attention against the numpy reference, on every instruction set, with float32,
bfloat16 and float16 caches (the reference reads the same 16-bit values, so the tolerance
is the same).

Batches mix fresh prefills, prefill chunks over a cached prefix and decodes; block
tables hold scattered block ids with -1 padding; every cache slot no sequence owns
holds NaN, so a read outside a sequence's tokens cannot go unnoticed.
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference

RTOL, ATOL = 1e-5, 1e-5
BF16 = np.dtype(ml_dtypes.bfloat16)
CACHE_DTYPES = [np.dtype(np.float32), BF16, np.dtype(np.float16)]


def make_batch(rng, seqs, num_kv_heads, group, head_dim, block_size, extra_blocks=3,
               q_strided=False, qk_scale=1.0, cache_dtype=np.float32):
    """seqs: [(seq_len, num_new)]. Returns the op's arguments (out filled with a sentinel)."""
    num_q_heads = num_kv_heads * group
    used = [-(-seq_len // block_size) for seq_len, _ in seqs]
    max_blocks = max(used, default=0) + 1
    num_blocks = sum(used) + extra_blocks
    ids = rng.permutation(num_blocks).astype(np.int32)  # scattered physical blocks
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = np.full(cache_shape, np.nan, np.float32)
    v_cache = np.full(cache_shape, np.nan, np.float32)
    block_tables = np.full((len(seqs), max_blocks), -1, np.int32)
    pos = 0
    for s, (seq_len, _) in enumerate(seqs):
        block_tables[s, :used[s]] = ids[pos:pos + used[s]]
        pos += used[s]
        for t in range(seq_len):
            b, o = block_tables[s, t // block_size], t % block_size
            k_cache[b, o] = rng.standard_normal((num_kv_heads, head_dim))
            v_cache[b, o] = rng.standard_normal((num_kv_heads, head_dim))
    seq_lens = np.array([seq_len for seq_len, _ in seqs], np.int32)
    query_start_loc = np.concatenate([[0], np.cumsum([n for _, n in seqs])]).astype(np.int32)
    num_tokens = int(query_start_loc[-1])
    q = (rng.standard_normal((num_tokens, num_q_heads, head_dim)) * qk_scale).astype(np.float32)
    if q_strided:  # a slice of a fused qkv row: token stride > num_q_heads * head_dim
        big = rng.standard_normal((num_tokens, num_q_heads + 2, head_dim + 3)).astype(np.float32)
        big[:, 1:num_q_heads + 1, 2:head_dim + 2] = q
        q = big[:, 1:num_q_heads + 1, 2:head_dim + 2]
    out = np.full((num_tokens, num_q_heads, head_dim), 7.0, np.float32)
    scale = float(head_dim) ** -0.5
    k_cache, v_cache = k_cache.astype(cache_dtype), v_cache.astype(cache_dtype)
    return q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out


def check_against_reference(args):
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out = args
    want = np.zeros(out.shape, np.float64)
    reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                              scale, out=want)
    before = (k_cache.copy(), v_cache.copy(), q.copy())
    ops.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                        out=out)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
    for a, b in zip(before, (k_cache, v_cache, q)):  # bits: NaN slots must still be NaN
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


# One sequence: its kind and its size.
sequence = st.one_of(
    st.integers(1, 60).map(lambda n: (n, 1)),                        # decode
    st.integers(1, 40).map(lambda n: (n, n)),                        # fresh prefill
    st.tuples(st.integers(1, 40), st.integers(2, 20)).map(lambda c: (c[0] + c[1], c[1])),  # chunk
    st.integers(1, 30).map(lambda n: (n, 0)),                        # in the batch, nothing new
)


@given(seqs=st.lists(sequence, min_size=1, max_size=4),
       num_kv_heads=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 2, 3, 4, 8]),
       head_dim=st.sampled_from([1, 3, 17, 64, 96, 128]), block_size=st.sampled_from([1, 2, 16, 32]),
       q_strided=st.booleans(), qk_scale=st.sampled_from([0.1, 1.0, 4.0]),
       cache_dtype=st.sampled_from(CACHE_DTYPES), seed=st.integers(0, 2**32 - 1))
def test_matches_reference(isa, seqs, num_kv_heads, group, head_dim, block_size, q_strided,
                           qk_scale, cache_dtype, seed):
    rng = np.random.default_rng(seed)
    check_against_reference(make_batch(rng, seqs, num_kv_heads, group, head_dim, block_size,
                                       q_strided=q_strided, qk_scale=qk_scale,
                                       cache_dtype=cache_dtype))


# Few work items with long contexts: the KV range is split across threads and merged.
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("seqs,num_kv_heads,group,head_dim,block_size", [
    ([(3000, 1)], 1, 1, 64, 16),                 # one long decode
    ([(1500, 1), (700, 1)], 1, 3, 17, 32),       # two decodes, GQA
    ([(1200, 5)], 3, 3, 64, 16),                 # short chunk after a long prefix (SmolLM2)
    ([(600, 40)], 1, 8, 3, 2),                   # rows that some splits never reach
    ([(4096, 1)], 3, 3, 64, 16),
    ([(1000, 1), (300, 1)], 8, 4, 128, 16),      # decodes over 32 query heads (Llama-3.2-1B)
    ([(700, 1)], 8, 8, 64, 16),                  # 64 query heads: a decode item per KV head
    ([(900, 33)], 2, 4, 128, 16),                # a prefill chunk, head_dim 128
    ([(800, 24), (600, 1)], 2, 4, 96, 16),       # head_dim 96: the generic kernels, widened chunks
    # Decode pieces chained on a thread, whose next piece starts over blocks under 16
    # positions: more chunks than a span holds (a span overran once, writing past its end).
    ([(5, 1), (50, 1), (300, 1)], 2, 4, 64, 1),
    ([(40, 1), (3, 1), (260, 1), (70, 1)], 3, 3, 64, 2),
    ([(700, 1), (129, 1)], 2, 4, 128, 5),
])
def test_long_context(isa, seqs, num_kv_heads, group, head_dim, block_size, cache_dtype):
    rng = np.random.default_rng(1)
    check_against_reference(make_batch(rng, seqs, num_kv_heads, group, head_dim, block_size,
                                       extra_blocks=1, qk_scale=3.0, cache_dtype=cache_dtype))


def test_empty_batch(isa, rng):
    check_against_reference(make_batch(rng, [], 2, 2, 8, 4))
    check_against_reference(make_batch(rng, [(5, 0)], 2, 2, 8, 4))


@pytest.mark.parametrize("seq_len", [1, 40, 2000])
def test_nan_in_q_gives_nan_rows(isa, rng, seq_len):
    args = make_batch(rng, [(seq_len, 1), (9, 3), (seq_len + 1, 2)], 2, 3, 16, 16)
    q, out = args[0], args[-1]
    q[1, 4, 5] = np.nan  # token 1 (second sequence), head 4
    q[5, 0, 0] = np.nan  # last token of the third sequence, head 0
    ops.paged_attention(*args[:-1], out=out)
    assert np.isnan(out[1, 4]).all() and np.isnan(out[5, 0]).all()
    mask = np.ones(out.shape[:2], bool)
    mask[1, 4] = mask[5, 0] = False
    assert np.isfinite(out[mask]).all()


def test_nan_in_cache_reaches_rows_that_see_it(isa, rng):
    args = make_batch(rng, [(10, 10)], 1, 2, 8, 4)
    k_cache, block_tables, out = args[1], args[3], args[-1]
    k_cache[block_tables[0, 1], 2, 0, 3] = np.nan  # position 6
    ops.paged_attention(*args[:-1], out=out)
    assert np.isfinite(out[:6]).all() and np.isnan(out[6:]).all()


# ---- errors: a ValueError naming the op and the argument; out untouched ---------------

def _mutate(case, args):
    q, k_cache, v_cache, block_tables, seq_lens, qsl, scale, out = args
    if case == "q dtype":
        q = q.astype(np.float64)
    elif case == "q ndim":
        q = q.reshape(q.shape[0], -1)
    elif case == "q last dim":
        q = np.repeat(q, 2, axis=2)[:, :, ::2]
    elif case == "k_cache contiguous":
        k_cache = np.repeat(k_cache, 2, axis=0)[::2]
    elif case == "k_cache dtype":
        k_cache = k_cache.astype(np.float16)
    elif case == "v_cache dtype unlike k_cache":
        v_cache = v_cache.astype(BF16)
    elif case == "v_cache shape":
        v_cache = v_cache[:-1]
    elif case == "head_dim":
        k_cache, v_cache = k_cache[..., :-1].copy(), v_cache[..., :-1].copy()
    elif case == "gqa ratio":
        k_cache, v_cache = np.concatenate([k_cache] * 2, 2), np.concatenate([v_cache] * 2, 2)[:, :, :3]
        k_cache = k_cache[:, :, :3].copy()
        v_cache = v_cache.copy()
    elif case == "block_tables dtype":
        block_tables = block_tables.astype(np.int64)
    elif case == "block_tables ndim":
        block_tables = block_tables.reshape(-1)
    elif case == "seq_lens shape":
        seq_lens = seq_lens[:-1]
    elif case == "query_start_loc shape":
        qsl = qsl[:-1]
    elif case == "query_start_loc start":
        qsl[0] = 1
    elif case == "query_start_loc order":
        qsl[1], qsl[2] = qsl[2], qsl[1]
    elif case == "query_start_loc end":
        qsl[-1] -= 1
    elif case == "new tokens exceed seq_len":
        seq_lens[1] = 1
    elif case == "seq_len exceeds block table":
        seq_lens[0] = block_tables.shape[1] * k_cache.shape[1] + 1
    elif case == "block id high":
        block_tables[2, 1] = k_cache.shape[0]
    elif case == "block id padding inside":
        block_tables[0, 0] = -1
    elif case == "out shape":
        out = out[:, :-1]
    elif case == "out dtype":
        out = out.astype(np.float64)
    elif case == "out last dim":
        out = np.repeat(out, 2, axis=2)[:, :, ::2]
    elif case == "out readonly":
        out.flags.writeable = False
    elif case == "out aliases q":
        out = q
    elif case == "scale":
        scale = float("nan")
    return q, k_cache, v_cache, block_tables, seq_lens, qsl, scale, out


ERRORS = {
    "q dtype": "q", "q ndim": "q", "q last dim": "q", "k_cache contiguous": "k_cache",
    "k_cache dtype": "k_cache", "v_cache shape": "v_cache", "head_dim": "k_cache",
    "v_cache dtype unlike k_cache": "v_cache must have k_cache's dtype float32, got bfloat16",
    "gqa ratio": "heads must be a multiple", "block_tables dtype": "block_tables",
    "block_tables ndim": "block_tables", "seq_lens shape": "seq_lens",
    "query_start_loc shape": "query_start_loc", "query_start_loc start": r"query_start_loc\[0\]",
    "query_start_loc order": "query_start_loc", "query_start_loc end": r"query_start_loc\[3\]",
    "new tokens exceed seq_len": r"seq_lens\[1\]", "seq_len exceeds block table": r"seq_lens\[0\]",
    "block id high": r"block_tables\[2, 1\]", "block id padding inside": r"block_tables\[0, 0\] = -1",
    "out shape": "out", "out dtype": "out", "out last dim": "out", "out readonly": "out",
    "out aliases q": "out", "scale": "scale",
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_rejects(case, rng):
    args = make_batch(rng, [(20, 4), (9, 3), (17, 1)], 2, 2, 8, 4)
    args = _mutate(case, args)
    out = args[-1]
    before = out.copy()
    with pytest.raises(ValueError, match=r"^paged_attention: .*" + ERRORS[case]):
        ops.paged_attention(*args[:-1], out=out)
    np.testing.assert_array_equal(out, before)


@given(seqs=st.lists(st.tuples(st.integers(1, 1300), st.integers(1, 3)), min_size=2, max_size=5),
       head_dim=st.sampled_from([16, 64]), cache_dtype=st.sampled_from(CACHE_DTYPES),
       seed=st.integers(0, 2**16))
def test_each_sequence_is_bit_identical_alone_and_in_a_batch(isa, seqs, head_dim, cache_dtype,
                                                              seed):
    """Batch invariance: a sequence's output does not depend on the others in the step
    (including contexts long enough for the split-KV path)."""
    seqs = [(max(seq_len, n), n) for seq_len, n in seqs]
    args = make_batch(np.random.default_rng(seed), seqs, 2, 3, head_dim, 16,
                      cache_dtype=cache_dtype)
    q, k_cache, v_cache, block_tables, seq_lens, qsl, scale, out = args
    ops.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, scale, out=out)
    for s in range(len(seqs)):
        start, end = int(qsl[s]), int(qsl[s + 1])
        alone = np.empty((end - start,) + out.shape[1:], np.float32)
        ops.paged_attention(q[start:end], k_cache, v_cache, block_tables[s:s + 1],
                            seq_lens[s:s + 1], np.array([0, end - start], np.int32), scale,
                            out=alone)
        assert np.array_equal(alone, out[start:end]), f"sequence {s} differs"


@given(seqs=st.lists(sequence, min_size=1, max_size=3), head_dim=st.sampled_from([17, 64, 128]),
       cache_dtype=st.sampled_from(CACHE_DTYPES), seed=st.integers(0, 2**32 - 1))
def test_prefetch_changes_no_bit(isa, seqs, head_dim, cache_dtype, seed):
    """prefetch is a hint (the AVX-512 kernel requests its bytes as it goes): the same bits
    with and without it, and the arrays left alone."""
    rng = np.random.default_rng(seed)
    args = make_batch(rng, seqs, 2, 4, head_dim, 16, cache_dtype=cache_dtype)
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out = args
    weights = np.frombuffer(rng.bytes(3 * 4096 + 5), np.uint8)
    arrays = [weights, weights[7:], k_cache[:1]]
    before = [a.copy() for a in arrays]
    want = ops.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                               scale, out=out.copy())
    got = ops.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                              scale, out=out.copy(), prefetch=arrays)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_prefetch_is_checked(rng):
    args = list(make_batch(rng, [(5, 1)], 1, 2, 8, 4))
    with pytest.raises(ValueError, match="prefetch array 0 must be C-contiguous"):
        ops.paged_attention(*args[:7], out=args[7], prefetch=[args[1][:, :, :, ::2]])
