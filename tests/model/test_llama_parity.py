"""Logits parity with Hugging Face transformers on small random-weight decoders.

Each model is built in transformers with random weights, saved as a Hugging Face
folder, loaded by engine, and run greedily: the logits of every step (the prompt's
last position, then 31 decode steps) must match transformers' logits for the same
tokens to 1e-3 x max|logit|, and the greedy tokens must be identical.
"""

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine import LLM, SamplingParams  # noqa: E402

PROMPT_LEN = 64
NEW_TOKENS = 32

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

MODELS = {
    "llama": (transformers.LlamaConfig, dict(rope_theta=10000.0)),
    "llama-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True, rope_theta=500.0)),
    "llama-head-dim": (transformers.LlamaConfig, dict(head_dim=24, num_key_value_heads=1)),
    "llama3-rope": (transformers.LlamaConfig, dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, rope_theta=10000.0)),
    "llama-linear-rope": (transformers.LlamaConfig, dict(rope_scaling={
        "rope_type": "linear", "factor": 2.0}, rope_theta=10000.0)),
    "qwen2-bias": (transformers.Qwen2Config, dict(rope_theta=10000.0, use_sliding_window=False)),
}


def make_model(kind, path, dtype=torch.float32):
    config_cls, extra = MODELS[kind]
    config = config_cls(**{**COMMON, **extra})
    torch.manual_seed(0)
    model_cls = (transformers.Qwen2ForCausalLM if kind.startswith("qwen2")
                 else transformers.LlamaForCausalLM)
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():  # random init is too tame: make logits and attention non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


@contextlib.contextmanager
def record_logits(llm):
    """Collects a copy of the last sequence's logits row from every forward while active."""
    recorded = []
    model = llm.engine.runner.model
    forward = model.forward

    def recording_forward(batch, caches, ws):
        logits = forward(batch, caches, ws)
        recorded.append(logits[-1].copy())
        return logits

    model.forward = recording_forward
    try:
        yield recorded
    finally:
        del model.forward


def engine_run(path, prompt, **engine_kwargs):
    """Greedy tokens and each step's logits from engine."""
    llm = LLM(str(path), skip_tokenizer_init=True, **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    with record_logits(llm) as recorded:
        out = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
    return out.token_ids, np.stack(recorded)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


@pytest.mark.parametrize("kind", list(MODELS))
def test_logits_and_greedy_tokens_match_transformers(kind, tmp_path):
    model = make_model(kind, tmp_path)
    prompt = np.random.default_rng(1).integers(3, COMMON["vocab_size"], PROMPT_LEN).tolist()
    tokens, logits = engine_run(tmp_path, prompt)
    assert len(tokens) == NEW_TOKENS

    ref = hf_logits(model, prompt + tokens)[PROMPT_LEN - 1:PROMPT_LEN - 1 + NEW_TOKENS]
    assert logits.shape == ref.shape
    err = np.abs(logits - ref).max()
    assert err <= 1e-3 * np.abs(ref).max(), f"max |dlogit| {err} vs max |logit| {np.abs(ref).max()}"
    assert tokens == ref.argmax(-1).tolist()  # each token is the reference's greedy choice

    with torch.no_grad():
        hf_tokens = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                   do_sample=False, eos_token_id=None)[0, PROMPT_LEN:].tolist()
    assert tokens == hf_tokens


@pytest.mark.parametrize("block_size,chunk", [(1, 5), (16, 16), (32, 2048)])
def test_chunked_prefill_and_block_sizes_do_not_change_results(block_size, chunk, tmp_path):
    make_model("llama", tmp_path)
    prompt = np.random.default_rng(2).integers(3, COMMON["vocab_size"], PROMPT_LEN).tolist()
    base_tokens, base_logits = engine_run(tmp_path, prompt)
    tokens, logits = engine_run(tmp_path, prompt, block_size=block_size,
                                max_num_batched_tokens=chunk)
    assert tokens == base_tokens
    # chunked runs record logits for each chunk: compare the rows after the prompt
    np.testing.assert_allclose(logits[-NEW_TOKENS:], base_logits, rtol=0, atol=1e-4)


def test_bf16_and_f16_weights_run_without_float32_copies(tmp_path):
    model = make_model("llama", tmp_path, dtype=torch.bfloat16)
    llm = LLM(str(tmp_path), skip_tokenizer_init=True)
    layer = llm.engine.model.layers[0]
    assert str(layer.qkv.dtype) == "bfloat16" and str(layer.down.dtype) == "bfloat16"
    prompt = list(range(5, 40))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    tokens = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0].token_ids
    ref = hf_logits(model.float(), prompt + tokens)[len(prompt) - 1:-1]
    assert tokens == ref.argmax(-1).tolist()


def test_packed_weights_give_the_same_bits_as_rows(tmp_path):
    """On the CPU float matrices are packed for decode (ops.PackedWeight), the tied
    embedding and LM head as one; unpacked back to rows, every step's logits are identical."""
    from engine.ops import PackedWeight

    make_model("llama-tied", tmp_path, dtype=torch.float16)
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, enable_prefix_caching=False)
    model = llm.engine.model
    names = ("qkv", "o_proj", "gate_up", "down")
    assert isinstance(model.lm_head, PackedWeight) and model.embed is model.lm_head
    assert all(isinstance(getattr(layer, n), PackedWeight) for layer in model.layers for n in names)
    prompt = list(range(3, 3 + PROMPT_LEN))
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    runs = []
    for packed in (True, False):
        if not packed:
            model.lm_head = model.embed = model.lm_head.unpack()
            for layer in model.layers:
                for n in names:
                    setattr(layer, n, getattr(layer, n).unpack())
        with record_logits(llm) as recorded:
            tokens = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0].token_ids
        runs.append((tokens, np.stack(recorded)))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
