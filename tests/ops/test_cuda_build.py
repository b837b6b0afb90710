"""The CUDA module: built wherever nvcc is found, and correct on a GPU where one is present."""

import os
import shutil

import numpy as np
import pytest

from engine.ops import reference


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


def test_silu_and_mul_on_the_gpu_matches_reference():
    module = load_cuda()
    if module is None or module.device_count() == 0:
        pytest.skip("no GPU: engine._C_cuda is absent or sees no CUDA device")
    x = np.random.default_rng(0).standard_normal((17, 2 * 769)).astype(np.float32)
    out = np.empty((17, 769), np.float32)
    module.silu_and_mul(x, out)
    np.testing.assert_allclose(out, reference.silu_and_mul(x, out=np.empty_like(out)),
                               rtol=1e-5, atol=1e-6)
