"""Embeddings: one vector per input text, from BERT-family encoders or Llama-family decoders.

    from engine import LLM
    llm = LLM("all-MiniLM-L6-v2")               # an embedding model: no KV cache, no scheduler
    vectors = llm.embed(["a sentence", "another"])   # float32 [2, 384], L2-normalised

Inputs are tokenized by engine (padding and truncation of the tokenizer file are off), packed
back to back into batches of at most `max_num_batched_tokens` tokens, run through the model
without padding, pooled per input (mean, CLS or last token, as the model folder's
sentence-transformers files say) and optionally L2-normalised.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from engine.model.bert import ENCODER_ARCHITECTURES, BertConfig, BertModel
from engine.model.config import DECODER_ARCHITECTURES
from engine.model.llama_embedding import BACKBONE_ARCHITECTURES, LlamaEmbeddingModel
from engine.model.loader import load_checkpoint
from engine.model.pooling import PoolingConfig, l2_normalize, pool, read_pooling_config
from engine.model.registry import resolve_model_path
from engine.tokenizer import load_tokenizer


def _folder_config(path: str) -> dict:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _architecture(config: dict) -> str | None:
    architectures = config.get("architectures") or [None]
    return architectures[0]


def _has_pooling_module(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "modules.json"), encoding="utf-8") as f:
            modules = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(modules, list) and any(
        isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling") for m in modules)


def is_embedding_model(model: str) -> bool:
    """Whether `LLM(model)` loads this model for embeddings rather than generation.

    True for a folder holding an encoder (BertModel), a decoder backbone without an LM head
    (LlamaModel, MistralModel, Qwen2Model), or a sentence-transformers Pooling module
    (modules.json). Any causal LM can still embed with `LLM(model, task="embed")`.

    Args:
        model: a path or a packaged model's name, as LLM takes.
    Returns:
        True for an embedding model.
    Raises:
        ValueError: the model is neither an existing path nor a known name.
    """
    path = resolve_model_path(model)
    if not os.path.isdir(path):
        return False  # a GGUF file: engine reads Llama-family decoders from those
    arch = _architecture(_folder_config(path))
    return (arch in ENCODER_ARCHITECTURES or arch in BACKBONE_ARCHITECTURES
            or _has_pooling_module(path))


@dataclass
class EmbeddingConfig:
    """Args:
        model: a Hugging Face folder, a .gguf file (decoders), or a packaged model's name.
        max_model_len: longest input in tokens, special tokens included, at most the
            model's positions (default: sentence-transformers' max_seq_length where the
            folder gives one, else the model's positions).
        max_num_batched_tokens: tokens per forward pass; inputs are packed up to this.
        pooling: "mean", "cls" or "last" (default: the folder's sentence-transformers
            Pooling module; without one, mean for encoders and last for decoders).
        normalize: L2-normalise by default (default: whether modules.json has a Normalize
            module; without modules.json, False for encoders and True for decoders).
        skip_tokenizer_init: accept token ids only (no tokenizer files needed).
        device: "cpu" (embeddings do not run on the GPU yet).
    """
    model: str
    max_model_len: int | None = None
    max_num_batched_tokens: int = 4096
    pooling: str | None = None
    normalize: bool | None = None
    skip_tokenizer_init: bool = False
    device: str = "cpu"

    def __post_init__(self):
        if self.device != "cpu":
            raise ValueError(f"EmbeddingConfig.device must be 'cpu' (embedding models run on "
                             f"the CPU only), got {self.device!r}")
        for name in ("max_model_len", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"EmbeddingConfig.{name} must be a positive integer, "
                                 f"got {value!r}")
        if self.pooling is not None:
            PoolingConfig(self.pooling, False)  # validates the name


def _st_max_seq_length(path: str) -> int | None:
    try:
        with open(os.path.join(path, "sentence_bert_config.json"), encoding="utf-8") as f:
            value = json.load(f).get("max_seq_length")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def _input_limit(path: str, model_max: int, max_model_len: int | None) -> int:
    """The longest input: max_model_len if given, else sentence-transformers' max_seq_length
    where the folder has one; never more than the model's positions."""
    wanted = max_model_len or (_st_max_seq_length(path) if os.path.isdir(path) else None)
    return min(model_max, wanted or model_max)


def _load_model(path: str, config: dict, max_model_len: int | None):
    """(model, default pooling, longest input) for a checkpoint."""
    arch = _architecture(config)
    if arch in ENCODER_ARCHITECTURES:
        checkpoint = load_checkpoint(path)
        model = BertModel(BertConfig.from_hf(checkpoint.config), checkpoint.weights, path)
        return (model, PoolingConfig("mean", normalize=False),
                _input_limit(path, model.max_position, max_model_len))
    if arch in DECODER_ARCHITECTURES or arch in BACKBONE_ARCHITECTURES or not os.path.isdir(path):
        checkpoint = load_checkpoint(path)
        model_max = int(checkpoint.config.get("max_position_embeddings", 2048))
        longest = _input_limit(path, model_max, max_model_len)
        model = LlamaEmbeddingModel(checkpoint.config, checkpoint.weights, path, longest)
        return model, PoolingConfig("last", normalize=True), longest
    supported = ENCODER_ARCHITECTURES + tuple(BACKBONE_ARCHITECTURES) + DECODER_ARCHITECTURES
    raise ValueError(f"{path}: architecture {arch!r} cannot embed; supported: "
                     f"{', '.join(supported)}")


def _truncate_encoding(full: list[int], bare: list[int], max_len: int) -> list[int]:
    """The first max_len tokens' worth of a text with its special tokens kept.

    full is bare with the post-processor's special tokens around it (prefix + bare +
    suffix, as for [CLS] text [SEP]); the text's tokens are cut so that the whole fits,
    which is what the tokenizers library's own truncation gives.
    """
    num_special = len(full) - len(bare)
    keep = max_len - num_special
    for p in range(num_special + 1):
        if full[p:p + len(bare)] == bare:
            if keep < 1:
                break
            return full[:p] + bare[:keep] + full[p + len(bare):]
    return full[:max_len]


class EmbeddingRunner:
    """Owns an embedding model, its tokenizer and one workspace; no KV cache, no scheduler.

    Attributes:
        tokenizer: the model's Tokenizer (None with skip_tokenizer_init).
        max_input_len: the longest input in tokens, special tokens included.
        dim: the length of each embedding.
        pooling: the PoolingConfig in use (mode and the default for normalize).
    Calls are serialised by a lock: one batch runs at a time (the kernels use every core).
    """

    def __init__(self, config: EmbeddingConfig):
        self.config = config
        path = resolve_model_path(config.model)
        hf_config = _folder_config(path) if os.path.isdir(path) else {}
        self.model, default, self.max_input_len = _load_model(path, hf_config,
                                                              config.max_model_len)
        pooling = read_pooling_config(path, default) if os.path.isdir(path) else default
        self.pooling = PoolingConfig(config.pooling or pooling.mode,
                                     pooling.normalize if config.normalize is None
                                     else bool(config.normalize))
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(path)
        self.dim = self.model.hidden_size
        self.vocab_size = self.model.config.vocab_size
        tokens = max(config.max_num_batched_tokens, self.max_input_len)
        self.workspace = self.model.make_workspace(tokens)
        self._lock = threading.Lock()

    def tokenize(self, inputs, truncate: bool = False) -> list[list[int]]:
        """Token ids of each input, checked against the vocabulary and max_input_len.

        Args:
            inputs: a string, a list of token ids (one input), or a list of strings and
                token-id lists. Texts get the model's special tokens ([CLS] ... [SEP], BOS);
                token ids are used as given.
            truncate: cut inputs longer than max_input_len (texts keep their special
                tokens); otherwise such an input is an error.
        Returns:
            One list of token ids per input, in order.
        Raises:
            ValueError: an input is empty, over-long (its index and length are named), has
                ids outside the vocabulary, or is neither text nor token ids.
        """
        items = _as_input_list(inputs)
        result = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                ids = self._encode_text(i, item, truncate)
            else:
                ids = _check_ids(i, item, self.vocab_size)
                if len(ids) > self.max_input_len and truncate:
                    ids = ids[:self.max_input_len]
            if not ids:
                raise ValueError(f"input {i} has no tokens to embed")
            if len(ids) > self.max_input_len:
                raise ValueError(f"input {i} is {len(ids)} tokens long, over the model's maximum "
                                 f"of {self.max_input_len} (pass truncate=True to cut it)")
            result.append(ids)
        return result

    def embed_token_ids(self, token_ids: Sequence[Sequence[int]],
                        normalize: bool | None = None) -> np.ndarray:
        """Embeddings of inputs already tokenized (by `tokenize`).

        Args:
            token_ids: one non-empty list of ids per input, each at most max_input_len long.
            normalize: L2-normalise (None: the model's default, `pooling.normalize`).
        Returns:
            float32 [len(token_ids), dim].
        """
        for i, ids in enumerate(token_ids):
            if not 0 < len(ids) <= self.max_input_len:
                raise ValueError(f"input {i} has {len(ids)} tokens; expected 1 to "
                                 f"{self.max_input_len} (the model's maximum)")
        out = np.empty((len(token_ids), self.dim), np.float32)
        budget = self.workspace.max_num_tokens  # >= max_input_len: every input fits
        with self._lock:
            start = 0
            while start < len(token_ids):
                end, total = start, 0
                while end < len(token_ids) and total + len(token_ids[end]) <= budget:
                    total += len(token_ids[end])
                    end += 1
                self._run_batch(token_ids[start:end], out[start:end])
                start = end
        if self.pooling.normalize if normalize is None else normalize:
            l2_normalize(out)
        return out

    def embed(self, inputs, normalize: bool | None = None, truncate: bool = False) -> np.ndarray:
        """Embeddings of texts or token ids: `tokenize` then `embed_token_ids`.

        Args:
            inputs: as for `tokenize`.
            normalize: L2-normalise (None: the model's default).
            truncate: cut over-long inputs instead of raising ValueError.
        Returns:
            float32 [number of inputs, dim].
        """
        return self.embed_token_ids(self.tokenize(inputs, truncate), normalize)

    def _encode_text(self, i: int, text: str, truncate: bool) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"input {i} is text, but the tokenizer was skipped "
                             f"(skip_tokenizer_init): pass token ids")
        ids = self.tokenizer.encode(text, add_special_tokens=True)
        if len(ids) > self.max_input_len and truncate:
            bare = self.tokenizer.encode(text, add_special_tokens=False)
            ids = _truncate_encoding(ids, bare, self.max_input_len)
        return ids

    def _run_batch(self, token_ids: Sequence[Sequence[int]], out: np.ndarray) -> None:
        lens = np.fromiter((len(t) for t in token_ids), np.int32, len(token_ids))
        query_start_loc = np.zeros(len(lens) + 1, np.int32)
        np.cumsum(lens, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        flat = np.fromiter((t for ids in token_ids for t in ids), np.int32, num_tokens)
        positions = (np.arange(num_tokens, dtype=np.int32)
                     - np.repeat(query_start_loc[:-1], lens))
        hidden = self.model.hidden_states(flat, positions, query_start_loc, self.workspace)
        pool(hidden, query_start_loc, self.pooling.mode, out=out)


def _is_token_id(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _as_input_list(inputs) -> list:
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, np.ndarray):
        inputs = inputs.tolist()
    if not isinstance(inputs, (list, tuple)):
        raise ValueError("inputs must be a string, a list of token ids, or a list of strings "
                         f"and token-id lists, got {type(inputs).__name__}")
    if inputs and all(_is_token_id(x) for x in inputs):
        return [list(inputs)]
    return list(inputs)


def _check_ids(i: int, item, vocab_size: int) -> list[int]:
    if isinstance(item, np.ndarray):
        item = item.tolist()
    if not isinstance(item, (list, tuple)) or not all(_is_token_id(t) for t in item):
        raise ValueError(f"input {i} must be a string or a list of token ids, got "
                         f"{type(item).__name__}")
    ids = [int(t) for t in item]
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"input {i} has token id {bad}, outside the vocabulary [0, {vocab_size})")
    return ids
