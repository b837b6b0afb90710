"""varlen_attention against the numpy reference, on every instruction set.

Batches pack sequences of mixed lengths (empty ones too) back to back; q, k and v are
views of one fused qkv row as the models pass them, or strided slices of wider arrays.
"""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference

RTOL, ATOL = 1e-5, 1e-5


def make_batch(rng, seq_lens, num_kv_heads, group, head_dim, layout, qk_scale=1.0):
    """q, k, v, query_start_loc for sequences of the given lengths."""
    num_heads = num_kv_heads * group
    query_start_loc = np.concatenate([[0], np.cumsum(seq_lens)]).astype(np.int32)
    n = int(query_start_loc[-1])
    if layout == "fused":  # views of one [n, (heads + 2 * kv_heads) * head_dim] matmul output
        width = (num_heads + 2 * num_kv_heads) * head_dim
        qkv = rng.standard_normal((n, width)).astype(np.float32)
        q = qkv[:, :num_heads * head_dim].reshape(n, num_heads, head_dim)
        k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim]
        v = qkv[:, (num_heads + num_kv_heads) * head_dim:]
        k, v = k.reshape(n, num_kv_heads, head_dim), v.reshape(n, num_kv_heads, head_dim)
    else:  # slices of wider arrays: token and head strides of their own
        def strided(heads):
            big = rng.standard_normal((n, heads + 1, head_dim + 3)).astype(np.float32)
            return big[:, 1:, 2:2 + head_dim]
        q, k, v = strided(num_heads), strided(num_kv_heads), strided(num_kv_heads)
    q *= qk_scale
    return q, k, v, query_start_loc


def check(q, k, v, query_start_loc, causal, scale=None):
    scale = q.shape[2] ** -0.5 if scale is None else scale
    out = np.full(q.shape, 7.0, np.float32)
    want = reference.varlen_attention(q, k, v, query_start_loc, scale, causal,
                                      out=np.zeros(q.shape, np.float64))
    before = (q.copy(), k.copy(), v.copy())
    ops.varlen_attention(q, k, v, query_start_loc, scale, causal, out=out)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
    for a, b in zip(before, (q, k, v)):
        np.testing.assert_array_equal(a, b)
    return out


@given(seq_lens=st.lists(st.sampled_from([0, 1, 2, 3, 7, 17, 33, 70, 130]), min_size=1,
                         max_size=5),
       num_kv_heads=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 2, 4]),
       head_dim=st.sampled_from([1, 3, 17, 32, 64]), causal=st.booleans(),
       layout=st.sampled_from(["fused", "strided"]), qk_scale=st.sampled_from([0.1, 1.0, 4.0]),
       seed=st.integers(0, 2**32 - 1))
def test_matches_reference(isa, seq_lens, num_kv_heads, group, head_dim, causal, layout,
                           qk_scale, seed):
    rng = np.random.default_rng(seed)
    check(*make_batch(rng, seq_lens, num_kv_heads, group, head_dim, layout, qk_scale), causal)


def test_long_sequence_and_negative_scale(isa, rng):
    q, k, v, qsl = make_batch(rng, [600, 5], 2, 2, 24, "fused")
    check(q, k, v, qsl, causal=False)
    check(q, k, v, qsl, causal=True, scale=-0.3)


@pytest.mark.parametrize("causal", [False, True])
def test_a_sequence_is_the_same_alone_and_in_a_batch(isa, rng, causal):
    q, k, v, qsl = make_batch(rng, [19, 40, 3], 2, 2, 32, "fused")
    batched = np.empty(q.shape, np.float32)
    ops.varlen_attention(q, k, v, qsl, 0.2, causal, out=batched)
    alone = np.empty((40, 4, 32), np.float32)
    ops.varlen_attention(q[19:59], k[19:59], v[19:59], np.array([0, 40], np.int32), 0.2, causal,
                         out=alone)
    np.testing.assert_array_equal(batched[19:59], alone)


def test_nan_reaches_exactly_the_rows_that_see_it(isa, rng):
    q, k, v, qsl = make_batch(rng, [9, 11], 1, 2, 17, "strided")
    v[9 + 6, 0, 3] = np.nan  # token 6 of sequence 1
    out = np.empty(q.shape, np.float32)
    ops.varlen_attention(q, k, v, qsl, 0.25, True, out=out)
    assert np.isfinite(out[:9 + 6]).all()                 # sequence 0, and tokens before 6
    assert np.isnan(out[9 + 6:, :, 3]).all()              # every later row of sequence 1
    ops.varlen_attention(q, k, v, qsl, 0.25, False, out=out)
    assert np.isfinite(out[:9]).all() and np.isnan(out[9:, :, 3]).all()
    q[2, 1, 0] = np.nan
    ops.varlen_attention(q, k, v, qsl, 0.25, False, out=out)
    assert np.isnan(out[2, 1]).all() and np.isfinite(out[:9][np.arange(9) != 2]).all()


@pytest.mark.parametrize("case,match", [
    ("q_dtype", "varlen_attention: q must be float32"),
    ("q_inner_stride", "varlen_attention: q must have a contiguous last dimension"),
    ("k_shape", r"varlen_attention: k must have shape \[6, \*, 8\], got float32 \[6, 2, 4\]"),
    ("v_shape", r"varlen_attention: v must have shape \[6, 2, 8\]"),
    ("heads", "varlen_attention: q's 4 heads must be a multiple of k's 3 KV heads"),
    ("qsl_dtype", "varlen_attention: query_start_loc must be int32"),
    ("qsl_first", r"varlen_attention: query_start_loc\[0\] must be 0, got 1"),
    ("qsl_order", r"query_start_loc must be non-decreasing, but query_start_loc\[2\] = 2 < "
                  r"query_start_loc\[1\] = 4"),
    ("qsl_last", r"varlen_attention: query_start_loc\[2\] must equal q's 6 tokens, got 5"),
    ("out_shape", r"varlen_attention: out must have shape \[6, 4, 8\]"),
    ("out_overlaps", "varlen_attention: out must not share memory with q, k or v"),
    ("out_readonly", "varlen_attention: out must be a writeable array"),
    ("scale", "varlen_attention: scale must be finite"),
])
def test_rejects(rng, case, match):
    q = rng.standard_normal((6, 4, 8)).astype(np.float32)
    k = rng.standard_normal((6, 2, 8)).astype(np.float32)
    v = rng.standard_normal((6, 2, 8)).astype(np.float32)
    qsl, scale = np.array([0, 4, 6], np.int32), 0.3
    out = np.zeros((6, 4, 8), np.float32)
    if case == "q_dtype":
        q = q.astype(np.float16)
    elif case == "q_inner_stride":
        q = np.repeat(q, 2, axis=2)[:, :, ::2]
    elif case == "k_shape":
        k = np.zeros((6, 2, 4), np.float32)
    elif case == "v_shape":
        v = np.zeros((6, 2, 7), np.float32)
    elif case == "heads":
        k = v = np.zeros((6, 3, 8), np.float32)
    elif case == "qsl_dtype":
        qsl = qsl.astype(np.int64)
    elif case == "qsl_first":
        qsl = np.array([1, 4, 6], np.int32)
    elif case == "qsl_order":
        qsl = np.array([0, 4, 2, 6], np.int32)
    elif case == "qsl_last":
        qsl = np.array([0, 4, 5], np.int32)
    elif case == "out_shape":
        out = np.zeros((6, 4, 9), np.float32)
    elif case == "out_overlaps":
        out = q
    elif case == "out_readonly":
        out.flags.writeable = False
    elif case == "scale":
        scale = float("inf")
    before = out.copy()
    with pytest.raises(ValueError, match=match):
        ops.varlen_attention(q, k, v, qsl, scale, True, out=out)
    if case != "out_overlaps":
        np.testing.assert_array_equal(out, before)
