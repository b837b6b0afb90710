"""Ops by name, dispatched to a backend by the arrays' device.

This is the only module that imports the native extensions. Models call these
functions and never know which backend runs them. Every op writes into the
`out` array it is given (or in place, where documented) and returns it.

numpy arrays run on `engine._C` (the CPU kernels). Device arrays
(`engine._C_cuda.DeviceArray`, made by `to_device` / `empty(..., device="cuda")`)
run on `engine._C_cuda` with the same names and signatures, queued on engine's
CUDA stream; `to_host` and `synchronize` wait for it.
"""

from __future__ import annotations

import numpy as np

from engine import _C
from engine.ops.packed import PackedWeight
from engine.ops.quantized import QuantizedWeight, RowStack

try:  # built wherever nvcc was found; imports without a driver and reports no device
    from engine import _C_cuda
except ImportError:  # pragma: no cover - a CPU-only build
    _C_cuda = None
_DeviceArray = getattr(_C_cuda, "DeviceArray", None)

__all__ = [
    "gpu_available", "is_device_array", "to_device", "from_dlpack", "to_host", "empty", "zeros", "synchronize",
    "copy", "matmul", "rms_norm", "fused_add_rms_norm", "rope", "silu_and_mul", "embedding",
    "kv_cache_write", "rope_kv_cache_write", "kv_cache_copy", "paged_attention", "sample", "apply_penalties", "log_softmax_topk",
    "isa", "best_isa", "set_isa", "available_isas",
    "layer_norm", "gelu", "varlen_attention",
    "QuantizedWeight", "PackedWeight", "quant_kernel",
]


def _backend(*arrays):
    """The extension module that owns these arrays: numpy -> _C, DeviceArray -> _C_cuda.
    Mixing the two in one call is a TypeError (copies are never implicit)."""
    for a in arrays:  # the common case first: a CPU step makes ~10 op calls per layer
        if a is not None and type(a) is not np.ndarray:
            break
    else:
        return _C
    on_device = [is_device_array(a) for a in arrays if a is not None]
    if any(on_device):
        if not all(on_device):
            raise TypeError("ops: arrays must all be on the GPU or all numpy; got a mix "
                            "(move them with ops.to_device / ops.to_host)")
        return _C_cuda
    for a in arrays:
        if a is not None and not isinstance(a, np.ndarray):
            raise TypeError(f"ops: expected numpy or device arrays, got {type(a).__name__}")
    return _C


# ---- devices ------------------------------------------------------------------------

def gpu_available() -> bool:
    """True where engine._C_cuda was built and a CUDA device is visible."""
    return _C_cuda is not None and _C_cuda.device_count() > 0


def is_device_array(a) -> bool:
    return _DeviceArray is not None and isinstance(a, _DeviceArray)


def _require_gpu():
    if _C_cuda is None:
        raise RuntimeError("engine was built without CUDA (nvcc was not found at install time)")
    if _C_cuda.device_count() == 0:
        raise RuntimeError("no CUDA device is visible (no NVIDIA driver or GPU)")
    return _C_cuda


def to_device(array):
    """A copy of a numpy array (f32/f16/bf16/int32/int64/uint8/uint64) on the GPU."""
    if is_device_array(array):
        return array
    return _require_gpu().from_numpy(np.ascontiguousarray(array))


def from_dlpack(tensor):
    """A DeviceArray viewing another library's CUDA tensor (torch, CuPy); no copy.
    Device arrays export the other way through __dlpack__ (torch.from_dlpack(a))."""
    return _require_gpu().from_dlpack(tensor)


def to_host(array) -> np.ndarray:
    """A numpy copy of a device array (waits for queued work); numpy arrays pass through."""
    return array.numpy() if is_device_array(array) else np.asarray(array)


def empty(shape, dtype, device: str = "cpu"):
    """An uninitialised array on "cpu" (numpy) or "cuda"."""
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if device == "cpu":
        return np.empty(shape, dtype)
    if device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return _require_gpu().empty(list(shape), np.dtype(dtype))


def zeros(shape, dtype, device: str = "cpu"):
    """A zero-filled array on "cpu" or "cuda"."""
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if device == "cpu":
        return np.zeros(shape, dtype)
    if device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return _require_gpu().zeros([int(s) for s in shape], np.dtype(dtype))


def synchronize() -> None:
    """Wait for the GPU work engine has queued (no-op without a GPU)."""
    if gpu_available():
        _C_cuda.synchronize()


def copy(src, *, out):
    """out[...] = src (same shape and dtype; rows contiguous on the GPU)."""
    if is_device_array(src) or is_device_array(out):
        _backend(src, out).copy(src, out)
    else:
        np.copyto(out, src)
    return out


def isa() -> str:
    """The CPU instruction set the kernels use now: avx512, avx2 or portable."""
    return _C.isa()


def best_isa() -> str:
    return _C.best_isa()


def set_isa(name: str) -> None:
    """Use the named instruction set; ValueError if the CPU lacks it."""
    _C.set_isa(name)


def available_isas() -> list[str]:
    """Every instruction set this CPU can run, best first."""
    order = ["avx512", "avx2", "portable"]
    return order[order.index(_C.best_isa()):]


def matmul(x, w, bias=None, *, out, prefetch=()):
    """out[num_tokens, out_features] = x @ w.T (+ bias).

    w is f32/f16/bf16, a PackedWeight (the same, laid out for the CPU's decode kernel;
    bit-identical results), a QuantizedWeight (GGUF blocks; CPU only: x is quantised on the
    fly to q8 blocks of 32 for integer dot products), or a RowStack of those (each part
    into its own columns of out).

    prefetch: up to 16 C-contiguous numpy arrays whose bytes the CPU's one-token quantised
    kernel (AVX-512 VNNI) requests into cache while it streams w: what the next op reads
    (decode's KV blocks). A hint; other kernels ignore it, and results never depend on it.
    """
    if isinstance(w, PackedWeight):
        _require_cpu("matmul", x, bias, out)
        _C.matmul_packed(x, w.data, w.out_features, bias, out)
    elif isinstance(w, QuantizedWeight):
        _require_cpu("matmul", x, bias, out)
        _C.quant_matmul(x, w.data, w.format, bias, out, w.interleave, list(prefetch))
    elif isinstance(w, RowStack):
        for i, (part, start, stop) in enumerate(zip(w.parts, w.bounds, w.bounds[1:])):
            matmul(x, part, None if bias is None else bias[start:stop], out=out[:, start:stop],
                   prefetch=prefetch if i == len(w.parts) - 1 else ())
    else:
        _backend(x, w, bias, out).matmul(x, w, bias, out)
    return out


def quant_kernel() -> str:
    """The quantised-matmul kernels in use: avx512_vnni, avx2 or portable."""
    return _C.quant_kernel()


def _require_cpu(op: str, *arrays) -> None:
    if _backend(*arrays) is not _C:
        raise TypeError(f"ops.{op}: packed and quantised (GGUF block) weights run on the CPU "
                        f"only; pass numpy arrays")


def rms_norm(x, weight, eps: float, *, out):
    """out = x * rsqrt(mean(x**2, -1) + eps) * weight."""
    _backend(x, weight, out).rms_norm(x, weight, eps, out)
    return out


def fused_add_rms_norm(x, residual, weight, eps: float):
    """In place: residual += x; x = rms_norm(residual) * weight."""
    _backend(x, residual, weight).fused_add_rms_norm(x, residual, weight, eps)
    return x, residual


def rope(positions, q, k, cos_sin_cache, head_dim: int):
    """In place rotary embedding (rotate_half layout) of q and k."""
    _backend(positions, q, k, cos_sin_cache).rope(positions, q, k, cos_sin_cache, head_dim)
    return q, k


def silu_and_mul(x, *, out):
    """out = silu(x[:, :d]) * x[:, d:]."""
    _backend(x, out).silu_and_mul(x, out)
    return out


def embedding(ids, table, *, out):
    """out[i] = table[ids[i]]; table f32/f16/bf16, a PackedWeight, or a QuantizedWeight
    (rows dequantised)."""
    if isinstance(table, PackedWeight):
        _require_cpu("embedding", ids, out)
        if not (isinstance(out, np.ndarray) and out.dtype == np.float32
                and out.shape == (len(ids), table.in_features)):
            got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
            raise ValueError(f"embedding: out must be float32 [{len(ids)}, {table.in_features}], "
                             f"got {got}")
        out[...] = table.take(ids)
    elif isinstance(table, QuantizedWeight):
        _require_cpu("embedding", ids, out)
        _C.quant_embedding(ids, table.data, table.format, out, table.interleave)
    else:
        _backend(ids, table, out).embedding(ids, table, out)
    return out


def kv_cache_write(k, v, k_cache, v_cache, slot_mapping):
    """Write new K/V rows into the paged cache at the given slots (-1 skips)."""
    _backend(k, v, k_cache, v_cache, slot_mapping).kv_cache_write(
        k, v, k_cache, v_cache, slot_mapping)


def rope_kv_cache_write(positions, q, k, v, cos_sin_cache, head_dim: int, k_cache, v_cache,
                        slot_mapping):
    """rope(positions, q, k, ...) then kv_cache_write(k, v, ...): one pass over the tokens on
    the CPU (the same bits as the two ops), the two kernels on the GPU. k and v are
    [num_tokens, num_kv_heads, head_dim]; every position and slot is checked before anything
    is rotated or written."""
    backend = _backend(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping)
    if backend is _C:
        _C.rope_kv_cache_write(positions, q, k, v, cos_sin_cache, head_dim, k_cache, v_cache,
                               slot_mapping)
    else:
        backend.rope(positions, q, k, cos_sin_cache, head_dim)
        backend.kv_cache_write(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def kv_cache_copy(k_cache, v_cache, src_blocks, dst_blocks):
    """Copy whole cache blocks src_blocks[i] -> dst_blocks[i] in K and V (copy-on-write).

    Args:
        k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim] float32, contiguous.
        src_blocks, dst_blocks: int32 [num_pairs] ids in [0, num_blocks); no dst repeats
            or is also a src.
    """
    _backend(k_cache, v_cache, src_blocks, dst_blocks).kv_cache_copy(
        k_cache, v_cache, src_blocks, dst_blocks)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                    scale: float, *, out, prefetch=()):
    """Causal attention of a packed batch over the paged KV cache.

    prefetch: up to 16 C-contiguous numpy arrays whose bytes the CPU's AVX-512 kernel
    requests into cache as it goes (the weights of the matmul after it); a hint, ignored
    elsewhere (the GPU included)."""
    backend = _backend(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out)
    if backend is _C:
        _C.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                           out, list(prefetch))
    else:
        backend.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                scale, out)
    return out


def sample(logits, temperature, top_k, top_p, min_p, rng_state, *, out):
    """One token id per row; rng_state (uint64 per row) advances in place."""
    _backend(logits, temperature, top_k, top_p, min_p, rng_state, out).sample(
        logits, temperature, top_k, top_p, min_p, rng_state, out)
    return out


def apply_penalties(logits, prompt_tokens, prompt_offsets, output_tokens, output_offsets,
                    presence_penalty, frequency_penalty, repetition_penalty,
                    bias_ids, bias_values, bias_offsets):
    """In place on logits [num_seqs, vocab] f32: repetition, frequency/presence, logit bias.

    Each sequence s reads its own slices of CSR lists (int32 ids, repeats allowed):
    prompt_tokens[prompt_offsets[s]:prompt_offsets[s + 1]], likewise output_tokens and
    bias_ids / bias_values. Order: repetition penalty (tokens in the prompt or output),
    then frequency * count + presence * (count > 0) (output tokens), then each bias.

    Args:
        logits: [num_seqs, vocab] float32, modified in place.
        prompt_tokens, output_tokens, bias_ids: int32 [*] ids in [0, vocab).
        prompt_offsets, output_offsets, bias_offsets: int32 [num_seqs + 1].
        presence_penalty, frequency_penalty, repetition_penalty: float32 [num_seqs].
        bias_values: float32, one per bias id.
    Returns:
        logits.
    """
    _backend(logits, prompt_tokens, prompt_offsets, output_tokens, output_offsets,
             presence_penalty, frequency_penalty, repetition_penalty, bias_ids, bias_values,
             bias_offsets).apply_penalties(
        logits, prompt_tokens, prompt_offsets, output_tokens, output_offsets, presence_penalty,
        frequency_penalty, repetition_penalty, bias_ids, bias_values, bias_offsets)
    return logits


def log_softmax_topk(logits, token_ids, k: int, *, out_token_logprob, out_topk_ids,
                     out_topk_logprobs):
    """Log-probability of each row's chosen token and the row's top k (ties: lower id).

    Args:
        logits: [num_seqs, vocab] float32 (not modified).
        token_ids: [num_seqs] int32, the chosen token of each row.
        k: how many top tokens per row, 0 <= k <= vocab.
        out_token_logprob: [num_seqs] float32.
        out_topk_ids: [num_seqs, k] int32, best first.
        out_topk_logprobs: [num_seqs, k] float32.
    Returns:
        (out_token_logprob, out_topk_ids, out_topk_logprobs).
    """
    _backend(logits, token_ids, out_token_logprob, out_topk_ids, out_topk_logprobs
             ).log_softmax_topk(logits, token_ids, k, out_token_logprob, out_topk_ids,
                                out_topk_logprobs)
    return out_token_logprob, out_topk_ids, out_topk_logprobs


def layer_norm(x, weight, bias, eps: float, *, out, residual=None):
    """LayerNorm per row, of x + residual when a residual is given (post-norm blocks).

    Args:
        x: [num_tokens, hidden] float32 (rows contiguous, any row stride).
        weight: [hidden] float32/float16/bfloat16.
        bias: [hidden] like weight, or None.
        eps: added to the variance.
        out: [num_tokens, hidden] float32; may be x or residual itself.
        residual: [num_tokens, hidden] float32 or None.
    Returns:
        out = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias, s = x (+ residual).
    """
    _backend(x, weight, bias, out, residual).layer_norm(
        x, residual=residual, weight=weight, bias=bias, eps=eps, out=out)
    return out


def gelu(x, *, out, approximate: str = "none"):
    """GELU elementwise, as torch.nn.functional.gelu.

    Args:
        x: [num_tokens, d] float32 (rows contiguous, any row stride).
        out: [num_tokens, d] float32; may be x itself.
        approximate: "none" for x / 2 * (1 + erf(x / sqrt(2))) (BERT's "gelu"), "tanh"
            for the tanh approximation ("gelu_new", "gelu_pytorch_tanh").
    Returns:
        out.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    _backend(x, out).gelu(x, out, approximate == "tanh")
    return out


def varlen_attention(q, k, v, query_start_loc, scale: float, causal: bool, *, out):
    """Attention within each sequence of a packed batch; no KV cache, no padding.

    Sequence s owns tokens query_start_loc[s]:query_start_loc[s + 1] of q, k and v; each
    token attends to every token of its sequence (causal=False, encoders) or to those at
    or before it (causal=True). Query head h reads KV head h // (num_heads // num_kv_heads).

    Args:
        q: [num_tokens, num_heads, head_dim] float32 (any token and head stride).
        k, v: [num_tokens, num_kv_heads, head_dim] float32 (any token and head stride).
        query_start_loc: [num_seqs + 1] int32, 0 first, non-decreasing, num_tokens last.
        scale: multiplies q . k (usually head_dim ** -0.5).
        causal: mask the tokens after each query token.
        out: [num_tokens, num_heads, head_dim] float32, not overlapping q, k or v.
    Returns:
        out.
    """
    _backend(q, k, v, query_start_loc, out).varlen_attention(
        q, k, v, query_start_loc, scale, causal, out)
    return out
