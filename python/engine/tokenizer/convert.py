"""write_hf_tokenizer_from_gguf: a GGUF's tokenizer as a Hugging Face tokenizer folder."""

from __future__ import annotations

import json
import os

from engine.tokenizer.gguf_vocab import (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED,
                                         GGUFVocab, build_bpe_tokenizer, build_spm_model_proto,
                                         read_gguf_vocab)
from engine.tokenizer.spm_json import build_spm_bpe_tokenizer


def write_hf_tokenizer_from_gguf(gguf_path: str | os.PathLike,
                                 out_dir: str | os.PathLike) -> list[str]:
    """Write the tokenizer of a GGUF file as a Hugging Face tokenizer.

    Writes tokenizer.json (both kinds; for SentencePiece models a `tokenizers` BPE that
    tokenizes exactly as SentencePiece) and, for SentencePiece models, tokenizer.model too,
    then tokenizer_config.json and special_tokens_map.json, so that
    `transformers.AutoTokenizer.from_pretrained(out_dir)` tokenizes as engine does.

    Args:
        gguf_path: the .gguf file.
        out_dir: the folder to write into (created when missing).
    Returns:
        The paths written.
    Raises:
        ValueError: the GGUF has no tokenizer engine can rebuild.
    """
    vocab = read_gguf_vocab(os.fspath(gguf_path))
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    if vocab.model == "llama":
        written.append(os.path.join(out_dir, "tokenizer.model"))
        with open(written[-1], "wb") as f:
            f.write(build_spm_model_proto(vocab))
    # transformers reads tokenizer.json first; for SentencePiece models it is a `tokenizers`
    # BPE that tokenizes exactly as the tokenizer.model does.
    written.append(os.path.join(out_dir, "tokenizer.json"))
    build = build_bpe_tokenizer if vocab.model == "gpt2" else build_spm_bpe_tokenizer
    build(vocab).save(written[-1])
    special = _special_tokens_map(vocab)
    for name, content in (("tokenizer_config.json", _tokenizer_config(vocab, special)),
                          ("special_tokens_map.json", special)):
        written.append(os.path.join(out_dir, name))
        with open(written[-1], "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False, indent=2)
            f.write("\n")
    return written


def _special_tokens_map(vocab: GGUFVocab) -> dict[str, str]:
    tokens = {f"{name}_token": vocab.token(getattr(vocab, f"{name}_token_id"))
              for name in ("bos", "eos", "unk", "pad")}
    return {k: v for k, v in tokens.items() if v is not None}


def _tokenizer_config(vocab: GGUFVocab, special: dict) -> dict:
    added = {}
    for i, token_type in enumerate(vocab.token_types):
        if token_type in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
            added[str(i)] = {"content": vocab.tokens[i], "lstrip": False, "normalized": False,
                             "rstrip": False, "single_word": False,
                             "special": token_type != TOKEN_USER_DEFINED}
    config = {
        # The generic class loads tokenizer.json as written; a model-specific class
        # (LlamaTokenizer) would rebuild its own pre-tokenizer around the vocabulary.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": vocab.add_bos_token,
        "add_eos_token": vocab.add_eos_token,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
        **special,
        "added_tokens_decoder": added,
    }
    if vocab.chat_template:
        config["chat_template"] = vocab.chat_template
    return config
