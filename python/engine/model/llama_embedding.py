"""Hidden states of Llama-family decoders for embeddings (e5-mistral, gte-Qwen2 style).

The same weights and layers as LlamaForCausalLM, run over a packed batch of whole
sequences with causal attention inside each one and no KV cache: nothing is generated,
so nothing is cached. Returns the final-normed hidden state of every token; pooling
(last token or mean) happens outside.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator

import numpy as np

from engine import ops
from engine.model.config import ModelConfig
from engine.model.llama import LlamaForCausalLM, Workspace

# Backbones without an LM head (e5-mistral's config says MistralModel): their tensors lack
# the causal LM's "model." prefix.
BACKBONE_ARCHITECTURES = {"LlamaModel": "LlamaForCausalLM", "MistralModel": "MistralForCausalLM",
                          "Qwen2Model": "Qwen2ForCausalLM"}


class _WithModelPrefix(Mapping):
    """A backbone's tensors ("layers.0...") under the causal LM's names ("model.layers.0...")."""

    def __init__(self, weights: Mapping[str, np.ndarray]):
        self.weights = weights

    def _name(self, name: str) -> str:
        return name[len("model."):] if name.startswith("model.") else name

    def __getitem__(self, name: str) -> np.ndarray:
        return self.weights[self._name(name)]

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and self._name(name) in self.weights

    def __iter__(self) -> Iterator[str]:
        return ("model." + name for name in self.weights)

    def __len__(self) -> int:
        return len(self.weights)


class LlamaEmbeddingModel:
    """A Llama-family checkpoint (a causal LM or a backbone) as an embedding model."""

    def __init__(self, config: dict, weights: Mapping[str, np.ndarray], source: str,
                 max_position: int):
        """Args:
            config: the Hugging Face config.json dict.
            weights: Hugging Face tensor names -> arrays.
            source: the checkpoint's path, for error messages.
            max_position: positions the RoPE table covers (the longest input).
        """
        config = dict(config)
        arch = (config.get("architectures") or [None])[0]
        if arch in BACKBONE_ARCHITECTURES:
            config["architectures"] = [BACKBONE_ARCHITECTURES[arch]]
            config["tie_word_embeddings"] = True  # a backbone has no LM head; none is used
            weights = _WithModelPrefix(weights)
        self.decoder = LlamaForCausalLM(ModelConfig.from_hf(config), weights, source,
                                        max_position=max_position)
        self.config = self.decoder.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_position(self) -> int:
        return len(self.decoder.cos_sin)

    def make_workspace(self, max_num_tokens: int) -> Workspace:
        return Workspace(self.config, max_num_tokens, 1)

    def hidden_states(self, token_ids: np.ndarray, positions: np.ndarray,
                      query_start_loc: np.ndarray, ws: Workspace) -> np.ndarray:
        """The final-normed hidden states of every token of a packed batch.

        Args:
            token_ids: [num_tokens] int32, whole sequences back to back.
            positions: [num_tokens] int32, each token's position in its sequence.
            query_start_loc: [num_seqs + 1] int32, where each sequence starts.
            ws: a workspace with max_num_tokens >= num_tokens.
        Returns:
            [num_tokens, hidden] float32, a view into the workspace.
        """
        m, c = self.decoder, self.config
        n = len(token_ids)
        hidden, residual, qkv, attn = ws.hidden[:n], ws.residual[:n], ws.qkv[:n], ws.attn[:n]
        ops.embedding(token_ids, m.embed, out=hidden)
        for i, layer in enumerate(m.layers):
            if i == 0:
                np.copyto(residual, hidden)
                ops.rms_norm(residual, layer.input_norm, c.rms_norm_eps, out=hidden)
            else:
                ops.fused_add_rms_norm(hidden, residual, layer.input_norm, c.rms_norm_eps)
            ops.matmul(hidden, layer.qkv, layer.qkv_bias, out=qkv)
            q = qkv[:, :c.q_size]
            k = qkv[:, c.q_size:c.q_size + c.kv_size]
            v = qkv[:, c.q_size + c.kv_size:]
            ops.rope(positions, q, k, m.cos_sin, c.head_dim)
            kv_heads = (n, c.num_kv_heads, c.head_dim)
            ops.varlen_attention(q.reshape(n, c.num_heads, c.head_dim), k.reshape(kv_heads),
                                 v.reshape(kv_heads), query_start_loc, m.scale, causal=True,
                                 out=attn.reshape(n, c.num_heads, c.head_dim))
            ops.matmul(attn, layer.o_proj, out=hidden)
            ops.fused_add_rms_norm(hidden, residual, layer.post_norm, c.rms_norm_eps)
            ops.matmul(hidden, layer.gate_up, out=ws.gate_up[:n])
            ops.silu_and_mul(ws.gate_up[:n], out=ws.act[:n])
            ops.matmul(ws.act[:n], layer.down, out=hidden)
        ops.fused_add_rms_norm(hidden, residual, m.norm, c.rms_norm_eps)
        return hidden
