"""load_tokenizer: a Hugging Face model folder or a GGUF file -> Tokenizer."""

from __future__ import annotations

import json
import os

from engine.tokenizer.base import Tokenizer
from engine.tokenizer.gguf_vocab import (GGUFVocab, build_bpe_tokenizer, build_spm_model_proto,
                                         read_gguf_vocab)
from engine.tokenizer.hf import HFTokenizersBackend
from engine.tokenizer.spm import SentencePieceBackend


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer of a model.

    Args:
        path: a Hugging Face model folder (tokenizer.json, else tokenizer.model; with
            tokenizer_config.json, special_tokens_map.json, generation_config.json when
            present) or a .gguf file (tokenizer rebuilt from its metadata).
    Returns:
        The Tokenizer.
    Raises:
        ValueError: no tokenizer found there, or one engine cannot load.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_folder(path)
    if os.path.isfile(path):
        if path.endswith(".gguf") or _has_gguf_magic(path):
            return tokenizer_from_gguf_vocab(read_gguf_vocab(path))
        raise ValueError(f"{path}: expected a model folder or a .gguf file")
    raise ValueError(f"{path}: no such file or folder; expected a model folder "
                     f"(tokenizer.json or tokenizer.model) or a .gguf file")


def _has_gguf_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def tokenizer_from_gguf_vocab(vocab: GGUFVocab) -> Tokenizer:
    """The Tokenizer a GGUF vocabulary describes."""
    if vocab.model == "gpt2":
        backend = HFTokenizersBackend(build_bpe_tokenizer(vocab), source=vocab.path)
    else:
        backend = SentencePieceBackend(
            build_spm_model_proto(vocab), source=vocab.path,
            bos_token_id=vocab.bos_token_id, eos_token_id=vocab.eos_token_id,
            add_bos_token=vocab.add_bos_token, add_eos_token=vocab.add_eos_token)
    return Tokenizer(backend, bos_token_id=vocab.bos_token_id,
                     eos_token_id=vocab.eos_token_id, extra_eos_token_ids=vocab.extra_eos_ids,
                     unk_token_id=vocab.unk_token_id, pad_token_id=vocab.pad_token_id,
                     chat_template=vocab.chat_template, name_or_path=vocab.path)


# ---------------------------------------------------------------- Hugging Face folders

def _read_json(folder: str, name: str) -> dict:
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e


def _token_text(value) -> str | None:
    """A token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: str, config: dict) -> str | None:
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None:
        template = _read_json(folder, "chat_template.json").get("chat_template")
    return template


def _added_tokens(config: dict) -> dict[int, tuple[str, bool]]:
    decoder = config.get("added_tokens_decoder") or {}
    return {int(i): (t["content"], bool(t.get("special", False))) for i, t in decoder.items()
            if isinstance(t, dict) and "content" in t}


def _load_folder(folder: str) -> Tokenizer:
    config = _read_json(folder, "tokenizer_config.json")
    tokens_map = _read_json(folder, "special_tokens_map.json")
    generation = _read_json(folder, "generation_config.json")
    names = {k: _token_text(config.get(f"{k}_token")) or _token_text(tokens_map.get(f"{k}_token"))
             for k in ("bos", "eos", "unk", "pad")}
    tokenizer_json = os.path.join(folder, "tokenizer.json")
    spm_model = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(tokenizer_json):
        backend = HFTokenizersBackend.from_file(tokenizer_json)
        ids = {k: backend.piece_to_id(v) if v else None for k, v in names.items()}
        backend.ensure_bos(ids["bos"], config.get("add_bos_token"))
    elif os.path.isfile(spm_model):
        backend, ids = _spm_folder_backend(spm_model, config, names)
    else:
        raise ValueError(f"{folder}: no tokenizer.json or tokenizer.model in the folder")
    if ids["bos"] is None and isinstance(generation.get("bos_token_id"), int):
        ids["bos"] = generation["bos_token_id"]
    eos_list = generation.get("eos_token_id")
    eos_list = [eos_list] if isinstance(eos_list, int) else list(eos_list or [])
    if ids["eos"] is None and eos_list:
        ids["eos"] = eos_list[0]
    return Tokenizer(backend, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                     extra_eos_token_ids=eos_list, unk_token_id=ids["unk"],
                     pad_token_id=ids["pad"], chat_template=_chat_template(folder, config),
                     name_or_path=folder)


def _spm_folder_backend(model_file: str, config: dict, names: dict):
    import sentencepiece as spm

    with open(model_file, "rb") as f:
        proto = f.read()
    probe = spm.SentencePieceProcessor()
    try:
        probe.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{model_file}: not a loadable SentencePiece model ({e})") from e
    added = _added_tokens(config)
    by_text = {text: i for i, (text, _) in added.items()}

    def lookup(text, default):
        if text is None:
            return default if default >= 0 else None
        if text in by_text:
            return by_text[text]
        i = probe.piece_to_id(text)
        return i if probe.id_to_piece(i) == text else None

    ids = {"bos": lookup(names["bos"], probe.bos_id()), "eos": lookup(names["eos"], probe.eos_id()),
           "unk": lookup(names["unk"], probe.unk_id()), "pad": lookup(names["pad"], probe.pad_id())}
    backend = SentencePieceBackend(
        proto, source=model_file, added_tokens=added, bos_token_id=ids["bos"],
        eos_token_id=ids["eos"], add_bos_token=config.get("add_bos_token", True),
        add_eos_token=config.get("add_eos_token", False))
    return backend, ids
