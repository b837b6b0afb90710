"""CUDA apply_penalties against ops.reference.apply_penalties: the same logits, bit for bit."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine import ops
from engine.ops import gpu_available, reference

pytestmark = pytest.mark.skipif(not gpu_available(),
                                reason="no GPU: CUDA kernels run only on a machine with an NVIDIA GPU")


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
    want = logits.copy()
    reference.apply_penalties(want, *args)
    got = ops.to_device(logits)
    ops.apply_penalties(got, *[ops.to_device(a) for a in args])
    return ops.to_host(got), want


@settings(deadline=None, max_examples=40)
@given(num_seqs=st.sampled_from([1, 3, 17]), vocab=st.sampled_from([1, 3, 17, 769, 49152, 300000]),
       scale=st.sampled_from([0.1, 1.0, 10.0]), max_len=st.sampled_from([0, 5, 40, 3000]),
       seed=st.integers(0, 2**32 - 1))
def test_apply_penalties_matches_reference(num_seqs, vocab, scale, max_len, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((num_seqs, vocab)) * scale).astype(np.float32)
    logits[rng.random(logits.shape) < 0.05] = 0.0  # logit 0 takes the "multiply" side
    got, want = run_both(logits, make_case(rng, num_seqs, vocab, max_len))
    np.testing.assert_array_equal(got, want)


def test_semantics_by_hand():
    logits = np.array([[2.0, -2.0, 1.0, 3.0, -1.0, 0.5]], np.float32)
    one = lambda v: np.array([v], np.float32)  # noqa: E731
    args = (np.array([0, 1, 1], np.int32), np.array([0, 3], np.int32),
            np.array([2, 2, 2, 1], np.int32), np.array([0, 4], np.int32),
            one(0.5), one(0.25), one(2.0),
            np.array([3, 5, 3], np.int32), np.array([1.0, -0.5, 2.0], np.float32),
            np.array([0, 3], np.int32))
    got, _ = run_both(logits, args)
    want = [2.0 / 2, -2.0 * 2 - 0.25 - 0.5, 1.0 / 2 - 0.75 - 0.5, 3.0 + 1.0 + 2.0, -1.0, 0.5 - 0.5]
    np.testing.assert_array_equal(got[0], np.array(want, np.float32))


def test_repeated_bias_ids_add_in_list_order():
    """float32 addition is not associative: 1e8 + 3 - 1e8 differs by order."""
    logits = np.zeros((1, 4), np.float32)
    args = (np.zeros(0, np.int32), np.zeros(2, np.int32), np.zeros(0, np.int32),
            np.zeros(2, np.int32), np.zeros(1, np.float32), np.zeros(1, np.float32),
            np.ones(1, np.float32), np.array([2, 2, 2, 1], np.int32),
            np.array([1e8, 3.0, -1e8, -np.inf], np.float32), np.array([0, 4], np.int32))
    got, want = run_both(logits, args)
    np.testing.assert_array_equal(got, want)
    assert got[0, 1] == -np.inf


def test_workspace_lists_strided_logits_and_empty_rows(rng):
    num_seqs, vocab = 5, 300
    wide = (rng.standard_normal((num_seqs, vocab + 7)) * 3).astype(np.float32)
    args = list(make_case(rng, num_seqs, vocab))
    for i in (0, 2, 7):  # longer lists than the offsets use
        args[i] = np.concatenate([args[i], np.full(9, vocab - 1, np.int32)])
    args[8] = np.concatenate([args[8], np.ones(9, np.float32)])
    want = wide[:, :vocab].copy()
    reference.apply_penalties(want, *args)
    got = ops.to_device(wide)
    ops.apply_penalties(got[:, :vocab], *[ops.to_device(a) for a in args])
    host = ops.to_host(got)
    np.testing.assert_array_equal(host[:, :vocab], want)
    np.testing.assert_array_equal(host[:, vocab:], wide[:, vocab:])


def test_out_of_range_device_values_are_skipped():
    """The host cannot see device ids; bad ones are skipped, the rest applied."""
    logits = np.ones((2, 4), np.float32)
    args = [np.array([9, 1, -3], np.int32), np.array([0, 3, 3], np.int32),
            np.array([2, 77], np.int32), np.array([0, 2, 5], np.int32),  # row 1: end past list
            np.zeros(2, np.float32), np.ones(2, np.float32), np.full(2, 2.0, np.float32),
            np.array([4, 0], np.int32), np.array([5.0, 1.0], np.float32),
            np.array([0, 2, 2], np.int32)]
    got = ops.to_device(logits)
    ops.apply_penalties(got, *[ops.to_device(a) for a in args])
    host = ops.to_host(got)
    # row 0: prompt 1 -> 0.5; output 2 once -> 1/2 - 1 = -0.5; bias id 4 skipped, 0 += 1
    np.testing.assert_array_equal(host[0], np.array([2.0, 0.5, -0.5, 1.0], np.float32))
    np.testing.assert_array_equal(host[1], np.ones(4, np.float32))


@pytest.mark.parametrize("case,match", [
    ("logits_dtype", "apply_penalties: logits must be float32"),
    ("offsets_len", r"apply_penalties: prompt_offsets must have shape \[3\]"),
    ("ids_dtype", "apply_penalties: output_tokens must be int32"),
    ("bias_len", "apply_penalties: bias_values must have the length of bias_ids"),
    ("penalty_shape", r"apply_penalties: presence_penalty must have shape \[2\]"),
])
def test_rejects(case, match):
    logits = np.zeros((2, 5), np.float32)
    args = [np.zeros(1, np.int32), np.zeros(3, np.int32), np.zeros(1, np.int32),
            np.zeros(3, np.int32), np.zeros(2, np.float32), np.zeros(2, np.float32),
            np.ones(2, np.float32), np.zeros(1, np.int32), np.zeros(1, np.float32),
            np.zeros(3, np.int32)]
    if case == "logits_dtype":
        logits = logits.astype(np.float16)
    elif case == "offsets_len":
        args[1] = np.zeros(2, np.int32)
    elif case == "ids_dtype":
        args[2] = args[2].astype(np.int64)
    elif case == "bias_len":
        args[8] = np.zeros(2, np.float32)
    elif case == "penalty_shape":
        args[4] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=match):
        ops.apply_penalties(ops.to_device(logits), *[ops.to_device(a) for a in args])
