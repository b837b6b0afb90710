"""Closes a step: penalties, logit bias and min_tokens, then one seeded draw per sequence.

The sampler turns each sequence's SamplingParams into the per-row arrays the native ops
take (CSR token lists, penalty factors, filter settings, generator states), so the work
over the vocabulary happens in `ops.apply_penalties`, `ops.sample` and
`ops.log_softmax_topk`; Python only loops over sequences and their own token lists.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from engine import ops


@dataclass
class SampleLogprobs:
    """Log-probabilities at one position.

    Attributes:
        token_id: the token taken at this position (sampled, or the prompt's next token).
        logprob: its log-probability.
        rank: 1 + the number of tokens with a strictly higher logit (vLLM's rank).
        top: the `k` most probable (token id, logprob), best first, ties to the lower id.
    """

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class SamplerOutput:
    """What the sampler returns for one step.

    Attributes:
        token_ids: int32 [num_seqs], one token per row (meaningless where is_sampled was
            False). A view of the sampler's buffer: valid until its next call.
        logprobs: per row, SampleLogprobs when the sequence asked for logprobs and the row
            was sampled, else None.
    """

    token_ids: np.ndarray
    logprobs: list[SampleLogprobs | None]


class Sampler:
    """Penalties, logit bias, min_tokens, temperature, top-k, top-p, min-p and the draw.

    Logprobs are vLLM v1's default ("raw_logprobs"): the log-softmax of the model's logits
    as they arrive, before penalties, logit bias, min_tokens bans, temperature and the
    top-k/top-p/min-p filters. They describe the model, not the processed distribution, so
    a token banned by logit_bias still has a finite logprob, and the sampled token's logprob
    does not depend on temperature.

    min_tokens bans EOS and stop_token_ids (with a -inf bias) while the sequence has fewer
    output tokens than min_tokens; as in vLLM, EOS is not banned when ignore_eos is set
    (it cannot end the sequence then). Stopping itself is the engine's job.

    On the GPU, logits stay there: the per-row settings and lists are copied in, the
    kernels run there, and only token ids and generator states come back (and, for rows
    that ask for logprobs, those rows, which are scored on the CPU).

    Args:
        eos_token_ids: the model's end-of-sequence ids.
        device: where the logits live, "cpu" or "cuda".
    """

    def __init__(self, eos_token_ids: set[int] | list[int], device: str = "cpu"):
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.device = device
        self._buffers: dict[str, np.ndarray] = {}
        self._device_buffers: dict[str, object] = {}

    def __call__(self, logits: np.ndarray, seqs: list, is_sampled: list[bool] | None = None
                 ) -> SamplerOutput:
        """Draw one token per row.

        Args:
            logits: [num_seqs, vocab] float32, row-contiguous; modified in place by
                penalties and bias.
            seqs: the Sequence of each row (prompt = token_ids[:num_prompt_tokens]).
            is_sampled: per row, whether its token is kept this step (False for a prompt
                chunk that is not the prompt's last). Only those rows advance their
                generator (seq.rng_state), get penalties and get logprobs. None = all.
        Returns:
            SamplerOutput.
        """
        num_seqs = len(seqs)
        if logits.ndim != 2 or logits.shape[0] != num_seqs:
            raise ValueError(f"Sampler: logits must be [{num_seqs}, vocab], got {logits.shape}")
        if is_sampled is None:
            is_sampled = [True] * num_seqs
        params = [seq.params for seq in seqs]
        logprob_rows = [i for i, p in enumerate(params)
                        if p.logprobs is not None and is_sampled[i]]
        penalised = [i for i, seq in enumerate(seqs)
                     if is_sampled[i] and self._needs_penalties(seq)]
        raw = self._raw_rows(logits, logprob_rows, copy=bool(penalised))
        if penalised:
            self._apply_penalties(logits, seqs, set(penalised))
        token_ids = self._draw(logits, seqs, params, is_sampled)
        logprobs: list[SampleLogprobs | None] = [None] * num_seqs
        if logprob_rows:
            k = max(params[i].logprobs for i in logprob_rows)
            chosen = token_ids[logprob_rows]
            for i, lp in zip(logprob_rows, _logprobs(raw, chosen, k, self._buf)):
                lp.top = lp.top[:params[i].logprobs]
                logprobs[i] = lp
        return SamplerOutput(token_ids, logprobs)

    def _raw_rows(self, logits, rows: list[int], copy: bool) -> np.ndarray | None:
        """The rows that want logprobs, as the model gave them (copied before penalties
        change logits in place, or when only some rows are wanted)."""
        if not rows:
            return None
        if self.device == "cuda":  # scored on the CPU: bring just these rows back
            out = self._device_buf("raw", (len(rows), logits.shape[1]), np.float32)
            ops.embedding(self._put("raw_rows", np.asarray(rows, np.int32)), logits, out=out)
            return ops.to_host(out)
        if not copy and len(rows) == logits.shape[0]:
            return logits
        out = self._buf("raw", (len(rows), logits.shape[1]), np.float32)
        return np.take(logits, rows, axis=0, out=out)

    # ---- penalties and bias -------------------------------------------------------

    def _banned_ids(self, seq) -> list[int]:
        """Ids min_tokens keeps out of reach at this step (empty once it is reached)."""
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            return []
        return (p.stop_token_ids if p.ignore_eos else self.eos_token_ids + p.stop_token_ids)

    def _needs_penalties(self, seq) -> bool:
        p = seq.params
        return p.has_penalties or bool(p.logit_bias) or bool(self._banned_ids(seq))

    def _apply_penalties(self, logits, seqs, rows: set[int]) -> None:
        """One apply_penalties call; rows outside `rows` get empty lists and no-op factors."""
        num_seqs, vocab = logits.shape
        prompt, output, bias_ids, bias_values = [], [], [], []
        presence = self._buf("presence", (num_seqs,), np.float32)
        frequency = self._buf("frequency", (num_seqs,), np.float32)
        repetition = self._buf("repetition", (num_seqs,), np.float32)
        presence[:], frequency[:], repetition[:] = 0.0, 0.0, 1.0
        for i, seq in enumerate(seqs):
            p = seq.params
            bias = dict(p.logit_bias or {}) if i in rows else {}
            if i in rows:
                presence[i], frequency[i], repetition[i] = (
                    p.presence_penalty, p.frequency_penalty, p.repetition_penalty)
                for t in self._banned_ids(seq):
                    if t < vocab:
                        bias[t] = -np.inf
            # only the lists a non-neutral penalty reads are sent to the kernel
            prompt.append(seq.token_ids[:seq.num_prompt_tokens]
                          if i in rows and p.repetition_penalty != 1.0 else ())
            output.append(seq.output_token_ids if i in rows and p.has_penalties else ())
            bias_ids.append(bias.keys())
            bias_values.append(bias.values())
        arrays = (*_csr(prompt, np.int32), *_csr(output, np.int32), presence, frequency,
                  repetition, *_csr(bias_ids, np.int32), _csr(bias_values, np.float32)[0])
        names = ("prompt", "prompt_offsets", "output", "output_offsets", "presence",
                 "frequency", "repetition", "bias_ids", "bias_offsets", "bias_values")
        a = dict(zip(names, (self._put(n, x) for n, x in zip(names, arrays))))
        ops.apply_penalties(logits, a["prompt"], a["prompt_offsets"], a["output"],
                            a["output_offsets"], a["presence"], a["frequency"], a["repetition"],
                            a["bias_ids"], a["bias_values"], a["bias_offsets"])

    # ---- the draw -----------------------------------------------------------------

    def _draw(self, logits, seqs, params, is_sampled) -> np.ndarray:
        num_seqs = len(seqs)
        temperature = self._fill("temperature", [p.temperature for p in params], np.float32)
        top_k = self._fill("top_k", [p.top_k for p in params], np.int32)
        top_p = self._fill("top_p", [p.top_p for p in params], np.float32)
        min_p = self._fill("min_p", [p.min_p for p in params], np.float32)
        rng_state = self._fill("rng_state", [seq.rng_state for seq in seqs], np.uint64)
        out = self._buf("token_ids", (num_seqs,), np.int32)
        if self.device == "cuda":
            rng = self._put("rng_state", rng_state)
            out_dev = self._device_buf("token_ids", (num_seqs,), np.int32)
            ops.sample(logits, self._put("temperature", temperature), self._put("top_k", top_k),
                       self._put("top_p", top_p), self._put("min_p", min_p), rng, out=out_dev)
            out[:] = ops.to_host(out_dev)
            rng_state[:] = ops.to_host(rng)
        else:
            ops.sample(logits, temperature, top_k, top_p, min_p, rng_state, out=out)
        for seq, state, keep in zip(seqs, rng_state.tolist(), is_sampled):
            if keep:  # a prompt chunk that is not the last must not advance its generator
                seq.rng_state = state
        return out

    # ---- buffers ------------------------------------------------------------------

    def _buf(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A contiguous [shape] view of a named buffer that only ever grows."""
        size = math.prod(shape)  # ints: np.prod costs 2-3 us a call, 6 calls a step
        buf = self._buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self._buffers[name] = np.empty(max(size, 1), dtype)
        return buf[:size].reshape(shape)

    def _device_buf(self, name: str, shape: tuple[int, ...], dtype):
        """A contiguous [shape] view of a named GPU buffer that only ever grows."""
        size = math.prod(shape)  # as _buf
        buf = self._device_buffers.get(name)
        if buf is None or buf.size < size:
            buf = self._device_buffers[name] = ops.empty(max(size, 1), dtype, "cuda")
        return buf[:size].reshape(shape)

    def _put(self, name: str, array: np.ndarray):
        """array itself on the CPU; on the GPU, a copy in the named device buffer."""
        if self.device != "cuda":
            return array
        out = self._device_buf(name, array.shape, array.dtype)
        out.copy_from(np.ascontiguousarray(array))
        return out

    def _fill(self, name: str, values: list, dtype) -> np.ndarray:
        out = self._buf(name, (len(values),), dtype)
        out[:] = values
        return out


def prompt_logprobs(logits_rows: np.ndarray, next_token_ids: np.ndarray, k: int
                    ) -> list[SampleLogprobs]:
    """Logprobs of a prompt's tokens: row j holds the logits at position j, and
    next_token_ids[j] is the prompt token at position j + 1.

    Args:
        logits_rows: [n, vocab] float32 (not modified).
        next_token_ids: [n] int ids.
        k: how many top tokens per position (0..vocab).
    Returns:
        n SampleLogprobs, one per position.
    """
    ids = np.ascontiguousarray(next_token_ids, dtype=np.int32)
    return _logprobs(np.ascontiguousarray(logits_rows, dtype=np.float32), ids, k)


def _new_buffer(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    return np.empty(shape, dtype)


def _logprobs(logits, token_ids, k, buf=_new_buffer) -> list[SampleLogprobs]:
    """log_softmax_topk over every row of logits, with ranks, as SampleLogprobs."""
    n = logits.shape[0]
    token_logprob = buf("lp_token", (n,), np.float32)
    top_ids = buf("lp_top_ids", (n, k), np.int32)
    top_logprobs = buf("lp_top_logprobs", (n, k), np.float32)
    ops.log_softmax_topk(logits, token_ids, k, out_token_logprob=token_logprob,
                         out_topk_ids=top_ids, out_topk_logprobs=top_logprobs)
    chosen = logits[np.arange(n), token_ids]
    ranks = (logits > chosen[:, None]).sum(axis=1) + 1
    return [SampleLogprobs(int(t), float(lp), int(r), list(zip(ids, lps)))
            for t, lp, r, ids, lps in zip(token_ids.tolist(), token_logprob.tolist(),
                                          ranks.tolist(), top_ids.tolist(),
                                          top_logprobs.tolist())]


def _csr(lists, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(values, int32 offsets [len(lists) + 1]) of a list of sized iterables."""
    offsets = np.zeros(len(lists) + 1, np.int32)
    np.cumsum(np.fromiter(map(len, lists), np.int64, len(lists)), out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(lists), dtype, count=int(offsets[-1]))
    return values, offsets
