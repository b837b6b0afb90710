"""CUDA sample against ops.reference.sample.

Greedy rows must match exactly; generator states must match exactly. A sampled row must
give the reference's token unless the draw (or top_p / min_p) sits within TOL of a
boundary, where the GPU's differently rounded sums may fall on the other side: then the
token must be one of those the reference gives with the draw or the filters moved by
TOL (computed from the reference, never "any token").
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine import ops
from engine.ops import gpu_available, reference

pytestmark = pytest.mark.skipif(not gpu_available(),
                                reason="no GPU: CUDA kernels run only on a machine with an NVIDIA GPU")

TOL = 1e-6  # relative: of the draw u (times the kept mass), of top_p and of min_p


def make_params(rng, num_seqs, mix):
    temperature = rng.choice([0.0, 0.3, 1.0, 1.7], num_seqs).astype(np.float32)
    top_k = np.where(rng.random(num_seqs) < mix, rng.integers(1, 60, num_seqs), 0).astype(np.int32)
    top_p = np.where(rng.random(num_seqs) < mix, rng.uniform(0.0, 1.0, num_seqs), 1.0)
    min_p = np.where(rng.random(num_seqs) < mix, rng.uniform(0.0, 0.5, num_seqs), 0.0)
    rng_state = rng.integers(0, 2**64 - 1, num_seqs, dtype=np.uint64, endpoint=True)
    return temperature, top_k, top_p.astype(np.float32), min_p.astype(np.float32), rng_state


def run_gpu(logits, temperature, top_k, top_p, min_p, rng_state):
    d = [ops.to_device(a) for a in (logits, temperature, top_k, top_p, min_p, rng_state)]
    out = ops.to_device(np.full(len(logits), -7, np.int32))
    ops.sample(*d, out=out)
    return ops.to_host(out), ops.to_host(d[5])


def allowed_tokens(row, temperature, top_k, top_p, min_p, u):
    """Every token the reference draws with u, top_p and min_p each moved by up to TOL."""
    tokens = set()
    for tp in {top_p, top_p * (1 - TOL), min(1.0, top_p * (1 + TOL))} if top_p < 1 else {top_p}:
        for mp in {min_p, min_p * (1 - TOL), min_p * (1 + TOL)} if min_p > 0 else {min_p}:
            ids, p = reference.kept_candidates(row, temperature, top_k, tp, mp)
            cum = np.cumsum(p)
            lo, hi = (u - TOL) * cum[-1], (u + TOL) * cum[-1]
            start = np.concatenate([[0.0], cum[:-1]])
            hit = (cum > lo) & (start <= hi)  # [start, cum) meets [lo, hi]
            tokens.update(int(t) for t in ids[hit])
    return tokens


def check_rows(logits, params, out, state):
    temperature, top_k, top_p, min_p, rng_state = params
    want_state = rng_state.copy()
    want = np.full(len(logits), -1, np.int32)
    reference.sample(logits, temperature, top_k, top_p, min_p, want_state, out=want)
    np.testing.assert_array_equal(state, want_state)
    for i in range(len(logits)):
        if out[i] == want[i]:
            continue
        assert temperature[i] > 0, f"row {i}: greedy token {out[i]} != {want[i]}"
        _, bits = reference.splitmix64(int(rng_state[i]))
        ok = allowed_tokens(logits[i], float(temperature[i]), int(top_k[i]), float(top_p[i]),
                            float(min_p[i]), reference.uniform(bits))
        assert int(out[i]) in ok, f"row {i}: token {out[i]}, reference {want[i]}, allowed {ok}"


@settings(deadline=None, max_examples=40)
@given(num_seqs=st.sampled_from([1, 3, 17]), vocab=st.sampled_from([1, 3, 17, 769, 20000]),
       scale=st.sampled_from([0.1, 1.0, 5.0, 40.0]), mix=st.sampled_from([0.0, 0.5, 1.0]),
       ties=st.booleans(), masked=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_sample_matches_reference(num_seqs, vocab, scale, mix, ties, masked, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((num_seqs, vocab)) * scale).astype(np.float32)
    if ties:  # few distinct values (and -0.0): equal probabilities go to the lower id
        logits = np.round(logits / scale).astype(np.float32)
    if masked:  # banned tokens; one entry per row stays finite
        logits[rng.random(logits.shape) < 0.5] = -np.inf
        logits[np.arange(num_seqs), rng.integers(0, vocab, num_seqs)] = 1.0
    params = make_params(rng, num_seqs, mix)
    out, state = run_gpu(logits, *params)
    check_rows(logits, params, out, state)


def test_large_vocab_with_filters(rng):
    logits = (rng.standard_normal((8, 152000)) * 3).astype(np.float32)
    logits[np.arange(8), rng.integers(0, 152000, 8)] += 12
    params = (np.array([0, 1, 0.7, 1.3, 1, 1, 0.5, 2], np.float32),
              np.array([0, 0, 50, 0, 5, 0, 100, 0], np.int32),
              np.array([1, 1, 0.9, 0.8, 1, 1, 0.95, 0.5], np.float32),
              np.array([0, 0, 0, 0.05, 0, 0.1, 0, 0], np.float32),
              rng.integers(0, 2**63, 8, dtype=np.uint64))
    for _ in range(3):
        out, state = run_gpu(logits, *params)
        check_rows(logits, params, out, state)
        params = (*params[:4], state)


def test_vocab_262144_and_k_equal_vocab(rng):
    vocab = 262144
    logits = (rng.standard_normal((3, vocab)) * 2).astype(np.float32)
    params = (np.ones(3, np.float32), np.array([vocab, vocab - 1, 1000], np.int32),
              np.array([1, 0.99, 0.5], np.float32), np.zeros(3, np.float32),
              rng.integers(0, 2**63, 3, dtype=np.uint64))
    out, state = run_gpu(logits, *params)
    check_rows(logits, params, out, state)


def test_greedy_first_argmax_all_neginf_and_state():
    logits = np.array([[1, 3, 3, 0], [-np.inf] * 4, [0.0, -0.0, 0.0, -1]], np.float32)
    zeros = np.zeros(3, np.float32)
    out, state = run_gpu(logits, zeros, np.zeros(3, np.int32), np.ones(3, np.float32), zeros,
                         np.array([5, 6, 7], np.uint64))
    assert out.tolist() == [1, 0, 0]
    assert state.tolist() == [(s + 0x9E3779B97F4A7C15) % 2**64 for s in (5, 6, 7)]


def test_ties_go_to_lower_id_with_top_k():
    """Equal logits (+0 and -0 included) under top_k = 1: always the lowest id."""
    logits = np.array([[-1, 2, 0, 2, 2], [-0.0, 0.0, -0.0, -1, -5]], np.float32)
    for seed in range(20):
        out, _ = run_gpu(logits, np.ones(2, np.float32), np.ones(2, np.int32),
                         np.ones(2, np.float32), np.zeros(2, np.float32),
                         np.array([seed, seed + 99], np.uint64))
        assert out.tolist() == [1, 0]


def test_invalid_rows_give_minus_one_and_advance():
    """The CPU raises; the GPU cannot, so such rows get -1 (documented in sampling.cu)."""
    logits = np.zeros((4, 5), np.float32)
    logits[0, 2] = np.nan
    logits[1, 3] = np.inf
    logits[2] = -np.inf
    temperature = np.array([0, 1, 1, 1], np.float32)
    out, state = run_gpu(logits, temperature, np.zeros(4, np.int32), np.ones(4, np.float32),
                         np.zeros(4, np.float32), np.arange(4, dtype=np.uint64))
    assert out.tolist()[:3] == [-1, -1, -1] and 0 <= out[3] < 5
    assert state.tolist() == [(s + 0x9E3779B97F4A7C15) % 2**64 for s in range(4)]


def test_frequencies_match_softmax():
    rng = np.random.default_rng(1)
    vocab, num_draws = 10, 20000
    logits = rng.standard_normal(vocab).astype(np.float32)
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    out, _ = run_gpu(np.tile(logits, (num_draws, 1)), np.ones(num_draws, np.float32),
                     np.zeros(num_draws, np.int32), np.ones(num_draws, np.float32),
                     np.zeros(num_draws, np.float32),
                     np.arange(num_draws, dtype=np.uint64) * np.uint64(7919))
    counts = np.bincount(out, minlength=vocab)
    chi2 = ((counts - p * num_draws) ** 2 / (p * num_draws)).sum()
    assert chi2 < 27.9


def test_strided_rows_and_rejects(rng):
    wide = ops.to_device(rng.standard_normal((3, 40)).astype(np.float32))
    logits = wide[:, 5:30]  # row stride 40
    args = [ops.to_device(a) for a in (np.zeros(3, np.float32), np.zeros(3, np.int32),
                                       np.ones(3, np.float32), np.zeros(3, np.float32),
                                       np.zeros(3, np.uint64))]
    out = ops.to_device(np.full(3, -7, np.int32))
    ops.sample(logits, *args, out=out)
    host = ops.to_host(wide)[:, 5:30]
    assert ops.to_host(out).tolist() == [int(np.argmax(r)) for r in host]
    with pytest.raises(ValueError, match="sample: top_k must be int32"):
        ops.sample(logits, args[0], ops.to_device(np.zeros(3, np.int64)), *args[2:], out=out)
    with pytest.raises(ValueError, match=r"sample: rng_state must have shape \[3\]"):
        ops.sample(logits, *args[:4], ops.to_device(np.zeros(2, np.uint64)), out=out)
