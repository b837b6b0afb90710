"""quant_matmul against ops.reference.quant_matmul (gguf's dequantisers, float64) for every
GGUF block format on every instruction set."""

import numpy as np
import pytest
from hypothesis import given, strategies as st
from quant_blocks import GuardedBuffer, magnitude, random_blocks

from engine import ops
from engine.ops import reference
from engine.ops.quantized import FORMATS, QuantizedWeight, RowStack, stack_rows

FORMAT_NAMES = list(FORMATS)
# The integer dot products are exact; what is left is float32 rounding of the per-block
# scale products and of the sum over K (<= 2048 per block, then added to out), relative to
# sum(|x| * (|scale * q| + |min|)).
RTOL = 2e-5
N_SIZES = [1, 2, 3, 4, 5, 7, 8, 13, 17, 33, 67]


def block_counts(fmt):
    """In-features that exercise one block, odd block counts (the 64-value step's tail) and
    more than one 2048-value K block."""
    values = FORMATS[fmt][0]
    blocks = [1, 2, 3, 5, 8, 9] if values == 32 else [1, 2, 3]
    return [values * b for b in blocks] + [2048 + values, 4096 + 3 * values]


def rows_of(rng, num_rows, num_cols, pad):
    base = rng.standard_normal((num_rows, num_cols + pad)).astype(np.float32)
    return base[:, pad // 2:pad // 2 + num_cols]


def check_quant_matmul(rng, fmt, num_tokens, in_features, out_features, has_bias, pad_x,
                       pad_out):
    x = rows_of(rng, num_tokens, in_features, pad_x)
    x[:, ::7] *= 30.0  # outliers, as real activations have
    w = random_blocks(rng, fmt, out_features, in_features)
    bias = rng.standard_normal(out_features).astype(np.float32) if has_bias else None
    out = rows_of(rng, num_tokens, out_features, pad_out)
    out_base = out.base.copy()
    ops.matmul(x, QuantizedWeight(w, fmt, in_features), bias, out=out)

    want = np.empty((num_tokens, out_features))
    reference.quant_matmul(x, w, fmt, bias, out=want)
    q, d = reference.quantize_q8_blocks(x)
    x_used = np.abs(q.reshape(d.shape + (32,)) * d[..., None].astype(np.float64))
    scale = x_used.reshape(q.shape) @ magnitude(w, fmt).T.astype(np.float64)
    if bias is not None:
        scale += np.abs(bias)
    err = np.abs(out - want)
    assert np.all(err <= RTOL * scale + 1e-30), f"max error {err.max()} (scale {scale.max()})"
    offset = pad_out // 2  # nothing outside the view was touched
    np.testing.assert_array_equal(out.base[:, :offset], out_base[:, :offset])
    np.testing.assert_array_equal(out.base[:, offset + out_features:],
                                  out_base[:, offset + out_features:])


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@given(data=st.data(), num_tokens=st.sampled_from([1, 1, 2, 3, 4, 5, 7, 13, 19]),
       out_features=st.sampled_from(N_SIZES), has_bias=st.booleans(),
       pad_x=st.sampled_from([0, 0, 3, 16]), pad_out=st.sampled_from([0, 0, 5]),
       seed=st.integers(0, 2**32 - 1))
def test_matches_reference(isa, fmt, data, num_tokens, out_features, has_bias, pad_x, pad_out,
                           seed):
    in_features = data.draw(st.sampled_from(block_counts(fmt)), label="in_features")
    check_quant_matmul(np.random.default_rng(seed), fmt, num_tokens, in_features, out_features,
                       has_bias, pad_x, pad_out)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("shape", [(1, 2048, 576), (1, 1536, 576), (70, 4352, 9), (67, 768, 37)])
def test_decode_and_prefill_shapes(isa, rng, fmt, shape):
    """Model-sized rows; 70 and 67 tokens cross the 64-token block."""
    num_tokens, in_features, out_features = shape
    check_quant_matmul(rng, fmt, num_tokens, in_features, out_features, True, 8, 3)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_within_activation_rounding_of_the_float_product(isa, rng, fmt):
    """What the quantisation of x costs: at most half a step d_x per value, times |w|."""
    in_features = 512
    x = rng.standard_normal((5, in_features)).astype(np.float32)
    w = random_blocks(rng, fmt, 23, in_features)
    out = ops.matmul(x, QuantizedWeight(w, fmt, in_features), out=np.empty((5, 23), np.float32))
    w_float = reference.dequantize_blocks(w, fmt).astype(np.float64)
    _, d = reference.quantize_q8_blocks(x)
    step = np.repeat(d.astype(np.float64), 32, axis=1)
    bound = 0.5 * step @ np.abs(w_float).T + 1e-4 * np.abs(x) @ np.abs(w_float).T
    assert np.all(np.abs(out - x.astype(np.float64) @ w_float.T) <= bound)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@given(num_tokens=st.integers(2, 20), out_features=st.sampled_from([1, 3, 13, 67]),
       seed=st.integers(0, 2**16))
def test_each_row_is_bit_identical_alone_and_in_a_batch(isa, fmt, num_tokens, out_features, seed):
    """Batch invariance: a decode row (one token) and prefill tiles sum in the same order."""
    rng = np.random.default_rng(seed)
    in_features = 4096 + 3 * FORMATS[fmt][0]  # two K blocks
    x = rng.standard_normal((num_tokens, in_features)).astype(np.float32)
    w = QuantizedWeight(random_blocks(rng, fmt, out_features, in_features), fmt, in_features)
    batch = ops.matmul(x, w, out=np.empty((num_tokens, out_features), np.float32))
    for t in range(num_tokens):
        alone = ops.matmul(x[t:t + 1], w, out=np.empty((1, out_features), np.float32))
        assert np.array_equal(alone[0], batch[t]), f"row {t} differs"


def test_activation_rounding_is_half_to_even(isa):
    """q8_0 weights holding one 1 per row read back x's codes: 127 sets d = 1, so the
    codes are x rounded, ties to even."""
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, -126.5] + [0.0] * 23],
                 np.float32)
    blocks = np.zeros((9, 34), np.uint8)
    blocks[:, :2] = np.array([1.0], np.float16).view(np.uint8)
    blocks[np.arange(9), 2 + np.arange(9)] = 1
    out = ops.matmul(x, QuantizedWeight(blocks, "q8_0", 32), out=np.empty((1, 9), np.float32))
    np.testing.assert_array_equal(out[0], [127, 0, 2, 2, -0.0, -2, -2, 3, -126])


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_non_finite_x_makes_its_row_nan(isa, rng, fmt):
    in_features = 2 * FORMATS[fmt][0]
    x = rng.standard_normal((5, in_features)).astype(np.float32)
    x[1, in_features - 1] = np.nan
    x[3, 0] = np.inf
    w = QuantizedWeight(random_blocks(rng, fmt, 13, in_features), fmt, in_features)
    out = ops.matmul(x, w, out=np.zeros((5, 13), np.float32))
    assert np.all(np.isnan(out[[1, 3]]))
    assert np.all(np.isfinite(out[[0, 2, 4]]))


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("blocks", [3, 8, 12])  # 8, 12: the decode kernel's head windows
def test_reads_nothing_past_the_weights_or_x(isa, rng, fmt, blocks):
    """w and x end where an inaccessible page starts: one byte too far would crash."""
    in_features = blocks * FORMATS[fmt][0]
    w = random_blocks(rng, fmt, 5, in_features)
    x = rng.standard_normal((3, in_features)).astype(np.float32)
    w_buf, x_buf = GuardedBuffer(w.nbytes), GuardedBuffer(x.nbytes)
    w_guarded, x_guarded = w_buf.holding(w), x_buf.holding(x)
    for num_tokens in (1, 3):
        out = np.empty((num_tokens, 5), np.float32)
        ops.matmul(x_guarded[3 - num_tokens:], QuantizedWeight(w_guarded, fmt, in_features),
                   out=out)
        want = np.empty(out.shape)
        reference.quant_matmul(x[3 - num_tokens:], w, fmt, out=want)
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


def test_row_stack_runs_each_part_into_its_columns(rng):
    in_features = 256
    parts = [QuantizedWeight(random_blocks(rng, "q4_k", 3, in_features), "q4_k", in_features),
             QuantizedWeight(random_blocks(rng, "q6_k", 2, in_features), "q6_k", in_features),
             rng.standard_normal((4, in_features)).astype(np.float32)]
    stacked = stack_rows(parts)
    assert isinstance(stacked, RowStack) and stacked.shape == (9, in_features)
    x = rng.standard_normal((2, in_features)).astype(np.float32)
    bias = rng.standard_normal(9).astype(np.float32)
    out = ops.matmul(x, stacked, bias, out=np.empty((2, 9), np.float32))
    start = 0
    for p in parts:
        rows = p.shape[0]
        want = ops.matmul(x, p, bias[start:start + rows], out=np.empty((2, rows), np.float32))
        np.testing.assert_array_equal(out[:, start:start + rows], want)
        start += rows
    one = x[:1]  # one token, with requests (a hint: the last part takes them)
    np.testing.assert_array_equal(
        ops.matmul(one, stacked, bias, out=np.empty((1, 9), np.float32), prefetch=[x, bias]),
        out[:1])
    same = stack_rows(parts[:1] * 2)
    assert isinstance(same, QuantizedWeight) and same.shape == (6, in_features)


# ---- argument errors ------------------------------------------------------------------

def good_args():
    return dict(x=np.ones((3, 64), np.float32), w=np.zeros((5, 68), np.uint8), format="q8_0",
                bias=np.ones(5, np.float32), out=np.zeros((3, 5), np.float32))


def bad_cases():
    readonly = np.zeros((3, 5), np.float32)
    readonly.flags.writeable = False
    shared = np.zeros((3, 69), np.float32)
    return {
        "unknown format": ("format", dict(format="q5_0")),
        "x float64": ("x", dict(x=np.ones((3, 64)))),
        "x not whole blocks": ("x", dict(x=np.ones((3, 48), np.float32))),
        "x columns strided": ("x", dict(x=np.ones((3, 128), np.float32)[:, ::2])),
        "w int8": ("w", dict(w=np.zeros((5, 68), np.int8))),
        "w wrong row bytes": ("w", dict(w=np.zeros((5, 64), np.uint8))),
        "w wrong format's row bytes": ("w", dict(format="q4_0")),
        "w rows strided": ("w", dict(w=np.zeros((10, 68), np.uint8)[::2])),
        "bias float16": ("bias", dict(bias=np.ones(5, np.float16))),
        "bias wrong length": ("bias", dict(bias=np.ones(4, np.float32))),
        "out wrong features": ("out", dict(out=np.zeros((3, 6), np.float32))),
        "out read-only": ("out", dict(out=readonly)),
        "out aliases x": ("out", dict(x=shared[:, :64], out=shared[:, 64:])),
    }


@pytest.mark.parametrize("case", list(bad_cases()))
def test_rejects_bad_arguments(isa, case):
    arg, changes = bad_cases()[case]
    args = good_args()
    args.update(changes)
    before = args["out"].copy()
    with pytest.raises(ValueError, match=rf"quant_matmul.*{arg}"):
        ops._C.quant_matmul(args["x"], args["w"], args["format"], args["bias"], args["out"])
    if arg != "out":
        np.testing.assert_array_equal(args["out"], before)


@pytest.mark.parametrize("data,fmt,in_features,message", [
    (np.zeros((2, 34), np.uint8), "q8_1", 32, "unknown quantisation format"),
    (np.zeros((2, 34), np.uint8), "q4_k", 32, "multiple of 256"),
    (np.zeros((2, 35), np.uint8), "q8_0", 32, r"uint8 \[rows, 34\]"),
    (np.zeros((2, 34), np.int8), "q8_0", 32, r"uint8 \[rows, 34\]"),
])
def test_quantized_weight_rejects_a_bad_layout(data, fmt, in_features, message):
    with pytest.raises(ValueError, match=message):
        QuantizedWeight(data, fmt, in_features)


def test_quantised_weights_refuse_device_arrays(rng):
    w = QuantizedWeight(random_blocks(rng, "q8_0", 2, 32), "q8_0", 32)
    with pytest.raises(TypeError, match="expected numpy"):
        ops.matmul([[0.0] * 32], w, out=np.empty((1, 2), np.float32))


# ---- 4-row tiles (QuantizedWeight.interleaved, interleave 4) ------------------------------

TILED = ["q8_0", "q4_0", "q4_1"]


def tiles_by_definition(w: np.ndarray, fmt: str) -> np.ndarray:
    """The tiled layout written out from its definition (quant_kernels.h), a byte at a time."""
    _, bb, _ = FORMATS[fmt]
    head = 4 if fmt == "q4_1" else 2
    n, width = w.shape
    blocks, quads = width // bb, width // bb // 4
    out = w.copy()
    for g in range(n // 4):
        base = 4 * g * width
        flat = out.reshape(-1)
        for q in range(quads):
            at = base + 16 * q * bb
            for j in range(4):
                for r in range(4):
                    blk = w[4 * g + r, (4 * q + j) * bb:(4 * q + j + 1) * bb]
                    for piece in range(head // 2):  # d, then q4_1's m
                        flat[at + 32 * piece + 2 * (4 * j + r):][:2] = blk[2 * piece:2 * piece + 2]
                    for c in range((bb - head) // 4):
                        flat[at + 16 * head + 64 * c + 4 * (4 * r + j):][:4] = blk[head + 4 * c:head + 4 * c + 4]
        for b in range(4 * quads, blocks):
            for r in range(4):
                flat[base + (4 * b + r) * bb:][:bb] = w[4 * g + r, b * bb:(b + 1) * bb]
    return out


@pytest.mark.parametrize("fmt", TILED)
@pytest.mark.parametrize("rows,blocks", [(4, 4), (9, 5), (8, 11), (7, 3)])
def test_tiles_follow_their_definition(rng, fmt, rows, blocks):
    in_features = 32 * blocks
    w = QuantizedWeight(random_blocks(rng, fmt, rows, in_features), fmt, in_features)
    tiled = w.interleaved()
    assert tiled.interleave == 4 and tiled.shape == w.shape
    np.testing.assert_array_equal(tiled.data, tiles_by_definition(w.data, fmt))
    np.testing.assert_array_equal(tiled.rows(), w.data)
    np.testing.assert_array_equal(tiled.dequantize(), w.dequantize())
    np.testing.assert_array_equal(tiled.take_rows(np.array([2, 0])).data, w.data[[2, 0]])


@pytest.mark.parametrize("fmt", TILED)
@given(num_tokens=st.sampled_from([1, 1, 2, 5, 16, 17, 40]),
       out_features=st.sampled_from([1, 3, 4, 5, 8, 12, 13, 17, 67]),
       blocks=st.sampled_from([1, 2, 3, 4, 5, 8, 9, 33, 36, 70]), has_bias=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_tiled_rows_give_the_same_bits(isa, fmt, num_tokens, out_features, blocks, has_bias,
                                       seed):
    """Every kernel reads tiles (whole quads, the blocks past them, the rows past the last
    group) to the same bits as rows; the rows themselves are checked against the reference
    above."""
    rng = np.random.default_rng(seed)
    in_features = 32 * blocks
    x = rng.standard_normal((num_tokens, in_features)).astype(np.float32)
    w = QuantizedWeight(random_blocks(rng, fmt, out_features, in_features), fmt, in_features)
    bias = rng.standard_normal(out_features).astype(np.float32) if has_bias else None
    want = ops.matmul(x, w, bias, out=np.empty((num_tokens, out_features), np.float32))
    got = ops.matmul(x, w.interleaved(), bias, out=np.empty((num_tokens, out_features), np.float32))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", TILED)
@pytest.mark.parametrize("rows,blocks", [(4, 4), (5, 9), (8, 12), (9, 3)])
def test_tiled_reads_nothing_past_the_weights(isa, rng, fmt, rows, blocks):
    in_features = 32 * blocks
    w = QuantizedWeight(random_blocks(rng, fmt, rows, in_features), fmt, in_features)
    tiled = w.interleaved()
    guarded = QuantizedWeight(GuardedBuffer(tiled.nbytes).holding(tiled.data), fmt, in_features, 4)
    x = rng.standard_normal((20, in_features)).astype(np.float32)
    for num_tokens in (1, 20):
        want = ops.matmul(x[:num_tokens], w, out=np.empty((num_tokens, rows), np.float32))
        got = ops.matmul(x[:num_tokens], guarded, out=np.empty((num_tokens, rows), np.float32))
        np.testing.assert_array_equal(got, want)


def test_interleave_is_checked():
    x, out = np.ones((1, 256), np.float32), np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match="interleave must be 1 .* or 4 .*got 2"):
        ops._C.quant_matmul(x, np.zeros((4, 272), np.uint8), "q8_0", None, out, 2)
    with pytest.raises(ValueError, match="interleave 4 needs a 32-value block format .*q6_k"):
        ops._C.quant_matmul(x, np.zeros((4, 210), np.uint8), "q6_k", None, out, 4)
    with pytest.raises(ValueError, match="quant_embedding: interleave must be"):
        ops._C.quant_embedding(np.zeros(1, np.int32), np.zeros((4, 272), np.uint8), "q8_0",
                               np.zeros((1, 256), np.float32), 3)
    with pytest.raises(ValueError, match="interleave must be 1, or 4 for q8_0, q4_0 or q4_1"):
        QuantizedWeight(np.zeros((4, 210), np.uint8), "q6_k", 256, interleave=4)
    q6 = QuantizedWeight(np.zeros((4, 210), np.uint8), "q6_k", 256).interleaved()
    assert q6.interleave == 1  # formats without tiles stay rows
    src, out = np.zeros((4, 35), np.uint8), np.zeros((4, 35), np.uint8)
    with pytest.raises(ValueError, match="quant_tiles: src: rows must be whole q8_0 blocks"):
        ops._C.quant_tiles(src, "q8_0", True, out)
    with pytest.raises(ValueError, match="quant_tiles: interleave 4 needs a 32-value"):
        ops._C.quant_tiles(np.zeros((4, 144), np.uint8), "q4_k", True, np.zeros((4, 144), np.uint8))
    with pytest.raises(ValueError, match="quant_tiles: out must not share memory with src"):
        same = np.zeros((4, 34), np.uint8)
        ops._C.quant_tiles(same, "q8_0", True, same)


def prefetch_arrays(rng, kind: str) -> list:
    """What a caller may ask a kernel to prefetch: cache blocks, an odd-sized byte run, an
    empty array, or one array sliced to its bytes at an odd offset."""
    blocks = rng.standard_normal((9, 16, 2, 8)).astype(np.float16)
    raw = np.frombuffer(rng.bytes(4099), np.uint8)
    return {"none": [], "blocks": [blocks[2:5], blocks[7:9]], "odd": [raw[3:], raw[:0]],
            "many": [blocks[i:i + 1] for i in range(8)] + [raw] * 8}[kind]


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@given(num_tokens=st.sampled_from([1, 1, 1, 3]), out_features=st.sampled_from([1, 4, 13, 67]),
       blocks=st.sampled_from([1, 8, 9, 72]), tiled=st.booleans(),
       kind=st.sampled_from(["none", "blocks", "odd", "many"]), seed=st.integers(0, 2**32 - 1))
def test_prefetch_changes_no_bit(isa, fmt, num_tokens, out_features, blocks, tiled, kind, seed):
    """prefetch is a hint: the same bits with and without it, on every kernel (the one-token
    AVX-512 kernel requests the arrays as it goes), and the arrays are left alone."""
    rng = np.random.default_rng(seed)
    in_features = FORMATS[fmt][0] * blocks
    x = rng.standard_normal((num_tokens, in_features)).astype(np.float32)
    w = QuantizedWeight(random_blocks(rng, fmt, out_features, in_features), fmt, in_features)
    if tiled and fmt in TILED:
        w = w.interleaved()
    arrays = prefetch_arrays(rng, kind)
    before = [a.copy() for a in arrays]
    want = ops.matmul(x, w, out=np.empty((num_tokens, out_features), np.float32))
    got = ops.matmul(x, w, out=np.empty((num_tokens, out_features), np.float32), prefetch=arrays)
    np.testing.assert_array_equal(got, want)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


def test_prefetch_is_checked(rng):
    x = rng.standard_normal((1, 64)).astype(np.float32)
    w = QuantizedWeight(random_blocks(rng, "q8_0", 4, 64), "q8_0", 64)
    out = np.empty((1, 4), np.float32)
    strided = np.zeros((8, 8), np.float32)[:, ::2]
    with pytest.raises(ValueError, match="prefetch array 1 must be C-contiguous"):
        ops.matmul(x, w, out=out, prefetch=[strided[:0], strided])
    with pytest.raises(ValueError, match="at most 16 arrays, got 17"):
        ops.matmul(x, w, out=out, prefetch=[out] * 17)
