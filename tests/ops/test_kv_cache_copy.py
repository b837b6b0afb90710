"""kv_cache_copy against the numpy reference, on every instruction set, float32, bfloat16
and float16 caches."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference


BF16 = np.dtype(ml_dtypes.bfloat16)


def make_caches(rng, num_blocks, block_size, num_kv_heads, head_dim, dtype=np.float32):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (rng.standard_normal(shape).astype(np.float32).astype(dtype),
            rng.standard_normal(shape).astype(np.float32).astype(dtype))


def make_pairs(rng, num_blocks, num_pairs):
    """Distinct dsts, none of them a src; srcs may repeat (one block forked twice)."""
    ids = rng.permutation(num_blocks)
    dst = ids[:num_pairs]
    rest = ids[num_pairs:]
    src = rng.choice(rest, num_pairs) if num_pairs else rest[:0]
    return src.astype(np.int32), dst.astype(np.int32)


@given(num_pairs=st.integers(0, 9), extra_blocks=st.integers(1, 6),
       block_size=st.sampled_from([1, 3, 16]), num_kv_heads=st.sampled_from([1, 2, 3]),
       head_dim=st.sampled_from([1, 3, 17, 64]), strided_ids=st.booleans(),
       dtype=st.sampled_from([np.float32, BF16, np.float16]), seed=st.integers(0, 2**32 - 1))
def test_matches_reference(isa, num_pairs, extra_blocks, block_size, num_kv_heads, head_dim,
                           strided_ids, dtype, seed):
    rng = np.random.default_rng(seed)
    num_blocks = num_pairs + extra_blocks
    k_cache, v_cache = make_caches(rng, num_blocks, block_size, num_kv_heads, head_dim, dtype)
    src, dst = make_pairs(rng, num_blocks, num_pairs)
    if strided_ids:  # ids read through a stride, as a column of a [n, 2] array gives
        pairs = np.stack([src, dst], axis=1)
        src, dst = pairs[:, 0], pairs[:, 1]
    want_k, want_v = k_cache.copy(), v_cache.copy()
    reference.kv_cache_copy(want_k, want_v, src, dst)
    ops.kv_cache_copy(k_cache, v_cache, src, dst)
    np.testing.assert_array_equal(k_cache.view(np.uint8), want_k.view(np.uint8))
    np.testing.assert_array_equal(v_cache.view(np.uint8), want_v.view(np.uint8))


def test_copies_the_whole_block_and_nothing_else(rng):
    k_cache, v_cache = make_caches(rng, 5, 4, 2, 8)
    before_k, before_v = k_cache.copy(), v_cache.copy()
    ops.kv_cache_copy(k_cache, v_cache, np.array([3, 3], np.int32), np.array([0, 4], np.int32))
    for b in (0, 4):
        np.testing.assert_array_equal(k_cache[b], before_k[3])
        np.testing.assert_array_equal(v_cache[b], before_v[3])
    np.testing.assert_array_equal(k_cache[1:4], before_k[1:4])
    np.testing.assert_array_equal(v_cache[1:4], before_v[1:4])


# ---- errors: a ValueError naming the op and the argument; nothing written --------------

def _bad(name, k_cache, v_cache, src, dst):
    if name == "k_cache dtype":
        k_cache = k_cache.astype(np.float16)
    elif name == "v_cache dtype unlike k_cache":
        v_cache = v_cache.astype(BF16)
    elif name == "k_cache ndim":
        k_cache = k_cache.reshape(k_cache.shape[0], -1)
    elif name == "v_cache contiguous":
        v_cache = np.concatenate([v_cache, v_cache], axis=3)[..., ::2]
    elif name == "v_cache shape":
        v_cache = v_cache[:-1]
    elif name == "v_cache readonly":
        v_cache.flags.writeable = False
    elif name == "same array":
        v_cache = k_cache
    elif name == "src dtype":
        src = src.astype(np.int64)
    elif name == "dst length":
        dst = dst[:-1]
    elif name == "src high":
        src[1] = 8
    elif name == "dst negative":
        dst[2] = -1
    elif name == "dst repeats":
        dst[2] = dst[0]
    elif name == "dst is a src":
        dst[1] = src[0]
    return k_cache, v_cache, src, dst


ERRORS = {
    "k_cache dtype": "k_cache", "k_cache ndim": "k_cache", "v_cache contiguous": "v_cache",
    "v_cache dtype unlike k_cache": "v_cache must have k_cache's dtype float32, got bfloat16",
    "v_cache shape": "v_cache", "v_cache readonly": "v_cache", "same array": "different arrays",
    "src dtype": "src_blocks", "dst length": "dst_blocks",
    "src high": r"src_blocks\[1\] = 8 is outside the cache's 8 blocks",
    "dst negative": r"dst_blocks\[2\] = -1 is outside",
    "dst repeats": "dst_blocks repeats block", "dst is a src": "both in src_blocks and in dst_blocks",
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_rejects(case, rng):
    k_cache, v_cache = make_caches(rng, 8, 4, 2, 4)
    src, dst = np.array([0, 1, 1], np.int32), np.array([5, 6, 7], np.int32)
    k_cache, v_cache, src, dst = _bad(case, k_cache, v_cache, src, dst)
    before_k, before_v = k_cache.copy(), v_cache.copy()
    with pytest.raises(ValueError, match=r"^kv_cache_copy: .*" + ERRORS[case]):
        ops.kv_cache_copy(k_cache, v_cache, src, dst)
    np.testing.assert_array_equal(k_cache, before_k)
    np.testing.assert_array_equal(v_cache, before_v)


def test_rejects_non_numpy(rng):
    k_cache, v_cache = make_caches(rng, 4, 2, 1, 2)
    with pytest.raises(TypeError):
        ops.kv_cache_copy(k_cache, v_cache, [0], np.array([1], np.int32))
