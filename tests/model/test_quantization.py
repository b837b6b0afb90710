"""Engine's own quantisation of a float checkpoint at load: LLM(model, quantization=...)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_llama_parity import make_model  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.cli import main as cli_main  # noqa: E402
from engine.engine import EngineConfig  # noqa: E402
from engine.ops.quantized import QuantizedWeight  # noqa: E402

# The weights' own rounding is the reference's too (it runs them dequantised); what is left
# is the q8 rounding of activations: measured 2-3% of max |logit| on this tiny random model.
RELATIVE_ERROR = 0.06


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", path)
    return path


def prefill_logits(llm, token_ids):
    """Logits of every position of one prefill: [len(token_ids), vocab]."""
    model = llm.engine.runner.model
    forward, captured = model.forward, []

    def capturing_forward(batch, caches, ws):
        logits = forward(batch, caches, ws)
        out = np.empty((batch.num_tokens, model.config.vocab_size), np.float32)
        captured.append(model.logits_for_rows(ws, np.arange(batch.num_tokens), out))
        return logits

    model.forward = capturing_forward
    try:
        llm.generate({"prompt_token_ids": token_ids}, SamplingParams(max_tokens=1),
                     use_tqdm=False)
    finally:
        del model.forward
    return captured[0]


def dequantised(llm):
    """Swap the engine's quantised weights for their float32 dequantisation."""
    model = llm.engine.runner.model
    for layer in model.layers:
        for name in ("qkv", "o_proj", "gate_up", "down"):
            setattr(layer, name, getattr(layer, name).dequantize())
    model.lm_head = model.lm_head.dequantize()
    return llm


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_quantised_model_computes_its_dequantised_weights(folder, fmt):
    tokens = np.random.default_rng(0).integers(3, 320, 48).tolist()
    llm = LLM(str(folder), skip_tokenizer_init=True, quantization=fmt,
              enable_prefix_caching=False)
    model = llm.engine.runner.model
    for layer in model.layers:
        for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down):
            assert isinstance(w, QuantizedWeight) and w.format == fmt
    assert isinstance(model.lm_head, QuantizedWeight) and model.lm_head.format == "q8_0"
    assert isinstance(model.embed, np.ndarray)  # gathered rows stay float
    got = prefill_logits(llm, tokens)
    ref = prefill_logits(dequantised(llm), tokens)
    error = np.abs(got - ref).max() / np.abs(ref).max()
    assert error <= RELATIVE_ERROR, error


def test_cli_flag_reaches_the_engine(monkeypatch, capsys):
    import engine

    seen = {}

    class FakeLLM:
        def __init__(self, model, **kwargs):
            seen.update(kwargs, model=model)

        def stream(self, prompt, params):
            yield " done"

    monkeypatch.setattr(engine, "LLM", FakeLLM)
    assert cli_main(["generate", "hi", "--model", "m", "--quantization", "q4_0"]) == 0
    assert seen["quantization"] == "q4_0" and "hi done" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["generate", "hi", "--quantization", "q2_k"])  # argparse lists the choices
    assert "invalid choice: 'q2_k'" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,match", [
    (dict(quantization="q4_k"), "quantization must be None, 'q8_0', 'q4_0' or 'q4_1'"),
    (dict(quantization="q8_0", device="cuda"), "CPU only"),
    (dict(kv_cache_dtype="float8"), "kv_cache_dtype must be 'auto', 'float32', 'bfloat16' or "
                                    "'float16', got 'float8'"),
    (dict(kv_cache_dtype="float16", device="cuda"), "'float16' runs on the CPU only"),
])
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(model="m", **kwargs)


def test_decode_prefetches_the_kv_blocks_and_o_proj(folder, monkeypatch):
    """A one-token step asks the QKV matmul for the KV blocks attention reads (views of the
    cache covering the sequence's positions) and attention for o_proj's bytes; the tokens
    are those of the same run without the requests."""
    from engine import ops
    from engine.model import llama

    tokens = np.random.default_rng(1).integers(3, 320, 40).tolist()
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    llm = LLM(str(folder), skip_tokenizer_init=True, quantization="q8_0",
              enable_prefix_caching=False, block_size=16)
    model = llm.engine.runner.model
    seen = {"matmul": [], "attention": []}
    matmul, attention = ops.matmul, ops.paged_attention

    def spy_matmul(x, w, bias=None, *, out, prefetch=()):
        if w is model.layers[0].qkv:
            seen["matmul"].append((x.shape[0], list(prefetch)))
        return matmul(x, w, bias, out=out, prefetch=prefetch)

    def spy_attention(*args, out, prefetch=()):
        seen["attention"].append(list(prefetch))
        return attention(*args, out=out, prefetch=prefetch)

    monkeypatch.setattr(ops, "matmul", spy_matmul)
    monkeypatch.setattr(ops, "paged_attention", spy_attention)
    with_requests = llm.generate({"prompt_token_ids": tokens}, params, use_tqdm=False)
    cache = llm.engine.runner.kv_caches[0]
    (prefill_tokens, none), *decodes = seen["matmul"]
    assert prefill_tokens == 40 and none == []  # the many-token kernel takes no requests
    for step, (n, arrays) in enumerate(decodes):
        assert n == 1 and len(arrays) % 2 == 0 and arrays
        blocks = sum(a.shape[0] for a in arrays[::2])
        assert blocks == -(-(40 + step + 1) // 16)  # the blocks of every position so far
        for a in arrays:
            assert np.shares_memory(a, cache.k) or np.shares_memory(a, cache.v)
    num_layers = len(model.layers)
    assert len(seen["attention"]) == len(seen["matmul"]) * num_layers
    for call, arrays in enumerate(seen["attention"]):
        step, layer = divmod(call, num_layers)
        want = [] if step == 0 else [model.layers[layer].o_proj.data]
        assert len(arrays) == len(want) and all(a is b for a, b in zip(arrays, want))

    monkeypatch.setattr(llama, "PREFETCH_KV_BYTES", 0)  # no requests at all
    monkeypatch.setattr(llama, "_weight_array", lambda w: w.data[:0])
    without = llm.generate({"prompt_token_ids": tokens}, params, use_tqdm=False)
    assert with_requests[0].outputs[0].token_ids == without[0].outputs[0].token_ids


def test_kv_block_runs_merge_consecutive_blocks_within_a_budget(monkeypatch):
    from engine.model import llama
    from engine.model.batch import ForwardBatch, KVCache

    cache = KVCache.allocate(64, 4, 1, 8, np.float32)  # 128 bytes of K a block
    tables = np.array([[5, 6, 7, 2, 3, -1], [9, 10, 30, 31, 32, 33]], np.int32)

    def runs(seq_lens):
        batch = ForwardBatch(token_ids=np.zeros(2, np.int32), positions=np.zeros(2, np.int32),
                             slot_mapping=np.zeros(2, np.int32),
                             query_start_loc=np.arange(3, dtype=np.int32),
                             seq_lens=np.array(seq_lens, np.int32), block_tables=tables,
                             logits_indices=np.arange(2, dtype=np.int32))
        return llama._kv_block_runs(batch, cache)

    assert runs([20, 24]) == [(5, 8), (2, 4), (9, 11), (30, 34)]
    assert runs([9, 5]) == [(5, 8), (9, 11)]  # only the blocks holding positions
    monkeypatch.setattr(llama, "PREFETCH_KV_BYTES", 2 * 128 * 6)  # K and V of 6 blocks
    assert runs([20, 24]) == [(5, 8), (2, 4), (9, 10)]
    tables[1] = [9, 11, 13, 15, 17, 19]
    monkeypatch.setattr(llama, "PREFETCH_KV_BYTES", 1 << 20)
    assert runs([20, 24]) == [(5, 8), (2, 4), (9, 10), (11, 12), (13, 14), (15, 16),
                              (17, 18), (19, 20)]  # 8 runs: 16 arrays, the most ops take
