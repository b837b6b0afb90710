"""Tokenizers: Hugging Face folders (tokenizer.json / tokenizer.model) and GGUF metadata.

    tok = load_tokenizer(path)
    ids = tok.encode("Hello")
    text = tok.decode(ids)
"""

from engine.tokenizer.base import Tokenizer
from engine.tokenizer.chat import TemplateError
from engine.tokenizer.convert import write_hf_tokenizer_from_gguf
from engine.tokenizer.detokenize import IncrementalDetokenizer
from engine.tokenizer.loader import load_tokenizer

__all__ = ["IncrementalDetokenizer", "TemplateError", "Tokenizer", "load_tokenizer",
           "write_hf_tokenizer_from_gguf"]
