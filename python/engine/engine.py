"""The engine loop: requests in, one step at a time, outputs out.

request -> scheduler -> runner -> model -> sampler -> sequences -> output.
"""

from __future__ import annotations

import itertools
import logging
import numbers
import os
import time
from dataclasses import dataclass

import numpy as np

from engine.kv_cache.block_manager import BlockManager
from engine.model.llama import Workspace
from engine.model.loader import load_checkpoint
from engine.metrics import EngineMetrics
from engine.model.registry import build_model, resolve_model_path
from engine.outputs import CompletionOutput, RequestOutput
from engine.runner import ModelRunner
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.tokenizer import IncrementalDetokenizer, load_tokenizer

logger = logging.getLogger("engine")


_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _config_eos_ids(config: dict) -> set[int]:
    eos = config.get("eos_token_id")
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


@dataclass
class EngineConfig:
    """Args:
        model: a Hugging Face folder, a .gguf file, or a packaged model's name.
        max_model_len: longest sequence (prompt + output); default: the model's maximum.
        block_size: tokens per KV block.
        kv_cache_gib: memory for the KV cache, in GiB (ignored when num_kv_blocks is set).
        num_kv_blocks: exact number of KV blocks.
        max_num_batched_tokens: most tokens in one step (longer prompts are chunked).
        max_num_seqs: most sequences in one step.
        skip_tokenizer_init: run on token ids alone (no tokenizer files needed; no text out).
        enable_prefix_caching: reuse the KV blocks of prompts' shared prefixes.
        device: "cpu" or "cuda" (the whole model, KV cache and sampling on the GPU).
        kv_cache_dtype: "auto" (float32 on the CPU; on the GPU bfloat16 for 16-bit
            weights, else float32), "float32", "bfloat16" or "float16" (CPU only). The
            16-bit caches halve the bytes a decode step reads; float16 (llama.cpp's
            default cache) keeps 11 significant bits, bfloat16 8. SmolLM2's logits move by
            1.2-2.1 with either, about as much as with its Q4_1 weights.
        use_cuda_graphs: on the GPU, replay decode steps as captured CUDA graphs.
        quantization: None (run the weights as stored: GGUF blocks natively, float as
            float), or "q8_0" / "q4_0" / "q4_1": quantise the float projection weights at
            load and run them on the quantised CPU kernels.
    """
    model: str
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_gib: float = 1.0
    num_kv_blocks: int | None = None
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    skip_tokenizer_init: bool = False
    enable_prefix_caching: bool = True
    device: str = "cpu"
    kv_cache_dtype: str = "auto"
    use_cuda_graphs: bool = True
    quantization: str | None = None

    def __post_init__(self):
        if self.quantization not in (None, "q8_0", "q4_0", "q4_1"):
            raise ValueError("EngineConfig.quantization must be None, 'q8_0', 'q4_0' or 'q4_1', "
                             f"got {self.quantization!r}")
        if self.quantization is not None and self.device != "cpu":
            raise ValueError("EngineConfig.quantization runs on the CPU only (device='cpu')")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"EngineConfig.device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.kv_cache_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError("EngineConfig.kv_cache_dtype must be 'auto', 'float32', "
                             f"'bfloat16' or 'float16', got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype == "float16" and self.device != "cpu":
            raise ValueError("EngineConfig.kv_cache_dtype 'float16' runs on the CPU only "
                             "(the GPU cache is float32 or bfloat16)")
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"EngineConfig.max_model_len must be positive, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"EngineConfig.num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if not self.kv_cache_gib > 0:
            raise ValueError(f"EngineConfig.kv_cache_gib must be > 0, got {self.kv_cache_gib}")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]


class LLMEngine:
    """The synchronous engine: owns the model, tokenizer, KV cache, scheduler and runner.

    Not thread-safe: one thread calls add_request / step / abort_request (AsyncLLM runs
    it on a thread of its own).
    """

    def __init__(self, config: EngineConfig):
        self.config = config
        path = resolve_model_path(config.model)
        checkpoint = load_checkpoint(path)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(path)
        self.eos_token_ids = (self.tokenizer.eos_token_ids if self.tokenizer
                              else _config_eos_ids(checkpoint.config))
        model_max = int(checkpoint.config.get("max_position_embeddings", 2048))
        self.max_model_len = min(config.max_model_len or model_max, model_max)
        if config.device == "cuda":
            from engine import ops

            if not ops.gpu_available():
                raise RuntimeError("device='cuda' needs engine built with CUDA and a visible GPU; "
                                   "gpu_available() is False")
        self.model = build_model(checkpoint, max_position=self.max_model_len,
                                 device=config.device, quantization=config.quantization)
        self.model_config = self.model.config
        self.kv_cache_dtype = self._kv_cache_dtype()
        self.num_blocks = config.num_kv_blocks or self._blocks_for_budget(config.kv_cache_gib)
        self.block_manager = BlockManager(self.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens,
                                   config.max_num_seqs)
        self.runner = ModelRunner(self.model, Sampler(self.eos_token_ids, config.device),
                                  self.num_blocks, config.block_size,
                                  config.max_num_batched_tokens, config.max_num_seqs,
                                  self.max_model_len, Workspace, self.kv_cache_dtype,
                                  config.use_cuda_graphs)
        self.metrics = EngineMetrics()
        self._prefix_seen = (0, 0)  # the block manager's counters at the last step
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        tokens = self.num_blocks * config.block_size
        logger.info("KV cache: %d blocks of %d tokens = %d tokens, %.2f GiB; %.1f sequences of "
                    "max_model_len %d at once", self.num_blocks, config.block_size, tokens,
                    self.num_blocks * self._block_bytes() / (1 << 30),
                    tokens / self.max_model_len, self.max_model_len)

    def _kv_cache_dtype(self):
        import ml_dtypes

        name = self.config.kv_cache_dtype
        if name == "auto":
            weight_dtype = np.dtype(self.model.layers[0].qkv.dtype)
            name = ("bfloat16" if self.config.device == "cuda" and weight_dtype.itemsize == 2
                    else "float32")
        return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)

    def _block_bytes(self) -> int:
        c = self.model_config
        return 2 * c.num_layers * self.config.block_size * c.kv_size * self.kv_cache_dtype.itemsize

    def _blocks_for_budget(self, gib: float) -> int:
        return max(1, int(gib * (1 << 30)) // self._block_bytes())

    # ---- requests ----------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | dict | list[int],
                    params: SamplingParams) -> None:
        """Queue a prompt (text, token ids, or {"prompt_token_ids": [...]}).

        Raises:
            ValueError: empty prompt, a token id outside the vocabulary, or a sequence
                that could never fit (max_model_len or the whole KV cache).
        """
        text, ids = self._tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is "
                             f"{self.max_model_len}, which must leave room for one new token")
        max_tokens = params.max_tokens or (self.max_model_len - len(ids))
        total = len(ids) + max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = {total} "
                             f"exceeds max_model_len ({self.max_model_len})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine was started with "
                             "skip_tokenizer_init=True (use stop_token_ids)")
        if self.block_manager.blocks_for(total) > self.num_blocks:
            raise ValueError(f"a sequence of {total} tokens needs "
                             f"{self.block_manager.blocks_for(total)} KV blocks; the cache has "
                             f"{self.num_blocks}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params.check_vocab(self.model_config.vocab_size)
        seqs = [self._new_sequence(request_id, i, ids, params) for i in range(params.n)]
        self.requests[request_id] = Request(request_id, text, ids, params, seqs)
        # n > 1: the first sequence computes the prompt, the others fork from it (sharing
        # its blocks) just before its last prompt token.
        seqs[0].pending_children = seqs[1:]
        self.scheduler.add(seqs[0])
        self.metrics.on_request_arrived(request_id, time.monotonic(), len(ids))

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; this engine was started with "
                                 "skip_tokenizer_init=True, so pass token ids")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids, text = list(prompt["prompt_token_ids"]), prompt.get("prompt")
        elif isinstance(prompt, (list, tuple)):
            ids, text = list(prompt), None
        else:
            raise ValueError("prompt must be a string, a list of token ids or "
                             f"{{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")
        vocab = self.model_config.vocab_size
        if not ids:
            raise ValueError("prompt is empty: at least one token is needed")
        for i, t in enumerate(ids):
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral) \
                    or not 0 <= t < vocab:
                raise ValueError(f"prompt token {i} is {t!r}; token ids must be integers "
                                 f"in [0, {vocab})")
        return text, [int(t) for t in ids]

    def _new_sequence(self, request_id, index, ids, params) -> Sequence:
        if params.seed is None:
            state = int.from_bytes(os.urandom(8), "little")
        else:  # the i-th of n completions gets its own stream from the same seed; mixing
            # keeps seeds s and s + 1 from being shifted copies of one SplitMix64 stream
            state = _mix64(_mix64(params.seed & _MASK64) ^ index)
        detok = (IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                 if self.tokenizer else None)
        return Sequence(next(self._seq_ids), request_id, index, ids, params, state, detok)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its KV blocks at once (unknown ids are ignored)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish("abort")
            self.scheduler.finish(seq)
        self.metrics.on_request_finished(request_id, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -----------------------------------------------------------------

    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """Run one forward; returns the outputs of requests that produced a token (or, with
        only_finished, of those that finished: offline generation needs no others)."""
        self._fork_ready_parents()
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        start = time.monotonic()
        sampled = self.runner.execute(out.scheduled, out.copies)
        now = time.monotonic()
        touched = {}
        num_prefill = num_decode = 0
        for i, (seq, n) in enumerate(out.scheduled):
            is_decode = seq.num_computed_tokens >= seq.num_prompt_tokens
            num_decode += n if is_decode else 0
            num_prefill += 0 if is_decode else n
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # prompt chunk: nothing sampled yet
            self._append_token(seq, int(sampled.token_ids[i]), sampled.logprobs[i])
            if seq.is_finished:
                self.scheduler.finish(seq)
            touched[seq.request_id] = touched.get(seq.request_id, 0) + 1
        for request_id, num_tokens in touched.items():
            self.metrics.on_token(request_id, now, num_tokens)
        self._record_step(num_prefill, num_decode, now - start)
        outputs = [self._output(self.requests[r]) for r in touched
                   if not only_finished or all(seq.is_finished for seq in self.requests[r].seqs)]
        for output in outputs:
            if output.finished:
                del self.requests[output.request_id]
                reason = output.outputs[0].finish_reason
                self.metrics.on_request_finished(output.request_id, reason)
        return outputs

    def _fork_ready_parents(self) -> None:
        """Give children of parents whose prompt (but its last token) is computed their
        share of the parent's blocks; each then computes the last token and samples."""
        for parent in list(self.scheduler.running):
            if parent.pending_children and parent.num_computed_tokens == parent.num_tokens - 1:
                for child in parent.pending_children:
                    self.block_manager.fork(parent, child)
                    child.status = SequenceStatus.RUNNING
                    self.scheduler.running.append(child)
                parent.pending_children = []

    def _record_step(self, num_prefill: int, num_decode: int, seconds: float) -> None:
        bm = self.block_manager
        self.metrics.on_step(num_prefill, num_decode, seconds, len(self.scheduler.running),
                             len(self.scheduler.waiting), bm.num_blocks - bm.num_free_blocks,
                             bm.num_blocks)
        seen = (bm.num_prefix_queries_tokens, bm.num_prefix_hit_tokens)
        self.metrics.on_prefix_cache(seen[0] - self._prefix_seen[0], seen[1] - self._prefix_seen[1])
        self._prefix_seen = seen

    def _append_token(self, seq: Sequence, token: int, logprobs=None) -> None:
        params = seq.params
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append({token: logprobs.logprob, **dict(logprobs.top)})
            seq.cumulative_logprob += logprobs.logprob
        previous = len(seq.text)
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.add(token)
        if params.stop and self._check_stop_strings(seq, previous):
            return
        max_tokens = params.max_tokens or self.max_model_len
        if token in params.stop_token_ids:
            seq.finish("stop", token)
        elif not params.ignore_eos and token in self.eos_token_ids:
            seq.finish("stop", None)
        elif seq.num_output_tokens >= max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish("length")
        if seq.is_finished and seq.detokenizer is not None:
            flushed = seq.detokenizer.flush()  # text held back inside a character
            if flushed:
                before = len(seq.text)
                seq.text += flushed
                if params.stop:
                    self._check_stop_strings(seq, before)

    def _check_stop_strings(self, seq: Sequence, previous: int) -> bool:
        """Finish seq if its text now holds a stop string; the text is cut before it."""
        stops = seq.params.stop
        start = max(0, previous - max(len(s) for s in stops) + 1)
        hits = [(seq.text.find(s, start), s) for s in stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        seq.text = seq.text[:i]
        seq.finish("stop", s)
        return True

    def _output(self, request: Request) -> RequestOutput:
        outs = []
        for seq in request.seqs:
            text = seq.text
            if not seq.is_finished and request.params.stop:
                # hold back what could still become a stop string
                text = text[:max(0, len(text) - max(len(s) for s in request.params.stop) + 1)]
            outs.append(CompletionOutput(
                seq.index, text, seq.output_token_ids, seq.finish_reason, seq.stop_reason,
                list(seq.logprobs) if request.params.logprobs is not None else None,
                seq.cumulative_logprob if request.params.logprobs is not None else None))
        prompt_lps = None
        if request.params.prompt_logprobs is not None:
            prompt_lps = [None] + list(request.seqs[0].prompt_logprobs)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outs,
                             prompt_lps)
