"""rope_kv_cache_write (rope on q and k, then k and v into the paged cache, in one pass)
against ops.reference and against the two ops it fuses, on every instruction set."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference

BF16 = np.dtype(ml_dtypes.bfloat16)


def make_case(rng, num_tokens, num_q_heads, num_kv_heads, head_dim, rotary_dim, block_size,
              cache_dtype, skip_every=0):
    """positions, q, k, v (column views of one fused qkv, as the model passes them), the
    cos/sin table, the caches and the slots."""
    angles = rng.uniform(0, 2 * np.pi, (64, rotary_dim // 2))
    cos_sin = np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    positions = rng.integers(0, 64, num_tokens).astype(np.int32)
    q_cols, kv_cols = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = rng.standard_normal((num_tokens, q_cols + 2 * kv_cols)).astype(np.float32)
    q = qkv[:, :q_cols]
    k = qkv[:, q_cols:q_cols + kv_cols].reshape(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_cols + kv_cols:].reshape(num_tokens, num_kv_heads, head_dim)
    num_blocks = -(-num_tokens // block_size) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = rng.standard_normal(shape).astype(np.float32).astype(cache_dtype)
    v_cache = rng.standard_normal(shape).astype(np.float32).astype(cache_dtype)
    slots = rng.permutation(num_blocks * block_size)[:num_tokens].astype(np.int32)
    if skip_every:
        slots[::skip_every] = -1
    return dict(positions=positions, qkv=qkv, q=q, k=k, v=v, cos_sin_cache=cos_sin,
                head_dim=head_dim, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots)


def call(fn, c):
    return fn(c["positions"], c["q"], c["k"], c["v"], c["cos_sin_cache"], c["head_dim"],
              c["k_cache"], c["v_cache"], c["slot_mapping"])


def copy_case(c):
    """The same case in fresh arrays (q, k, v re-cut from a copy of qkv)."""
    d = dict(c)
    d["qkv"] = c["qkv"].copy()
    q_cols = c["q"].shape[1]
    kv_cols = c["k"].shape[1] * c["k"].shape[2]
    d["q"] = d["qkv"][:, :q_cols]
    d["k"] = d["qkv"][:, q_cols:q_cols + kv_cols].reshape(c["k"].shape)
    d["v"] = d["qkv"][:, q_cols + kv_cols:].reshape(c["v"].shape)
    d["k_cache"], d["v_cache"] = c["k_cache"].copy(), c["v_cache"].copy()
    return d


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


@given(num_tokens=st.integers(0, 40), num_q_heads=st.sampled_from([1, 3, 4]),
       num_kv_heads=st.sampled_from([1, 2, 3]), head_dim=st.sampled_from([2, 16, 64, 80]),
       partial=st.sampled_from([1.0, 0.5]), block_size=st.sampled_from([1, 2, 16]),
       skip_every=st.sampled_from([0, 2, 3]),
       cache_dtype=st.sampled_from([np.float32, BF16, np.float16]),
       seed=st.integers(0, 2**32 - 1))
def test_matches_the_two_ops_and_the_reference(isa, num_tokens, num_q_heads, num_kv_heads,
                                               head_dim, partial, block_size, skip_every,
                                               cache_dtype, seed):
    rng = np.random.default_rng(seed)
    rotary_dim = max(2, int(head_dim * partial) // 2 * 2)
    fused = make_case(rng, num_tokens, num_q_heads, num_kv_heads, head_dim, rotary_dim,
                      block_size, cache_dtype, skip_every)
    apart, want = copy_case(fused), copy_case(fused)
    call(ops.rope_kv_cache_write, fused)
    # the two ops it fuses: the same bits everywhere (q, k, v and both caches)
    ops.rope(apart["positions"], apart["q"], apart["k"], apart["cos_sin_cache"], head_dim)
    ops.kv_cache_write(apart["k"], apart["v"], apart["k_cache"], apart["v_cache"],
                       apart["slot_mapping"])
    for name in ("qkv", "k_cache", "v_cache"):
        np.testing.assert_array_equal(bits(fused[name]), bits(apart[name]), err_msg=name)
    # the numpy reference (rope in float64 there too; caches rounded by numpy's cast)
    call(reference.rope_kv_cache_write, want)
    np.testing.assert_allclose(fused["qkv"], want["qkv"], rtol=1e-6, atol=1e-6)
    for name in ("k_cache", "v_cache"):
        np.testing.assert_allclose(fused[name].astype(np.float32), want[name].astype(np.float32),
                                   rtol=1e-2 if cache_dtype != np.float32 else 1e-6, atol=1e-6)


def test_skipped_slots_still_rotate(isa, rng):
    c = make_case(rng, 4, 2, 1, 16, 16, 4, np.float32, skip_every=1)  # every slot -1
    before = copy_case(c)
    call(ops.rope_kv_cache_write, c)
    np.testing.assert_array_equal(c["k_cache"], before["k_cache"])
    np.testing.assert_array_equal(c["v_cache"], before["v_cache"])
    assert not np.array_equal(c["q"], before["q"])  # positions are random: rotated
    np.testing.assert_array_equal(c["v"], before["v"])


# ---- validation: ValueError naming the op and the argument, nothing rotated or written ----

@pytest.mark.parametrize("case,match", [
    ("position_high", r"rope_kv_cache_write: positions\[1\] = 64 is outside \[0, 64\)"),
    ("slot_high", r"rope_kv_cache_write: slot_mapping\[2\] = \d+ is outside the cache's"),
    ("slot_low", r"rope_kv_cache_write: slot_mapping\[0\] = -2 is outside"),
    ("k_head_dim", r"rope_kv_cache_write: k must have shape \[\*, \*, 16\]"),
    ("cache_dtype", r"rope_kv_cache_write: k_cache has unsupported dtype float64"),
    ("v_shape", r"rope_kv_cache_write: v must have shape"),
])
def test_rejects_and_changes_nothing(isa, rng, case, match):
    c = make_case(rng, 3, 2, 2, 16, 16, 4, np.float16)
    if case == "position_high":
        c["positions"][1] = 64
    elif case == "slot_high":
        c["slot_mapping"][2] = c["k_cache"].shape[0] * c["k_cache"].shape[1]
    elif case == "slot_low":
        c["slot_mapping"][0] = -2
    elif case == "k_head_dim":
        c["head_dim"] = 8
        match = r"rope_kv_cache_write: k must have shape \[\*, \*, head_dim 8\]"
    elif case == "cache_dtype":
        c["k_cache"] = c["k_cache"].astype(np.float64)
    elif case == "v_shape":
        c["v"] = c["v"][:2]
    before = {name: c[name].copy() for name in ("qkv", "k_cache", "v_cache")}
    with pytest.raises(ValueError, match=match):
        call(ops.rope_kv_cache_write, c)
    for name, was in before.items():  # q and k not rotated, nothing cached
        np.testing.assert_array_equal(c[name], was, err_msg=name)
