"""DeviceArray: copies, numpy-style views, reshape, DLPack with torch, graphs."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import gpu_available

pytestmark = pytest.mark.skipif(not gpu_available(),
                                reason="no GPU: CUDA kernels run only on a machine with an NVIDIA GPU")

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.int32, np.int64, np.uint8, np.uint64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_keeps_values_and_dtype(dtype):
    a = (np.random.default_rng(0).standard_normal((3, 5, 7)) * 50).astype(dtype)
    d = ops.to_device(a)
    assert d.shape == a.shape and np.dtype(d.dtype) == np.dtype(dtype)
    np.testing.assert_array_equal(ops.to_host(d), a)


@given(rows=st.integers(1, 9), cols=st.integers(2, 9), data=st.data())
def test_slices_and_reshapes_match_numpy(rows, cols, data):
    a = np.arange(rows * cols * 4, dtype=np.float32).reshape(rows, cols * 4)
    d = ops.to_device(a)
    r0 = data.draw(st.integers(0, rows - 1))
    r1 = data.draw(st.integers(r0, rows))
    c0 = data.draw(st.integers(0, cols * 4 - 1))
    c1 = data.draw(st.integers(c0, cols * 4))
    np.testing.assert_array_equal(ops.to_host(d[r0:r1, c0:c1]), a[r0:r1, c0:c1])
    np.testing.assert_array_equal(ops.to_host(d[r0]), a[r0])
    np.testing.assert_array_equal(ops.to_host(d[..., c0:c1]), a[..., c0:c1])
    # splitting the last dim of a column slice needs no copy (as numpy)
    part = d[:, 4:8].reshape(rows, 2, 2)
    np.testing.assert_array_equal(ops.to_host(part), a[:, 4:8].reshape(rows, 2, 2))
    np.testing.assert_array_equal(ops.to_host(d.reshape(-1)), a.reshape(-1))


def test_views_cannot_reach_outside_and_bad_reshapes_fail():
    d = ops.to_device(np.zeros((4, 6), np.float32))
    with pytest.raises(IndexError):
        d[4]
    with pytest.raises(ValueError, match="reshape"):
        d.reshape(5, 5)
    with pytest.raises(ValueError, match="copy"):
        d[:, 1:5].reshape(-1)
    with pytest.raises(ValueError, match="shape"):
        d.copy_from(np.zeros((3, 6), np.float32))
    with pytest.raises(ValueError, match="must be float32 like the array, got float64"):
        d.copy_from(np.zeros((4, 6), np.float64))
    with pytest.raises(ValueError, match="not equally spaced"):
        ops.to_host(d[:, 1:5].reshape(4, 2, 2)[:, :, :1])


def test_copy_from_into_a_row_slice_leaves_the_rest():
    d = ops.to_device(np.zeros((5, 8), np.float32))
    d[1:3, 2:6].copy_from(np.ones((2, 4), np.float32))
    expected = np.zeros((5, 8), np.float32)
    expected[1:3, 2:6] = 1
    np.testing.assert_array_equal(ops.to_host(d), expected)


def test_zeros_and_copy_op():
    z = ops.zeros((3, 7), np.float32, "cuda")
    np.testing.assert_array_equal(ops.to_host(z), np.zeros((3, 7), np.float32))
    a = np.random.default_rng(1).standard_normal((3, 12)).astype(np.float32)
    src = ops.to_device(a)
    ops.copy(src[:, 2:9], out=z)
    np.testing.assert_array_equal(ops.to_host(z), a[:, 2:9])


def test_dlpack_both_ways_with_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch here has no CUDA")
    a = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    d = ops.to_device(a)
    t = torch.from_dlpack(d)
    assert t.is_cuda and tuple(t.shape) == (4, 6)
    np.testing.assert_array_equal(t.cpu().numpy(), a)
    t2 = torch.arange(24, device="cuda", dtype=torch.float32).reshape(4, 6)[:, 1:4]
    d2 = ops.from_dlpack(t2)
    np.testing.assert_array_equal(ops.to_host(d2), t2.cpu().numpy())
    # the view shares memory: an op writing into it shows in torch
    out = ops.from_dlpack(torch.empty(4, 3, device="cuda"))
    ops.copy(d[:, :3], out=out)
    ops.synchronize()
    bf = ops.from_dlpack(torch.ones(2, 2, device="cuda", dtype=torch.bfloat16))
    assert np.dtype(bf.dtype) == np.dtype(ml_dtypes.bfloat16)


def test_graph_replays_captured_ops_with_new_inputs():
    from engine import _C_cuda

    x = ops.to_device(np.zeros((4, 8), np.float32))
    out = ops.empty((4, 4), np.float32, "cuda")
    g = _C_cuda.Graph()
    g.capture_begin()
    ops.silu_and_mul(x, out=out)
    g.capture_end()
    for seed in range(3):
        a = np.random.default_rng(seed).standard_normal((4, 8)).astype(np.float32)
        x.copy_from(a)
        g.replay()
        want = a[:, :4] / (1 + np.exp(-a[:, :4])) * a[:, 4:]
        np.testing.assert_allclose(ops.to_host(out), want, rtol=1e-5, atol=1e-6)
