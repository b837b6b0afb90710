"""apply_penalties against ops.reference.apply_penalties: the same logits, bit for bit."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference


def csr(rng, num_seqs, vocab, max_len, p_empty=0.3):
    """int32 ids and offsets: per-sequence lists, some empty, with repeats."""
    lens = np.where(rng.random(num_seqs) < p_empty, 0, rng.integers(0, max_len + 1, num_seqs))
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    pool = max(1, min(vocab, max_len // 2 + 1))  # a small pool: tokens repeat
    ids = rng.integers(0, pool, int(offsets[-1])) + rng.integers(0, vocab - pool + 1)
    return ids.astype(np.int32), offsets


def make_case(rng, num_seqs, vocab, max_len=40):
    prompt = csr(rng, num_seqs, vocab, max_len)
    output = csr(rng, num_seqs, vocab, max_len)
    bias_ids, bias_offsets = csr(rng, num_seqs, vocab, 6, p_empty=0.5)
    bias_values = rng.uniform(-100, 100, len(bias_ids)).astype(np.float32)
    presence = rng.choice([0.0, 0.5, -1.0, 2.0], num_seqs).astype(np.float32)
    frequency = rng.choice([0.0, 0.3, -0.7, 2.0], num_seqs).astype(np.float32)
    repetition = rng.choice([1.0, 1.2, 0.8, 2.0], num_seqs).astype(np.float32)
    return (*prompt, *output, presence, frequency, repetition, bias_ids, bias_values,
            bias_offsets)


def run_both(logits, args):
    got, want = logits.copy(), logits.copy()
    ops.apply_penalties(got, *args)
    reference.apply_penalties(want, *args)
    return got, want


@given(num_seqs=st.sampled_from([1, 3, 17]), vocab=st.sampled_from([1, 3, 17, 769, 49152]),
       scale=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 2**32 - 1))
def test_apply_penalties_matches_reference(isa, num_seqs, vocab, scale, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((num_seqs, vocab)) * scale).astype(np.float32)
    logits[rng.random(logits.shape) < 0.05] = 0.0  # logit 0 takes the "multiply" side
    got, want = run_both(logits, make_case(rng, num_seqs, vocab))
    np.testing.assert_array_equal(got, want)


def test_semantics_by_hand():
    logits = np.array([[2.0, -2.0, 1.0, 3.0, -1.0, 0.5]], np.float32)
    prompt = np.array([0, 1, 1], np.int32)            # repetition only
    output = np.array([2, 2, 2, 1], np.int32)         # counts: 2 -> 3, 1 -> 1
    one = lambda v: np.array([v], np.float32)         # noqa: E731
    ops.apply_penalties(logits, prompt, np.array([0, 3], np.int32), output,
                        np.array([0, 4], np.int32), one(0.5), one(0.25), one(2.0),
                        np.array([3, 5, 3], np.int32), np.array([1.0, -0.5, 2.0], np.float32),
                        np.array([0, 3], np.int32))
    want = [2.0 / 2,                  # prompt, positive: divided
            -2.0 * 2 - 0.25 - 0.5,    # prompt and output once: multiplied, then penalties
            1.0 / 2 - 0.75 - 0.5,     # output three times
            3.0 + 1.0 + 2.0,          # bias twice
            -1.0,                     # untouched
            0.5 - 0.5]
    np.testing.assert_array_equal(logits[0], np.array(want, np.float32))


def test_rows_independent_and_workspace_lists(rng):
    """A row alone gives what it gives in the batch; offsets may index into longer lists."""
    num_seqs, vocab = 9, 300
    logits = rng.standard_normal((num_seqs, vocab)).astype(np.float32)
    args = make_case(rng, num_seqs, vocab)
    batch = logits.copy()
    ops.apply_penalties(batch, *args)
    p_ids, p_off, o_ids, o_off, pres, freq, rep, b_ids, b_val, b_off = args
    for s in range(num_seqs):
        row = logits[s:s + 1].copy()
        pick = lambda a: a[s:s + 1].copy()  # noqa: E731
        ops.apply_penalties(row, p_ids, p_off[s:s + 2].copy(), o_ids, o_off[s:s + 2].copy(),
                            pick(pres), pick(freq), pick(rep), b_ids, b_val,
                            b_off[s:s + 2].copy())
        np.testing.assert_array_equal(row[0], batch[s])


def test_empty_lists_and_neutral_penalties_change_nothing(rng, isa):
    logits = rng.standard_normal((4, 17)).astype(np.float32)
    got = logits.copy()
    empty_i, empty_f, zero_off = np.empty(0, np.int32), np.empty(0, np.float32), np.zeros(5, np.int32)
    ops.apply_penalties(got, empty_i, zero_off, empty_i, zero_off, np.zeros(4, np.float32),
                        np.zeros(4, np.float32), np.ones(4, np.float32), empty_i, empty_f,
                        zero_off)
    np.testing.assert_array_equal(got, logits)


def test_repeated_calls_reuse_scratch_cleanly(rng):
    """The per-thread scratch is cleared after each row: a second call sees no leftovers."""
    logits = rng.standard_normal((5, 769)).astype(np.float32)
    args = make_case(rng, 5, 769)
    for _ in range(3):
        got, want = run_both(logits, args)
        np.testing.assert_array_equal(got, want)


def test_large_batch_threads_match_reference(rng):
    num_seqs, vocab = 64, 4096
    logits = rng.standard_normal((num_seqs, vocab)).astype(np.float32)
    got, want = run_both(logits, make_case(rng, num_seqs, vocab, max_len=2000))
    np.testing.assert_array_equal(got, want)


# ---- validation: ValueError naming op, argument and index; logits untouched

@pytest.mark.parametrize("case,match", [
    ("logits_dtype", "apply_penalties: logits must be float32"),
    ("logits_readonly", "apply_penalties: logits must be a writeable array"),
    ("logits_inner_stride", "apply_penalties: logits must have a contiguous last dimension"),
    ("prompt_id_high", r"apply_penalties: prompt_tokens\[2\] = 10 is out of range \[0, 10\)"),
    ("output_id_negative", r"apply_penalties: output_tokens\[1\] = -1 is out of range"),
    ("bias_id_high", r"apply_penalties: bias_ids\[0\] = 99 is out of range"),
    ("offsets_decreasing", r"apply_penalties: output_offsets must be non-decreasing, "
                           r"got output_offsets\[2\] = 1 < output_offsets\[1\] = 2"),
    ("offsets_negative", r"apply_penalties: prompt_offsets\[0\] = -1 is negative"),
    ("offsets_past_end", r"apply_penalties: bias_offsets\[3\] = 9 is past the end of bias_ids"),
    ("offsets_shape", r"apply_penalties: prompt_offsets must have shape \[4\]"),
    ("offsets_dtype", "apply_penalties: output_offsets must be int32"),
    ("tokens_dtype", "apply_penalties: prompt_tokens must be int32"),
    ("bias_values_len", "apply_penalties: bias_values must have the length of bias_ids"),
    ("bias_value_nan", r"apply_penalties: bias_values\[1\] = nan must not be NaN or \+inf"),
    ("presence_nan", r"apply_penalties: presence_penalty\[2\] = nan must be finite"),
    ("frequency_inf", r"apply_penalties: frequency_penalty\[0\] = inf must be finite"),
    ("repetition_zero", r"apply_penalties: repetition_penalty\[1\] = 0.000000 must be finite and > 0"),
    ("repetition_shape", r"apply_penalties: repetition_penalty must have shape \[3\]"),
])
def test_apply_penalties_rejects(rng, case, match):
    logits = rng.standard_normal((3, 10)).astype(np.float32)
    p_ids, p_off = np.array([1, 2, 3, 4], np.int32), np.array([0, 2, 2, 4], np.int32)
    o_ids, o_off = np.array([5, 6, 7], np.int32), np.array([0, 2, 3, 3], np.int32)
    b_ids, b_val = np.array([1, 2], np.int32), np.array([1.0, -1.0], np.float32)
    b_off = np.array([0, 1, 1, 2], np.int32)
    pres, freq, rep = np.zeros(3, np.float32), np.zeros(3, np.float32), np.ones(3, np.float32)
    if case == "logits_dtype":
        logits = logits.astype(np.float16)
    elif case == "logits_readonly":
        logits.flags.writeable = False
    elif case == "logits_inner_stride":
        logits = np.repeat(logits, 2, axis=1)[:, ::2]
    elif case == "prompt_id_high":
        p_ids[2] = 10
    elif case == "output_id_negative":
        o_ids[1] = -1
    elif case == "bias_id_high":
        b_ids[0] = 99
    elif case == "offsets_decreasing":
        o_off[2] = 1
    elif case == "offsets_negative":
        p_off[0] = -1
    elif case == "offsets_past_end":
        b_off[3] = 9
    elif case == "offsets_shape":
        p_off = np.array([0, 2, 4], np.int32)
    elif case == "offsets_dtype":
        o_off = o_off.astype(np.int64)
    elif case == "tokens_dtype":
        p_ids = p_ids.astype(np.int64)
    elif case == "bias_values_len":
        b_val = np.ones(3, np.float32)
    elif case == "bias_value_nan":
        b_val[1] = np.nan
    elif case == "presence_nan":
        pres[2] = np.nan
    elif case == "frequency_inf":
        freq[0] = np.inf
    elif case == "repetition_zero":
        rep[1] = 0.0
    elif case == "repetition_shape":
        rep = np.ones(4, np.float32)
    before = logits.copy()
    with pytest.raises(ValueError, match=match):
        ops.apply_penalties(logits, p_ids, p_off, o_ids, o_off, pres, freq, rep, b_ids, b_val,
                            b_off)
    np.testing.assert_array_equal(logits, before)
