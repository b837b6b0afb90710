"""log_softmax_topk against ops.reference.log_softmax_topk: the same ids, logprobs to 1e-5."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference

RTOL, ATOL = 1e-5, 1e-9  # atol only for log-probabilities that round to about 0


def outputs(num_seqs, k, fill=-7):
    return dict(out_token_logprob=np.full(num_seqs, fill, np.float32),
                out_topk_ids=np.full((num_seqs, k), fill, np.int32),
                out_topk_logprobs=np.full((num_seqs, k), fill, np.float32))


def run_both(logits, token_ids, k):
    got, want = outputs(len(logits), k), outputs(len(logits), k)
    ops.log_softmax_topk(logits, token_ids, k, **got)
    reference.log_softmax_topk(logits, token_ids, k, **want)
    return got, want


def assert_match(got, want):
    np.testing.assert_array_equal(got["out_topk_ids"], want["out_topk_ids"])
    for name in ("out_token_logprob", "out_topk_logprobs"):
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL)


@given(num_seqs=st.sampled_from([1, 3, 17]), vocab=st.sampled_from([1, 3, 17, 769, 49152]),
       k=st.sampled_from([0, 1, 5, 20, -1]), scale=st.sampled_from([0.1, 1.0, 5.0, 40.0]),
       ties=st.booleans(), masked=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_log_softmax_topk_matches_reference(isa, num_seqs, vocab, k, scale, ties, masked, seed):
    rng = np.random.default_rng(seed)
    k = vocab if k < 0 else min(k, vocab)
    logits = (rng.standard_normal((num_seqs, vocab)) * scale).astype(np.float32)
    if ties:  # few distinct values: equal logits go to the lower id
        logits = np.round(logits / scale).astype(np.float32)
    if masked:  # -inf where a mask was applied; one entry per row stays finite
        logits[rng.random(logits.shape) < 0.5] = -np.inf
        logits[np.arange(num_seqs), rng.integers(0, vocab, num_seqs)] = 1.0
    token_ids = rng.integers(0, vocab, num_seqs).astype(np.int32)
    assert_match(*run_both(logits, token_ids, k))


def test_full_topk_is_a_normalised_distribution(rng):
    logits = (rng.standard_normal((3, 769)) * 4).astype(np.float32)
    out = outputs(3, 769)
    ops.log_softmax_topk(logits, np.zeros(3, np.int32), 769, **out)
    p = np.exp(out["out_topk_logprobs"].astype(np.float64))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    assert (np.diff(out["out_topk_logprobs"], axis=1) <= 0).all()
    np.testing.assert_array_equal(np.sort(out["out_topk_ids"], axis=1), np.tile(np.arange(769), (3, 1)))


def test_stable_for_huge_logits_and_ties_by_id():
    logits = np.array([[1e30, 1e30, -1e30, 5.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    out = outputs(2, 3)
    ops.log_softmax_topk(logits, np.array([1, 3], np.int32), 3, **out)
    np.testing.assert_allclose(out["out_token_logprob"], [-np.log(2), -np.log(4)], rtol=1e-6)
    assert out["out_topk_ids"].tolist() == [[0, 1, 3], [0, 1, 2]]


def test_rows_independent_of_batch(rng):
    logits = rng.standard_normal((9, 500)).astype(np.float32)
    token_ids = rng.integers(0, 500, 9).astype(np.int32)
    batch = outputs(9, 4)
    ops.log_softmax_topk(logits, token_ids, 4, **batch)
    for i in range(9):
        alone = outputs(1, 4)
        ops.log_softmax_topk(logits[i:i + 1], token_ids[i:i + 1], 4, **alone)
        for name, arr in alone.items():
            np.testing.assert_array_equal(arr[0], batch[name][i])


def test_large_batch_threads_match_reference(rng):
    logits = (rng.standard_normal((32, 49152)) * 3).astype(np.float32)
    token_ids = rng.integers(0, 49152, 32).astype(np.int32)
    assert_match(*run_both(logits, token_ids, 20))


def test_strided_rows(rng):
    big = rng.standard_normal((4, 40)).astype(np.float32)
    logits = big[:, :17]  # row stride 40, contiguous rows
    token_ids = np.array([0, 5, 16, 3], np.int32)
    assert_match(*run_both(logits, token_ids, 5))


# ---- validation: ValueError naming op, argument or row; outputs untouched

@pytest.mark.parametrize("case,match", [
    ("nan", "log_softmax_topk: row 1: logits contain NaN"),
    ("posinf", r"log_softmax_topk: row 2: logits contain \+inf"),
    ("all_neginf", "log_softmax_topk: row 0: logits are all -inf"),
    ("logits_dtype", "log_softmax_topk: logits must be float32"),
    ("logits_inner_stride", "log_softmax_topk: logits must have a contiguous last dimension"),
    ("empty_vocab", "log_softmax_topk: logits must have between 1 and"),
    ("k_negative", r"log_softmax_topk: k must be in \[0, 10\]"),
    ("k_too_big", r"log_softmax_topk: k must be in \[0, 10\] \(the vocab\), got 11"),
    ("token_out_of_range", r"log_softmax_topk: token_ids\[2\] = 10 is out of range \[0, 10\)"),
    ("token_negative", r"log_softmax_topk: token_ids\[0\] = -1 is out of range"),
    ("token_dtype", "log_softmax_topk: token_ids must be int32"),
    ("token_shape", r"log_softmax_topk: token_ids must have shape \[3\]"),
    ("out_token_dtype", "log_softmax_topk: out_token_logprob must be float32"),
    ("out_ids_shape", r"log_softmax_topk: out_topk_ids must have shape \[3, 2\]"),
    ("out_ids_dtype", "log_softmax_topk: out_topk_ids must be int32"),
    ("out_lps_readonly", "log_softmax_topk: out_topk_logprobs must be a writeable array"),
])
def test_log_softmax_topk_rejects(rng, case, match):
    logits = rng.standard_normal((3, 10)).astype(np.float32)
    token_ids = np.array([1, 2, 3], np.int32)
    k = 2
    out = outputs(3, 2)
    if case == "nan":
        logits[1, 4] = np.nan
    elif case == "posinf":
        logits[2, 4] = np.inf
    elif case == "all_neginf":
        logits[0] = -np.inf
    elif case == "logits_dtype":
        logits = logits.astype(np.float16)
    elif case == "logits_inner_stride":
        logits = np.repeat(logits, 2, axis=1)[:, ::2]
    elif case == "empty_vocab":
        logits = logits[:, :0]
    elif case == "k_negative":
        k = -1
    elif case == "k_too_big":
        k = 11
    elif case == "token_out_of_range":
        token_ids[2] = 10
    elif case == "token_negative":
        token_ids[0] = -1
    elif case == "token_dtype":
        token_ids = token_ids.astype(np.int64)
    elif case == "token_shape":
        token_ids = np.zeros(2, np.int32)
    elif case == "out_token_dtype":
        out["out_token_logprob"] = np.zeros(3, np.float16)
    elif case == "out_ids_shape":
        out["out_topk_ids"] = np.zeros((3, 3), np.int32)
    elif case == "out_ids_dtype":
        out["out_topk_ids"] = np.zeros((3, 2), np.int64)
    elif case == "out_lps_readonly":
        out["out_topk_logprobs"].flags.writeable = False
    before = {name: arr.copy() for name, arr in out.items()}
    with pytest.raises(ValueError, match=match):
        ops.log_softmax_topk(logits, token_ids, k, **out)
    for name, arr in out.items():
        np.testing.assert_array_equal(arr, before[name])
