"""Tokenizers loaded once per session: loading a 49152-token vocabulary takes a moment."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from assets import llama_cpp_vocab, mistral_tokenizer_model, smollm2_gguf  # noqa: E402

from engine.tokenizer import load_tokenizer, write_hf_tokenizer_from_gguf  # noqa: E402


@pytest.fixture(scope="session")
def llama_spm():
    """Llama-2's SentencePiece vocabulary, rebuilt from llama.cpp's GGUF."""
    return load_tokenizer(llama_cpp_vocab("llama-spm"))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct's byte-level BPE, rebuilt from its GGUF."""
    return load_tokenizer(smollm2_gguf())


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory):
    """SmolLM2's tokenizer written as a Hugging Face folder."""
    out = tmp_path_factory.mktemp("smollm2-hf")
    write_hf_tokenizer_from_gguf(smollm2_gguf(), out)
    return out


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory):
    """A folder holding only Mistral-7B's tokenizer.model."""
    out = tmp_path_factory.mktemp("mistral")
    shutil.copy(mistral_tokenizer_model(), out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def mistral(mistral_dir):
    return load_tokenizer(mistral_dir)
