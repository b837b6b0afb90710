"""numpy versions of every op: the oracle that tests hold each backend to.

Written for clarity, not speed: same arguments and semantics as `engine.ops`,
computed in float64 where that makes the result the exact answer to compare to.
"""

from __future__ import annotations

import math

import numpy as np

MASK64 = (1 << 64) - 1


def matmul(x, w, bias=None, *, out):
    y = x.astype(np.float64) @ w.astype(np.float64).T
    if bias is not None:
        y += bias.astype(np.float64)
    out[...] = y
    return out


def rms_norm(x, weight, eps, *, out):
    x64 = x.astype(np.float64)
    inv = 1.0 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    out[...] = x64 * inv * weight.astype(np.float64)
    return out


def fused_add_rms_norm(x, residual, weight, eps):
    residual[...] = residual.astype(np.float64) + x.astype(np.float64)
    rms_norm(residual, weight, eps, out=x)
    return x, residual


def layer_norm(x, weight, bias, eps, *, out, residual=None):
    s = x.astype(np.float32) if residual is None else x + residual  # the sum rounds to float32
    s64 = s.astype(np.float64)
    mean = s64.mean(axis=-1, keepdims=True)
    var = ((s64 - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (s64 - mean) / np.sqrt(var + eps) * weight.astype(np.float64)
    if bias is not None:
        y += bias.astype(np.float64)
    out[...] = y
    return out


def rope(positions, q, k, cos_sin_cache, head_dim):
    if len(positions) == 0:
        return q, k
    rotary_dim = cos_sin_cache.shape[1]
    half = rotary_dim // 2
    cos = cos_sin_cache[positions, :half].astype(np.float64)[:, None, :]
    sin = cos_sin_cache[positions, half:].astype(np.float64)[:, None, :]
    for t in (q, k):
        heads = t.reshape(t.shape[0], -1, head_dim)
        x1 = heads[..., :half].astype(np.float64)
        x2 = heads[..., half:rotary_dim].astype(np.float64)
        rotated = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        heads[..., :rotary_dim] = rotated
        t[...] = heads.reshape(t.shape)
    return q, k


def silu_and_mul(x, *, out):
    d = x.shape[-1] // 2
    a = x[..., :d].astype(np.float64)
    out[...] = a / (1.0 + np.exp(-a)) * x[..., d:].astype(np.float64)
    return out


def gelu(x, *, out, approximate="none"):
    x64 = x.astype(np.float64)
    if approximate == "tanh":
        u = np.sqrt(2.0 / np.pi) * (x64 + 0.044715 * x64 ** 3)
        out[...] = 0.5 * x64 * (1.0 + np.tanh(u))
    else:  # x * Phi(x) = x / 2 * erfc(-x / sqrt(2)): no cancellation for x < 0
        erfc = np.vectorize(math.erfc, otypes=[np.float64])
        out[...] = 0.5 * x64 * erfc(-x64 / np.sqrt(2.0)) if x.size else x64
    return out


def embedding(ids, table, *, out):
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise ValueError(f"embedding: ids must be in [0, {table.shape[0]})")
    out[...] = table[ids].astype(np.float32)
    return out


def kv_cache_write(k, v, k_cache, v_cache, slot_mapping):
    block_size = k_cache.shape[1]
    for i, slot in enumerate(slot_mapping):
        if slot < 0:
            continue
        k_cache[slot // block_size, slot % block_size] = k[i]
        v_cache[slot // block_size, slot % block_size] = v[i]


def rope_kv_cache_write(positions, q, k, v, cos_sin_cache, head_dim, k_cache, v_cache,
                        slot_mapping):
    if positions.size and (positions.min() < 0 or positions.max() >= cos_sin_cache.shape[0]):
        raise ValueError(f"rope_kv_cache_write: positions must be in [0, {cos_sin_cache.shape[0]})")
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if slot_mapping.size and (slot_mapping.min() < -1 or slot_mapping.max() >= num_slots):
        raise ValueError(f"rope_kv_cache_write: slots must be -1 or in [0, {num_slots})")
    rope(positions, q, k, cos_sin_cache, head_dim)
    kv_cache_write(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def kv_cache_copy(k_cache, v_cache, src_blocks, dst_blocks):
    for src, dst in zip(src_blocks, dst_blocks):
        k_cache[dst] = k_cache[src]
        v_cache[dst] = v_cache[src]


def gather_kv(cache, block_table, seq_len):
    """The first seq_len cached tokens of one sequence: [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache[block_table[:num_blocks]]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, *, out):
    num_q_heads = q.shape[1]
    group = num_q_heads // k_cache.shape[2]
    for s in range(len(seq_lens)):
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        seq_len = int(seq_lens[s])
        num_new = end - start
        k = gather_kv(k_cache, block_tables[s], seq_len).astype(np.float64)
        v = gather_kv(v_cache, block_tables[s], seq_len).astype(np.float64)
        k = np.repeat(k, group, axis=1)  # [seq_len, num_q_heads, head_dim]
        v = np.repeat(v, group, axis=1)
        qs = q[start:end].astype(np.float64)  # [num_new, num_q_heads, head_dim]
        scores = np.einsum("thd,shd->hts", qs, k) * scale
        positions = seq_len - num_new + np.arange(num_new)
        mask = np.arange(seq_len)[None, :] > positions[:, None]
        scores[:, mask] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out[start:end] = np.einsum("hts,shd->thd", p, v)
    return out


def varlen_attention(q, k, v, query_start_loc, scale, causal, *, out):
    group = q.shape[1] // k.shape[1]
    for s in range(len(query_start_loc) - 1):
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        if end == start:
            continue
        qs = q[start:end].astype(np.float64)                       # [n, num_heads, head_dim]
        ks = np.repeat(k[start:end].astype(np.float64), group, axis=1)
        vs = np.repeat(v[start:end].astype(np.float64), group, axis=1)
        scores = np.einsum("thd,shd->hts", qs, ks) * scale
        if causal:
            n = end - start
            scores[:, np.triu(np.ones((n, n), bool), k=1)] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out[start:end] = np.einsum("hts,shd->thd", p, vs)
    return out


# ---- sampling ------------------------------------------------------------------

def splitmix64(state: int) -> tuple[int, int]:
    """One step of SplitMix64: (new_state, 64 random bits)."""
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def uniform(bits: int) -> float:
    """A double in [0, 1) from the top 53 of 64 random bits."""
    return (bits >> 11) * (1.0 / (1 << 53))


def kept_candidates(row, temperature, top_k, top_p, min_p):
    """Token ids that survive the filters, most probable first, and their probabilities.

    Order: softmax(logits / temperature); sort descending (ties: lower id first);
    keep the top_k (if > 0); then the shortest prefix whose cumulative probability
    reaches top_p (if < 1); then those with p >= min_p * p_max (if > 0).
    """
    x = row.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    n = len(order)
    if top_k > 0:
        n = min(n, int(top_k))
    if top_p < 1.0:
        cum = np.cumsum(p[order[:n]])
        n = min(n, int(np.searchsorted(cum, top_p, side="left")) + 1)
    if min_p > 0.0:
        n = max(1, int(np.count_nonzero(p[order[:n]] >= min_p * p[order[0]])))
    return order[:n], p[order[:n]]


def sample(logits, temperature, top_k, top_p, min_p, rng_state, *, out):
    """Reference sampler. Each row's generator advances once per call, greedy or not.

    A sampled row draws u in [0, 1) and returns the first kept candidate whose
    cumulative probability exceeds u times the kept mass.
    """
    if np.isnan(logits).any():
        raise ValueError("sample: logits contain NaN")
    for i in range(logits.shape[0]):
        state, bits = splitmix64(int(rng_state[i]))
        rng_state[i] = state
        if temperature[i] <= 0.0:
            out[i] = int(np.argmax(logits[i]))
            continue
        ids, p = kept_candidates(logits[i], float(temperature[i]), int(top_k[i]),
                                 float(top_p[i]), float(min_p[i]))
        cum = np.cumsum(p)
        target = uniform(bits) * cum[-1]
        j = int(np.searchsorted(cum, target, side="right"))
        out[i] = int(ids[min(j, len(ids) - 1)])
    return out


# ---- penalties and logprobs ----------------------------------------------------

def _csr_slices(name, tokens, offsets, num_seqs, vocab):
    """Each sequence's slice of a CSR list, after the checks the kernel makes."""
    off = [int(o) for o in offsets]
    if len(off) != num_seqs + 1 or off[0] < 0 or off[-1] > len(tokens) or any(
            b < a for a, b in zip(off, off[1:])):
        raise ValueError(f"apply_penalties: bad {name} offsets")
    used = tokens[off[0]:off[-1]]
    if used.size and (used.min() < 0 or used.max() >= vocab):
        raise ValueError(f"apply_penalties: {name} out of range [0, {vocab})")
    return [tokens[a:b] for a, b in zip(off, off[1:])]


def apply_penalties(logits, prompt_tokens, prompt_offsets, output_tokens, output_offsets,
                    presence_penalty, frequency_penalty, repetition_penalty,
                    bias_ids, bias_values, bias_offsets):
    """In order: repetition penalty on tokens in the prompt or the output (logit > 0:
    divide, else multiply), then logit -= frequency * count + presence * (count > 0) over
    the output counts (both in float64, rounded to float32 once), then each bias added in
    float32, in list order.
    """
    num_seqs, vocab = logits.shape
    prompts = _csr_slices("prompt_tokens", prompt_tokens, prompt_offsets, num_seqs, vocab)
    outputs = _csr_slices("output_tokens", output_tokens, output_offsets, num_seqs, vocab)
    b_ids = _csr_slices("bias_ids", bias_ids, bias_offsets, num_seqs, vocab)
    b_vals = [bias_values[int(a):int(b)] for a, b in zip(bias_offsets, bias_offsets[1:])]
    for s in range(num_seqs):
        counts = np.bincount(outputs[s], minlength=vocab).astype(np.float64)
        seen = counts > 0
        seen[prompts[s]] = True
        x = logits[s].astype(np.float64)
        r = float(repetition_penalty[s])
        x = np.where(seen, np.where(x > 0, x / r, x * r), x)
        x = x - (float(frequency_penalty[s]) * counts + float(presence_penalty[s]) * (counts > 0))
        row = x.astype(np.float32)
        np.add.at(row, b_ids[s], b_vals[s].astype(np.float32))
        logits[s] = row
    return logits


def log_softmax_topk(logits, token_ids, k, *, out_token_logprob, out_topk_ids,
                     out_topk_logprobs):
    """log p = (x - max) - log(sum(exp(x - max))) in float64; the top k by logit
    (log_softmax keeps the order), ties to the lower id."""
    for i, row in enumerate(logits):
        if np.isnan(row).any():
            raise ValueError(f"log_softmax_topk: row {i}: logits contain NaN")
        x = row.astype(np.float64)
        x_max = x.max()
        logp = (x - x_max) - np.log(np.exp(x - x_max).sum())
        out_token_logprob[i] = logp[token_ids[i]]
        top = np.argsort(-x, kind="stable")[:k]
        out_topk_ids[i] = top
        out_topk_logprobs[i] = logp[top]
    return out_token_logprob, out_topk_ids, out_topk_logprobs


# ---- quantised weights (GGUF blocks) ------------------------------------------------------

Q8_BLOCK = 32


def quantize_q8_blocks(x):
    """The kernels' on-the-fly activation quantisation, bit for bit.

    Per token row and block of 32 values: d = max|x| / 127 and q = round-half-even(x / d)
    (as x * (1 / d) in float32); a block with NaN or inf gets d = NaN and q = 0.

    Args:
        x: [num_tokens, in_features] float32, in_features a multiple of 32.
    Returns:
        (q [num_tokens, in_features] int8, d [num_tokens, in_features / 32] float32).
    """
    blocks = np.asarray(x, np.float32).reshape(x.shape[0], -1, Q8_BLOCK)
    finite = np.isfinite(blocks).all(axis=-1)
    with np.errstate(invalid="ignore"):
        amax = np.where(finite, np.abs(blocks).max(axis=-1), np.float32(0))
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        q = np.rint(np.where(finite[..., None], blocks, 0) * inv[..., None]).astype(np.int8)
    d = np.where(finite, d, np.float32(np.nan)).astype(np.float32)
    return q.reshape(x.shape), d


def dequantize_blocks(w, format):
    """[rows, row_bytes] uint8 blocks -> float32 [rows, in_features], by gguf's dequantisers."""
    from gguf.quants import dequantize

    from engine.ops.quantized import FORMATS

    block_values, block_bytes, type_id = FORMATS[format]
    in_features = w.shape[1] // block_bytes * block_values
    if w.shape[0] == 0:
        return np.zeros((0, in_features), np.float32)
    return np.asarray(dequantize(np.ascontiguousarray(w), type_id), np.float32).reshape(
        w.shape[0], in_features)


def quant_matmul(x, w, format, bias=None, *, out):
    """out = dequantise(x's q8 blocks) @ dequantise(w)^T (+ bias), in float64."""
    q, d = quantize_q8_blocks(x)
    x_used = (q.reshape(d.shape + (Q8_BLOCK,)).astype(np.float64) * d[..., None]).reshape(q.shape)
    y = x_used @ dequantize_blocks(w, format).astype(np.float64).T
    if bias is not None:
        y += bias.astype(np.float64)
    out[...] = y
    return out


def quant_embedding(ids, table, format, *, out):
    out[...] = dequantize_blocks(table[np.asarray(ids)], format)
    return out
