"""GGUF files: validated opening, llama metadata -> Hugging Face config, tensors -> HF weights.

`gguf.GGUFReader` trusts the lengths and counts it reads: a truncated or lying file makes it
raise assorted exceptions, loop over a count it never checks against the file size, or build
views that do not reach the bytes they claim. `open_gguf` therefore first walks the layout
itself, checking every length, count and tensor extent against the file size, and only then
hands the file to the reader.

Layout (all little-endian):
    magic "GGUF", version u32 (2 or 3), tensor_count u64, kv_count u64
    kv_count  x  key: string, value_type u32, value
    tensor_count  x  name: string, n_dims u32, dims u64[n_dims] (innermost first),
                     ggml_type u32, offset u64 (relative to the data section)
    padding to general.alignment (default 32), then the data section
string = length u64 + UTF-8 bytes; array = item_type u32 + count u64 + items.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterator, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8
DEFAULT_ALIGNMENT = 32
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                   10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Bounds-checked sequential reads over the file's bytes."""

    def __init__(self, buf: mmap.mmap | bytes, name: str):
        self.buf, self.name, self.pos, self.size = buf, name, 0, len(buf)

    def need(self, num_bytes: int, what: str) -> None:
        if num_bytes > self.size - self.pos:
            raise ValueError(f"{self.name}: truncated: {what} at byte {self.pos} needs "
                             f"{num_bytes} bytes, the file has {self.size - self.pos} left")

    def scalar(self, fmt: str, what: str) -> int | float | bool:
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        length = self.scalar("Q", what)
        self.need(length, what)
        raw = bytes(self.buf[self.pos:self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.name}: {what} is not valid UTF-8: {e}") from e

    def skip_value(self, value_type: int, what: str, depth: int = 0):
        """Skip one metadata value; returns it when it is a scalar (for general.alignment)."""
        if value_type in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[value_type], what)
        if value_type == _STRING:
            self.string(what)
            return None
        if value_type != _ARRAY or depth >= MAX_NESTING:
            raise ValueError(f"{self.name}: {what} has unknown value type {value_type}")
        item_type = self.scalar("I", what)
        count = self.scalar("Q", what)
        if item_type in _SCALAR_FORMATS:
            size = count * struct.calcsize("<" + _SCALAR_FORMATS[item_type])
            self.need(size, f"{what} ({count} items)")
            self.pos += size
            return None
        # Strings take at least 8 bytes each, arrays 12: a lying count fails here, not in a loop.
        self.need(count * (8 if item_type == _STRING else 12), f"{what} ({count} items)")
        for idx in range(count):
            self.skip_value(item_type, f"{what}[{idx}]", depth + 1)
        return None


def _check_layout(buf: mmap.mmap | bytes, name: str) -> None:
    """Walk the header and tensor infos, checking everything against the file size."""
    cur = _Cursor(buf, name)
    cur.need(24, "header")
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{name}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.scalar("I", "version")
    if version not in (2, 3):
        raise ValueError(f"{name}: unsupported GGUF version {version} (expected 2 or 3, "
                         f"little-endian)")
    tensor_count, kv_count = cur.scalar("Q", "tensor count"), cur.scalar("Q", "metadata count")
    # Each key/value takes at least 13 bytes, each tensor info at least 24.
    cur.need(kv_count * 13 + tensor_count * 24, f"{kv_count} metadata entries and "
                                                f"{tensor_count} tensor infos")
    alignment, keys = DEFAULT_ALIGNMENT, set()
    for idx in range(kv_count):
        key = cur.string(f"metadata key #{idx}")
        if key in keys:
            raise ValueError(f"{name}: duplicate metadata key {key!r}")
        keys.add(key)
        value = cur.skip_value(cur.scalar("I", f"type of {key!r}"), f"metadata {key!r}")
        if key == "general.alignment":
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                raise ValueError(f"{name}: general.alignment {value!r} is not a power of two")
            alignment = value
    tensors = [_read_tensor_info(cur, idx) for idx in range(tensor_count)]
    data_start = -(-cur.pos // alignment) * alignment
    names = set()
    for tensor_name, num_bytes, offset in tensors:
        if tensor_name in names:
            raise ValueError(f"{name}: duplicate tensor {tensor_name!r}")
        names.add(tensor_name)
        if offset % alignment:
            raise ValueError(f"{name}: tensor {tensor_name!r} offset {offset} is not a multiple "
                             f"of the alignment {alignment}")
        if data_start + offset + num_bytes > len(buf):
            raise ValueError(f"{name}: tensor {tensor_name!r} data [{data_start + offset}, "
                             f"{data_start + offset + num_bytes}) lies past the end of the file "
                             f"({len(buf)} bytes)")


def _read_tensor_info(cur: _Cursor, idx: int) -> tuple[str, int, int]:
    tensor_name = cur.string(f"name of tensor #{idx}")
    where = f"tensor {tensor_name!r}"
    num_dims = cur.scalar("I", where)
    if not 1 <= num_dims <= MAX_DIMS:
        raise ValueError(f"{cur.name}: {where} has {num_dims} dimensions (expected 1..{MAX_DIMS})")
    dims = [cur.scalar("Q", where) for _ in range(num_dims)]
    raw_type = cur.scalar("I", where)
    offset = cur.scalar("Q", where)
    try:
        ggml_type = GGMLQuantizationType(raw_type)
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise ValueError(f"{cur.name}: {where} has unknown tensor type {raw_type}") from None
    if dims[0] % block_size:
        raise ValueError(f"{cur.name}: {where} row length {dims[0]} is not a multiple of the "
                         f"{ggml_type.name} block size {block_size}")
    return tensor_name, math.prod(dims) // block_size * type_size, offset


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """Open a GGUF file after checking that its layout lies within the file.

    Args:
        path: the .gguf file.

    Returns:
        A `gguf.GGUFReader` over the memory-mapped file.

    Raises:
        ValueError: the file is missing, truncated or malformed; the message names the file
            and, where one is involved, the tensor.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ValueError(f"{name}: file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _check_layout(buf, name)
    except OSError as e:
        raise ValueError(f"{path}: cannot read GGUF file: {e}") from e
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises KeyError, IndexError, ...: one error for callers
        raise ValueError(f"{name}: malformed GGUF file: {type(e).__name__}: {e}") from e


_VOCAB_KEYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
               "tokenizer.ggml.merges"}


def file_name(reader: GGUFReader) -> str:
    return os.path.basename(getattr(reader.data, "filename", None) or "<gguf>")


def metadata(reader: GGUFReader, include_vocab: bool = True) -> dict[str, object]:
    """All metadata key/values as plain Python values (str, int, float, bool, lists).

    Args:
        reader: an open GGUF.
        include_vocab: False skips the large tokenizer arrays (tokens, scores, types, merges).
    """
    result = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own header entries, not metadata
            continue
        if not include_vocab and key in _VOCAB_KEYS:
            continue
        try:
            result[key] = field.contents()
        except Exception as e:
            raise ValueError(f"{file_name(reader)}: metadata {key!r} cannot be read: {e}") from e
    return result


# -- llama: GGUF metadata and tensors in Hugging Face terms -------------------------------------

SUPPORTED_ARCHITECTURES = ("llama",)
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                   "output": "lm_head"}


def architecture(reader: GGUFReader) -> str:
    field = reader.get_field("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{file_name(reader)}: unsupported architecture {arch!r} "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return arch


def _int(meta: dict, key: str, where: str, default: int | None = None) -> int:
    value = meta.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{where}: metadata {key!r} must be a positive integer, got {value!r}")
    return value


def _float(value: float) -> float:
    """A float32 value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    value = float(value)
    as_f32 = np.float32(value)
    return float(str(as_f32)) if float(as_f32) == value else value


def hf_config(reader: GGUFReader) -> dict[str, object]:
    """The Hugging Face `LlamaForCausalLM` config.json equivalent of the GGUF metadata.

    Raises:
        ValueError: the architecture is not llama, or a required key is missing or invalid.
    """
    arch, where = architecture(reader), file_name(reader)
    meta = metadata(reader, include_vocab=False)
    hidden = _int(meta, f"{arch}.embedding_length", where)
    num_heads = _int(meta, f"{arch}.attention.head_count", where)
    num_kv_heads = _int(meta, f"{arch}.attention.head_count_kv", where, num_heads)
    head_dim = _int(meta, f"{arch}.attention.key_length", where, hidden // num_heads)
    rope_dim = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if num_heads % num_kv_heads or rope_dim != head_dim:
        raise ValueError(f"{where}: unsupported attention shape: {num_heads} heads, "
                         f"{num_kv_heads} KV heads, head_dim {head_dim}, rope dims {rope_dim}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{where}: tensor 'rope_freqs.weight' (llama3 rope scaling) "
                         f"is not supported")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab_default = int(embed.shape[-1]) if embed is not None else None
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _int(meta, f"{arch}.feed_forward_length", where),
        "num_hidden_layers": _int(meta, f"{arch}.block_count", where),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": _int(meta, f"{arch}.context_length", where, 2048),
        "vocab_size": _int(meta, f"{arch}.vocab_size", where, vocab_default),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
        if isinstance(meta.get(f"tokenizer.ggml.{key}"), int):
            config[hf_key] = meta[f"tokenizer.ggml.{key}"]
    rope_scaling = _rope_scaling(meta, arch)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(meta: dict, arch: str) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind is None and factor is not None:
        kind = "linear"  # the older key rope.scale_linear
    if kind in (None, "none") or factor is None:
        return None
    scaling = {"rope_type": kind, "factor": _float(factor)}
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    base, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
    return None


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> HF rotate_half halves).

    Args:
        w: [rows, cols] (or [rows] for a bias), rows = num_heads * head_dim.
        num_heads: query heads for Q, KV heads for K.
    """
    rows = w.shape[0]
    rest = w.shape[1:]
    return (w.reshape(num_heads, rows // num_heads // 2, 2, *rest)
            .swapaxes(1, 2).reshape(w.shape))


class GGUFWeights(Mapping[str, np.ndarray]):
    """HF name -> float32 array, dequantised (and Q/K un-permuted) on each access.

    Nothing is cached: a caller that keeps every array holds a float32 copy of the model,
    one that converts each to its own layout holds one tensor at a time.
    """

    def __init__(self, reader: GGUFReader, config: dict):
        self.reader, self.file = reader, file_name(reader)
        self._tensors, self._heads = {}, {}
        for t in reader.tensors:
            hf_name = hf_tensor_name(t.name)
            if hf_name is None:
                raise ValueError(f"{self.file}: tensor {t.name!r} has no Hugging Face llama "
                                 f"equivalent")
            self._tensors[hf_name] = t
            if ".q_proj." in hf_name:
                self._heads[hf_name] = config["num_attention_heads"]
            elif ".k_proj." in hf_name:
                self._heads[hf_name] = config["num_key_value_heads"]

    def shape(self, name: str) -> tuple[int, ...]:
        """Row-major shape, (out_features, in_features) for a matrix, without dequantising."""
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def gguf_name(self, name: str) -> str:
        return self._tensors[name].name

    def __getitem__(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as e:
            raise ValueError(f"{self.file}: tensor {t.name!r}: {e}") from e
        w = w.reshape(self.shape(name))
        if name in self._heads:
            heads = self._heads[name]
            if w.shape[0] % (2 * heads):
                raise ValueError(f"{self.file}: tensor {t.name!r} has {w.shape[0]} rows, not "
                                 f"divisible into {heads} heads of an even size")
            w = unpermute_rows(w, heads)
        return np.ascontiguousarray(w)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors
