"""rms_norm and fused_add_rms_norm against ops.reference, on every instruction set."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference

SIZES = st.sampled_from([1, 3, 17, 769])
WEIGHT_DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


def make_rows(rng, num_tokens, hidden, row_pad):
    """[num_tokens, hidden] float32, a column slice of a wider array when row_pad > 0."""
    base = rng.standard_normal((num_tokens, hidden + row_pad)).astype(np.float32) * 3
    return base[:, :hidden]


@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES)
@given(num_tokens=SIZES, hidden=SIZES, row_pad=st.sampled_from([0, 5]),
       eps=st.sampled_from([1e-6, 1e-5, 0.1]), seed=st.integers(0, 2**32 - 1))
def test_rms_norm_matches_reference(isa, weight_dtype, num_tokens, hidden, row_pad, eps, seed):
    rng = np.random.default_rng(seed)
    x = make_rows(rng, num_tokens, hidden, row_pad)
    weight = rng.standard_normal(hidden).astype(weight_dtype)
    out = make_rows(rng, num_tokens, hidden, row_pad)
    want = np.empty((num_tokens, hidden), np.float32)
    ops.rms_norm(x, weight, eps, out=out)
    reference.rms_norm(x, weight, eps, out=want)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES)
@given(num_tokens=SIZES, hidden=SIZES, row_pad=st.sampled_from([0, 3]),
       seed=st.integers(0, 2**32 - 1))
def test_fused_add_rms_norm_matches_reference(isa, weight_dtype, num_tokens, hidden, row_pad, seed):
    rng = np.random.default_rng(seed)
    x = make_rows(rng, num_tokens, hidden, row_pad)
    residual = make_rows(rng, num_tokens, hidden, row_pad)
    weight = rng.standard_normal(hidden).astype(weight_dtype)
    want_x, want_residual = x.copy(), residual.copy()
    ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    reference.fused_add_rms_norm(want_x, want_residual, weight, 1e-6)
    np.testing.assert_allclose(residual, want_residual, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x, want_x, rtol=1e-6, atol=1e-6)


def test_in_place_and_large_values(isa, rng):
    x = (rng.standard_normal((3, 17)) * 1e20).astype(np.float32)  # x**2 overflows float32
    weight = np.ones(17, np.float32)
    want = reference.rms_norm(x, weight, 1e-6, out=np.empty_like(x))
    ops.rms_norm(x, weight, 1e-6, out=x)
    np.testing.assert_allclose(x, want, rtol=1e-6)


def test_nan_stays_in_its_row(isa, rng):
    x = rng.standard_normal((3, 17)).astype(np.float32)
    x[1, 4] = np.nan
    out = np.zeros_like(x)
    ops.rms_norm(x, np.ones(17, np.float32), 1e-6, out=out)
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    residual = np.zeros_like(x)
    ops.fused_add_rms_norm(x, residual, np.ones(17, np.float32), 1e-6)
    assert np.isnan(x[1]).all() and np.isfinite(x[[0, 2]]).all()


# ---- validation: ValueError naming op and argument, output untouched ---------------

def _args(rng):
    return (rng.standard_normal((3, 8)).astype(np.float32), np.ones(8, np.float32),
            np.zeros((3, 8), np.float32))


@pytest.mark.parametrize("case,match", [
    ("x_dtype", "rms_norm: x must be float32"),
    ("x_ndim", "rms_norm: x must have 2 dims"),
    ("x_inner_stride", "rms_norm: x must have a contiguous last dimension"),
    ("weight_dtype", "rms_norm: weight must be float32 or float16 or bfloat16, got int32"),
    ("weight_shape", r"rms_norm: weight must have shape \[8\], got float16 \[9\]"),
    ("out_dtype", "rms_norm: out must be float32"),
    ("out_shape", r"rms_norm: out must have shape \[3, 8\]"),
    ("out_readonly", "rms_norm: out must be a writeable array"),
    ("eps", "rms_norm: eps must be"),
])
def test_rms_norm_rejects(rng, case, match):
    x, weight, out = _args(rng)
    eps = 1e-6
    if case == "x_dtype":
        x = x.astype(np.float16)
    elif case == "x_ndim":
        x = x.reshape(3, 2, 4)
    elif case == "x_inner_stride":
        x = np.repeat(x, 2, axis=1)[:, ::2]
    elif case == "weight_dtype":
        weight = weight.astype(np.int32)
    elif case == "weight_shape":
        weight = np.ones(9, np.float16)
    elif case == "out_dtype":
        out = out.astype(np.float16)
    elif case == "out_shape":
        out = np.zeros((3, 9), np.float32)
    elif case == "out_readonly":
        out.flags.writeable = False
    elif case == "eps":
        eps = -1.0
    before = out.copy()
    with pytest.raises(ValueError, match=match):
        ops.rms_norm(x, weight, eps, out=out)
    np.testing.assert_array_equal(out, before)


@pytest.mark.parametrize("case,match", [
    ("residual_shape", r"fused_add_rms_norm: residual must have shape \[3, 8\]"),
    ("residual_dtype", "fused_add_rms_norm: residual must be float32"),
    ("weight_shape", r"fused_add_rms_norm: weight must have shape \[8\]"),
    ("x_readonly", "fused_add_rms_norm: x must be a writeable array"),
])
def test_fused_add_rms_norm_rejects(rng, case, match):
    x, weight, residual = _args(rng)
    if case == "residual_shape":
        residual = np.zeros((4, 8), np.float32)
    elif case == "residual_dtype":
        residual = residual.astype(np.float16)
    elif case == "weight_shape":
        weight = np.ones(7, np.float32)
    elif case == "x_readonly":
        x.flags.writeable = False
    before_x, before_r = x.copy(), residual.copy()
    with pytest.raises(ValueError, match=match):
        ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    np.testing.assert_array_equal(x, before_x)
    np.testing.assert_array_equal(residual, before_r)
