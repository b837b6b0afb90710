"""Each SamplingParams field, shown through the whole engine (LLM.generate / LLM.stream).

Text-level behaviour runs on the real SmolLM2-135M-Instruct; logprob values are checked
against transformers on a small random-weight Llama (as in tests/model/test_llama_parity.py).
"""

import numpy as np
import pytest

from engine import LLM, SamplingParams

REPEAT_PROMPT = "1 1 1 1 1 1 1 1"       # greedy goes on with " 1 1 1 ..."
FRANCE_PROMPT = "The capital of France is"
SHORT_CHAT = [{"role": "user", "content": "What is 2+2? Answer with a number only."}]


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return LLM(smollm2_gguf, max_model_len=256)


@pytest.fixture(scope="module")
def eos(llm):
    (eos_id,) = llm.get_tokenizer().eos_token_ids  # SmolLM2: <|im_end|>
    return eos_id


@pytest.fixture(scope="module")
def chat_greedy(llm, eos):
    """The short chat reply, greedy: it ends with EOS well before max_tokens."""
    out = llm.chat(SHORT_CHAT, greedy(max_tokens=32))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos and len(out.token_ids) >= 3
    assert eos not in out.token_ids[:-1]
    return out


@pytest.fixture(scope="module")
def france_greedy(llm):
    return llm.generate(FRANCE_PROMPT, greedy(max_tokens=8, ignore_eos=True))[0].outputs[0]


def greedy(**kw):
    return SamplingParams(temperature=0.0, **kw)


def tokens(llm, prompt, params):
    return llm.generate(prompt, params)[0].outputs[0].token_ids


# ---- temperature, top_k, top_p, min_p ---------------------------------------------------


def test_temperature_zero_is_argmax_of_the_logits_and_ignores_the_seed(llm, france_greedy):
    from model.test_llama_parity import record_logits

    with record_logits(llm) as recorded:
        out = tokens(llm, FRANCE_PROMPT, greedy(max_tokens=8, ignore_eos=True, seed=99))
    assert out == france_greedy.token_ids
    assert out == [int(np.argmax(row)) for row in recorded]


def test_temperature_above_zero_samples_and_seeds_differ(llm, france_greedy):
    runs = {tuple(tokens(llm, FRANCE_PROMPT, SamplingParams(temperature=1.5, max_tokens=6,
                                                             seed=s, ignore_eos=True)))
            for s in range(4)}
    assert len(runs) > 1
    assert runs != {tuple(france_greedy.token_ids[:6])}


@pytest.mark.parametrize("field, value", [("top_k", 1), ("top_p", 1e-6), ("min_p", 1.0)])
def test_filters_that_keep_only_the_top_token_equal_greedy(llm, france_greedy, field, value):
    for seed in (0, 1):
        params = SamplingParams(temperature=1.5, max_tokens=8, seed=seed, ignore_eos=True,
                                **{field: value})
        assert tokens(llm, FRANCE_PROMPT, params) == france_greedy.token_ids


# ---- penalties ---------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.0),
                                          ("frequency_penalty", 2.0),
                                          ("repetition_penalty", 2.0)])
def test_penalty_cuts_the_repeated_token(llm, field, value):
    one = llm.get_tokenizer().encode("1 1")[0]
    base = tokens(llm, REPEAT_PROMPT, greedy(max_tokens=10, ignore_eos=True))
    assert base.count(one) >= 4  # greedy keeps repeating "1"
    penalised = tokens(llm, REPEAT_PROMPT, greedy(max_tokens=10, ignore_eos=True,
                                                  **{field: value}))
    assert penalised.count(one) <= base.count(one) // 2


# ---- logit_bias --------------------------------------------------------------------------


def test_logit_bias_plus_100_forces_the_token_every_step(llm):
    forced = llm.get_tokenizer().encode(" banana")[-1]
    out = tokens(llm, FRANCE_PROMPT, greedy(max_tokens=5, logit_bias={forced: 100.0}))
    assert out == [forced] * 5
    sampled = tokens(llm, FRANCE_PROMPT, SamplingParams(temperature=1.0, seed=3, max_tokens=5,
                                                        logit_bias={forced: 100.0}))
    assert sampled == [forced] * 5


def test_logit_bias_minus_100_bans_greedys_first_token(llm, france_greedy):
    first = france_greedy.token_ids[0]
    out = tokens(llm, FRANCE_PROMPT, greedy(max_tokens=4, ignore_eos=True,
                                            logit_bias={first: -100.0}))
    assert out[0] != first and first not in out


# ---- seed --------------------------------------------------------------------------------


def test_seed_reproduces_alone_and_inside_a_mixed_batch(llm):
    params = SamplingParams(temperature=1.2, top_p=0.9, max_tokens=8, seed=4321, ignore_eos=True)
    alone = tokens(llm, FRANCE_PROMPT, params)
    assert tokens(llm, FRANCE_PROMPT, params) == alone
    others = [greedy(max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.7, top_k=5, max_tokens=3, seed=1, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=8, presence_penalty=1.0,
                             repetition_penalty=1.3, logit_bias={42: 5.0}, logprobs=3)]
    outs = llm.generate(["Hello", FRANCE_PROMPT, REPEAT_PROMPT, FRANCE_PROMPT],
                        [others[0], params, others[1], others[2]])
    assert outs[1].outputs[0].token_ids == alone


# ---- lengths: max_tokens, min_tokens, ignore_eos -------------------------------------------


def test_max_tokens_sets_the_length_and_finishes_with_length(llm, france_greedy):
    out = llm.generate(FRANCE_PROMPT, greedy(max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length" and out.stop_reason is None
    assert out.token_ids == france_greedy.token_ids[:3]


def test_min_tokens_holds_eos_back(llm, chat_greedy, eos):
    num = len(chat_greedy.token_ids)
    min_tokens = num + 3
    out = llm.chat(SHORT_CHAT, greedy(max_tokens=min_tokens + 12, min_tokens=min_tokens)
                   )[0].outputs[0]
    assert len(out.token_ids) >= min_tokens
    assert eos not in out.token_ids[:min_tokens]
    assert out.token_ids[:num - 1] == chat_greedy.token_ids[:-1]  # same until the EOS


def test_ignore_eos_generates_past_eos_to_max_tokens(llm, chat_greedy, eos):
    num = len(chat_greedy.token_ids)
    out = llm.chat(SHORT_CHAT, greedy(max_tokens=num + 3, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == num + 3
    assert out.token_ids[:num] == chat_greedy.token_ids  # EOS sampled, then more


# ---- stop, stop_token_ids, skip_special_tokens --------------------------------------------


def _stop_across_tokens(llm, completion):
    """A substring of the text made of the end of one token and the start of the next,
    found nowhere earlier in the text; returns (stop, index in text)."""
    tok = llm.get_tokenizer()
    pieces = [tok.decode(completion.token_ids[:i + 1]) for i in range(len(completion.token_ids))]
    assert pieces[-1] == completion.text
    for j in range(1, len(pieces) - 1):
        boundary = len(pieces[j - 1])
        if boundary >= 2 and len(pieces[j]) - boundary >= 1:
            stop = completion.text[boundary - 2:boundary + 1]
            if completion.text.find(stop) == boundary - 2 and stop.strip():
                return stop, boundary - 2
    pytest.fail(f"no stop string spans two tokens of {completion.text!r}")


def test_stop_string_split_across_tokens(llm, france_greedy):
    stop, index = _stop_across_tokens(llm, france_greedy)
    params = greedy(max_tokens=8, stop=[stop])
    out = llm.generate(FRANCE_PROMPT, params)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == france_greedy.text[:index]
    streamed = list(llm.stream(FRANCE_PROMPT, params))
    assert "".join(streamed) == out.text
    assert stop not in "".join(streamed)


def test_stop_token_ids_end_with_that_token(llm, france_greedy):
    stop_id = france_greedy.token_ids[2]
    out = llm.generate(FRANCE_PROMPT, greedy(max_tokens=8, stop_token_ids=[stop_id]))[0]
    out = out.outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == france_greedy.token_ids[:france_greedy.token_ids.index(stop_id) + 1]


def test_skip_special_tokens_false_keeps_the_eos_text(llm, chat_greedy, eos):
    num = len(chat_greedy.token_ids)
    assert "<|im_end|>" not in chat_greedy.text
    kept = llm.chat(SHORT_CHAT, greedy(max_tokens=32, stop_token_ids=[eos],
                                       skip_special_tokens=False))[0].outputs[0]
    assert kept.stop_reason == eos and kept.token_ids == chat_greedy.token_ids
    assert kept.text == chat_greedy.text + "<|im_end|>"
    past = llm.chat(SHORT_CHAT, greedy(max_tokens=num + 1, ignore_eos=True,
                                       skip_special_tokens=False))[0].outputs[0]
    assert "<|im_end|>" in past.text
    skipped = llm.chat(SHORT_CHAT, greedy(max_tokens=num + 1, ignore_eos=True))[0].outputs[0]
    assert skipped.token_ids == past.token_ids and "<|im_end|>" not in skipped.text


# ---- n -------------------------------------------------------------------------------------


def test_n_gives_distinct_seeded_completions(llm):
    params = SamplingParams(n=3, temperature=1.2, max_tokens=5, seed=11, ignore_eos=True)
    out = llm.generate(FRANCE_PROMPT, params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = llm.generate(FRANCE_PROMPT, params)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_n_shares_the_prompt_blocks(llm):
    engine = llm.engine
    bm = engine.block_manager
    assert bm.num_free_blocks == engine.num_blocks
    prompt = (llm.get_tokenizer().encode("alpha beta gamma delta " * 40))[:100]
    prompt_blocks = bm.blocks_for(len(prompt))  # 7 blocks of 16
    engine.add_request("n-blocks", {"prompt_token_ids": prompt},
                       SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=3,
                                      ignore_eos=True))
    max_used, final = 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
        max_used = max(max_used, engine.num_blocks - bm.num_free_blocks)
    assert final is not None and final.finished and len(final.outputs) == 4
    assert all(len(c.token_ids) == 3 for c in final.outputs)
    # 6 full prompt blocks shared; each completion owns at most its last block (copy on write)
    assert max_used <= prompt_blocks + 4
    assert max_used < 2 * prompt_blocks
    assert bm.num_free_blocks == engine.num_blocks


# ---- logprobs and prompt_logprobs against transformers ----------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A small random-weight Llama in transformers, saved as a Hugging Face folder."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from model.test_llama_parity import make_model

    path = tmp_path_factory.mktemp("tiny_llama")
    model = make_model("llama", path)
    return path, model, torch


def _ref_log_softmax(tiny, token_ids):
    _, model, torch = tiny
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


TINY_PROMPT = np.random.default_rng(3).integers(3, 320, 40).tolist()


def test_logprobs_match_transformers(tiny_llama):
    llm = LLM(str(tiny_llama[0]), skip_tokenizer_init=True)
    params = greedy(max_tokens=6, ignore_eos=True, logprobs=5)
    out = llm.generate({"prompt_token_ids": TINY_PROMPT}, params)[0].outputs[0]
    ref = _ref_log_softmax(tiny_llama, TINY_PROMPT + out.token_ids)[len(TINY_PROMPT) - 1:-1]
    assert len(out.logprobs) == len(out.token_ids) == 6
    for token, entry, row in zip(out.token_ids, out.logprobs, ref):
        top5 = np.argsort(-row)[:5].tolist()
        assert token == top5[0] and set(entry) == set(top5)
        for t, lp in entry.items():
            assert lp == pytest.approx(row[t], abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.token_ids,
                                                                            out.logprobs)))

    # a token forced by logit_bias is outside the top 5: 6 entries, its raw logprob
    forced = int(np.argsort(ref[0])[0])  # the least likely token at the first step
    out = llm.generate({"prompt_token_ids": TINY_PROMPT},
                       greedy(max_tokens=2, logprobs=5, logit_bias={forced: 100.0})
                       )[0].outputs[0]
    assert out.token_ids == [forced, forced]
    row = _ref_log_softmax(tiny_llama, TINY_PROMPT)[-1]
    assert len(out.logprobs[0]) == 6
    assert out.logprobs[0][forced] == pytest.approx(row[forced], abs=1e-4)
    assert set(out.logprobs[0]) - {forced} == set(np.argsort(-row)[:5].tolist())

    # sampled: logprobs=0 is the chosen token alone, its raw logprob whatever the temperature
    out = llm.generate({"prompt_token_ids": TINY_PROMPT},
                       SamplingParams(temperature=0.5, top_k=3, seed=0, max_tokens=4,
                                      ignore_eos=True, logprobs=0))[0].outputs[0]
    ref = _ref_log_softmax(tiny_llama, TINY_PROMPT + out.token_ids)[len(TINY_PROMPT) - 1:-1]
    for token, entry, row in zip(out.token_ids, out.logprobs, ref):
        assert list(entry) == [token]
        assert entry[token] == pytest.approx(row[token], abs=1e-4)


@pytest.mark.parametrize("chunk", [2048, 16])
def test_prompt_logprobs_match_transformers(tiny_llama, chunk):
    llm = LLM(str(tiny_llama[0]), skip_tokenizer_init=True, max_num_batched_tokens=chunk)
    out = llm.generate({"prompt_token_ids": TINY_PROMPT},
                       greedy(max_tokens=1, prompt_logprobs=2))[0]
    ref = _ref_log_softmax(tiny_llama, TINY_PROMPT)
    assert len(out.prompt_logprobs) == len(TINY_PROMPT)
    assert out.prompt_logprobs[0] is None
    for i in range(1, len(TINY_PROMPT)):
        entry, row, token = out.prompt_logprobs[i], ref[i - 1], TINY_PROMPT[i]
        top2 = np.argsort(-row)[:2].tolist()
        assert set(entry) == set(top2) | {token}
        for t, lp in entry.items():
            assert lp == pytest.approx(row[t], abs=1e-4), (i, t)
