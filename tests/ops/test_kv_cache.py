"""kv_cache_write against the numpy reference, on every instruction set, into float32,
bfloat16 and float16 caches (16-bit values must be numpy's round-to-nearest-even cast, bit
for bit)."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference


BF16 = np.dtype(ml_dtypes.bfloat16)


def assert_bits_equal(got, want):
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def make_case(rng, num_tokens, num_kv_heads, head_dim, num_blocks, block_size, skip_every=0,
              cache_dtype=np.float32):
    k = rng.standard_normal((num_tokens, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((num_tokens, num_kv_heads, head_dim)).astype(np.float32)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = rng.standard_normal(cache_shape).astype(np.float32).astype(cache_dtype)
    v_cache = rng.standard_normal(cache_shape).astype(np.float32).astype(cache_dtype)
    slots = rng.permutation(num_blocks * block_size)[:num_tokens].astype(np.int32)
    if skip_every:
        slots[::skip_every] = -1
    return k, v, k_cache, v_cache, slots


@given(num_tokens=st.integers(0, 40), num_kv_heads=st.sampled_from([1, 2, 3]),
       head_dim=st.sampled_from([1, 3, 17, 64, 128]), block_size=st.sampled_from([1, 2, 16, 32]),
       skip_every=st.sampled_from([0, 2, 3]), strided=st.booleans(),
       cache_dtype=st.sampled_from([np.float32, BF16, np.float16]), seed=st.integers(0, 2**32 - 1))
def test_matches_reference(isa, num_tokens, num_kv_heads, head_dim, block_size, skip_every,
                           strided, cache_dtype, seed):
    rng = np.random.default_rng(seed)
    num_blocks = -(-num_tokens // block_size) + 2
    k, v, k_cache, v_cache, slots = make_case(rng, num_tokens, num_kv_heads, head_dim,
                                              num_blocks, block_size, skip_every, cache_dtype)
    if strided:  # token and head strides that are not the packed ones, as slices of qkv give
        big = rng.standard_normal((num_tokens, 2 * num_kv_heads + 1, head_dim)).astype(np.float32)
        big[:, :num_kv_heads], big[:, num_kv_heads + 1:] = k, v
        k, v = big[:, :num_kv_heads], big[:, num_kv_heads + 1:]
    want_k, want_v = k_cache.copy(), v_cache.copy()
    reference.kv_cache_write(k, v, want_k, want_v, slots)
    ops.kv_cache_write(k, v, k_cache, v_cache, slots)
    assert_bits_equal(k_cache, want_k)
    assert_bits_equal(v_cache, want_v)


EDGES = {  # ties between two 16-bit numbers, overflow, subnormals, zeros, inf, NaN
    BF16: [1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 3.0e38, -3.4e38, 1e-40, -1e-45],
    np.dtype(np.float16): [1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, -(1.0 + 2.0**-11), 65504.0,
                           65519.0, 65520.0, -1e6, 2.0**-25, 3 * 2.0**-26, 2.0**-24 * 1.5,
                           2.0**-24 * 2.5, 2.0**-15 * (1 + 2.0**-11), 6.1e-5, 1e-8, 1e-40],
}


@pytest.mark.parametrize("dtype", list(EDGES))
def test_16_bit_caches_round_to_nearest_even(isa, rng, dtype):
    """Edge values as numpy's cast gives them (NaN stays NaN), and random ones over the
    whole range of each format."""
    wide = rng.standard_normal(200) * np.exp2(rng.uniform(-30, 20, 200))
    vals = np.array(EDGES[dtype] + [0.0, -0.0, np.inf, -np.inf, np.nan] + list(wide), np.float32)
    k = vals.reshape(1, 1, -1)
    k_cache, v_cache = (np.zeros((1, 1, 1, vals.size), dtype) for _ in range(2))
    ops.kv_cache_write(k, k, k_cache, v_cache, np.array([0], np.int32))
    with np.errstate(over="ignore"):  # overflow to inf is the expected result
        want = vals.astype(dtype)
    finite = ~np.isnan(vals)
    assert_bits_equal(k_cache.reshape(-1)[finite], want[finite])
    assert np.isnan(k_cache.reshape(-1).astype(np.float32)[~finite]).all()
    assert_bits_equal(v_cache, k_cache)


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
        elif name == "v_cache dtype unlike k_cache":
            v_cache = v_cache.astype(BF16)
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
    "v_cache dtype unlike k_cache": "v_cache must have k_cache's dtype float32, got bfloat16",
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
