"""CUDA log_softmax_topk against ops.reference.log_softmax_topk: the same ids, logprobs
to 1e-5; rows the CPU rejects give NaN log-probabilities and ids -1."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine import ops
from engine.ops import gpu_available, reference

pytestmark = pytest.mark.skipif(not gpu_available(),
                                reason="no GPU: CUDA kernels run only on a machine with an NVIDIA GPU")

RTOL, ATOL = 1e-5, 1e-9


def run_gpu(logits, token_ids, k, fill=np.nan):
    n = len(logits)
    out = dict(out_token_logprob=np.full(n, fill, np.float32),
               out_topk_ids=np.full((n, k), -7, np.int32),
               out_topk_logprobs=np.full((n, k), fill, np.float32))
    dev = {name: ops.to_device(a) for name, a in out.items()}
    ops.log_softmax_topk(ops.to_device(logits), ops.to_device(token_ids), k, **dev)
    return {name: ops.to_host(a) for name, a in dev.items()}


def run_reference(logits, token_ids, k):
    n = len(logits)
    want = dict(out_token_logprob=np.zeros(n, np.float32), out_topk_ids=np.zeros((n, k), np.int32),
                out_topk_logprobs=np.zeros((n, k), np.float32))
    reference.log_softmax_topk(logits, token_ids, k, **want)
    return want


def assert_match(got, want):
    np.testing.assert_array_equal(got["out_topk_ids"], want["out_topk_ids"])
    for name in ("out_token_logprob", "out_topk_logprobs"):  # NaN never passes
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL)


@settings(deadline=None, max_examples=40)
@given(num_seqs=st.sampled_from([1, 3, 17]), vocab=st.sampled_from([1, 3, 17, 769, 49152]),
       k=st.sampled_from([0, 1, 5, 20, 1025, -1]), scale=st.sampled_from([0.1, 1.0, 5.0, 40.0]),
       ties=st.booleans(), masked=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_log_softmax_topk_matches_reference(num_seqs, vocab, k, scale, ties, masked, seed):
    rng = np.random.default_rng(seed)
    k = vocab if k < 0 else min(k, vocab)
    logits = (rng.standard_normal((num_seqs, vocab)) * scale).astype(np.float32)
    if ties:  # few distinct values (and -0.0): equal logits go to the lower id
        logits = np.round(logits / scale).astype(np.float32)
    if masked:  # -inf where a mask was applied; one entry per row stays finite
        logits[rng.random(logits.shape) < 0.5] = -np.inf
        logits[np.arange(num_seqs), rng.integers(0, vocab, num_seqs)] = 1.0
    token_ids = rng.integers(0, vocab, num_seqs).astype(np.int32)
    assert_match(run_gpu(logits, token_ids, k), run_reference(logits, token_ids, k))


def test_k_equal_vocab_is_a_normalised_permutation(rng):
    logits = (rng.standard_normal((3, 3000)) * 4).astype(np.float32)
    got = run_gpu(logits, np.zeros(3, np.int32), 3000)
    assert_match(got, run_reference(logits, np.zeros(3, np.int32), 3000))
    p = np.exp(got["out_topk_logprobs"].astype(np.float64))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.sort(got["out_topk_ids"], axis=1), np.tile(np.arange(3000), (3, 1)))


def test_huge_logits_ties_and_signed_zero():
    logits = np.array([[1e30, 1e30, -1e30, 5.0], [0.0, -0.0, 0.0, -0.0], [-0.0, -1, -0.0, 0.0]],
                      np.float32)
    token_ids = np.array([2, 1, 3], np.int32)
    assert_match(run_gpu(logits, token_ids, 3), run_reference(logits, token_ids, 3))


def test_strided_rows(rng):
    wide = ops.to_device((rng.standard_normal((4, 100)) * 3).astype(np.float32))
    logits = wide[:, 10:60]
    out = {"out_token_logprob": ops.to_device(np.full(4, np.nan, np.float32)),
           "out_topk_ids": ops.to_device(np.full((4, 7), -7, np.int32)),
           "out_topk_logprobs": ops.to_device(np.full((4, 7), np.nan, np.float32))}
    token_ids = np.array([0, 3, 49, 7], np.int32)
    ops.log_softmax_topk(logits, ops.to_device(token_ids), 7, **out)
    host = ops.to_host(wide)[:, 10:60].copy()
    assert_match({n: ops.to_host(a) for n, a in out.items()}, run_reference(host, token_ids, 7))


def test_rejected_rows_give_nan_and_minus_one():
    """The CPU raises for NaN, +inf and all -inf; the GPU marks only those rows."""
    logits = np.zeros((4, 6), np.float32)
    logits[0, 1] = np.nan
    logits[1, 2] = np.inf
    logits[2] = -np.inf
    logits[3] = np.arange(6)
    got = run_gpu(logits, np.array([0, 0, 0, 99], np.int32), 2, fill=0.0)  # 99: out of range
    assert np.isnan(got["out_token_logprob"]).all()
    assert np.isnan(got["out_topk_logprobs"][:3]).all()
    assert (got["out_topk_ids"][:3] == -1).all()
    assert got["out_topk_ids"][3].tolist() == [5, 4]
    want = run_reference(logits[3:], np.zeros(1, np.int32), 2)
    np.testing.assert_allclose(got["out_topk_logprobs"][3], want["out_topk_logprobs"][0], rtol=RTOL)


def test_rejects_bad_k_and_shapes():
    logits = ops.to_device(np.zeros((2, 5), np.float32))
    tok = ops.to_device(np.zeros(2, np.int32))
    out = dict(out_token_logprob=ops.to_device(np.zeros(2, np.float32)),
               out_topk_ids=ops.to_device(np.zeros((2, 6), np.int32)),
               out_topk_logprobs=ops.to_device(np.zeros((2, 6), np.float32)))
    with pytest.raises(ValueError, match=r"log_softmax_topk: k must be in \[0, 5\]"):
        ops.log_softmax_topk(logits, tok, 6, **out)
    with pytest.raises(ValueError, match=r"log_softmax_topk: out_topk_ids must have shape \[2, 4\]"):
        ops.log_softmax_topk(logits, tok, 4, **out)
