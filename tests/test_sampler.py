"""Sampler: every SamplingParams field shown on real numbers against numpy."""

import numpy as np
import pytest

from engine.sampler import Sampler, prompt_logprobs
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

EOS = 0
VOCAB = 32


def make_seq(params, prompt=(1, 2, 3), output=(), rng_state=0, seq_id=0):
    seq = Sequence(seq_id, f"r{seq_id}", 0, list(prompt), params, rng_state, detokenizer=None)
    seq.token_ids.extend(output)
    return seq


def log_softmax(x):
    x = np.asarray(x, np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(x):
    return np.exp(log_softmax(x))


def random_logits(num_seqs=4, vocab=VOCAB, seed=0, scale=2.0):
    return (np.random.default_rng(seed).standard_normal((num_seqs, vocab)) * scale
            ).astype(np.float32)


def sample_many(row, params, num_draws=300):
    """Draw num_draws tokens from one logits row, one sequence per generator seed."""
    seqs = [make_seq(params, rng_state=seed, seq_id=seed) for seed in range(num_draws)]
    logits = np.ascontiguousarray(np.broadcast_to(row, (num_draws, row.size)))
    return Sampler({EOS})(logits, seqs).token_ids.copy()


# ---- temperature, top-k, top-p, min-p -----------------------------------------------

def test_temperature_zero_is_argmax():
    logits = random_logits(8)
    seqs = [make_seq(SamplingParams(temperature=0.0), seq_id=i) for i in range(8)]
    out = Sampler({EOS})(logits.copy(), seqs)
    np.testing.assert_array_equal(out.token_ids, logits.argmax(axis=1))


def test_temperature_one_samples_more_than_one_token():
    tokens = sample_many(random_logits(1, scale=0.5)[0], SamplingParams(temperature=1.0))
    assert len(set(tokens.tolist())) > 5


@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_top_k_restricts_support(top_k):
    row = random_logits(1, seed=1, scale=0.5)[0]
    allowed = set(np.argsort(-row, kind="stable")[:top_k].tolist())
    tokens = set(sample_many(row, SamplingParams(top_k=top_k)).tolist())
    assert tokens == allowed  # inside the set, and 300 draws reach all of it


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_restricts_support(top_p):
    row = random_logits(1, seed=2, scale=1.0)[0]
    p = softmax(row)
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    assert np.abs(cum - top_p).min() > 1e-3  # no boundary case in this data
    allowed = set(order[:int(np.searchsorted(cum, top_p)) + 1].tolist())
    tokens = set(sample_many(row, SamplingParams(top_p=top_p)).tolist())
    assert tokens == allowed and len(tokens) > 1


@pytest.mark.parametrize("min_p", [0.2, 0.3, 0.5])
def test_min_p_restricts_support(min_p):
    row = random_logits(1, seed=0, scale=1.0)[0]
    p = softmax(row)
    assert np.abs(p - min_p * p.max()).min() > 1e-4
    allowed = set(np.flatnonzero(p >= min_p * p.max()).tolist())
    tokens = set(sample_many(row, SamplingParams(min_p=min_p)).tolist())
    assert tokens == allowed and len(tokens) > 1


# ---- penalties and bias --------------------------------------------------------------

def test_presence_and_frequency_penalties_follow_the_formula():
    logits = random_logits(1)
    want = logits[0].astype(np.float64)
    output = [5, 5, 7, 5, 9]
    counts = np.bincount(output, minlength=VOCAB)
    want -= 0.3 * counts + 0.5 * (counts > 0)
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3)
    Sampler({EOS})(logits, [make_seq(params, prompt=[5, 6], output=output)])
    np.testing.assert_allclose(logits[0], want, rtol=0, atol=1e-5)


def test_repetition_penalty_follows_the_formula():
    logits = random_logits(1)
    want = logits[0].astype(np.float64)
    seen = np.zeros(VOCAB, bool)
    seen[[1, 2, 3, 8, 11]] = True
    want = np.where(seen, np.where(want > 0, want / 1.5, want * 1.5), want)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    Sampler({EOS})(logits, [make_seq(params, prompt=[1, 2, 3], output=[8, 11, 8])])
    np.testing.assert_allclose(logits[0], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("field, value", [("presence_penalty", 1.0), ("frequency_penalty", 0.6),
                                          ("repetition_penalty", 2.0)])
def test_penalty_flips_the_greedy_token(field, value):
    logits = np.zeros((1, VOCAB), np.float32)
    logits[0, 4], logits[0, 9] = 3.0, 2.5  # 4 is the argmax and was generated twice
    seq = make_seq(SamplingParams(temperature=0.0, **{field: value}), prompt=[1], output=[4, 4])
    neutral = make_seq(SamplingParams(temperature=0.0), prompt=[1], output=[4, 4], seq_id=1)
    out = Sampler({EOS})(np.concatenate([logits, logits]), [seq, neutral])
    assert out.token_ids.tolist() == [9, 4]


def test_logit_bias_forces_and_bans():
    logits = random_logits(1, seed=5)[0]
    low, top = int(logits.argmin()), int(logits.argmax())
    second = int(np.argsort(-logits, kind="stable")[1])
    greedy = SamplingParams(temperature=0.0, logit_bias={top: -100.0})
    out = Sampler({EOS})(logits[None].copy(), [make_seq(greedy)])
    assert out.token_ids.tolist() == [second]
    forced = sample_many(logits, SamplingParams(logit_bias={low: 100.0}), num_draws=100)
    assert set(forced.tolist()) == {low}
    banned = sample_many(logits, SamplingParams(logit_bias={top: -100.0}, top_k=2))
    assert top not in set(banned.tolist())


def test_neutral_params_leave_logits_untouched():
    logits = random_logits(3)
    before = logits.copy()
    Sampler({EOS})(logits, [make_seq(SamplingParams(), seq_id=i, output=[4]) for i in range(3)])
    np.testing.assert_array_equal(logits, before)


# ---- min_tokens ----------------------------------------------------------------------

def min_tokens_logits():
    logits = np.zeros((1, VOCAB), np.float32)
    logits[0, EOS], logits[0, 1], logits[0, 2] = 5.0, 4.0, 3.0  # EOS, then stop id 1, then 2
    return logits


@pytest.mark.parametrize("num_output, want", [(0, 2), (1, 2), (2, EOS), (3, EOS)])
def test_min_tokens_bans_eos_and_stop_ids_until_reached(num_output, want):
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1])
    seq = make_seq(params, prompt=[5], output=[7] * num_output)
    assert Sampler({EOS})(min_tokens_logits(), [seq]).token_ids.tolist() == [want]


def test_min_tokens_bans_eos_when_sampling():
    row = min_tokens_logits()[0]
    tokens = sample_many(row, SamplingParams(min_tokens=1, stop_token_ids=[1]))
    assert not {EOS, 1} & set(tokens.tolist())


def test_min_tokens_with_ignore_eos_bans_only_stop_ids():
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[EOS + 1],
                            ignore_eos=True)
    out = Sampler({EOS})(min_tokens_logits(), [make_seq(params)])
    assert out.token_ids.tolist() == [EOS]


# ---- seeds and batch independence -----------------------------------------------------

def run_steps(sampler, seqs, logits_by_step):
    for logits in logits_by_step:
        out = sampler(logits[:len(seqs)].copy(), seqs)
        for seq, t in zip(seqs, out.token_ids.tolist()):
            seq.token_ids.append(t)
    return [seq.output_token_ids for seq in seqs], [seq.rng_state for seq in seqs]


def test_same_seed_reproduces_and_batch_does_not_matter():
    steps = [random_logits(4, seed=s, scale=0.5) for s in range(6)]
    params = SamplingParams(temperature=0.9, top_p=0.95, presence_penalty=0.2)
    alone = run_steps(Sampler({EOS}), [make_seq(params, rng_state=1234)], steps)
    again = run_steps(Sampler({EOS}), [make_seq(params, rng_state=1234)], steps)
    assert alone == again
    others = [SamplingParams(temperature=0.0), SamplingParams(top_k=3, repetition_penalty=1.3),
              SamplingParams(logit_bias={3: 5.0}, min_tokens=4, logprobs=2)]
    batch = [make_seq(params, rng_state=1234)] + [
        make_seq(p, rng_state=99 + i, seq_id=i + 1) for i, p in enumerate(others)]
    # the same logits row for the first sequence in both runs: rows 0 of every step
    tokens, states = run_steps(Sampler({EOS}), batch, steps)
    assert (tokens[0], states[0]) == (alone[0][0], alone[1][0])
    other_seed = run_steps(Sampler({EOS}), [make_seq(params, rng_state=4321)], steps)
    assert other_seed[1] != alone[1]


def test_is_sampled_mask_leaves_rng_state_of_masked_rows():
    params = [SamplingParams(logprobs=1), SamplingParams(temperature=0.0, logprobs=1),
              SamplingParams(logprobs=1)]
    seqs = [make_seq(p, rng_state=10 + i, seq_id=i) for i, p in enumerate(params)]
    out = Sampler({EOS})(random_logits(3), seqs, is_sampled=[True, False, False])
    assert seqs[0].rng_state != 10  # sampled rows advance, greedy or not
    assert [seqs[1].rng_state, seqs[2].rng_state] == [11, 12]
    assert out.logprobs[0] is not None and out.logprobs[1:] == [None, None]


def test_is_sampled_chunked_prompt_gives_the_same_draw():
    params = SamplingParams(seed=7)
    logits = random_logits(1, seed=9, scale=0.3)
    whole = make_seq(params, rng_state=55)
    chunked = make_seq(params, rng_state=55, seq_id=1)
    Sampler({EOS})(random_logits(1, seed=8), [chunked], is_sampled=[False])
    a = Sampler({EOS})(logits.copy(), [whole]).token_ids.tolist()
    b = Sampler({EOS})(logits.copy(), [chunked]).token_ids.tolist()
    assert a == b and whole.rng_state == chunked.rng_state


# ---- logprobs ------------------------------------------------------------------------

def test_logprobs_are_the_raw_model_log_softmax():
    logits = random_logits(4, seed=11)
    raw = logits.copy()
    params = [SamplingParams(logprobs=5, temperature=0.0),
              SamplingParams(logprobs=0, presence_penalty=2.0, logit_bias={3: -50.0}),
              SamplingParams(),
              SamplingParams(logprobs=20, top_k=2, temperature=0.5, repetition_penalty=1.7)]
    seqs = [make_seq(p, seq_id=i, output=[3, 4]) for i, p in enumerate(params)]
    out = Sampler({EOS})(logits, seqs)
    want = log_softmax(raw)
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        lp, n = out.logprobs[i], params[i].logprobs
        t = int(out.token_ids[i])
        assert lp.token_id == t
        np.testing.assert_allclose(lp.logprob, want[i, t], rtol=0, atol=1e-5)
        assert lp.rank == 1 + int((raw[i] > raw[i, t]).sum())
        top = np.argsort(-raw[i], kind="stable")[:n]
        assert [tid for tid, _ in lp.top] == top.tolist()
        np.testing.assert_allclose([v for _, v in lp.top], want[i, top], rtol=0, atol=1e-5)
    assert out.logprobs[0].rank == 1 and out.logprobs[1].top == []


def test_prompt_logprobs_of_the_next_tokens():
    logits = random_logits(5, seed=12)
    next_ids = np.array([3, 0, 31, 7, 7])
    got = prompt_logprobs(logits, next_ids, 4)
    want = log_softmax(logits)
    for j, lp in enumerate(got):
        assert lp.token_id == next_ids[j]
        np.testing.assert_allclose(lp.logprob, want[j, next_ids[j]], rtol=0, atol=1e-5)
        top = np.argsort(-logits[j], kind="stable")[:4]
        assert [t for t, _ in lp.top] == top.tolist()
        np.testing.assert_allclose([v for _, v in lp.top], want[j, top], rtol=0, atol=1e-5)


# ---- SamplingParams validation ---------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", float("nan")),
    ("presence_penalty", "1"),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5), ("frequency_penalty", None),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("repetition_penalty", float("inf")), ("repetition_penalty", True),
    ("logit_bias", {5: 101.0}), ("logit_bias", {5: -100.5}), ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"5": 1.0}), ("logit_bias", {5: float("nan")}), ("logit_bias", [(5, 1.0)]),
    ("min_tokens", -1), ("min_tokens", 1.5), ("min_tokens", 17),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0),
    ("prompt_logprobs", -1), ("prompt_logprobs", 21), ("prompt_logprobs", "3"),
])
def test_sampling_params_rejects(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} "):
        SamplingParams(max_tokens=16, **{field: value})


def test_sampling_params_accepts_the_edges():
    p = SamplingParams(presence_penalty=-2, frequency_penalty=2.0, repetition_penalty=0.1,
                       logit_bias={0: -100, 7: 100.0}, min_tokens=16, max_tokens=16,
                       logprobs=20, prompt_logprobs=0)
    assert p.logit_bias == {0: -100.0, 7: 100.0} and p.has_penalties
    assert SamplingParams(min_tokens=500, max_tokens=None).min_tokens == 500
    assert not SamplingParams().has_penalties and SamplingParams().logit_bias is None


def test_check_vocab_names_the_first_bad_id():
    SamplingParams(logit_bias={31: 1.0}, stop_token_ids=[31]).check_vocab(32)
    with pytest.raises(ValueError, match=r"SamplingParams.logit_bias token id 32 "):
        SamplingParams(logit_bias={3: 1.0, 32: 1.0, 40: 1.0}).check_vocab(32)
    with pytest.raises(ValueError, match=r"SamplingParams.stop_token_ids token id 99 "):
        SamplingParams(stop_token_ids=[1, 99]).check_vocab(32)
