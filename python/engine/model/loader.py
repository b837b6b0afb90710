"""One entry point for checkpoints: a Hugging Face folder (safetensors) or a GGUF file.

Both come out the same way: the Hugging Face config.json content and a mapping from Hugging
Face tensor names to numpy arrays. Safetensors arrays are zero-copy views of the memory-mapped
files in their stored dtype; GGUF arrays are dequantised to float32 on access.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import numpy as np

from engine.model import gguf_file, gguf_llama
from engine.model.safetensors_file import open_safetensors_folder

CONFIG_FILE_NAME = "config.json"


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: the folder or .gguf file it came from.
        format: "safetensors" or "gguf".
        config: the Hugging Face config.json content (for GGUF, mapped from its metadata).
        weights: Hugging Face tensor name -> array.
    """

    path: str
    format: str
    config: dict
    weights: Mapping[str, np.ndarray]


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a Hugging Face model folder or a .gguf file.

    Args:
        path: a folder holding config.json and model.safetensors (or an index and its shards),
            or a GGUF file.

    Returns:
        The checkpoint; weights are memory-mapped, not read, until used.

    Raises:
        ValueError: the path is neither, a file is missing, or a file is malformed.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_folder(path)
    if os.path.isfile(path):
        if _is_gguf(path):
            parsed = gguf_file.read_gguf(path)
            config = gguf_llama.hf_config(parsed)
            return Checkpoint(path, "gguf", config, gguf_llama.GGUFWeights(parsed, config))
        raise ValueError(f"{path}: not a GGUF file (no GGUF magic); for safetensors pass the "
                         f"model folder holding config.json")
    raise ValueError(f"{path}: no such file or folder (expected a Hugging Face model folder "
                     f"or a .gguf file)")


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF" or path.endswith(".gguf")


def _load_folder(folder: str) -> Checkpoint:
    config_path = os.path.join(folder, CONFIG_FILE_NAME)
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder}: not a Hugging Face model folder: expected "
                         f"{CONFIG_FILE_NAME} beside the weights")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{config_path}: cannot read config: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return Checkpoint(folder, "safetensors", config, open_safetensors_folder(folder))


def require(weights: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...],
            file: str) -> np.ndarray:
    """A tensor that must exist with the shape the config implies.

    Args:
        weights: name -> array.
        name: the Hugging Face tensor name.
        shape: the shape config.json implies.
        file: the checkpoint path, for the message.

    Returns:
        The array.

    Raises:
        ValueError: the tensor is missing or its shape disagrees with the config.
    """
    if name not in weights:
        raise ValueError(f"{file}: tensor {name!r} is missing (expected shape "
                         f"{tuple(shape)} from config.json)")
    array = weights[name]
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{file}: tensor {name!r} has shape {tuple(array.shape)}, but "
                         f"config.json implies {tuple(shape)}")
    return array
