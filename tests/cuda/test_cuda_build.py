"""The CUDA module: built wherever nvcc is found; clear errors where no GPU is present."""

import os
import shutil

import numpy as np
import pytest

from engine import ops


def load_cuda():
    try:
        from engine import _C_cuda
    except ImportError:
        return None
    return _C_cuda


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("ENGINE_CUDA") == "OFF",
                    reason="nvcc not found (or ENGINE_CUDA=OFF): engine._C_cuda is not built")
def test_cuda_module_is_built_where_nvcc_is_found():
    module = load_cuda()
    assert module is not None, "nvcc is on PATH but engine._C_cuda was not built"
    assert module.device_count() >= 0
    for name in ("matmul", "rms_norm", "fused_add_rms_norm", "rope", "silu_and_mul",
                 "embedding", "copy", "kv_cache_write", "kv_cache_copy", "paged_attention",
                 "sample", "apply_penalties", "log_softmax_topk", "DeviceArray", "Graph"):
        assert hasattr(module, name), f"engine._C_cuda lacks {name}"


def test_without_a_gpu_device_requests_fail_clearly():
    if ops.gpu_available():
        pytest.skip("a GPU is present: this checks the error where there is none")
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.to_device(np.zeros(3, np.float32))
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.empty((2, 2), np.float32, "cuda")


def test_mixing_host_and_device_arrays_is_a_type_error():
    if not ops.gpu_available():
        pytest.skip("no GPU: device arrays can only be made on a machine with an NVIDIA GPU")
    x = ops.to_device(np.ones((2, 4), np.float32))
    with pytest.raises(TypeError, match="mix"):
        ops.silu_and_mul(x, out=np.empty((2, 2), np.float32))
