"""Convert a llama GGUF into a Hugging Face folder that transformers loads as LlamaForCausalLM.

The folder holds config.json, generation_config.json, model.safetensors (float32, Hugging Face
names, Q/K rows un-permuted, no lm_head when the embedding is tied) and the tokenizer files.
Weights are dequantised and written one tensor at a time, so converting never holds a float32
copy of the whole model.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from engine.model import gguf_file, gguf_llama
from engine.model.safetensors_file import SINGLE_FILE_NAME


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 tokenizer: bool = True) -> None:
    """Write a Hugging Face model folder from a llama GGUF file.

    Args:
        gguf_path: the .gguf file.
        out_dir: the folder to write (created if missing; files in it are overwritten).
        tokenizer: also write the tokenizer files (tokenizer.json and its configs).

    Raises:
        ValueError: the GGUF is malformed or not a supported architecture.
    """
    gguf_path, out_dir = os.fspath(gguf_path), os.fspath(out_dir)
    parsed = gguf_file.read_gguf(gguf_path)
    config = gguf_llama.hf_config(parsed)
    weights = gguf_llama.GGUFWeights(parsed, config, dequantize=True)
    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, "config.json"), config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if k in config}
    _write_json(os.path.join(out_dir, "generation_config.json"), generation)
    names = sorted(weights)
    if config["tie_word_embeddings"] and "lm_head.weight" in names:
        names.remove("lm_head.weight")
    write_safetensors_f32(os.path.join(out_dir, SINGLE_FILE_NAME),
                          {name: weights.shape(name) for name in names}, weights.__getitem__)
    if tokenizer:
        from engine.tokenizer import write_hf_tokenizer_from_gguf  # lazy: a heavier import
        write_hf_tokenizer_from_gguf(gguf_path, out_dir)


def _write_json(path: str, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
        f.write("\n")


def write_safetensors_f32(path: str, shapes: dict[str, tuple[int, ...]], get_tensor) -> None:
    """Stream float32 tensors into a safetensors file, one at a time.

    Args:
        path: the file to write.
        shapes: name -> shape, in the order the tensors are written.
        get_tensor: name -> array of that shape (converted to little-endian float32).
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in shapes.items():
            array = np.ascontiguousarray(get_tensor(name), dtype="<f4")
            if array.shape != tuple(shape):
                raise ValueError(f"{path}: tensor {name!r} has shape {array.shape}, "
                                 f"expected {tuple(shape)}")
            f.write(memoryview(array).cast("B"))
