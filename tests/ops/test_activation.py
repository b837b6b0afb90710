"""silu_and_mul against ops.reference, on every instruction set."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference


@given(num_tokens=st.sampled_from([1, 3, 17, 769]), d=st.sampled_from([1, 3, 17, 769]),
       row_pad=st.sampled_from([0, 4]), scale=st.sampled_from([1.0, 10.0, 100.0]),
       seed=st.integers(0, 2**32 - 1))
def test_silu_and_mul_matches_reference(isa, num_tokens, d, row_pad, scale, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((num_tokens, 2 * d + row_pad)) * scale).astype(np.float32)[:, :2 * d]
    out = np.zeros((num_tokens, d + row_pad), np.float32)[:, :d]
    want = np.empty((num_tokens, d), np.float32)
    ops.silu_and_mul(x, out=out)
    reference.silu_and_mul(x, out=want)
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=1e-30)


def test_nan_and_extremes(isa):
    x = np.array([[np.nan, -200.0, 200.0, 0.0, 1.0, 2.0, 3.0, 4.0]], np.float32)
    out = np.zeros((1, 4), np.float32)
    ops.silu_and_mul(x, out=out)
    assert np.isnan(out[0, 0])
    np.testing.assert_allclose(out[0, 1:], reference.silu_and_mul(x, out=np.empty_like(out))[0, 1:],
                               rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("case,match", [
    ("x_dtype", "silu_and_mul: x must be float32"),
    ("x_odd", "silu_and_mul: x must have an even number of columns"),
    ("x_inner_stride", "silu_and_mul: x must have a contiguous last dimension"),
    ("out_shape", r"silu_and_mul: out must have shape \[3, 4\]"),
    ("out_dtype", "silu_and_mul: out must be float32"),
    ("out_readonly", "silu_and_mul: out must be a writeable array"),
])
def test_silu_and_mul_rejects(rng, case, match):
    x = rng.standard_normal((3, 8)).astype(np.float32)
    out = np.zeros((3, 4), np.float32)
    if case == "x_dtype":
        x = x.astype(np.float16)
    elif case == "x_odd":
        x = x[:, :7]
    elif case == "x_inner_stride":
        x = np.repeat(x, 2, axis=1)[:, ::2]
    elif case == "out_shape":
        out = np.zeros((3, 5), np.float32)
    elif case == "out_dtype":
        out = out.astype(np.float16)
    elif case == "out_readonly":
        out.flags.writeable = False
    before = out.copy()
    with pytest.raises(ValueError, match=match):
        ops.silu_and_mul(x, out=out)
    np.testing.assert_array_equal(out, before)
