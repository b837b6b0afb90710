"""Ops by name, dispatched to a backend by the arrays' device.

This is the only module that imports the native extensions. Models call these
functions and never know which backend runs them. Every op writes into the
`out` array it is given (or in place, where documented) and returns it.

numpy arrays run on `engine._C` (the CPU kernels). GPU arrays (a later
backend) run on `engine._C_cuda` with the same names and signatures.
"""

from __future__ import annotations

import numpy as np

from engine import _C

__all__ = [
    "matmul", "rms_norm", "fused_add_rms_norm", "rope", "silu_and_mul", "embedding",
    "kv_cache_write", "kv_cache_copy", "paged_attention", "sample", "apply_penalties", "log_softmax_topk",
    "isa", "best_isa", "set_isa", "available_isas",
]


def _backend(*arrays):
    """The extension module that owns these arrays (numpy -> _C)."""
    for a in arrays:
        if a is not None and not isinstance(a, np.ndarray):
            raise TypeError(f"ops: expected numpy arrays, got {type(a).__name__}")
    return _C


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


def matmul(x, w, bias=None, *, out):
    """out[num_tokens, out_features] = x @ w.T (+ bias); w f32/f16/bf16."""
    _backend(x, w, bias, out).matmul(x, w, bias, out)
    return out


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
    """out[i] = table[ids[i]]."""
    _backend(ids, table, out).embedding(ids, table, out)
    return out


def kv_cache_write(k, v, k_cache, v_cache, slot_mapping):
    """Write new K/V rows into the paged cache at the given slots (-1 skips)."""
    _backend(k, v, k_cache, v_cache, slot_mapping).kv_cache_write(
        k, v, k_cache, v_cache, slot_mapping)


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
                    scale: float, *, out):
    """Causal attention of a packed batch over the paged KV cache."""
    _backend(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out).paged_attention(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out)
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
