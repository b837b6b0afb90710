"""SmolLM2-135M-Instruct: engine on the folder `engine convert` writes from its GGUF (float32)
against transformers on that folder, and engine on the GGUF's own Q4_1 / Q8_0 blocks against
the float32 model."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine import LLM, SamplingParams  # noqa: E402
from engine.cli import main as cli_main  # noqa: E402
from engine.ops.quantized import QuantizedWeight  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The three primary colors are",
    "Water boils at a temperature of 100 degrees",
]
NEW_TOKENS = 32
# Quantising activations to q8 blocks (as llama.cpp does) moves SmolLM2's logits by up to
# about 1.5 (they span about +-40; the final hidden state has 17-sigma outlier dimensions,
# which coarsen their blocks): measured 1.16-1.48 over these prompts.
MAX_LOGIT_ERROR = 2.5
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, smollm2_gguf):
    out = tmp_path_factory.mktemp("smollm2-hf")
    assert cli_main(["convert", smollm2_gguf, str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    """The GGUF as stored: Q4_1 layers and a Q8_0 embedding / LM head, run natively."""
    return LLM(smollm2_gguf, max_model_len=512, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def float_llm(converted):
    """The same weights dequantised to float32."""
    return LLM(str(converted), max_model_len=512, enable_prefix_caching=False)


def test_greedy_tokens_match_transformers_on_the_converted_folder(float_llm, converted):
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    model = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    outputs = float_llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outputs):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == ref, prompt


def test_capital_of_france_is_paris(llm):
    out = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=16))
    assert "Paris" in out[0].outputs[0].text


def test_runs_the_gguf_blocks_without_dequantising(llm):
    model = llm.engine.runner.model
    assert isinstance(model.embed, QuantizedWeight) and model.embed.format == "q8_0"
    assert model.lm_head is model.embed  # tied
    for layer in model.layers:
        for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down):
            assert isinstance(w, QuantizedWeight) and w.format == "q4_1"


def prefill_logits(llm, token_ids):
    """Logits at every position of one prefill over token_ids: [len(token_ids), vocab]."""
    model = llm.engine.runner.model
    forward, captured = model.forward, []

    def capturing_forward(batch, caches, ws):
        logits = forward(batch, caches, ws)
        if not captured:
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


def assert_follows_within_the_logit_error(llm, ref_llm):
    """Greedy tokens from llm are those of ref_llm until a position where ref_llm's top two
    logits lie closer than llm's logit error there; that error stays under MAX_LOGIT_ERROR."""
    fully_identical = 0
    for prompt, got_out, ref in zip(PROMPTS, llm.generate(PROMPTS, GREEDY, use_tqdm=False),
                                    ref_llm.generate(PROMPTS, GREEDY, use_tqdm=False)):
        got, want = got_out.outputs[0].token_ids, ref.outputs[0].token_ids
        tokens = ref.prompt_token_ids + want
        start = len(ref.prompt_token_ids) - 1  # the position that predicts new token 0
        q = prefill_logits(llm, tokens)[start:start + NEW_TOKENS].astype(np.float64)
        f = prefill_logits(ref_llm, tokens)[start:start + NEW_TOKENS].astype(np.float64)
        error = np.abs(q - f).max(axis=1)
        assert error.max() <= MAX_LOGIT_ERROR, (prompt, error.max())
        assert np.array_equal(f.argmax(axis=1), want)  # the teacher-forced run is the same run
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if first is None:
            fully_identical += 1
            continue
        top2 = np.sort(f[first])[-2:]
        assert top2[1] - top2[0] <= 2 * error[first], (
            f"{prompt!r}: token {first} differs although the reference's margin "
            f"{top2[1] - top2[0]:.3f} exceeds twice the logit error {error[first]:.3f}")
    assert fully_identical >= 1


def test_gguf_blocks_follow_the_float32_model_within_the_logit_error(llm, float_llm):
    assert_follows_within_the_logit_error(llm, float_llm)


@pytest.mark.parametrize("kv_cache_dtype", ["float16", "bfloat16"])
def test_16_bit_kv_caches_follow_the_float32_cache_within_the_logit_error(
        llm, smollm2_gguf, kv_cache_dtype):
    """The same GGUF with K and V stored in 16 bits (SmolLM2's logits move by 1.2-2.1 either
    way: its outlier dimensions amplify any rounding, as the Q4_1 weights' error shows)."""
    half = LLM(smollm2_gguf, max_model_len=512, enable_prefix_caching=False,
               kv_cache_dtype=kv_cache_dtype)
    assert half.engine.runner.kv_caches[0].k.dtype.name == kv_cache_dtype
    assert_follows_within_the_logit_error(half, llm)
