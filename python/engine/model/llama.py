"""Llama-family decoders (Llama 2/3, Mistral without sliding window, SmolLM, TinyLlama,
Qwen2 with q/k/v biases) over the packed batch and the paged KV cache.

The model composes ops and knows nothing of requests: it reads a ForwardBatch,
writes K/V into the caches it is given, and returns logits for the batch's
logits_indices rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from engine import ops
from engine.model.batch import ForwardBatch, KVCache
from engine.model.config import ModelConfig
from engine.model.loader import require
from engine.model.rope import rope_cos_sin_cache, rope_parameters
from engine.ops.packed import PackedWeight
from engine.ops.quantized import QUANTIZABLE, QuantizedWeight, RowStack, private_copy, stack_rows


@dataclass
class LlamaLayer:
    input_norm: np.ndarray   # [hidden]
    qkv: np.ndarray          # [q_size + 2 * kv_size, hidden]: q, k, v rows fused at load
    qkv_bias: np.ndarray | None  # [q_size + 2 * kv_size] float32
    o_proj: np.ndarray       # [hidden, q_size]
    post_norm: np.ndarray    # [hidden]
    gate_up: np.ndarray      # [2 * intermediate, hidden]: gate rows then up rows
    down: np.ndarray         # [hidden, intermediate]


def _dequantized(w):
    """float32 for GGUF blocks (and stacks holding them); anything else as it is."""
    if isinstance(w, QuantizedWeight):
        return w.dequantize()
    if isinstance(w, RowStack):
        return np.concatenate([np.asarray(_dequantized(p), np.float32) for p in w.parts])
    return w


# A one-token step on the CPU overlaps memory with compute (ops.matmul's and
# ops.paged_attention's prefetch): the quantised QKV matmul requests the KV blocks attention
# reads next, at most this many bytes a layer, and attention requests o_proj's weights.
PREFETCH_KV_BYTES = 8 << 20


def _kv_block_runs(batch: ForwardBatch, cache: KVCache) -> list[tuple[int, int]]:
    """Runs [first, last) of consecutive cache blocks holding the batch's cached positions
    (the same in every layer), at most 8 (16 arrays: K and V each) and PREFETCH_KV_BYTES of
    K and V in all."""
    runs, budget = [], PREFETCH_KV_BYTES // (2 * cache.k[0].nbytes)
    bs = cache.k.shape[1]
    for s in range(batch.num_seqs):
        ids = batch.block_tables[s, :-(-int(batch.seq_lens[s]) // bs)].tolist()
        for b in ids:
            if budget == 0:
                return runs
            budget -= 1
            if runs and runs[-1][1] == b:
                runs[-1] = (runs[-1][0], b + 1)
            elif len(runs) == 8:
                return runs
            else:
                runs.append((b, b + 1))
    return runs


def _weight_array(w) -> np.ndarray:
    """The array holding a weight's bytes (a stack's first part)."""
    if isinstance(w, RowStack):
        w = w.parts[0]
    return w.data if isinstance(w, (QuantizedWeight, PackedWeight)) else w


def _tiles_quantised(device: str) -> bool:
    """Whether q8_0 / q4_0 / q4_1 blocks are laid out in 4-row tiles: on the CPU, where the
    AVX-512 VNNI kernels run (QuantizedWeight.interleaved)."""
    return device == "cpu" and ops.quant_kernel() == "avx512_vnni"


class Workspace:
    """Activation buffers sized once for max_num_tokens / max_num_seqs; steps take views."""

    def __init__(self, config: ModelConfig, max_num_tokens: int, max_num_seqs: int,
                 device: str = "cpu"):
        c = config

        def empty(rows, cols):
            return ops.empty((rows, cols), np.float32, device)

        self.hidden = empty(max_num_tokens, c.hidden_size)     # [T, hidden]
        self.residual = empty(max_num_tokens, c.hidden_size)   # [T, hidden]
        self.qkv = empty(max_num_tokens, c.q_size + 2 * c.kv_size)
        self.attn = empty(max_num_tokens, c.q_size)            # [T, heads * head_dim]
        self.gate_up = empty(max_num_tokens, 2 * c.intermediate_size)
        self.act = empty(max_num_tokens, c.intermediate_size)
        self.last_hidden = empty(max_num_seqs, c.hidden_size)  # [S, hidden]
        self.logits = empty(max_num_seqs, c.vocab_size)        # [S, vocab]
        self.max_num_tokens = max_num_tokens
        self.max_num_seqs = max_num_seqs
        self.device = device


class LlamaForCausalLM:
    def __init__(self, config: ModelConfig, weights: Mapping[str, np.ndarray], source: str,
                 max_position: int | None = None, device: str = "cpu",
                 quantization: str | None = None):
        """Args:
            config: the model's shape.
            weights: Hugging Face tensor names -> arrays (f32/f16/bf16, zero-copy where
                possible) or QuantizedWeights (GGUF blocks, run as they are).
            source: the file or folder the weights came from, for error messages.
            max_position: positions the RoPE table covers (default: the config's maximum).
            device: "cpu" (the matrices copied into this process's memory, the files'
                pages released; norms and an untied embedding stay views of the files) or
                "cuda" (copies in GPU memory, same dtypes).
            quantization: None, or "q8_0" / "q4_0" / "q4_1": quantise the float projection
                weights at load (the LM head to q8_0; the embedding table stays as it is;
                weights the checkpoint already stores quantised are kept).
        """
        self.config = c = config
        hidden, q, kv, inter = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size

        def get(name, shape):
            return require(weights, name, shape, source)

        release = getattr(weights, "release", lambda _: None)  # drop a copied tensor's pages
        # On the CPU (unless quantised below) float matrices are packed for the decode
        # kernel (ops.PackedWeight: one stream per 8 rows instead of 8 streams; the 1B f16
        # model's weights on 2 threads: 31 -> 32 GB/s when memory is slow, 43 -> 50 when
        # it is fast). The same bits out; packed as loaded, so the peak holds one extra
        # matrix at most.
        # GGUF blocks of q8_0 / q4_0 / q4_1 are laid out in 4-row tiles where the AVX-512 VNNI
        # kernels run (QuantizedWeight.interleaved: the same blocks and results; the decode
        # kernel reads a tile without shuffles).
        pack = device == "cpu" and quantization is None
        tile = _tiles_quantised(device)

        def packed(w):
            if isinstance(w, QuantizedWeight):
                return w.interleaved() if tile else w  # stacked: a private copy already
            return PackedWeight(w) if pack and isinstance(w, np.ndarray) and w.ndim == 2 else w

        def fused(names_shapes):
            """Row-stacked copies; the file's pages of the parts are released once copied."""
            w = packed(stack_rows([get(name, shape) for name, shape in names_shapes]))
            for name, _ in names_shapes:
                release(name)
            return w

        def resident(name, shape):
            """On the CPU, a private copy (packed, or GGUF blocks) whose file pages are then
            released: numpy backs large arrays with huge pages, which decode streams about
            5% faster than the file's 4 KiB pages (1B f16 layers, 2 threads: 29.6 against
            28.0 GB/s)."""
            w = get(name, shape)
            if device != "cpu":
                return w
            if isinstance(w, QuantizedWeight):
                w = w.interleaved() if tile else private_copy(w)  # a private copy either way
            else:
                w = PackedWeight(w) if pack and isinstance(w, np.ndarray) else private_copy(w)
            release(name)
            return w

        def bias(name, size):
            return np.ascontiguousarray(get(name, (size,)), dtype=np.float32)

        self.norm = get("model.norm.weight", (hidden,))
        if c.tie_word_embeddings and "lm_head.weight" not in weights:
            self.embed = self.lm_head = resident("model.embed_tokens.weight",
                                                 (c.vocab_size, hidden))
        else:
            self.embed = get("model.embed_tokens.weight", (c.vocab_size, hidden))  # gathered
            self.lm_head = resident("lm_head.weight", (c.vocab_size, hidden))
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            qkv = fused([(p + "self_attn.q_proj.weight", (q, hidden)),
                         (p + "self_attn.k_proj.weight", (kv, hidden)),
                         (p + "self_attn.v_proj.weight", (kv, hidden))])
            qkv_bias = None
            if c.attention_bias:
                qkv_bias = np.concatenate([bias(p + "self_attn.q_proj.bias", q),
                                           bias(p + "self_attn.k_proj.bias", kv),
                                           bias(p + "self_attn.v_proj.bias", kv)])
            gate_up = fused([(p + "mlp.gate_proj.weight", (inter, hidden)),
                             (p + "mlp.up_proj.weight", (inter, hidden))])
            self.layers.append(LlamaLayer(
                input_norm=get(p + "input_layernorm.weight", (hidden,)),
                qkv=qkv, qkv_bias=qkv_bias,
                o_proj=resident(p + "self_attn.o_proj.weight", (hidden, q)),
                post_norm=get(p + "post_attention_layernorm.weight", (hidden,)),
                gate_up=gate_up,
                down=resident(p + "mlp.down_proj.weight", (hidden, inter)),
            ))
        base, scaling = rope_parameters(c.rope_config)
        rotary_dim = int(c.head_dim * c.rope_config.get("partial_rotary_factor", 1.0))
        self.cos_sin = rope_cos_sin_cache(rotary_dim, max_position or c.max_position_embeddings,
                                          base, scaling)
        self.scale = c.head_dim ** -0.5
        self.device = device
        if quantization is not None:
            self._quantize(quantization)
        if device == "cuda":
            self._to_device()

    def _quantize(self, fmt: str) -> None:
        """Quantise the float projection weights to fmt (the LM head to q8_0) in place."""
        if fmt not in QUANTIZABLE:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZABLE)}, got {fmt!r}")

        def convert(w, to, what):
            if not isinstance(w, np.ndarray):
                return w  # already stored quantised
            try:
                q = QuantizedWeight.quantize(w, to)
                return q.interleaved() if _tiles_quantised(self.device) else q
            except ValueError as e:
                raise ValueError(f"quantization={fmt!r}: {what} {w.shape}: {e}") from None

        for i, layer in enumerate(self.layers):
            for name in ("qkv", "o_proj", "gate_up", "down"):
                setattr(layer, name, convert(getattr(layer, name), fmt, f"layer {i} {name}"))
        self.lm_head = convert(self.lm_head, "q8_0", "lm_head")

    def _to_device(self) -> None:
        """Copy every weight (and the RoPE table) to the GPU once, tied ones once. GGUF
        blocks have no GPU kernels: they go over dequantised to float32."""
        moved: dict[int, object] = {}

        def move(a):
            if a is None:
                return None
            if id(a) not in moved:
                moved[id(a)] = ops.to_device(_dequantized(a))
            return moved[id(a)]

        self.embed, self.norm, self.lm_head = move(self.embed), move(self.norm), move(self.lm_head)
        self.cos_sin = move(self.cos_sin)
        for layer in self.layers:
            for name in ("input_norm", "qkv", "qkv_bias", "o_proj", "post_norm", "gate_up",
                         "down"):
                setattr(layer, name, move(getattr(layer, name)))

    def forward(self, batch: ForwardBatch, kv_caches: list[KVCache], ws: Workspace) -> np.ndarray:
        """Run one step; returns logits [num_seqs, vocab] (a view into the workspace)."""
        c = self.config
        n, s, eps = batch.num_tokens, batch.num_seqs, c.rms_norm_eps
        hidden, residual = ws.hidden[:n], ws.residual[:n]
        gate_up, act = ws.gate_up[:n], ws.act[:n]
        views = _AttentionViews(c, ws, n)  # one set for every layer
        if n == 1 and self.device == "cpu" and isinstance(self.layers[0].qkv,
                                                          (QuantizedWeight, RowStack)):
            views.kv_runs = _kv_block_runs(batch, kv_caches[0])
        ops.embedding(batch.token_ids, self.embed, out=hidden)
        for i, layer in enumerate(self.layers):
            if i == 0:
                ops.copy(hidden, out=residual)
                ops.rms_norm(residual, layer.input_norm, eps, out=hidden)
            else:
                ops.fused_add_rms_norm(hidden, residual, layer.input_norm, eps)
            self._attention(layer, kv_caches[i], batch, hidden, views)
            ops.fused_add_rms_norm(hidden, residual, layer.post_norm, eps)
            ops.matmul(hidden, layer.gate_up, out=gate_up)
            ops.silu_and_mul(gate_up, out=act)
            ops.matmul(act, layer.down, out=hidden)
        ops.fused_add_rms_norm(hidden, residual, self.norm, eps)
        last = ws.last_hidden[:s]
        ops.embedding(batch.logits_indices, hidden, out=last)  # gathers the rows
        return ops.matmul(last, self.lm_head, out=ws.logits[:s])

    def logits_for_rows(self, ws: Workspace, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Logits of the given token rows of the last forward (prompt logprobs).

        Args:
            ws: the workspace the last forward ran in (its final hidden states).
            rows: int indices into that step's tokens.
            out: float32 [len(rows), vocab] on the model's device.
        """
        rows = np.ascontiguousarray(rows, dtype=np.int32)
        hidden = ops.empty((len(rows), self.config.hidden_size), np.float32, self.device)
        if self.device == "cuda":
            rows = ops.to_device(rows)
        ops.embedding(rows, ws.hidden, out=hidden)
        return ops.matmul(hidden, self.lm_head, out=out)

    def _attention(self, layer: LlamaLayer, cache: KVCache, batch: ForwardBatch, hidden,
                   views: "_AttentionViews"):
        """hidden -> qkv -> rope and cache write -> paged attention -> o_proj -> hidden."""
        kv, o_proj = (), ()
        if views.kv_runs is not None:  # one token: overlap memory with compute (see above)
            kv = [a[b0:b1] for b0, b1 in views.kv_runs for a in (cache.k, cache.v)]
            o_proj = (_weight_array(layer.o_proj),)
        ops.matmul(hidden, layer.qkv, layer.qkv_bias, out=views.qkv, prefetch=kv)
        ops.rope_kv_cache_write(batch.positions, views.q, views.k, views.v, self.cos_sin,
                                self.config.head_dim, cache.k, cache.v, batch.slot_mapping)
        ops.paged_attention(views.q, cache.k, cache.v, batch.block_tables, batch.seq_lens,
                            batch.query_start_loc, self.scale, out=views.out, prefetch=o_proj)
        ops.matmul(views.attn, layer.o_proj, out=hidden)


class _AttentionViews:
    """A step's views of the workspace that attention reads and writes, made once for all
    layers: qkv [n, q_size + 2 * kv_size]; q, k, v as [n, heads, head_dim] views of its
    columns; attn [n, q_size] and out, the same memory as [n, heads, head_dim]."""

    def __init__(self, c: ModelConfig, ws: Workspace, n: int):
        q_size, kv_size = c.q_size, c.kv_size
        self.qkv = ws.qkv[:n]
        self.q = self.qkv[:, :q_size].reshape(n, c.num_heads, c.head_dim)
        self.k = self.qkv[:, q_size:q_size + kv_size].reshape(n, c.num_kv_heads, c.head_dim)
        self.v = self.qkv[:, q_size + kv_size:].reshape(n, c.num_kv_heads, c.head_dim)
        self.attn = ws.attn[:n]
        self.out = self.attn.reshape(n, c.num_heads, c.head_dim)
        self.kv_runs: list[tuple[int, int]] | None = None  # blocks to prefetch (forward)
