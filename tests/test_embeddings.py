"""The embedding API on the real all-MiniLM-L6-v2: shapes, inputs, batching, truncation, errors."""

import json
import threading

import numpy as np
import pytest

from engine import LLM
from engine.embedding import EmbeddingConfig, is_embedding_model
from engine.model.pooling import PoolingConfig, read_pooling_config

CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def llm():
    return LLM("all-MiniLM-L6-v2")


def test_shapes_dtype_and_normalisation(llm):
    assert llm.task == "embed" and llm.engine is None
    runner = llm.embedder
    assert (runner.dim, runner.max_input_len) == (384, 256)
    assert runner.pooling == PoolingConfig("mean", normalize=True)
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The sky is blue."]
    emb = llm.embed(texts)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    raw = llm.embed(texts, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, rtol=1e-3)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), emb, atol=1e-7)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3  # the two sentences about eating are close
    assert llm.embed("The sky is blue.").shape == (1, 384)
    assert llm.embed([]).shape == (0, 384)


def test_token_ids_are_inputs_too(llm):
    ids = llm.get_tokenizer().encode("hello world")
    assert ids == [CLS, 7592, 2088, SEP]
    by_text = llm.embed(["hello world"])
    np.testing.assert_array_equal(llm.embed([ids]), by_text)
    np.testing.assert_array_equal(llm.embed(ids), by_text)  # one list of ids is one input
    np.testing.assert_array_equal(llm.embed(np.array(ids, np.int64)), by_text)
    mixed = llm.embed(["hello world", ids, [CLS, SEP]])
    np.testing.assert_array_equal(mixed[:2], np.vstack([by_text, by_text]))
    np.testing.assert_array_equal(mixed[2], llm.embed([""])[0])


def test_results_do_not_depend_on_the_batch(llm):
    texts = [" ".join(["word"] * n) for n in (1, 50, 200, 3, 254, 0, 90)]
    together = llm.embed(texts)
    small = LLM("all-MiniLM-L6-v2", max_num_batched_tokens=256)  # about one input per batch
    assert small.embedder.workspace.max_num_tokens == 256
    np.testing.assert_array_equal(small.embed(texts), together)
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(llm.embed([text])[0], together[i])


def test_over_long_inputs_are_rejected_or_truncated(llm):
    long_text = " ".join(["word"] * 300)
    with pytest.raises(ValueError, match=r"input 1 is 302 tokens long, over the model's maximum "
                                         r"of 256 \(pass truncate=True"):
        llm.embed(["short", long_text])
    with pytest.raises(ValueError, match="input 0 is 257 tokens long"):
        llm.embed([[CLS] * 257])
    ids = llm.embedder.tokenize([long_text, [7] * 300], truncate=True)
    assert ids[0] == [CLS] + [2773] * 254 + [SEP] and ids[1] == [7] * 256
    np.testing.assert_array_equal(llm.embed(long_text, truncate=True),
                                  llm.embed([" ".join(["word"] * 254)]))
    short = LLM("all-MiniLM-L6-v2", max_model_len=8)
    assert short.embedder.max_input_len == 8
    with pytest.raises(ValueError, match="input 0 is 9 tokens long, over the model's maximum of 8"):
        short.embed("one two three four five six seven")
    assert short.embedder.tokenize("one two three four five six seven", truncate=True)[0][-1] == SEP


def test_max_model_len_moves_the_limit_up_to_the_model_positions():
    wide = LLM("all-MiniLM-L6-v2", max_model_len=512)  # over sentence-transformers' 256
    assert wide.embedder.max_input_len == 512
    assert wide.embed(" ".join(["word"] * 400)).shape == (1, 384)
    assert LLM("all-MiniLM-L6-v2", max_model_len=4096).embedder.max_input_len == 512


@pytest.mark.parametrize("inputs,match", [
    ([[CLS, 30522, SEP]], r"input 0 has token id 30522, outside the vocabulary \[0, 30522\)"),
    ([[CLS], [-1]], r"input 1 has token id -1, outside the vocabulary"),
    (["fine", []], "input 1 has no tokens to embed"),
    (["fine", 3.5], "input 1 must be a string or a list of token ids, got float"),
    (["fine", None], "input 1 must be a string or a list of token ids, got NoneType"),
    ([["a", "b"]], "input 0 must be a string or a list of token ids, got list"),
    (5, "inputs must be a string, a list of token ids, or a list of strings"),
])
def test_bad_inputs_name_what_is_wrong(llm, inputs, match):
    with pytest.raises(ValueError, match=match):
        llm.embed(inputs)


def test_configuration_errors():
    with pytest.raises(ValueError, match="task must be one of auto, generate, embed, got 'score'"):
        LLM("all-MiniLM-L6-v2", task="score")
    with pytest.raises(ValueError, match="pooling must be one of mean, cls, last, got 'max'"):
        EmbeddingConfig("all-MiniLM-L6-v2", pooling="max")
    with pytest.raises(ValueError, match="max_num_batched_tokens must be a positive integer"):
        EmbeddingConfig("all-MiniLM-L6-v2", max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="device must be 'cpu' .* got 'cuda'"):
        EmbeddingConfig("all-MiniLM-L6-v2", device="cuda")
    with pytest.raises(TypeError, match="block_size"):
        LLM("all-MiniLM-L6-v2", block_size=16)  # a KV-cache option: no KV cache here
    ids_only = LLM("all-MiniLM-L6-v2", skip_tokenizer_init=True, pooling="cls", normalize=False)
    assert ids_only.embedder.pooling == PoolingConfig("cls", False)
    with pytest.raises(ValueError, match="input 0 is text, but the tokenizer was skipped"):
        ids_only.embed("text")
    with pytest.raises(ValueError, match="built for embeddings .* cannot generate"):
        ids_only.generate("text")


def test_is_embedding_model(smollm2_gguf, tmp_path):
    assert is_embedding_model("all-MiniLM-L6-v2")
    assert not is_embedding_model(smollm2_gguf)
    with pytest.raises(ValueError, match="neither an existing path"):
        is_embedding_model(str(tmp_path / "missing"))


@pytest.mark.parametrize("pooling,match", [
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True},
     "expected exactly one of pooling_mode_mean_tokens, pooling_mode_cls_token, "
     "pooling_mode_lasttoken to be true, got 2"),
    ({"pooling_mode_max_tokens": True}, "pooling_mode_max_tokens is not supported"),
    (None, "cannot read sentence-transformers config"),
])
def test_pooling_config_errors_name_the_file(tmp_path, pooling, match):
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    if pooling is not None:
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(ValueError, match=match) as info:
        read_pooling_config(str(tmp_path), PoolingConfig("mean", False))
    assert "1_Pooling" in str(info.value)


def test_concurrent_calls_give_the_same_vectors(llm):
    texts = [f"sentence number {i} " * (i % 7 + 1) for i in range(40)]
    want = llm.embed(texts)
    results = [None] * 4

    def work(k):
        results[k] = llm.embed(texts)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:
        np.testing.assert_array_equal(got, want)


def test_embed_token_ids_checks_what_it_is_given(llm):
    runner = llm.embedder
    with pytest.raises(ValueError, match="input 1 has 0 tokens; expected 1 to 256"):
        runner.embed_token_ids([[CLS, SEP], []])
    with pytest.raises(ValueError, match="input 0 has 300 tokens; expected 1 to 256"):
        runner.embed_token_ids([[CLS] * 300])
    with pytest.raises(ValueError, match=r"ids\[1\] = 40000 is outside \[0, 30522\)"):
        runner.embed_token_ids([[CLS, 40000]])
    np.testing.assert_array_equal(runner.embed_token_ids([[CLS, 7592, 2088, SEP]]),
                                  llm.embed("hello world"))
