"""rope against ops.reference, on every instruction set."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference


def make_cache(rng, max_position, rotary_dim):
    angles = rng.uniform(0, 2 * np.pi, (max_position, rotary_dim // 2))
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


@given(num_tokens=st.sampled_from([1, 3, 17, 769]), num_q_heads=st.sampled_from([1, 3, 4]),
       num_kv_heads=st.sampled_from([1, 2]), head_dim=st.sampled_from([2, 16, 64, 80]),
       partial=st.sampled_from([1.0, 0.5]), fused=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_rope_matches_reference(isa, num_tokens, num_q_heads, num_kv_heads, head_dim, partial,
                                fused, seed):
    rng = np.random.default_rng(seed)
    rotary_dim = max(2, int(head_dim * partial) // 2 * 2)
    cache = make_cache(rng, 100, rotary_dim)
    positions = rng.integers(0, 100, num_tokens).astype(np.int32)
    q_cols, k_cols = num_q_heads * head_dim, num_kv_heads * head_dim
    if fused:  # column slices of a fused QKV output: strided rows
        qkv = rng.standard_normal((num_tokens, q_cols + 2 * k_cols)).astype(np.float32)
        q, k = qkv[:, :q_cols], qkv[:, q_cols:q_cols + k_cols]
    else:
        q = rng.standard_normal((num_tokens, q_cols)).astype(np.float32)
        k = rng.standard_normal((num_tokens, k_cols)).astype(np.float32)
    want_q, want_k = q.copy(), k.copy()
    v_before = qkv[:, q_cols + k_cols:].copy() if fused else None
    ops.rope(positions, q, k, cache, head_dim)
    reference.rope(positions, want_q, want_k, cache, head_dim)
    np.testing.assert_allclose(q, want_q, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(k, want_k, rtol=1e-6, atol=1e-6)
    if fused:
        np.testing.assert_array_equal(qkv[:, q_cols + k_cols:], v_before)


def test_nan_stays_in_its_head(isa, rng):
    cache = make_cache(rng, 8, 16)
    q = rng.standard_normal((2, 32)).astype(np.float32)
    k = rng.standard_normal((2, 16)).astype(np.float32)
    q[0, 3] = np.nan
    ops.rope(np.array([1, 2], np.int32), q, k, cache, 16)
    assert np.isnan(q[0, [3, 11]]).all()
    assert np.isfinite(np.delete(q[0], [3, 11])).all() and np.isfinite(q[1]).all()
    assert np.isfinite(k).all()


# ---- validation: ValueError naming op and argument, nothing written ---------------

@pytest.mark.parametrize("case,match", [
    ("position_high", r"rope: positions\[1\] = 8 is outside \[0, 8\)"),
    ("position_negative", r"rope: positions\[0\] = -1 is outside"),
    ("positions_dtype", "rope: positions must be int32"),
    ("q_dtype", "rope: q must be float32"),
    ("q_cols", "rope: q must have a multiple of head_dim 16"),
    ("k_rows", "rope: k must have 2 rows"),
    ("k_inner_stride", "rope: k must have a contiguous last dimension"),
    ("k_readonly", "rope: k must be a writeable array"),
    ("cache_dtype", "rope: cos_sin_cache must be float32"),
    ("cache_odd", "rope: cos_sin_cache must have an even number of columns"),
    ("cache_wide", "rope: cos_sin_cache must have an even number of columns"),
    ("head_dim", "rope: head_dim must be > 0"),
])
def test_rope_rejects(rng, case, match):
    positions = np.array([0, 5], np.int32)
    q = rng.standard_normal((2, 32)).astype(np.float32)
    k = rng.standard_normal((2, 16)).astype(np.float32)
    cache = make_cache(rng, 8, 16)
    head_dim = 16
    if case == "position_high":
        positions[1] = 8
    elif case == "position_negative":
        positions[0] = -1
    elif case == "positions_dtype":
        positions = positions.astype(np.int64)
    elif case == "q_dtype":
        q = q.astype(np.float16)
    elif case == "q_cols":
        q = q[:, :24]
    elif case == "k_rows":
        k = np.zeros((3, 16), np.float32)
    elif case == "k_inner_stride":
        k = np.repeat(k, 2, axis=1)[:, ::2]
    elif case == "k_readonly":
        k.flags.writeable = False
    elif case == "cache_dtype":
        cache = cache.astype(np.float16)
    elif case == "cache_odd":
        cache = np.ascontiguousarray(cache[:, :15])
    elif case == "cache_wide":
        cache = make_cache(rng, 8, 18)
    elif case == "head_dim":
        head_dim = 0
    q_before, k_before = q.copy(), k.copy()
    with pytest.raises(ValueError, match=match):
        ops.rope(positions, q, k, cache, head_dim)
    np.testing.assert_array_equal(q, q_before)
    np.testing.assert_array_equal(k, k_before)
