"""Pooling of token hidden states into one vector per sequence, as sentence-transformers does.

A sentence-transformers folder says how: `1_Pooling/config.json` names the mode
(`pooling_mode_mean_tokens`, `pooling_mode_cls_token`, `pooling_mode_lasttoken`) and
`modules.json` lists a `Normalize` module when the embeddings are L2-normalised.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

POOLING_MODES = ("mean", "cls", "last")
_ST_MODE_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_lasttoken": "last"}
_ST_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens")


@dataclass
class PoolingConfig:
    """Args:
        mode: "mean" (average of the sequence's tokens), "cls" (its first token) or
            "last" (its last token).
        normalize: L2-normalise the pooled vectors by default.
    """
    mode: str
    normalize: bool

    def __post_init__(self):
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}, "
                             f"got {self.mode!r}")


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read sentence-transformers config: {e}") from e


def read_pooling_config(folder: str, default: PoolingConfig) -> PoolingConfig:
    """The pooling a sentence-transformers folder asks for, else `default`.

    Args:
        folder: the model folder (modules.json, the Pooling module's config.json).
        default: what to use where the folder says nothing.
    Returns:
        The PoolingConfig.
    Raises:
        ValueError: a config file is malformed or names a pooling engine lacks.
    """
    modules_path = os.path.join(folder, "modules.json")
    if not os.path.isfile(modules_path):
        return default
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise ValueError(f"{modules_path}: expected a list of modules")
    types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    mode = default.mode
    if "Pooling" in types:
        config_path = os.path.join(folder, types["Pooling"].get("path", ""), "config.json")
        config = _read_json(config_path)
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: expected a JSON object")
        for key in _ST_UNSUPPORTED:
            if config.get(key):
                raise ValueError(f"{config_path}: {key} is not supported (supported: "
                                 f"{', '.join(_ST_MODE_KEYS)})")
        chosen = [m for key, m in _ST_MODE_KEYS.items() if config.get(key)]
        if len(chosen) != 1:
            raise ValueError(f"{config_path}: expected exactly one of {', '.join(_ST_MODE_KEYS)} "
                             f"to be true, got {len(chosen)}")
        mode = chosen[0]
    return PoolingConfig(mode=mode, normalize="Normalize" in types)


def pool(hidden: np.ndarray, query_start_loc: np.ndarray, mode: str, *,
         out: np.ndarray) -> np.ndarray:
    """One vector per sequence of a packed batch.

    Args:
        hidden: [num_tokens, hidden] float32, the sequences' tokens back to back.
        query_start_loc: [num_seqs + 1] int, sequence s is hidden[qsl[s]:qsl[s + 1]],
            never empty.
        mode: "mean", "cls" or "last".
        out: [num_seqs, hidden] float32.
    Returns:
        out.
    """
    starts = query_start_loc[:-1]
    if mode == "mean":
        np.add.reduceat(hidden, starts, axis=0, out=out)
        out /= np.diff(query_start_loc).astype(np.float32)[:, None]
    elif mode == "cls":
        np.take(hidden, starts, axis=0, out=out)
    elif mode == "last":
        np.take(hidden, query_start_loc[1:] - 1, axis=0, out=out)
    else:
        raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {mode!r}")
    return out


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm in place (a zero row stays zero, as torch's normalize)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.maximum(norms, np.float32(1e-12))
    return x
