"""RoPE's cos/sin cache, computed as Hugging Face transformers computes it.

transformers builds inv_freq in float32 and the angles as float32 products
`position * inv_freq` (see `transformers.modeling_rope_utils`); this module does
the same arithmetic in numpy, so the cache matches what a transformers model
sees. The one difference: transformers' float32 `pow` is not correctly rounded
and this one is, so for some (base, rotary_dim) an inv_freq entry differs by one
or two float32 ulps.
"""

from __future__ import annotations

import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_parameters(config: dict) -> tuple[float, dict | None]:
    """The RoPE base and scaling of a Hugging Face config dict.

    Reads both forms: `rope_theta` beside `rope_scaling` (transformers 4), and
    `rope_parameters` = {"rope_theta": ..., "rope_type": ..., ...} (transformers 5).

    Args:
        config: the config dict (config.json), or any dict holding its rope fields.

    Returns:
        (base, scaling): scaling is None for plain RoPE, else the scaling dict.
    """
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params:
        if all(isinstance(v, dict) for v in params.values()):
            raise ValueError(
                "rope_parameters per layer type (" + ", ".join(params) + ") are not supported")
        base = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
        scaling = params
    else:
        base = float(config.get("rope_theta", 10000.0))
        scaling = config.get("rope_scaling")
    if not scaling or _rope_type(scaling) == "default":
        return base, None
    return base, {k: v for k, v in scaling.items() if k != "rope_theta"}


def rope_cos_sin_cache(rotary_dim: int, max_position: int, base: float,
                       rope_scaling: dict | None = None) -> np.ndarray:
    """The cos_sin_cache that `ops.rope` takes.

    Args:
        rotary_dim: how many dims of each head rotate (even; head_dim unless partial).
        max_position: number of positions (rows).
        base: rope_theta.
        rope_scaling: None, {"rope_type" (or "type"): "linear", "factor"}, or
            {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}.

    Returns:
        float32 [max_position, rotary_dim]: cos of the angles in the first half,
        sin in the second.
    """
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rope: rotary_dim must be even and > 0, got {rotary_dim}")
    if max_position <= 0:
        raise ValueError(f"rope: max_position must be > 0, got {max_position}")
    if not base > 0:
        raise ValueError(f"rope: base (rope_theta) must be > 0, got {base}")
    inv_freq = rope_inv_freq(rotary_dim, base, rope_scaling)
    positions = np.arange(max_position, dtype=np.float32)
    angles = np.outer(positions, inv_freq).astype(np.float64)  # float32 products, as transformers
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def rope_inv_freq(rotary_dim: int, base: float, rope_scaling: dict | None = None) -> np.ndarray:
    """inv_freq float32 [rotary_dim // 2], with transformers' float32 arithmetic."""
    exponent = np.arange(0, rotary_dim, 2).astype(np.float32) / np.float32(rotary_dim)
    power = np.power(np.float64(base), exponent.astype(np.float64)).astype(np.float32)
    inv_freq = np.float32(1.0) / power
    rope_type = _rope_type(rope_scaling) if rope_scaling else "default"
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / np.float32(_get(rope_scaling, "factor"))
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported; "
                     f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _llama3_inv_freq(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """transformers' _compute_llama3_parameters, in float32."""
    factor, low_freq_factor, high_freq_factor, old_context_len = (
        _get(scaling, k) for k in _LLAMA3_KEYS)
    f32 = np.float32
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = f32(2 * np.pi) / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / f32(factor), inv_freq)
    smooth_factor = ((f32(old_context_len) / wavelen - f32(low_freq_factor))
                     / f32(high_freq_factor - low_freq_factor))
    smoothed = ((f32(1) - smooth_factor) * inv_freq_llama / f32(factor)
                + smooth_factor * inv_freq_llama)
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)


def _rope_type(scaling: dict) -> str:
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def _get(scaling: dict, key: str) -> float:
    if key not in scaling:
        raise ValueError(f"rope_scaling of type {_rope_type(scaling)!r} needs {key!r}, "
                         f"got keys {sorted(scaling)}")
    return float(scaling[key])
