"""BERT-family encoders (BERT, MiniLM, BGE, E5 and the like in the BertModel layout).

Word + token-type + absolute position embeddings, post-norm layers (LayerNorm of each
sublayer's output plus its input), GELU MLPs and bidirectional attention. Sequences run
packed back to back (DESIGN.md's varlen layout): attention stays within each sequence,
so there is no padding and no attention mask. Every sequence is one segment (token type 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from engine import ops
from engine.model.loader import require

ENCODER_ARCHITECTURES = ("BertModel",)
# Hugging Face hidden_act names -> ops.gelu's `approximate`.
GELU_ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    gelu_approximate: str  # "none" (erf) or "tanh"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"config: hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_heads})")
        if not self.layer_norm_eps >= 0:
            raise ValueError(f"config: layer_norm_eps must be >= 0, got {self.layer_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "BertConfig":
        """Build from a config.json dict; ValueError names what is missing or unsupported."""
        def need(key):
            if key not in config:
                raise ValueError(f"config: missing required field {key!r}")
            return config[key]

        act = config.get("hidden_act", "gelu")
        if act not in GELU_ACTIVATIONS:
            raise ValueError(f"config: hidden_act {act!r} is not supported (supported: "
                             f"{', '.join(GELU_ACTIVATIONS)})")
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"config: position_embedding_type {position_type!r} is not "
                             f"supported (only 'absolute')")
        return cls(vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
                   num_layers=need("num_hidden_layers"), num_heads=need("num_attention_heads"),
                   intermediate_size=need("intermediate_size"),
                   max_position_embeddings=need("max_position_embeddings"),
                   type_vocab_size=config.get("type_vocab_size", 2),
                   layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                   gelu_approximate=GELU_ACTIVATIONS[act])


@dataclass
class BertLayer:
    qkv: np.ndarray            # [3 * hidden, hidden]: query, key, value rows fused at load
    qkv_bias: np.ndarray       # [3 * hidden] float32
    o_proj: np.ndarray         # [hidden, hidden]
    o_bias: np.ndarray         # [hidden] float32
    attn_norm: tuple           # LayerNorm (weight, bias) [hidden] after attention + residual
    up: np.ndarray             # [intermediate, hidden]
    up_bias: np.ndarray        # [intermediate] float32
    down: np.ndarray           # [hidden, intermediate]
    down_bias: np.ndarray      # [hidden] float32
    mlp_norm: tuple            # LayerNorm (weight, bias) [hidden] after the MLP + residual


class BertWorkspace:
    """Activation buffers for up to max_num_tokens tokens; a forward takes views."""

    def __init__(self, config: BertConfig, max_num_tokens: int):
        c, f32 = config, np.float32
        self.hidden = np.empty((max_num_tokens, c.hidden_size), f32)         # [T, hidden]
        self.tmp = np.empty((max_num_tokens, c.hidden_size), f32)            # [T, hidden]
        self.qkv = np.empty((max_num_tokens, 3 * c.hidden_size), f32)        # [T, 3 * hidden]
        self.attn = np.empty((max_num_tokens, c.hidden_size), f32)           # [T, hidden]
        self.mlp = np.empty((max_num_tokens, c.intermediate_size), f32)      # [T, intermediate]
        self.max_num_tokens = max_num_tokens


class BertModel:
    """A BertModel checkpoint (tensor names with or without a `bert.` prefix)."""

    def __init__(self, config: BertConfig, weights: Mapping[str, np.ndarray], source: str):
        """Args:
            config: the model's shape.
            weights: Hugging Face tensor names -> arrays (f32/f16/bf16).
            source: the file or folder the weights came from, for error messages.
        """
        self.config = c = config
        hidden, inter = c.hidden_size, c.intermediate_size
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""

        def get(name, shape):
            return require(weights, prefix + name, shape, source)

        def f32(name, shape):
            return np.ascontiguousarray(get(name, shape), dtype=np.float32)

        def norm(name):
            return get(name + ".weight", (hidden,)), get(name + ".bias", (hidden,))

        e = "embeddings."
        self.word_embed = get(e + "word_embeddings.weight", (c.vocab_size, hidden))
        # Every sequence is segment 0: its token-type row is folded into the position table.
        positions = f32(e + "position_embeddings.weight", (c.max_position_embeddings, hidden))
        token_type = f32(e + "token_type_embeddings.weight", (c.type_vocab_size, hidden))
        self.position_embed = positions + token_type[0]
        self.embed_norm = norm(e + "LayerNorm")
        self.layers = []
        for i in range(c.num_layers):
            p = f"encoder.layer.{i}."
            a = p + "attention."
            self.layers.append(BertLayer(
                qkv=np.concatenate([get(a + f"self.{n}.weight", (hidden, hidden))
                                    for n in ("query", "key", "value")]),
                qkv_bias=np.concatenate([f32(a + f"self.{n}.bias", (hidden,))
                                         for n in ("query", "key", "value")]),
                o_proj=get(a + "output.dense.weight", (hidden, hidden)),
                o_bias=f32(a + "output.dense.bias", (hidden,)),
                attn_norm=norm(a + "output.LayerNorm"),
                up=get(p + "intermediate.dense.weight", (inter, hidden)),
                up_bias=f32(p + "intermediate.dense.bias", (inter,)),
                down=get(p + "output.dense.weight", (hidden, inter)),
                down_bias=f32(p + "output.dense.bias", (hidden,)),
                mlp_norm=norm(p + "output.LayerNorm"),
            ))
        self.scale = c.head_dim ** -0.5

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_position(self) -> int:
        return self.config.max_position_embeddings

    def make_workspace(self, max_num_tokens: int) -> BertWorkspace:
        return BertWorkspace(self.config, max_num_tokens)

    def hidden_states(self, token_ids: np.ndarray, positions: np.ndarray,
                      query_start_loc: np.ndarray, ws: BertWorkspace) -> np.ndarray:
        """The last layer's hidden states of every token of a packed batch.

        Args:
            token_ids: [num_tokens] int32, the sequences back to back.
            positions: [num_tokens] int32, each token's position in its sequence.
            query_start_loc: [num_seqs + 1] int32, where each sequence starts.
            ws: a workspace with max_num_tokens >= num_tokens.
        Returns:
            [num_tokens, hidden] float32, a view into the workspace.
        """
        c = self.config
        n = len(token_ids)
        h, tmp, qkv, attn, mlp = ws.hidden[:n], ws.tmp[:n], ws.qkv[:n], ws.attn[:n], ws.mlp[:n]
        ops.embedding(token_ids, self.word_embed, out=h)
        ops.embedding(positions, self.position_embed, out=tmp)
        ops.layer_norm(h, *self.embed_norm, c.layer_norm_eps, out=h, residual=tmp)
        heads = (n, c.num_heads, c.head_dim)
        for layer in self.layers:
            ops.matmul(h, layer.qkv, layer.qkv_bias, out=qkv)
            hs = c.hidden_size
            ops.varlen_attention(qkv[:, :hs].reshape(heads), qkv[:, hs:2 * hs].reshape(heads),
                                 qkv[:, 2 * hs:].reshape(heads), query_start_loc, self.scale,
                                 causal=False, out=attn.reshape(heads))
            ops.matmul(attn, layer.o_proj, layer.o_bias, out=tmp)
            ops.layer_norm(tmp, *layer.attn_norm, c.layer_norm_eps, out=h, residual=h)
            ops.matmul(h, layer.up, layer.up_bias, out=mlp)
            ops.gelu(mlp, out=mlp, approximate=c.gelu_approximate)
            ops.matmul(mlp, layer.down, layer.down_bias, out=tmp)
            ops.layer_norm(tmp, *layer.mlp_norm, c.layer_norm_eps, out=h, residual=h)
        return h
