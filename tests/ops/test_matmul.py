"""matmul against ops.reference.matmul on every instruction set and weight dtype."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference

WEIGHT_DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
# The kernels convert weights to f32 exactly, so the only error is f32 summation
# (blocked, ~K/16 + log terms): relative to sum(|x| * |w|) per output element.
# f16/bf16 weights carry fewer mantissa bits, which only shrinks that error.
RTOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float16): 2e-5,
        np.dtype(ml_dtypes.bfloat16): 2e-5}

SIZES = [1, 2, 3, 5, 8, 16, 17, 31, 33, 64, 100]
K_SIZES = SIZES + [769, 1100]  # 1100 > the kernels' K block (1024)
N_SIZES = SIZES + [769]


def rows_of(rng, num_rows, num_cols, pad, dtype=np.float32):
    """A [num_rows, num_cols] view whose rows sit `pad` elements apart in a wider array."""
    base = rng.standard_normal((num_rows, num_cols + pad)).astype(dtype)
    offset = pad // 2
    return base[:, offset:offset + num_cols]


def check_matmul(rng, num_tokens, in_features, out_features, w_dtype, has_bias, pad_x, pad_out):
    x = rows_of(rng, num_tokens, in_features, pad_x)
    w = rng.standard_normal((out_features, in_features)).astype(w_dtype)
    bias = rng.standard_normal(out_features).astype(np.float32) if has_bias else None
    out = rows_of(rng, num_tokens, out_features, pad_out)
    out_base = out.base.copy()
    ops.matmul(x, w, bias, out=out)

    want = np.empty((num_tokens, out_features), np.float64)
    reference.matmul(x, w, bias, out=want)  # from the same (rounded) weights
    scale = np.abs(x).astype(np.float64) @ np.abs(w.astype(np.float64)).T
    if bias is not None:
        scale += np.abs(bias)
    tol = RTOL[np.dtype(w_dtype)] * scale + 1e-30
    err = np.abs(out - want)
    assert np.all(err <= tol), f"max error {err.max()} (tol {tol.max()})"
    # Nothing outside the view was touched.
    offset = pad_out // 2
    np.testing.assert_array_equal(out.base[:, :offset], out_base[:, :offset])
    np.testing.assert_array_equal(out.base[:, offset + out_features:],
                                  out_base[:, offset + out_features:])


@pytest.mark.parametrize("w_dtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
@given(num_tokens=st.sampled_from([1, 1, 2, 3, 4, 5, 6, 7, 13, 19]),
       in_features=st.sampled_from(K_SIZES), out_features=st.sampled_from(N_SIZES),
       has_bias=st.booleans(), pad_x=st.sampled_from([0, 0, 3, 16]),
       pad_out=st.sampled_from([0, 0, 5]), seed=st.integers(0, 2**32 - 1))
def test_matches_reference(isa, w_dtype, num_tokens, in_features, out_features, has_bias,
                           pad_x, pad_out, seed):
    rng = np.random.default_rng(seed)
    check_matmul(rng, num_tokens, in_features, out_features, w_dtype, has_bias, pad_x, pad_out)


@pytest.mark.parametrize("w_dtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(1, 1100, 769), (1, 576, 1536), (131, 1100, 67),  # > 128-token block
                                   (64, 3, 17), (37, 64, 7)])
def test_decode_and_prefill_shapes(isa, rng, w_dtype, shape):
    num_tokens, in_features, out_features = shape
    check_matmul(rng, num_tokens, in_features, out_features, w_dtype, True, 8, 3)


@pytest.mark.parametrize("w_dtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
@given(num_tokens=st.integers(2, 20), in_features=st.sampled_from([5, 17, 576, 1100, 2100]),
       out_features=st.sampled_from([1, 3, 13, 67, 1540]), seed=st.integers(0, 2**16))
def test_each_row_is_bit_identical_alone_and_in_a_batch(isa, w_dtype, num_tokens, in_features,
                                                        out_features, seed):
    """Batch invariance: decode (one row) and prefill tiles sum in the same order."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_tokens, in_features)).astype(np.float32)
    w = rng.standard_normal((out_features, in_features)).astype(w_dtype)
    batch = ops.matmul(x, w, out=np.empty((num_tokens, out_features), np.float32))
    for t in range(num_tokens):
        alone = ops.matmul(x[t:t + 1], w, out=np.empty((1, out_features), np.float32))
        assert np.array_equal(alone[0], batch[t]), f"row {t} differs"
    head = ops.matmul(x[:num_tokens // 2], w,
                      out=np.empty((num_tokens // 2, out_features), np.float32))
    assert np.array_equal(head, batch[:num_tokens // 2])


def test_strided_token_rows(isa, rng):
    """x and out as every other row of bigger arrays (row stride 2 * width)."""
    x = rng.standard_normal((14, 40)).astype(np.float32)[::2]
    w = rng.standard_normal((9, 40)).astype(np.float32)
    out = np.zeros((14, 9), np.float32)[::2]
    ops.matmul(x, w, out=out)
    want = np.empty(out.shape)
    reference.matmul(x, w, out=want)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert not np.any(out.base[1::2])


def test_empty_in_features_gives_bias(isa):
    x = np.zeros((3, 0), np.float32)
    w = np.zeros((4, 0), np.float32)
    bias = np.arange(4, dtype=np.float32)
    out = np.full((3, 4), 7.0, np.float32)
    ops.matmul(x, w, bias, out=out)
    np.testing.assert_array_equal(out, np.broadcast_to(bias, (3, 4)))
    ops.matmul(x, w, out=out)
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("w_dtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("num_tokens,in_features", [(1, 769), (11, 1100), (7, 5)])
def test_nan_in_x_reaches_its_row(isa, rng, w_dtype, num_tokens, in_features):
    x = rng.standard_normal((num_tokens, in_features)).astype(np.float32)
    w = rng.standard_normal((13, in_features)).astype(w_dtype)
    bad_row = num_tokens // 2
    x[bad_row, in_features - 1] = np.nan  # the last column: the K tail of every kernel
    out = np.zeros((num_tokens, 13), np.float32)
    ops.matmul(x, w, out=out)
    assert np.all(np.isnan(out[bad_row]))
    assert np.all(np.isfinite(np.delete(out, bad_row, axis=0)))


# ---- argument errors ------------------------------------------------------------------

def good_args():
    return dict(x=np.ones((3, 8), np.float32), w=np.ones((5, 8), np.float32),
                bias=np.ones(5, np.float32), out=np.zeros((3, 5), np.float32))


def bad_cases():
    wide_x = np.ones((3, 16), np.float32)
    readonly = np.zeros((3, 5), np.float32)
    readonly.flags.writeable = False
    shared = np.zeros((3, 13), np.float32)
    return {
        "x float64": ("x", dict(x=np.ones((3, 8)))),
        "x 3-d": ("x", dict(x=np.ones((1, 3, 8), np.float32))),
        "x columns strided": ("x", dict(x=wide_x[:, ::2])),
        "w int32": ("w", dict(w=np.ones((5, 8), np.int32))),
        "w wrong in_features": ("w", dict(w=np.ones((5, 7), np.float32))),
        "w 1-d": ("w", dict(w=np.ones(8, np.float32))),
        "w transposed": ("w", dict(w=np.ones((8, 5), np.float32).T)),
        "w rows strided": ("w", dict(w=np.ones((10, 8), np.float32)[::2])),
        "bias float16": ("bias", dict(bias=np.ones(5, np.float16))),
        "bias wrong length": ("bias", dict(bias=np.ones(4, np.float32))),
        "bias 2-d": ("bias", dict(bias=np.ones((1, 5), np.float32))),
        "bias strided": ("bias", dict(bias=np.ones(10, np.float32)[::2])),
        "out float64": ("out", dict(out=np.zeros((3, 5)))),
        "out wrong tokens": ("out", dict(out=np.zeros((4, 5), np.float32))),
        "out wrong features": ("out", dict(out=np.zeros((3, 6), np.float32))),
        "out columns strided": ("out", dict(out=np.zeros((3, 10), np.float32)[:, ::2])),
        "out read-only": ("out", dict(out=readonly)),
        "out aliases x": ("out", dict(x=shared[:, :8], out=shared[:, 8:])),
    }


@pytest.mark.parametrize("case", list(bad_cases()))
def test_rejects_bad_arguments(isa, case):
    arg, changes = bad_cases()[case]
    args = good_args()
    args.update(changes)
    before = args["out"].copy()
    with pytest.raises(ValueError, match=rf"matmul.*{arg}"):
        ops.matmul(args["x"], args["w"], args["bias"], out=args["out"])
    if arg != "out":
        np.testing.assert_array_equal(args["out"], before)


def test_good_arguments_pass(isa):
    args = good_args()
    ops.matmul(args["x"], args["w"], args["bias"], out=args["out"])
    np.testing.assert_array_equal(args["out"], 9.0)
