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
