"""rms_norm, fused_add_rms_norm, rope, silu_and_mul, embedding on the GPU against the
numpy reference (the CPU kernels' oracle)."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine import ops
from engine.model.rope import rope_cos_sin_cache
from engine.ops import gpu_available, reference

pytestmark = pytest.mark.skipif(not gpu_available(),
                                reason="no GPU: CUDA kernels run only on a machine with an NVIDIA GPU")

SIZES = st.sampled_from([1, 3, 17, 64, 769, 2048])
WEIGHT_DTYPES = st.sampled_from([np.float32, np.float16, ml_dtypes.bfloat16])


def rand(rng, shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def poisoned(shape):
    return ops.to_device(np.full(shape, np.nan, np.float32))


@settings(max_examples=30)
@given(rows=st.integers(1, 40), hidden=SIZES, wdtype=WEIGHT_DTYPES, seed=st.integers(0, 99))
def test_rms_norm(rows, hidden, wdtype, seed):
    rng = np.random.default_rng(seed)
    x, w = rand(rng, (rows, hidden), scale=3.0), rand(rng, hidden, wdtype)
    out = poisoned((rows, hidden))
    ops.rms_norm(ops.to_device(x), ops.to_device(w), 1e-5, out=out)
    want = reference.rms_norm(x, w, 1e-5, out=np.empty_like(x))
    np.testing.assert_allclose(ops.to_host(out), want, rtol=2e-6, atol=1e-6)


@settings(max_examples=30)
@given(rows=st.integers(1, 40), hidden=SIZES, wdtype=WEIGHT_DTYPES, seed=st.integers(0, 99))
def test_fused_add_rms_norm_on_strided_rows(rows, hidden, wdtype, seed):
    rng = np.random.default_rng(seed)
    x, r, w = rand(rng, (rows, hidden)), rand(rng, (rows, hidden)), rand(rng, hidden, wdtype)
    wide = np.full((rows, hidden + 5), 7.0, np.float32)
    wide[:, 2:2 + hidden] = x
    xd, rd = ops.to_device(wide), ops.to_device(r)
    ops.fused_add_rms_norm(xd[:, 2:2 + hidden], rd, ops.to_device(w), 1e-6)
    want_x, want_r = reference.fused_add_rms_norm(x.copy(), r.copy(), w, 1e-6)
    got = ops.to_host(xd)
    np.testing.assert_allclose(got[:, 2:2 + hidden], want_x, rtol=2e-6, atol=1e-6)
    np.testing.assert_array_equal(got[:, :2], 7.0)
    np.testing.assert_array_equal(got[:, 2 + hidden:], 7.0)
    np.testing.assert_allclose(ops.to_host(rd), want_r, rtol=1e-7, atol=0)


@settings(max_examples=30)
@given(tokens=st.integers(1, 33), heads=st.integers(1, 9), kv_heads=st.integers(1, 4),
       head_dim=st.sampled_from([2, 32, 64, 128]), partial=st.booleans(), seed=st.integers(0, 99))
def test_rope_on_fused_qkv_slices(tokens, heads, kv_heads, head_dim, partial, seed):
    rng = np.random.default_rng(seed)
    rotary = head_dim // 2 if partial and head_dim >= 4 else head_dim
    cache = rope_cos_sin_cache(rotary, 300, 10000.0, None)
    positions = rng.integers(0, 300, tokens).astype(np.int32)
    qkv = rand(rng, (tokens, (heads + 2 * kv_heads) * head_dim))
    q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
    d = ops.to_device(qkv)
    ops.rope(ops.to_device(positions), d[:, :q_end], d[:, q_end:k_end], ops.to_device(cache),
             head_dim)
    want = qkv.copy()
    reference.rope(positions, want[:, :q_end], want[:, q_end:k_end], cache, head_dim)
    np.testing.assert_allclose(ops.to_host(d), want, rtol=1e-6, atol=1e-6)


def test_rope_leaves_a_token_with_a_position_outside_the_table():
    cache = rope_cos_sin_cache(8, 10, 10000.0, None)
    q = np.ones((2, 8), np.float32)
    d, k = ops.to_device(q), ops.to_device(q.copy())
    ops.rope(ops.to_device(np.array([3, 99], np.int32)), d, k, ops.to_device(cache), 8)
    got = ops.to_host(d)
    assert not np.allclose(got[0], 1.0)
    np.testing.assert_array_equal(got[1], 1.0)


@settings(max_examples=30)
@given(rows=st.integers(1, 40), d=SIZES, seed=st.integers(0, 99))
def test_silu_and_mul(rows, d, seed):
    x = rand(np.random.default_rng(seed), (rows, 2 * d), scale=4.0)
    out = poisoned((rows, d))
    ops.silu_and_mul(ops.to_device(x), out=out)
    want = reference.silu_and_mul(x, out=np.empty((rows, d), np.float32))
    np.testing.assert_allclose(ops.to_host(out), want, rtol=1e-5, atol=1e-6)


@settings(max_examples=30)
@given(tokens=st.integers(1, 50), vocab=st.integers(1, 300), hidden=SIZES,
       dtype=WEIGHT_DTYPES, seed=st.integers(0, 99))
def test_embedding(tokens, vocab, hidden, dtype, seed):
    rng = np.random.default_rng(seed)
    table = rand(rng, (vocab, hidden), dtype)
    ids = rng.integers(0, vocab, tokens).astype(np.int32)
    out = poisoned((tokens, hidden))
    ops.embedding(ops.to_device(ids), ops.to_device(table), out=out)
    np.testing.assert_array_equal(ops.to_host(out), table[ids].astype(np.float32))


def test_embedding_gives_zeros_for_ids_outside_the_table():
    table = np.ones((4, 3), np.float32)
    out = poisoned((3, 3))
    ops.embedding(ops.to_device(np.array([1, -1, 4], np.int32)), ops.to_device(table), out=out)
    np.testing.assert_array_equal(ops.to_host(out), [[1, 1, 1], [0, 0, 0], [0, 0, 0]])


def test_shape_errors_name_the_argument():
    x = ops.to_device(np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="rms_norm: weight"):
        ops.rms_norm(x, ops.to_device(np.zeros(7, np.float32)), 1e-5,
                     out=ops.empty((2, 8), np.float32, "cuda"))
    with pytest.raises(ValueError, match="silu_and_mul: out"):
        ops.silu_and_mul(x, out=ops.empty((2, 3), np.float32, "cuda"))
