"""CUDA kv_cache_write and kv_cache_copy against ops.reference, f32 and bf16 caches.

The GPU skips slots and block ids that are out of range (the host cannot see device
values); the CPU op rejects them. bf16 caches must equal numpy's round-to-nearest-even
assignment bit for bit.
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


def assert_bits_equal(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def make_caches(rng, num_blocks, block_size, num_kv_heads, head_dim, dtype):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype))


# ---- kv_cache_write -----------------------------------------------------------------

@settings(deadline=None, max_examples=40)
@given(num_tokens=st.sampled_from([1, 3, 17, 40, 769]), num_kv_heads=st.sampled_from([1, 2, 3, 8]),
       head_dim=st.sampled_from([1, 3, 17, 64, 128]), block_size=st.sampled_from([1, 2, 16, 32]),
       skip_every=st.sampled_from([0, 2, 3]), strided=st.booleans(),
       dtype=st.sampled_from(CACHE_DTYPES), seed=st.integers(0, 2**32 - 1))
def test_write_matches_reference(num_tokens, num_kv_heads, head_dim, block_size, skip_every,
                                 strided, dtype, seed):
    rng = np.random.default_rng(seed)
    num_blocks = -(-num_tokens // block_size) + 2
    k_cache, v_cache = make_caches(rng, num_blocks, block_size, num_kv_heads, head_dim, dtype)
    slots = rng.permutation(num_blocks * block_size)[:num_tokens].astype(np.int32)
    if skip_every:
        slots[::skip_every] = -1
    # k, v: slices of one fused row (token and head strides that are not the packed ones)
    big = rng.standard_normal((num_tokens, 2 * num_kv_heads + 1, head_dim)).astype(np.float32)
    k, v = big[:, :num_kv_heads], big[:, num_kv_heads + 1:]
    big_d = ops.to_device(big)
    if strided:
        k_d, v_d = big_d[:, :num_kv_heads], big_d[:, num_kv_heads + 1:]
    else:
        k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
        k_d, v_d = ops.to_device(k), ops.to_device(v)
    want_k, want_v = k_cache.copy(), v_cache.copy()
    reference.kv_cache_write(k, v, want_k, want_v, slots)
    k_cache_d, v_cache_d = ops.to_device(k_cache), ops.to_device(v_cache)
    ops.kv_cache_write(k_d, v_d, k_cache_d, v_cache_d, ops.to_device(slots))
    assert_bits_equal(ops.to_host(k_cache_d), want_k)
    assert_bits_equal(ops.to_host(v_cache_d), want_v)


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
def test_write_skips_out_of_range_slots(rng, dtype):
    k_cache, v_cache = make_caches(rng, 4, 16, 2, 64, dtype)
    k = rng.standard_normal((5, 2, 64)).astype(np.float32)
    v = rng.standard_normal((5, 2, 64)).astype(np.float32)
    slots = np.array([3, 64, -7, 1 << 30, 63], np.int32)  # 64 slots: only 3 and 63 are real
    want_k, want_v = k_cache.copy(), v_cache.copy()
    reference.kv_cache_write(k, v, want_k, want_v, np.where(slots < 64, slots, -1).clip(-1))
    k_cache_d, v_cache_d = ops.to_device(k_cache), ops.to_device(v_cache)
    ops.kv_cache_write(ops.to_device(k), ops.to_device(v), k_cache_d, v_cache_d,
                       ops.to_device(slots))
    assert_bits_equal(ops.to_host(k_cache_d), want_k)
    assert_bits_equal(ops.to_host(v_cache_d), want_v)


def test_write_rounds_to_nearest_even(rng):
    """Values exactly between two bf16 numbers, and NaN / inf, as numpy's cast gives them."""
    k = np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), np.inf, -np.inf, np.nan,
                  3.0e38, 1e-40], np.float32).reshape(1, 1, 8)
    k_cache, v_cache = make_caches(rng, 1, 1, 1, 8, BF16)
    want_k, want_v = k_cache.copy(), v_cache.copy()
    reference.kv_cache_write(k, k, want_k, want_v, np.array([0], np.int32))
    k_cache_d, v_cache_d = ops.to_device(k_cache), ops.to_device(v_cache)
    ops.kv_cache_write(ops.to_device(k), ops.to_device(k), k_cache_d, v_cache_d,
                       ops.to_device(np.array([0], np.int32)))
    got = ops.to_host(k_cache_d)
    finite = np.isfinite(want_k.astype(np.float32))
    assert_bits_equal(got[finite], want_k[finite])
    assert np.isnan(got.astype(np.float32)[~finite & np.isnan(want_k.astype(np.float32))]).all()
    assert (got.astype(np.float32)[np.isinf(want_k.astype(np.float32))]
            == want_k.astype(np.float32)[np.isinf(want_k.astype(np.float32))]).all()


def test_write_empty(rng):
    k_cache, v_cache = make_caches(rng, 2, 4, 2, 8, np.float32)
    k_cache_d, v_cache_d = ops.to_device(k_cache), ops.to_device(v_cache)
    empty = ops.to_device(np.zeros((0, 2, 8), np.float32))
    ops.kv_cache_write(empty, empty, k_cache_d, v_cache_d, ops.to_device(np.zeros(0, np.int32)))
    assert_bits_equal(ops.to_host(k_cache_d), k_cache)


WRITE_ERRORS = {
    "k dtype": "k", "v shape": "v", "k_cache dtype": "k_cache", "v_cache dtype": "v_cache",
    "v_cache shape": "v_cache", "slot_mapping dtype": "slot_mapping",
    "slot_mapping length": "slot_mapping",
}


@pytest.mark.parametrize("case", sorted(WRITE_ERRORS))
def test_write_rejects(case, rng):
    k = rng.standard_normal((6, 2, 4)).astype(np.float32)
    v = k.copy()
    k_cache, v_cache = make_caches(rng, 32, 16, 2, 4, np.float32)
    slots = np.arange(6, dtype=np.int32)
    if case == "k dtype":
        k = k.astype(np.float16)
    elif case == "v shape":
        v = v[:, :1]
    elif case == "k_cache dtype":
        k_cache = k_cache.astype(np.float16)
    elif case == "v_cache dtype":
        v_cache = v_cache.astype(BF16)
    elif case == "v_cache shape":
        v_cache = v_cache[:-1]
    elif case == "slot_mapping dtype":
        slots = slots.astype(np.int64)
    elif case == "slot_mapping length":
        slots = slots[:-1]
    k_cache_d = ops.to_device(k_cache)
    with pytest.raises(ValueError, match=r"^kv_cache_write: .*" + WRITE_ERRORS[case]):
        ops.kv_cache_write(ops.to_device(k), ops.to_device(v), k_cache_d, ops.to_device(v_cache),
                           ops.to_device(slots))
    assert_bits_equal(ops.to_host(k_cache_d), k_cache)


# ---- kv_cache_copy ------------------------------------------------------------------

def make_pairs(rng, num_blocks, num_pairs):
    """Distinct dsts, none of them a src; srcs may repeat (one block forked twice)."""
    ids = rng.permutation(num_blocks)
    dst = ids[:num_pairs]
    src = rng.choice(ids[num_pairs:], num_pairs) if num_pairs else ids[:0]
    return src.astype(np.int32), dst.astype(np.int32)


@settings(deadline=None, max_examples=40)
@given(num_pairs=st.integers(0, 9), extra_blocks=st.integers(1, 6),
       block_size=st.sampled_from([1, 3, 16]), num_kv_heads=st.sampled_from([1, 2, 3]),
       head_dim=st.sampled_from([1, 3, 17, 64, 128]), strided_ids=st.booleans(),
       dtype=st.sampled_from(CACHE_DTYPES), seed=st.integers(0, 2**32 - 1))
def test_copy_matches_reference(num_pairs, extra_blocks, block_size, num_kv_heads, head_dim,
                                strided_ids, dtype, seed):
    rng = np.random.default_rng(seed)
    num_blocks = num_pairs + extra_blocks
    k_cache, v_cache = make_caches(rng, num_blocks, block_size, num_kv_heads, head_dim, dtype)
    src, dst = make_pairs(rng, num_blocks, num_pairs)
    if strided_ids:  # ids read through a stride: columns of a [num_pairs, 2] array
        pairs_d = ops.to_device(np.stack([src, dst], axis=1))
        src_d, dst_d = pairs_d[:, 0], pairs_d[:, 1]
    else:
        src_d, dst_d = ops.to_device(src), ops.to_device(dst)
    want_k, want_v = k_cache.copy(), v_cache.copy()
    reference.kv_cache_copy(want_k, want_v, src, dst)
    k_cache_d, v_cache_d = ops.to_device(k_cache), ops.to_device(v_cache)
    ops.kv_cache_copy(k_cache_d, v_cache_d, src_d, dst_d)
    assert_bits_equal(ops.to_host(k_cache_d), want_k)
    assert_bits_equal(ops.to_host(v_cache_d), want_v)


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
def test_copy_big_blocks_and_bad_ids(rng, dtype):
    """Blocks of 32 x 8 x 128 (many chunks per pair); pairs with an id out of range skip."""
    k_cache, v_cache = make_caches(rng, 6, 32, 8, 128, dtype)
    src = np.array([5, 1, 99, 2, -1], np.int32)
    dst = np.array([0, 3, 4, -2, 1 << 30], np.int32)
    want_k, want_v = k_cache.copy(), v_cache.copy()
    reference.kv_cache_copy(want_k, want_v, src[:2], dst[:2])
    k_cache_d, v_cache_d = ops.to_device(k_cache), ops.to_device(v_cache)
    ops.kv_cache_copy(k_cache_d, v_cache_d, ops.to_device(src), ops.to_device(dst))
    assert_bits_equal(ops.to_host(k_cache_d), want_k)
    assert_bits_equal(ops.to_host(v_cache_d), want_v)


def test_copy_unaligned_cache_view(rng):
    """A cache that starts 4 bytes past an allocation: the 4-byte path (f32), 2-byte (bf16)."""
    for dtype in CACHE_DTYPES:
        shape = (5, 3, 1, 3)
        k_cache, v_cache = make_caches(rng, 5, 3, 1, 3, dtype)
        k_big = ops.to_device(np.concatenate([np.zeros(1, dtype), k_cache.ravel()]))
        v_big = ops.to_device(np.concatenate([np.zeros(1, dtype), v_cache.ravel()]))
        k_d, v_d = k_big[1:].reshape(*shape), v_big[1:].reshape(*shape)
        want_k, want_v = k_cache.copy(), v_cache.copy()
        src, dst = np.array([0, 0], np.int32), np.array([3, 4], np.int32)
        reference.kv_cache_copy(want_k, want_v, src, dst)
        ops.kv_cache_copy(k_d, v_d, ops.to_device(src), ops.to_device(dst))
        assert_bits_equal(ops.to_host(k_d), want_k)
        assert_bits_equal(ops.to_host(v_d), want_v)


COPY_ERRORS = {"k_cache dtype": "k_cache", "v_cache shape": "v_cache",
               "v_cache dtype": "v_cache", "src_blocks dtype": "src_blocks",
               "dst_blocks length": "dst_blocks"}


@pytest.mark.parametrize("case", sorted(COPY_ERRORS))
def test_copy_rejects(case, rng):
    k_cache, v_cache = make_caches(rng, 5, 4, 2, 8, np.float32)
    src, dst = np.array([1, 2], np.int32), np.array([3, 4], np.int32)
    if case == "k_cache dtype":
        k_cache = k_cache.astype(np.float16)
    elif case == "v_cache shape":
        v_cache = v_cache[:-1]
    elif case == "v_cache dtype":
        v_cache = v_cache.astype(BF16)
    elif case == "src_blocks dtype":
        src = src.astype(np.int64)
    elif case == "dst_blocks length":
        dst = dst[:1]
    with pytest.raises(ValueError, match=r"^kv_cache_copy: .*" + COPY_ERRORS[case]):
        ops.kv_cache_copy(ops.to_device(k_cache), ops.to_device(v_cache), ops.to_device(src),
                          ops.to_device(dst))
