"""sample against ops.reference.sample: the same tokens and the same generator states."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference


def make_params(rng, num_seqs, mix):
    """Per-row sampling parameters; mix picks which filters are on."""
    temperature = rng.choice([0.0, 0.3, 1.0, 1.7], num_seqs).astype(np.float32)
    top_k = np.where(rng.random(num_seqs) < mix, rng.integers(1, 60, num_seqs), 0).astype(np.int32)
    top_p = np.where(rng.random(num_seqs) < mix, rng.uniform(0.0, 1.0, num_seqs), 1.0)
    min_p = np.where(rng.random(num_seqs) < mix, rng.uniform(0.0, 0.5, num_seqs), 0.0)
    rng_state = rng.integers(0, 2**64 - 1, num_seqs, dtype=np.uint64, endpoint=True)
    return temperature, top_k, top_p.astype(np.float32), min_p.astype(np.float32), rng_state


def run_both(logits, temperature, top_k, top_p, min_p, rng_state):
    state, want_state = rng_state.copy(), rng_state.copy()
    out = np.full(len(logits), -1, np.int32)
    want = np.full(len(logits), -1, np.int32)
    ops.sample(logits, temperature, top_k, top_p, min_p, state, out=out)
    reference.sample(logits, temperature, top_k, top_p, min_p, want_state, out=want)
    return out, want, state, want_state


@given(num_seqs=st.sampled_from([1, 3, 17]), vocab=st.sampled_from([1, 3, 17, 769, 20000]),
       scale=st.sampled_from([0.1, 1.0, 5.0, 40.0]), mix=st.sampled_from([0.0, 0.5, 1.0]),
       ties=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_sample_matches_reference(isa, num_seqs, vocab, scale, mix, ties, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((num_seqs, vocab)) * scale).astype(np.float32)
    if ties:  # few distinct values: many equal probabilities, ties go to the lower id
        logits = np.round(logits / scale).astype(np.float32)
    params = make_params(rng, num_seqs, mix)
    out, want, state, want_state = run_both(logits, *params)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(state, want_state)


def test_large_vocab_with_filters_matches_reference(rng):
    logits = (rng.standard_normal((8, 152000)) * 3).astype(np.float32)
    logits[:, rng.integers(0, 152000, 8)] += 12  # a peaked row or two
    temperature = np.array([0, 1, 0.7, 1.3, 1, 1, 0.5, 2], np.float32)
    top_k = np.array([0, 0, 50, 0, 5, 0, 100, 0], np.int32)
    top_p = np.array([1, 1, 0.9, 0.8, 1, 1, 0.95, 0.5], np.float32)
    min_p = np.array([0, 0, 0, 0.05, 0, 0.1, 0, 0], np.float32)
    state = rng.integers(0, 2**63, 8, dtype=np.uint64)
    for _ in range(3):
        out, want, state, want_state = run_both(logits, temperature, top_k, top_p, min_p, state)
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(state, want_state)


def test_row_independent_of_batch(rng):
    logits = rng.standard_normal((9, 500)).astype(np.float32)
    params = make_params(rng, 9, 0.5)
    out = ops.sample(logits, *[p.copy() for p in params], out=np.empty(9, np.int32))
    for i in range(9):
        one = [p[i:i + 1].copy() for p in params]
        alone = ops.sample(logits[i:i + 1], *one, out=np.empty(1, np.int32))
        assert alone[0] == out[i]


def test_greedy_is_first_argmax_and_advances_state():
    logits = np.array([[1, 3, 3, 0], [-np.inf, -np.inf, -np.inf, -np.inf]], np.float32)
    state = np.array([5, 6], np.uint64)
    zeros = np.zeros(2, np.float32)
    out = ops.sample(logits, zeros, np.zeros(2, np.int32), np.ones(2, np.float32), zeros, state,
                     out=np.empty(2, np.int32))
    assert out.tolist() == [1, 0]
    assert state.tolist() == [5 + 0x9E3779B97F4A7C15, 6 + 0x9E3779B97F4A7C15]


@given(vocab=st.sampled_from([1, 2, 63, 64, 65, 130, 1000, 49152]), data=st.data())
def test_greedy_is_the_first_maximum_of_long_rows(vocab, data):
    """Ties within and across the kernel's 64-value steps and in the tail, signed zeros,
    infinities: the lowest index whose value no other beats (numpy's argmax)."""
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    palette = np.array([-np.inf, -1.0, -0.0, 0.0, 2.5, np.inf], np.float32)
    top = data.draw(st.integers(1, len(palette)), label="palette size")
    logits = palette[rng.integers(0, top, (3, vocab))]
    logits[1] = rng.standard_normal(vocab).astype(np.float32)
    logits[2, rng.integers(0, vocab)] = 7.0  # one clear maximum anywhere
    zeros = np.zeros(3, np.float32)
    out = ops.sample(logits, zeros, np.zeros(3, np.int32), np.ones(3, np.float32), zeros,
                     np.zeros(3, np.uint64), out=np.empty(3, np.int32))
    want = [int(np.flatnonzero(row == row.max())[0]) for row in logits]
    assert out.tolist() == want


def test_seeded_draws_reproduce(rng):
    logits = rng.standard_normal((4, 1000)).astype(np.float32)
    params = make_params(rng, 4, 0.5)
    params[0][:] = 1.0
    draws = []
    for _ in range(2):
        state = params[4].copy()
        seq = [ops.sample(logits, *params[:4], state, out=np.empty(4, np.int32)).copy()
               for _ in range(5)]
        draws.append(np.array(seq))
    np.testing.assert_array_equal(draws[0], draws[1])
    assert len(np.unique(draws[0][:, 0])) > 1  # the state advances: not one token forever


def test_frequencies_match_softmax():
    rng = np.random.default_rng(1)
    vocab, num_draws = 10, 20000
    logits = rng.standard_normal(vocab).astype(np.float32)
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    batch = np.tile(logits, (num_draws, 1))
    state = np.arange(num_draws, dtype=np.uint64) * np.uint64(7919)
    out = ops.sample(batch, np.ones(num_draws, np.float32), np.zeros(num_draws, np.int32),
                     np.ones(num_draws, np.float32), np.zeros(num_draws, np.float32), state,
                     out=np.empty(num_draws, np.int32))
    counts = np.bincount(out, minlength=vocab)
    expected = p * num_draws
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001


# ---- validation: ValueError naming op and argument; no state advanced, nothing written

@pytest.mark.parametrize("case,match", [
    ("nan", "sample: row 1: logits contain NaN"),
    ("posinf", r"sample: row 2: logits contain \+inf"),
    ("all_neginf", "sample: row 0: logits are all -inf"),
    ("nan_temperature", "sample: row 1: temperature is NaN"),
    ("logits_dtype", "sample: logits must be float32"),
    ("logits_inner_stride", "sample: logits must have a contiguous last dimension"),
    ("empty_vocab", "sample: logits must have between 1 and"),
    ("temperature_shape", r"sample: temperature must have shape \[3\]"),
    ("top_k_dtype", "sample: top_k must be int32"),
    ("top_p_dtype", "sample: top_p must be float32"),
    ("min_p_shape", r"sample: min_p must have shape \[3\]"),
    ("rng_dtype", "sample: rng_state must be uint64"),
    ("rng_readonly", "sample: rng_state must be a writeable array"),
    ("out_dtype", "sample: out must be int32"),
])
def test_sample_rejects(rng, case, match):
    logits = rng.standard_normal((3, 10)).astype(np.float32)
    temperature = np.array([1.0, 0.0, 1.0], np.float32)
    top_k = np.zeros(3, np.int32)
    top_p = np.ones(3, np.float32)
    min_p = np.zeros(3, np.float32)
    state = np.array([1, 2, 3], np.uint64)
    out = np.full(3, -1, np.int32)
    if case == "nan":
        logits[1, 4] = np.nan  # a greedy row: NaN is still an error
    elif case == "posinf":
        logits[2, 4] = np.inf
    elif case == "all_neginf":
        logits[0] = -np.inf
    elif case == "nan_temperature":
        temperature[1] = np.nan
    elif case == "logits_dtype":
        logits = logits.astype(np.float16)
    elif case == "logits_inner_stride":
        logits = np.repeat(logits, 2, axis=1)[:, ::2]
    elif case == "empty_vocab":
        logits = logits[:, :0]
    elif case == "temperature_shape":
        temperature = np.ones(4, np.float32)
    elif case == "top_k_dtype":
        top_k = top_k.astype(np.int64)
    elif case == "top_p_dtype":
        top_p = top_p.astype(np.float16)
    elif case == "min_p_shape":
        min_p = np.zeros(2, np.float32)
    elif case == "rng_dtype":
        state = state.astype(np.int64)
    elif case == "rng_readonly":
        state.flags.writeable = False
    elif case == "out_dtype":
        out = out.astype(np.int64)
    state_before, out_before = state.copy(), out.copy()
    with pytest.raises(ValueError, match=match):
        ops.sample(logits, temperature, top_k, top_p, min_p, state, out=out)
    np.testing.assert_array_equal(state, state_before)
    np.testing.assert_array_equal(out, out_before)
