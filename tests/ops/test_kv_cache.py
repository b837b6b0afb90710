"""kv_cache_write against the numpy reference, on every instruction set."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference


def make_case(rng, num_tokens, num_kv_heads, head_dim, num_blocks, block_size, skip_every=0):
    k = rng.standard_normal((num_tokens, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((num_tokens, num_kv_heads, head_dim)).astype(np.float32)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = rng.standard_normal(cache_shape).astype(np.float32)
    v_cache = rng.standard_normal(cache_shape).astype(np.float32)
    slots = rng.permutation(num_blocks * block_size)[:num_tokens].astype(np.int32)
    if skip_every:
        slots[::skip_every] = -1
    return k, v, k_cache, v_cache, slots


@given(num_tokens=st.integers(0, 40), num_kv_heads=st.sampled_from([1, 2, 3]),
       head_dim=st.sampled_from([1, 3, 17, 64, 128]), block_size=st.sampled_from([1, 2, 16, 32]),
       skip_every=st.sampled_from([0, 2, 3]), strided=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_matches_reference(isa, num_tokens, num_kv_heads, head_dim, block_size, skip_every,
                           strided, seed):
    rng = np.random.default_rng(seed)
    num_blocks = -(-num_tokens // block_size) + 2
    k, v, k_cache, v_cache, slots = make_case(rng, num_tokens, num_kv_heads, head_dim,
                                              num_blocks, block_size, skip_every)
    if strided:  # token and head strides that are not the packed ones, as slices of qkv give
        big = rng.standard_normal((num_tokens, 2 * num_kv_heads + 1, head_dim)).astype(np.float32)
        big[:, :num_kv_heads], big[:, num_kv_heads + 1:] = k, v
        k, v = big[:, :num_kv_heads], big[:, num_kv_heads + 1:]
    want_k, want_v = k_cache.copy(), v_cache.copy()
    reference.kv_cache_write(k, v, want_k, want_v, slots)
    ops.kv_cache_write(k, v, k_cache, v_cache, slots)
    np.testing.assert_array_equal(k_cache, want_k)
    np.testing.assert_array_equal(v_cache, want_v)


def test_last_dim_strided(isa, rng):
    k, v, k_cache, v_cache, slots = make_case(rng, 5, 2, 8, 4, 4)
    k2 = np.repeat(k, 2, axis=2)[:, :, ::2]
    want_k, want_v = k_cache.copy(), v_cache.copy()
    reference.kv_cache_write(k2, v, want_k, want_v, slots)
    ops.kv_cache_write(k2, v, k_cache, v_cache, slots)
    np.testing.assert_array_equal(k_cache, want_k)
    np.testing.assert_array_equal(v_cache, want_v)


# ---- errors: a ValueError naming the op and the argument; nothing written --------------

def _bad(name):
    def mutate(args):
        k, v, k_cache, v_cache, slots = args
        if name == "k dtype":
            k = k.astype(np.float64)
        elif name == "k ndim":
            k = k.reshape(k.shape[0], -1)
        elif name == "v shape":
            v = v[:, :1]
        elif name == "k_cache dtype":
            k_cache = k_cache.astype(np.float16)
        elif name == "k_cache contiguous":
            k_cache = np.concatenate([k_cache, k_cache], axis=3)[..., ::2]
        elif name == "v_cache shape":
            v_cache = v_cache[:-1]
        elif name == "v_cache readonly":
            v_cache.flags.writeable = False
        elif name == "slot_mapping dtype":
            slots = slots.astype(np.int64)
        elif name == "slot_mapping length":
            slots = slots[:-1]
        elif name == "slot_mapping high":
            slots[3] = 900
        elif name == "slot_mapping negative":
            slots[2] = -2
        return k, v, k_cache, v_cache, slots
    return mutate


ERRORS = {
    "k dtype": "k", "k ndim": "k", "v shape": "v", "k_cache dtype": "k_cache",
    "k_cache contiguous": "k_cache", "v_cache shape": "v_cache", "v_cache readonly": "v_cache",
    "slot_mapping dtype": "slot_mapping", "slot_mapping length": "slot_mapping",
    "slot_mapping high": r"slot_mapping\[3\] = 900 is outside the cache's 512 slots",
    "slot_mapping negative": r"slot_mapping\[2\] = -2",
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_rejects(case, rng):
    args = make_case(rng, 6, 2, 4, 32, 16)
    k, v, k_cache, v_cache, slots = _bad(case)(args)
    before_k, before_v = k_cache.copy(), v_cache.copy()
    with pytest.raises(ValueError, match=r"^kv_cache_write: .*" + ERRORS[case]):
        ops.kv_cache_write(k, v, k_cache, v_cache, slots)
    np.testing.assert_array_equal(k_cache, before_k)
    np.testing.assert_array_equal(v_cache, before_v)
