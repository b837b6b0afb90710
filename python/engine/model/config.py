"""The model's shape, read from a Hugging Face config.json dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Decoder architectures that share the Llama layout (Qwen2 adds q/k/v biases).
DECODER_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    rope_config: dict  # the config dict's rope fields, read by model.rope.rope_parameters

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config: num_attention_heads ({self.num_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_kv_heads})")
        if self.mlp_bias:
            raise ValueError("config: mlp_bias=true is not supported yet (the MLP projections "
                             "would silently lose their biases)")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"config: rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "ModelConfig":
        """Build from a config.json dict; ValueError names what is missing or unsupported."""
        architectures = config.get("architectures") or []
        arch = architectures[0] if architectures else None
        if arch not in DECODER_ARCHITECTURES:
            raise ValueError(f"config: unsupported architecture {arch!r}; "
                             f"supported: {', '.join(DECODER_ARCHITECTURES)}")
        if arch == "MistralForCausalLM" and config.get("sliding_window") is not None:
            raise ValueError("config: Mistral with a sliding window is not supported yet "
                             f"(sliding_window={config['sliding_window']})")

        def need(key):
            if key not in config:
                raise ValueError(f"config: missing required field {key!r}")
            return config[key]

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        head_dim = config.get("head_dim") or (hidden // heads if isinstance(hidden, int) and
                                              isinstance(heads, int) and heads else 0)
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", arch == "Qwen2ForCausalLM")),
            mlp_bias=bool(config.get("mlp_bias", False)),
            rope_config={k: config[k] for k in ("rope_theta", "rope_scaling", "rope_parameters",
                                                "partial_rotary_factor") if k in config},
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim
