"""layer_norm (optionally of x + residual) against ops.reference, on every instruction set."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference

SIZES = st.sampled_from([1, 3, 17, 384, 769])
PARAM_DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


def make_rows(rng, num_tokens, hidden, row_pad, shift=0.0):
    """[num_tokens, hidden] float32, a column slice of a wider array when row_pad > 0."""
    base = rng.standard_normal((num_tokens, hidden + row_pad)) * 3 + shift
    return base.astype(np.float32)[:, :hidden]


@pytest.mark.parametrize("param_dtype", PARAM_DTYPES)
@given(num_tokens=SIZES, hidden=SIZES, row_pad=st.sampled_from([0, 5]),
       with_residual=st.booleans(), with_bias=st.booleans(),
       eps=st.sampled_from([1e-12, 1e-5, 0.1]), shift=st.sampled_from([0.0, 100.0]),
       seed=st.integers(0, 2**32 - 1))
def test_layer_norm_matches_reference(isa, param_dtype, num_tokens, hidden, row_pad,
                                      with_residual, with_bias, eps, shift, seed):
    rng = np.random.default_rng(seed)
    x = make_rows(rng, num_tokens, hidden, row_pad, shift)
    residual = make_rows(rng, num_tokens, hidden, row_pad) if with_residual else None
    weight = rng.standard_normal(hidden).astype(param_dtype)
    bias = rng.standard_normal(hidden).astype(param_dtype) if with_bias else None
    out = make_rows(rng, num_tokens, hidden, row_pad)
    want = np.empty((num_tokens, hidden), np.float64)
    x_before = x.copy()
    ops.layer_norm(x, weight, bias, eps, out=out, residual=residual)
    reference.layer_norm(x, weight, bias, eps, out=want, residual=residual)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("alias", ["x", "residual"])
def test_out_may_be_an_input(isa, rng, alias):
    x = make_rows(rng, 17, 384, 3)
    residual = make_rows(rng, 17, 384, 3)
    weight, bias = rng.standard_normal((2, 384)).astype(np.float32)
    want = reference.layer_norm(x, weight, bias, 1e-12, out=np.empty((17, 384)), residual=residual)
    out = x if alias == "x" else residual
    ops.layer_norm(x, weight, bias, 1e-12, out=out, residual=residual)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_constant_row_gives_bias_and_nan_stays_in_its_row(isa, rng):
    x = rng.standard_normal((3, 17)).astype(np.float32)
    x[0] = 5.0  # zero variance: (x - mean) is exactly 0
    x[1, 4] = np.nan
    bias = rng.standard_normal(17).astype(np.float32)
    out = np.zeros_like(x)
    ops.layer_norm(x, np.ones(17, np.float32), bias, 1e-5, out=out)
    np.testing.assert_array_equal(out[0], bias)
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    residual = np.zeros_like(x)
    residual[2, 0] = np.nan
    ops.layer_norm(np.ones_like(x), np.ones(17, np.float32), None, 1e-5, out=out,
                   residual=residual)
    assert np.isnan(out[2]).all() and np.isfinite(out[:2]).all()


# ---- validation: ValueError naming op and argument, output untouched ---------------

@pytest.mark.parametrize("case,match", [
    ("x_dtype", "layer_norm: x must be float32"),
    ("x_ndim", "layer_norm: x must have 2 dims"),
    ("x_inner_stride", "layer_norm: x must have a contiguous last dimension"),
    ("residual_shape", r"layer_norm: residual must have shape \[3, 8\], got float32 \[4, 8\]"),
    ("weight_shape", r"layer_norm: weight must have shape \[8\], got float16 \[9\]"),
    ("bias_dtype", "layer_norm: bias must be float32 or float16 or bfloat16, got int32"),
    ("out_shape", r"layer_norm: out must have shape \[3, 8\]"),
    ("out_readonly", "layer_norm: out must be a writeable array"),
    ("out_shifted", "layer_norm: out must be x itself or not overlap it"),
    ("eps", "layer_norm: eps must be a finite number >= 0"),
])
def test_layer_norm_rejects(rng, case, match):
    x = rng.standard_normal((3, 8)).astype(np.float32)
    residual, weight, bias = None, np.ones(8, np.float32), np.zeros(8, np.float32)
    out, eps = np.zeros((3, 8), np.float32), 1e-5
    if case == "x_dtype":
        x = x.astype(np.float16)
    elif case == "x_ndim":
        x = x.reshape(3, 2, 4)
    elif case == "x_inner_stride":
        x = np.repeat(x, 2, axis=1)[:, ::2]
    elif case == "residual_shape":
        residual = np.zeros((4, 8), np.float32)
    elif case == "weight_shape":
        weight = np.ones(9, np.float16)
    elif case == "bias_dtype":
        bias = bias.astype(np.int32)
    elif case == "out_shape":
        out = np.zeros((3, 9), np.float32)
    elif case == "out_readonly":
        out.flags.writeable = False
    elif case == "out_shifted":
        big = np.zeros((4, 8), np.float32)
        x, out = big[:3], big[1:]
    elif case == "eps":
        eps = -1.0
    before = out.copy()
    with pytest.raises(ValueError, match=match):
        ops.layer_norm(x, weight, bias, eps, out=out, residual=residual)
    np.testing.assert_array_equal(out, before)
