"""gelu (erf and tanh forms) against ops.reference, on every instruction set."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference

# float32 noise around a float64 answer: a few ulps of the result, and the erf
# approximation's 6e-8 absolute error times |x| / 2 where gelu(x) is nearly 0 (x < -4).
RTOL, ATOL = 2e-6, 1e-6


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@given(num_tokens=st.sampled_from([1, 3, 17, 129]), d=st.sampled_from([1, 3, 17, 769]),
       row_pad=st.sampled_from([0, 4]), scale=st.sampled_from([0.1, 1.0, 3.0, 30.0]),
       in_place=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_gelu_matches_reference(isa, approximate, num_tokens, d, row_pad, scale, in_place, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((num_tokens, d + row_pad)) * scale).astype(np.float32)[:, :d]
    want = reference.gelu(x, out=np.empty((num_tokens, d)), approximate=approximate)
    out = x if in_place else np.zeros((num_tokens, d + row_pad), np.float32)[:, :d]
    ops.gelu(x, out=out, approximate=approximate)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_dense_sweep_and_extremes(isa, approximate):
    x = np.concatenate([np.linspace(-12, 12, 48001), [-1e30, -100.0, 0.0, 1e-30, 100.0, 1e30]])
    x = x.astype(np.float32).reshape(1, -1)
    out = np.empty_like(x)
    ops.gelu(x, out=out, approximate=approximate)
    want = reference.gelu(x, out=np.empty(x.shape), approximate=approximate)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
    assert out[0, -1] == np.float32(1e30) and out[0, -4] == 0.0


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_nan_stays_nan(isa, approximate):
    x = np.array([[np.nan, -1.0, 1.0], [2.0, np.nan, 0.5]], np.float32)
    out = np.zeros_like(x)
    ops.gelu(x, out=out, approximate=approximate)
    assert np.isnan(out[0, 0]) and np.isnan(out[1, 1])
    assert np.isfinite(out[0, 1:]).all() and np.isfinite(out[1, [0, 2]]).all()


@pytest.mark.parametrize("case,match", [
    ("x_dtype", "gelu: x must be float32"),
    ("x_ndim", "gelu: x must have 2 dims"),
    ("x_inner_stride", "gelu: x must have a contiguous last dimension"),
    ("out_shape", r"gelu: out must have shape \[3, 8\], got float32 \[3, 9\]"),
    ("out_dtype", "gelu: out must be float32"),
    ("out_readonly", "gelu: out must be a writeable array"),
    ("out_shifted", "gelu: out must be x itself or not overlap it"),
    ("approximate", "gelu: approximate must be 'none' or 'tanh', got 'erf'"),
])
def test_gelu_rejects(rng, case, match):
    x = rng.standard_normal((3, 8)).astype(np.float32)
    out, approximate = np.zeros((3, 8), np.float32), "none"
    if case == "x_dtype":
        x = x.astype(np.float16)
    elif case == "x_ndim":
        x = x.reshape(3, 2, 4)
    elif case == "x_inner_stride":
        x = np.repeat(x, 2, axis=1)[:, ::2]
    elif case == "out_shape":
        out = np.zeros((3, 9), np.float32)
    elif case == "out_dtype":
        out = out.astype(np.float16)
    elif case == "out_readonly":
        out.flags.writeable = False
    elif case == "out_shifted":
        flat = np.zeros(30, np.float32)
        x, out = flat[:24].reshape(3, 8), flat[2:26].reshape(3, 8)
    elif case == "approximate":
        approximate = "erf"
    before = out.copy()
    with pytest.raises(ValueError, match=match):
        ops.gelu(x, out=out, approximate=approximate)
    np.testing.assert_array_equal(out, before)
