"""Llama GGUF files in Hugging Face terms: metadata -> config.json, tensors -> HF weights."""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from engine.model.gguf_file import GGUFFile, metadata
from engine.ops.quantized import QuantizedWeight, format_of_ggml_type

SUPPORTED_ARCHITECTURES = ("llama",)
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                   "output": "lm_head"}
# Stored types read as zero-copy numpy views (the matmul converts them in its inner loop).
_FLOAT_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                GGMLQuantizationType.BF16: ml_dtypes.bfloat16}


def architecture(gguf_file: GGUFFile) -> str:
    arch = gguf_file.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{gguf_file.name}: unsupported architecture {arch!r} "
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


def hf_config(gguf_file: GGUFFile) -> dict[str, object]:
    """The Hugging Face `LlamaForCausalLM` config.json equivalent of the GGUF metadata.

    Raises:
        ValueError: the architecture is not llama, or a required key is missing or invalid.
    """
    arch, where = architecture(gguf_file), gguf_file.name
    meta = metadata(gguf_file, include_vocab=False)
    hidden = _int(meta, f"{arch}.embedding_length", where)
    num_heads = _int(meta, f"{arch}.attention.head_count", where)
    num_kv_heads = _int(meta, f"{arch}.attention.head_count_kv", where, num_heads)
    head_dim = _int(meta, f"{arch}.attention.key_length", where, hidden // num_heads)
    rope_dim = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if num_heads % num_kv_heads or rope_dim != head_dim:
        raise ValueError(f"{where}: unsupported attention shape: {num_heads} heads, "
                         f"{num_kv_heads} KV heads, head_dim {head_dim}, rope dims {rope_dim}")
    names = gguf_file.tensors
    if "rope_freqs.weight" in names:
        raise ValueError(f"{where}: tensor 'rope_freqs.weight' (llama3 rope scaling) "
                         f"is not supported")
    embed = names.get("token_embd.weight")
    vocab_default = embed.shape[0] if embed is not None else None  # [vocab, hidden]
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
    """HF name -> weight, Q/K rows un-permuted, read on each access.

    By default a weight comes as the file stores it: float32/float16/bfloat16 as zero-copy
    views, Q8_0/Q4_0/Q4_1/Q4_K/Q6_K matrices as `QuantizedWeight` blocks (what the quantised
    kernels run), other block types dequantised to float32. With dequantize=True every
    weight is float32 (what `engine convert` writes).

    Nothing is cached: a caller that keeps every array holds a copy only of what had to be
    converted or un-permuted.
    """

    def __init__(self, gguf_file: GGUFFile, config: dict, dequantize: bool = False):
        self.gguf_file, self.file = gguf_file, gguf_file.name
        self.dequantize = dequantize
        self._tensors, self._heads = {}, {}
        for t in gguf_file.tensors.values():
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
        return self._tensors[name].shape

    def gguf_name(self, name: str) -> str:
        return self._tensors[name].name

    def __getitem__(self, name: str):
        t = self._tensors[name]
        w = self._read(t)
        if name in self._heads:
            heads = self._heads[name]
            if w.shape[0] % (2 * heads):
                raise ValueError(f"{self.file}: tensor {t.name!r} has {w.shape[0]} rows, not "
                                 f"divisible into {heads} heads of an even size")
            order = unpermute_rows(np.arange(w.shape[0]), heads)  # whole rows: blocks intact
            return w.take_rows(order) if isinstance(w, QuantizedWeight) else w[order]
        return w

    def _read(self, t):
        raw = self.gguf_file.tensor_bytes(t.name)
        shape = t.shape
        if not self.dequantize:
            if t.ggml_type in _FLOAT_TYPES:
                return raw.view(_FLOAT_TYPES[t.ggml_type]).reshape(shape)
            fmt = format_of_ggml_type(t.ggml_type)
            if fmt is not None and len(shape) == 2:
                # gguf_file checked that the rows fill whole blocks and lie inside the file
                return QuantizedWeight(raw.reshape(shape[0], -1), fmt, shape[1])
        try:
            w = np.asarray(dequantize(raw, t.ggml_type), dtype=np.float32)
        except NotImplementedError as e:
            raise ValueError(f"{self.file}: tensor {t.name!r}: {e}") from e
        return np.ascontiguousarray(w.reshape(shape))

    def release(self, name: str) -> None:
        """Drop this process's mapped pages of a tensor it has copied (they stay in the page
        cache; a later access reads them back): the copy alone then counts in its memory."""
        if self.dequantize:
            return  # every access made a copy; nothing of the file is held
        t = self._tensors[name]
        raw_map = getattr(self.gguf_file.data, "_mmap", None)
        start = -(-t.offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (t.offset + t.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if raw_map is not None and end > start and hasattr(mmap, "MADV_DONTNEED"):
            raw_map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors
