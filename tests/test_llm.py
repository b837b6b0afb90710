"""The offline API on the real SmolLM2-135M-Instruct: shapes, stopping, seeds, streaming, errors."""

import re

import pytest

from engine import LLM, RequestOutput, SamplingParams


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return LLM(smollm2_gguf, max_model_len=256)


def greedy(max_tokens=12, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def test_generate_returns_one_output_per_prompt_in_order(llm):
    prompts = ["The capital of France is", "1, 2, 3, 4,", {"prompt_token_ids": [504, 3575, 282]}]
    outs = llm.generate(prompts, greedy(max_tokens=5, ignore_eos=True))
    assert [type(o) for o in outs] == [RequestOutput] * 3
    assert outs[0].prompt == prompts[0] and outs[2].prompt_token_ids == [504, 3575, 282]
    assert outs[0].prompt_token_ids == llm.get_tokenizer().encode(prompts[0])
    for out in outs:
        completion = out.outputs[0]
        assert len(completion.token_ids) == 5 and completion.finish_reason == "length"
        assert completion.text == llm.get_tokenizer().decode(completion.token_ids)
    single = llm.generate(prompts[1], greedy(max_tokens=5, ignore_eos=True))
    assert single[0].outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_eos_finishes_with_stop(llm):
    conversation = [{"role": "user", "content": "Say hi."}]
    out = llm.chat(conversation, greedy(max_tokens=200))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in llm.get_tokenizer().eos_token_ids
    assert "<|im_end|>" not in out.text and out.text.strip()


def test_chat_takes_a_list_of_conversations_and_applies_the_template(llm):
    conversations = [[{"role": "user", "content": "Say hi."}],
                     [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Name a color."}]]
    outs = llm.chat(conversations, greedy(max_tokens=8))
    assert len(outs) == 2
    tok = llm.get_tokenizer()
    for conversation, out in zip(conversations, outs):
        text = tok.apply_chat_template(conversation, add_generation_prompt=True)
        assert out.prompt == text and text.endswith("<|im_start|>assistant\n")
        assert out.prompt_token_ids == tok.encode(text, add_special_tokens=False)
        assert out.outputs[0].token_ids


def test_stop_string_is_cut_and_never_emitted(llm):
    base = llm.generate("1, 2, 3, 4,", greedy(max_tokens=20, ignore_eos=True))[0].outputs[0]
    assert " 7" in base.text
    out = llm.generate("1, 2, 3, 4,", greedy(max_tokens=20, stop=[" 7"]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == " 7"
    assert out.text == base.text[:base.text.index(" 7")]
    streamed = "".join(llm.stream("1, 2, 3, 4,", greedy(max_tokens=20, stop=[" 7"])))
    assert streamed == out.text


def test_stop_token_ids(llm):
    base = llm.generate("1, 2, 3, 4,", greedy(max_tokens=8, ignore_eos=True))[0].outputs[0]
    stop_id = base.token_ids[3]
    out = llm.generate("1, 2, 3, 4,", greedy(max_tokens=8, stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == base.token_ids[:base.token_ids.index(stop_id) + 1]


def test_seeded_sampling_is_reproducible_and_seeds_differ(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_tokens=16, seed=1234,
                            ignore_eos=True)
    a = llm.generate("Once upon a time", params)[0].outputs[0].token_ids
    b = llm.generate(["Hello", "Once upon a time"], params)[1].outputs[0].token_ids
    assert a == b
    others = {tuple(llm.generate("Once upon a time", SamplingParams(
        temperature=1.0, max_tokens=16, seed=s, ignore_eos=True))[0].outputs[0].token_ids)
        for s in range(4)}
    assert len(others) > 1


def test_stream_concatenates_to_the_generated_text(llm):
    params = greedy(max_tokens=24, ignore_eos=True)
    pieces = list(llm.stream("Write a haiku about the sea:", params))
    full = llm.generate("Write a haiku about the sea:", params)[0].outputs[0].text
    assert len(pieces) > 3 and "".join(pieces) == full
    assert all("\ufffd" not in p for p in pieces)


def test_nearby_seeds_give_unrelated_streams(llm):
    params = [SamplingParams(temperature=1.0, max_tokens=8, seed=s, ignore_eos=True)
              for s in (5, 6)]
    a, b = (llm.generate("Once upon a time", p)[0].outputs[0].token_ids for p in params)
    assert a[1:] != b[:-1] and a != b  # not one stream shifted by a token


def test_numpy_integer_token_ids_are_accepted(llm):
    import numpy as np
    ids = np.array([504, 3575, 282], np.int64)
    out = llm.generate({"prompt_token_ids": list(ids)}, greedy(max_tokens=2))[0]
    assert out.prompt_token_ids == [504, 3575, 282]


def test_n_completions(llm):
    out = llm.generate("Tell me a color:", SamplingParams(n=3, temperature=1.0, max_tokens=6,
                                                         seed=7, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)


@pytest.mark.parametrize("prompt, params, message", [
    ("x", greedy(max_tokens=300), "exceeds max_model_len"),
    ({"prompt_token_ids": []}, greedy(), "empty"),
    ({"prompt_token_ids": [1, 49152]}, greedy(), "token ids must be integers in [0, 49152)"),
    ({"prompt_token_ids": [1, -3]}, greedy(), "[0, 49152)"),
    ("x " * 300, SamplingParams(max_tokens=None), "max_model_len is 256"),
    ({"prompt_token_ids": [1] * 256}, SamplingParams(max_tokens=None), "prompt has 256 tokens"),
    (42, greedy(), "prompts must be a string"),
    ([42], greedy(), "prompt must be a string"),
])
def test_bad_requests_raise_value_error_and_leave_the_engine_usable(llm, prompt, params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate(prompt, params)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks
    assert llm.generate("Hi", greedy(max_tokens=2))[0].outputs[0].token_ids


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5),
    ("max_tokens", 0), ("n", 0), ("stop", [""]), ("seed", 1.5), ("temperature", float("nan")),
    ("temperature", float("inf")), ("temperature", 1e39),
])
def test_sampling_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_blocks_are_freed_after_generation(llm):
    llm.generate(["a b c", "d e f g"], greedy(max_tokens=20, ignore_eos=True))
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks
