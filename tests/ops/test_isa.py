"""Run-time instruction-set selection."""

import os
import subprocess
import sys

import pytest

from engine import ops


def test_default_is_the_best_the_cpu_has():
    if os.environ.get("ENGINE_ISA"):
        pytest.fail("run the tests without ENGINE_ISA set")
    assert ops.isa() == ops.best_isa()
    assert ops.available_isas()[0] == ops.best_isa() and ops.available_isas()[-1] == "portable"


def test_engine_isa_environment_variable_lowers_it():
    code = "from engine import ops; print(ops.isa())"
    env = {**os.environ, "ENGINE_ISA": "portable"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "portable"


def test_set_isa_rejects_unknown_names_and_keeps_the_current_one():
    before = ops.isa()
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        ops.set_isa("sse9")
    assert ops.isa() == before
