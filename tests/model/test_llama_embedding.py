"""Decoder embeddings (last-token and mean pooling) against transformers on random Llamas.

The models come from test_llama_parity's make_model; transformers' final-normed hidden
states (`model.model(ids).last_hidden_state`), computed one sequence at a time, are the
reference for engine's packed batches.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_llama_parity import COMMON, make_model  # noqa: E402

from engine import LLM  # noqa: E402
from engine.embedding import is_embedding_model  # noqa: E402

LENGTHS = (1, 2, 9, 31, 64, 100, 17)


def reference_hidden(model, ids):
    with torch.no_grad():
        return model.model(torch.tensor([ids])).last_hidden_state[0].double().numpy()


@pytest.mark.parametrize("kind", ["llama", "llama-head-dim", "qwen2-bias"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooled_hidden_states_match_transformers(tmp_path, kind, pooling):
    model = make_model(kind, tmp_path)
    rng = np.random.default_rng(4)
    inputs = [rng.integers(3, COMMON["vocab_size"], n).tolist() for n in LENGTHS]
    # A budget of 128 tokens: the inputs run in several packed batches.
    llm = LLM(str(tmp_path), task="embed", pooling=pooling, normalize=False,
              skip_tokenizer_init=True, max_num_batched_tokens=128)
    assert llm.engine is None and not is_embedding_model(str(tmp_path))
    got = llm.embed(inputs)
    assert got.shape == (len(inputs), COMMON["hidden_size"]) and got.dtype == np.float32
    for ids, vec in zip(inputs, got):
        h = reference_hidden(model, ids)
        want = h[-1] if pooling == "last" else h.mean(0)
        np.testing.assert_allclose(vec, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    normalized = llm.embed(inputs, normalize=True)
    np.testing.assert_allclose(normalized, got / np.linalg.norm(got, axis=1, keepdims=True),
                               rtol=1e-6, atol=1e-7)


def test_a_backbone_without_lm_head_is_an_embedding_model(tmp_path):
    causal = make_model("llama", tmp_path / "causal")
    causal.model.save_pretrained(tmp_path / "backbone", safe_serialization=True)
    config = json.loads((tmp_path / "backbone" / "config.json").read_text())
    assert config["architectures"] == ["LlamaModel"]
    assert is_embedding_model(str(tmp_path / "backbone"))
    llm = LLM(str(tmp_path / "backbone"), skip_tokenizer_init=True)
    assert llm.task == "embed" and llm.embedder.pooling.mode == "last"
    ids = list(range(5, 45))
    got = llm.embed(ids)  # a list of ids is one input
    want = reference_hidden(causal, ids)[-1]
    np.testing.assert_allclose(got[0], want / np.linalg.norm(want), rtol=1e-4, atol=1e-5)


def test_generation_on_the_same_folder_is_unchanged(tmp_path):
    model = make_model("llama", tmp_path)
    prompt = list(range(3, 30))
    gen = LLM(str(tmp_path), skip_tokenizer_init=True)
    assert gen.task == "generate" and gen.embedder is None
    from engine import SamplingParams

    out = gen.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False,
                              eos_token_id=None)[0, len(prompt):].tolist()
    assert out.outputs[0].token_ids == want
    with pytest.raises(ValueError, match="built for generation .* task='embed'"):
        gen.embed(["hello"])
