"""matmul on a PackedWeight: the same bits as on the rows, on every instruction set and
weight dtype, within the reference's tolerance, reading nothing past the packed array."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import _C, ops
from engine.ops import PackedWeight, reference
from quant_blocks import GuardedBuffer
from test_matmul import K_SIZES, N_SIZES, RTOL, WEIGHT_DTYPES, rows_of


def matmul_both(x, w, bias, pad_out, rng):
    """out from the rows and from the packed weight (into padded views of out)."""
    outs = []
    for weight in (w, PackedWeight(w)):
        out = rows_of(rng, x.shape[0], w.shape[0], pad_out)
        base = out.base.copy()
        ops.matmul(x, weight, bias, out=out)
        offset = pad_out // 2  # nothing outside the view was touched
        np.testing.assert_array_equal(out.base[:, :offset], base[:, :offset])
        np.testing.assert_array_equal(out.base[:, offset + w.shape[0]:],
                                      base[:, offset + w.shape[0]:])
        outs.append(out)
    return outs


@pytest.mark.parametrize("w_dtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
@given(num_tokens=st.sampled_from([1, 1, 2, 3, 4, 5, 7, 12, 13, 19]),  # >= 12: panels
       in_features=st.sampled_from(K_SIZES), out_features=st.sampled_from(N_SIZES),
       has_bias=st.booleans(), pad_x=st.sampled_from([0, 3]), pad_out=st.sampled_from([0, 5]),
       seed=st.integers(0, 2**32 - 1))
def test_same_bits_as_the_rows_and_within_the_reference(isa, w_dtype, num_tokens, in_features,
                                                       out_features, has_bias, pad_x, pad_out,
                                                       seed):
    rng = np.random.default_rng(seed)
    x = rows_of(rng, num_tokens, in_features, pad_x)
    w = rng.standard_normal((out_features, in_features)).astype(w_dtype)
    bias = rng.standard_normal(out_features).astype(np.float32) if has_bias else None
    from_rows, from_packed = matmul_both(x, w, bias, pad_out, rng)
    np.testing.assert_array_equal(from_packed, from_rows)

    want = np.empty((num_tokens, out_features), np.float64)
    reference.matmul(x, PackedWeight(w).unpack(), bias, out=want)
    scale = np.abs(x).astype(np.float64) @ np.abs(w.astype(np.float64)).T
    if bias is not None:
        scale += np.abs(bias)
    assert np.all(np.abs(from_packed - want) <= RTOL[np.dtype(w_dtype)] * scale + 1e-30)


@pytest.mark.parametrize("w_dtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(1, 2048, 3072), (1, 8192, 64), (3, 576, 1536),
                                   (131, 1100, 67)])  # decode, batch, > 128-token block
def test_model_shapes(isa, rng, w_dtype, shape):
    num_tokens, in_features, out_features = shape
    x = rng.standard_normal((num_tokens, in_features)).astype(np.float32)
    w = rng.standard_normal((out_features, in_features)).astype(w_dtype)
    from_rows, from_packed = matmul_both(x, w, None, 0, rng)
    np.testing.assert_array_equal(from_packed, from_rows)


@given(out_features=st.integers(1, 40), in_features=st.integers(1, 70),
       seed=st.integers(0, 2**16))
def test_layout_round_trip_and_rows(out_features, in_features, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_features, in_features)).astype(np.float16)
    p = PackedWeight(w)
    assert p.shape == w.shape and p.dtype == w.dtype
    assert p.data.shape == (-(-out_features // 8), -(-in_features // 16), 8, 16)
    n, k = rng.integers(0, out_features), rng.integers(0, in_features)
    assert p.data[n // 8, k // 16, n % 8, k % 16] == w[n, k]
    np.testing.assert_array_equal(p.unpack(), w)
    ids = rng.integers(0, out_features, 7)
    np.testing.assert_array_equal(p.take(ids), w[ids])
    padded = p.data.transpose(0, 2, 1, 3).reshape(p.data.shape[0] * 8, -1)
    padded[:out_features, :in_features] = 0
    assert not padded.any()  # the padding is zeros


@pytest.mark.parametrize("out_features,in_features", [(8, 16), (13, 37), (3, 2100)])
@pytest.mark.parametrize("num_tokens", [1, 3, 12])
def test_reads_nothing_past_the_packed_weight(isa, rng, out_features, in_features, num_tokens):
    """The packed array ends where an inaccessible page starts: one byte too far would crash."""
    w = rng.standard_normal((out_features, in_features)).astype(np.float16)
    p = PackedWeight(w)
    buf = GuardedBuffer(p.data.nbytes)
    guarded = buf.holding(p.data)
    x = rng.standard_normal((num_tokens, in_features)).astype(np.float32)
    out = np.empty((num_tokens, out_features), np.float32)
    _C.matmul_packed(x, guarded, out_features, None, out)
    want = np.empty_like(out)
    ops.matmul(x, w, out=want)
    np.testing.assert_array_equal(out, want)


def test_embedding_gathers_packed_rows(rng):
    w = rng.standard_normal((21, 40)).astype(ml_dtypes.bfloat16)
    ids = np.array([0, 20, 7, 7, 8], np.int32)
    out = np.empty((5, 40), np.float32)
    ops.embedding(ids, PackedWeight(w), out=out)
    np.testing.assert_array_equal(out, w[ids].astype(np.float32))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 21\)"):
        ops.embedding(np.array([21], np.int32), PackedWeight(w), out=out[:1])
    with pytest.raises(ValueError, match=r"out must be float32 \[5, 40\]"):
        ops.embedding(ids, PackedWeight(w), out=np.empty((5, 41), np.float32))


def test_rejects_bad_arguments(rng):
    with pytest.raises(ValueError, match="2-D float32, float16 or bfloat16"):
        PackedWeight(np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="2-D float32, float16 or bfloat16"):
        PackedWeight(np.zeros(4, np.float32))
    p = PackedWeight(rng.standard_normal((9, 20)).astype(np.float32))
    x, out = np.zeros((2, 20), np.float32), np.zeros((2, 9), np.float32)
    with pytest.raises(ValueError, match=r"w must be .* \[2, 2, 8, 16\] \(9 rows of 20 packed\)"):
        _C.matmul_packed(x, p.data[:, :1], 9, None, out)
    with pytest.raises(ValueError, match=r"\[1, 2, 8, 16\] \(8 rows"):
        _C.matmul_packed(x, p.data, 8, None, out[:, :8])  # 9 rows' groups for 8
    with pytest.raises(ValueError, match="x must be float32"):
        _C.matmul_packed(np.zeros(20, np.float32), p.data, 9, None, out)
    with pytest.raises(ValueError, match=r"out must be float32 \[2, 9\]"):
        _C.matmul_packed(x, p.data, 9, None, np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="must be contiguous"):
        _C.matmul_packed(x, np.asfortranarray(p.data), 9, None, out)
