"""CUDA matmul against ops.reference.matmul: every path (few-token GEMV, the skinny
tensor-core kernel for decode batches and the mma kernel, with and without split-K, the
tiled fallback), weight dtype, odd sizes, strided rows, bias; split-K is deterministic."""

import contextlib
import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine import ops
from engine.ops import gpu_available, reference

pytestmark = pytest.mark.skipif(
    not gpu_available(), reason="no GPU: CUDA kernels run only on a machine with an NVIDIA GPU")

WEIGHT_DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
# Mirrors cuda/matmul.cuh: with 16-bit weights, more tokens than this go through tensor
# cores and x is rounded to w's dtype first (the fallback kernel rounds the same way).
GEMV_MAX_TOKENS = 8
# Mirrors cuda/matmul.cuh: more tokens than GEMV_MAX_TOKENS and up to this many go through
# the skinny kernel, unless the environment has ENGINE_CUDA_MATMUL_SKINNY=0 (read at every
# call): then through the mma kernel, as above this many.
SKINNY_MAX_TOKENS = 256
SKINNY_ENV = "ENGINE_CUDA_MATMUL_SKINNY"
# f32 accumulation only: error relative to sum(|x| * |w|) (+ |bias|) per element.
RTOL = 2e-5
SENTINEL = -12345.0

M_SIZES = [1, 2, 3, 8, 9, 16, 17, 64, 65, 200, 257]
K_SIZES = [1, 8, 17, 24, 64, 100, 136, 769, 776, 1024]  # K % 8 == 0 reaches the fast paths
N_SIZES = [1, 3, 17, 64, 129, 256, 769]
# (pad, offset): x / out rows as a column slice of a wider buffer. Offset 4 with pad 8 keeps
# rows 16-byte aligned (fast paths); offset 1 does not (the fallback).
X_LAYOUTS = [(0, 0), (8, 4), (3, 1)]
OUT_LAYOUTS = [(0, 0), (5, 2), (8, 4)]


@contextlib.contextmanager
def skinny_kernel(enabled):
    """Turns the skinny kernel on or off for the calls inside (os.environ reaches getenv)."""
    old = os.environ.get(SKINNY_ENV)
    os.environ[SKINNY_ENV] = "1" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[SKINNY_ENV]
        else:
            os.environ[SKINNY_ENV] = old


SKINNY_IDS = {True: "skinny", False: "mma"}


def is_rounded(num_tokens, w_dtype):
    return np.dtype(w_dtype) != np.float32 and num_tokens > GEMV_MAX_TOKENS


def expected(x, w, bias):
    """The reference on the kernel's inputs, and the error scale sum(|x||w|) (+ |bias|)."""
    if is_rounded(x.shape[0], w.dtype):
        x = x.astype(w.dtype).astype(np.float32)
    want = np.empty((x.shape[0], w.shape[0]), np.float64)
    reference.matmul(x, w, bias, out=want)
    scale = np.abs(x).astype(np.float64) @ np.abs(w.astype(np.float64)).T
    if bias is not None:
        scale += np.abs(bias)
    return want, scale


def device_rows(host_base, offset, width):
    """host_base on the GPU, and the device view of its columns [offset, offset + width)."""
    base = ops.to_device(host_base)
    return base, base[:, offset:offset + width]


def run_and_check(rng, num_tokens, in_features, out_features, w_dtype, has_bias,
                  x_layout=(0, 0), out_layout=(0, 0), x_scale=1.0):
    x_pad, x_off = x_layout
    out_pad, out_off = out_layout
    x_base = (rng.standard_normal((num_tokens, in_features + x_pad)) * x_scale).astype(np.float32)
    x = x_base[:, x_off:x_off + in_features]
    w = rng.standard_normal((out_features, in_features)).astype(w_dtype)
    bias = rng.standard_normal(out_features).astype(np.float32) if has_bias else None
    # Poison: NaN where the op must write, a sentinel around it that must survive.
    out_host = np.full((num_tokens, out_features + out_pad), SENTINEL, np.float32)
    out_host[:, out_off:out_off + out_features] = np.nan

    _, x_dev = device_rows(x_base, x_off, in_features)
    out_base, out_dev = device_rows(out_host, out_off, out_features)
    bias_dev = ops.to_device(bias) if has_bias else None
    ops.matmul(x_dev, ops.to_device(w), bias_dev, out=out_dev)
    got_base = ops.to_host(out_base)

    got = got_base[:, out_off:out_off + out_features].astype(np.float64)
    want, scale = expected(x, w, bias)
    assert not np.any(np.isnan(got)), f"{np.isnan(got).sum()} outputs never written"
    err = np.abs(got - want)
    tol = RTOL * scale + 1e-30
    bad = ~(err <= tol)
    assert not np.any(bad), (f"{bad.sum()} of {bad.size} wrong; max error {err.max()} "
                             f"(tol {tol.max()}); first at {np.argwhere(bad)[0]}")
    np.testing.assert_array_equal(got_base[:, :out_off], SENTINEL)
    np.testing.assert_array_equal(got_base[:, out_off + out_features:], SENTINEL)


@pytest.mark.parametrize("w_dtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
@settings(max_examples=50, deadline=None)
@given(num_tokens=st.sampled_from(M_SIZES), in_features=st.sampled_from(K_SIZES),
       out_features=st.sampled_from(N_SIZES), has_bias=st.booleans(),
       x_layout=st.sampled_from(X_LAYOUTS), out_layout=st.sampled_from(OUT_LAYOUTS),
       seed=st.integers(0, 2**32 - 1))
def test_matches_reference(w_dtype, num_tokens, in_features, out_features, has_bias, x_layout,
                           out_layout, seed):
    rng = np.random.default_rng(seed)
    run_and_check(rng, num_tokens, in_features, out_features, w_dtype, has_bias, x_layout,
                  out_layout)


# Small and reduced versions of the served model's shapes: the GEMV (1-8 tokens), split-K
# tensor cores (fewer than 132 CTAs: decode batches), full tiles with a partial
# rasterisation group (1100 tokens = 9 M-tiles of 128), K tails inside a tile (2056 =
# 64.25 tiles of 32).
SHAPES = [
    (1, 2048, 2560), (1, 5632, 2048), (5, 2048, 1000), (8, 5632, 264),
    (9, 2048, 2560), (32, 2048, 2560), (128, 5632, 2048), (256, 2048, 2048),
    (200, 2056, 777), (1100, 64, 700), (1100, 256, 640), (513, 1024, 1031),
    (1100, 520, 2000),  # >= 132 CTAs of 128 x 128: no split, partial group, K and N tails
    (1100, 72, 3900), (1500, 520, 3000),  # >= 132 CTAs of 128 x 256 (the wide tile)
]


@pytest.mark.parametrize("w_dtype", [np.float16, ml_dtypes.bfloat16],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("has_bias", [True, False])
def test_model_shapes(w_dtype, shape, has_bias):
    rng = np.random.default_rng(sum(shape))
    num_tokens, in_features, out_features = shape
    run_and_check(rng, num_tokens, in_features, out_features, w_dtype, has_bias, (8, 4), (5, 2))


# The decode-batch shapes above (GEMV_MAX_TOKENS < M <= SKINNY_MAX_TOKENS) with the skinny
# kernel forced on and off (off: the mma kernel with split-K).
DECODE_SHAPES = [s for s in SHAPES if GEMV_MAX_TOKENS < s[0] <= SKINNY_MAX_TOKENS]


@pytest.mark.parametrize("skinny", [True, False], ids=SKINNY_IDS.get)
@pytest.mark.parametrize("w_dtype", [np.float16, ml_dtypes.bfloat16],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_shapes_both_kernels(skinny, w_dtype, shape):
    rng = np.random.default_rng(sum(shape) + 1)
    num_tokens, in_features, out_features = shape
    with skinny_kernel(skinny):
        run_and_check(rng, num_tokens, in_features, out_features, w_dtype, True, (8, 4), (5, 2))


# Every tile shape of the skinny kernel (BM 32 / 64 / 128, one or two M-tiles), K and N
# tails, K shorter than a tile, splits with a short last slice.
DECODE_M = [9, 16, 17, 31, 32, 33, 64, 65, 127, 128, 129, 200, 256]
DECODE_K = [8, 24, 64, 72, 136, 776, 1024, 2056]
DECODE_N = [1, 3, 17, 64, 65, 129, 769]


@pytest.mark.parametrize("skinny", [True, False], ids=SKINNY_IDS.get)
@pytest.mark.parametrize("w_dtype", [np.float16, ml_dtypes.bfloat16],
                         ids=lambda d: np.dtype(d).name)
@settings(max_examples=30, deadline=None)
@given(num_tokens=st.sampled_from(DECODE_M), in_features=st.sampled_from(DECODE_K),
       out_features=st.sampled_from(DECODE_N), has_bias=st.booleans(),
       x_layout=st.sampled_from([(0, 0), (8, 4)]), out_layout=st.sampled_from(OUT_LAYOUTS),
       seed=st.integers(0, 2**32 - 1))
def test_decode_batches_match_reference(skinny, w_dtype, num_tokens, in_features, out_features,
                                        has_bias, x_layout, out_layout, seed):
    rng = np.random.default_rng(seed)
    with skinny_kernel(skinny):
        run_and_check(rng, num_tokens, in_features, out_features, w_dtype, has_bias, x_layout,
                      out_layout)


# Shapes whose tile grid is under one wave, so K is split: (tokens, in, out, skinny kernel).
SPLIT_CASES = [(32, 2048, 2560, True), (128, 5632, 2048, True), (200, 2056, 777, True),
               (32, 2048, 2560, False), (128, 5632, 2048, False), (300, 1024, 1000, False)]


@pytest.mark.parametrize("case", SPLIT_CASES,
                         ids=lambda c: "x".join(map(str, c[:3])) + "-" + SKINNY_IDS[c[3]])
def test_split_k_is_deterministic(case):
    """The same inputs give the same bits on every run, also after another shape has used
    the split-K scratch in between (seeded sampling on the GPU relies on it)."""
    num_tokens, in_features, out_features, skinny = case
    rng = np.random.default_rng(5)
    x = rng.standard_normal((num_tokens, in_features)).astype(np.float32)
    w = rng.standard_normal((out_features, in_features)).astype(ml_dtypes.bfloat16)
    bias = rng.standard_normal(out_features).astype(np.float32)
    x_dev, w_dev, bias_dev = ops.to_device(x), ops.to_device(w), ops.to_device(bias)
    other_x = ops.to_device(rng.standard_normal((64, 1024)).astype(np.float32))
    other_w = ops.to_device(rng.standard_normal((1000, 1024)).astype(ml_dtypes.bfloat16))
    other_out = ops.empty((64, 1000), np.float32, device="cuda")
    results = []
    with skinny_kernel(skinny):
        for _ in range(5):
            out = ops.to_device(np.full((num_tokens, out_features), np.nan, np.float32))
            ops.matmul(x_dev, w_dev, bias_dev, out=out)
            ops.matmul(other_x, other_w, out=other_out)  # reuses the scratch
            results.append(ops.to_host(out))
    for r in results[1:]:
        np.testing.assert_array_equal(r.view(np.uint32), results[0].view(np.uint32))
    want, scale = expected(x, w, bias)
    err = np.abs(results[0] - want)
    assert np.all(err <= RTOL * scale), f"max error {err.max()}"


@pytest.mark.parametrize("w_dtype", [np.float16, ml_dtypes.bfloat16],
                         ids=lambda d: np.dtype(d).name)
def test_prefill_shape_sampled_rows(w_dtype):
    """A benchmark prefill shape (4096 tokens, the qkv projection), checked on 48 rows."""
    rng = np.random.default_rng(4)
    num_tokens, in_features, out_features = 4096, 2048, 2560
    x = rng.standard_normal((num_tokens, in_features)).astype(np.float32)
    w = rng.standard_normal((out_features, in_features)).astype(w_dtype)
    bias = rng.standard_normal(out_features).astype(np.float32)
    out = ops.to_device(np.full((num_tokens, out_features), np.nan, np.float32))
    ops.matmul(ops.to_device(x), ops.to_device(w), ops.to_device(bias), out=out)
    got = ops.to_host(out)
    assert not np.any(np.isnan(got))
    rows = np.sort(rng.choice(num_tokens, 48, replace=False))
    rows[0], rows[-1] = 0, num_tokens - 1
    x_rounded = x[rows].astype(w_dtype).astype(np.float32)  # the tensor-core numerics
    want = x_rounded.astype(np.float64) @ w.astype(np.float64).T + bias
    scale = np.abs(x_rounded).astype(np.float64) @ np.abs(w.astype(np.float64)).T + np.abs(bias)
    err = np.abs(got[rows] - want)
    assert np.all(err <= RTOL * scale), f"max error {err.max()}"


@pytest.mark.parametrize("shape", [(1, 17, 769), (9, 769, 17), (64, 3, 17), (130, 1100, 67)],
                         ids=lambda s: "x".join(map(str, s)))
def test_f32_weights(shape):
    rng = np.random.default_rng(1)
    num_tokens, in_features, out_features = shape
    run_and_check(rng, num_tokens, in_features, out_features, np.float32, True, (3, 1), (5, 2))


def test_large_values_stay_finite_in_f16():
    """x up to ~3e4 still rounds to finite f16 values on the tensor-core path."""
    rng = np.random.default_rng(2)
    run_and_check(rng, 64, 256, 128, np.float16, True, x_scale=1e4)


@pytest.mark.parametrize("w_dtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("num_tokens,in_features", [(1, 768), (7, 5), (11, 1024), (100, 776),
                                                    (70, 2048)])
def test_nan_in_x_reaches_its_row(w_dtype, num_tokens, in_features):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((num_tokens, in_features)).astype(np.float32)
    w = rng.standard_normal((13, in_features)).astype(w_dtype)
    bad_row = num_tokens // 2
    x[bad_row, in_features - 1] = np.nan  # the last column: the K tail of every kernel
    out = ops.to_device(np.zeros((num_tokens, 13), np.float32))
    ops.matmul(ops.to_device(x), ops.to_device(w), out=out)
    got = ops.to_host(out)
    assert np.all(np.isnan(got[bad_row]))
    assert np.all(np.isfinite(np.delete(got, bad_row, axis=0)))


@pytest.mark.parametrize("w_dtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_empty_in_features_gives_bias(w_dtype):
    x = ops.to_device(np.zeros((3, 0), np.float32))
    w = ops.to_device(np.zeros((4, 0), w_dtype))
    bias = np.arange(4, dtype=np.float32)
    out = ops.to_device(np.full((3, 4), np.nan, np.float32))
    ops.matmul(x, w, ops.to_device(bias), out=out)
    np.testing.assert_array_equal(ops.to_host(out), np.broadcast_to(bias, (3, 4)))
    ops.matmul(x, w, out=out)
    np.testing.assert_array_equal(ops.to_host(out), 0.0)


def test_empty_tokens_is_a_no_op():
    x = ops.to_device(np.zeros((0, 8), np.float32))
    w = ops.to_device(np.ones((4, 8), ml_dtypes.bfloat16))
    out = ops.empty((0, 4), np.float32, device="cuda")
    ops.matmul(x, w, out=out)
    assert ops.to_host(out).shape == (0, 4)


# ---- argument errors ------------------------------------------------------------------

def good_args():
    return dict(x=np.ones((3, 8), np.float32), w=np.ones((5, 8), ml_dtypes.bfloat16),
                bias=np.ones(5, np.float32), out=np.zeros((3, 5), np.float32))


BAD_CASES = {
    "w int32": ("w", dict(w=np.ones((5, 8), np.int32))),
    "w wrong in_features": ("w", dict(w=np.ones((5, 7), np.float32))),
    "w 1-d": ("w", dict(w=np.ones(8, np.float32))),
    "bias float16": ("bias", dict(bias=np.ones(5, np.float16))),
    "bias wrong length": ("bias", dict(bias=np.ones(4, np.float32))),
    "out wrong tokens": ("out", dict(out=np.zeros((4, 5), np.float32))),
    "out wrong features": ("out", dict(out=np.zeros((3, 6), np.float32))),
    "out float16": ("out", dict(out=np.zeros((3, 5), np.float16))),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_rejects_bad_arguments(case):
    arg, changes = BAD_CASES[case]
    args = good_args()
    args.update(changes)
    dev = {k: ops.to_device(v) for k, v in args.items()}
    with pytest.raises(ValueError, match=rf"matmul.*{arg}"):
        ops.matmul(dev["x"], dev["w"], dev["bias"], out=dev["out"])
    if arg != "out":
        np.testing.assert_array_equal(ops.to_host(dev["out"]), 0.0)


def test_rejects_out_overlapping_x():
    shared = ops.to_device(np.zeros((3, 13), np.float32))
    w = ops.to_device(np.ones((5, 8), np.float32))
    with pytest.raises(ValueError, match=r"matmul.*out"):
        ops.matmul(shared[:, :8], w, out=shared[:, 8:])


def test_good_arguments_pass():
    args = {k: ops.to_device(v) for k, v in good_args().items()}
    ops.matmul(args["x"], args["w"], args["bias"], out=args["out"])
    np.testing.assert_array_equal(ops.to_host(args["out"]), 9.0)
