"""The embedding model behind the server: one worker thread that owns an EmbeddingRunner.

Embedding is CPU-bound and blocking, so it never runs on the event loop. Handlers submit
already-validated token ids with `await worker.embed(ids)`; the worker takes the oldest job
and every job queued behind it up to a token budget, runs them as one call (the runner packs
them into forward passes), and hands each job its rows. Concurrent requests are therefore
batched together, one batch at a time (the kernels use every core). The native kernels
release the GIL, so the event loop (and /health) stays responsive during a batch.

A job whose caller went away (its future cancelled) before the worker took it is skipped.
It has the small part of AsyncLLM's interface the server uses: `is_running`, `shutdown()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass, field

import numpy as np

from engine.embedding import EmbeddingConfig, EmbeddingRunner

logger = logging.getLogger("engine.server")

# engine serve options that only mean something for a generation model (KV cache, scheduler)
GENERATION_ONLY_ARGS = ("num_kv_blocks", "kv_cache_gib", "max_num_seqs", "block_size")


class WorkerStopped(RuntimeError):
    """The worker was shut down before the job ran."""


@dataclass
class _Job:
    token_ids: list[list[int]]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)


class EmbeddingWorker:
    """Runs embeddings for the server on a thread of its own.

    Args:
        runner: the loaded model (its tokenizer, limits and dim are read by handlers).
        batch_tokens: the most tokens the worker merges from queued jobs into one call
            (default: the runner's max_num_batched_tokens); a single larger job still runs.
    """

    def __init__(self, runner: EmbeddingRunner, batch_tokens: int | None = None):
        self.runner = runner
        self.batch_tokens = batch_tokens or runner.config.max_num_batched_tokens
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders submissions against shutdown
        self._is_closed = False
        self._carry: _Job | None = None  # taken from the queue but over the batch budget
        self.num_waiting = 0          # inputs queued
        self.num_running = 0          # inputs in the batch being run
        self.total_prompt_tokens = 0  # tokens embedded since start
        self.num_batches = 0
        self._thread = threading.Thread(target=self._loop, name="engine-embed", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, model: str, engine_kwargs: dict) -> EmbeddingWorker:
        """Load an embedding model with `engine serve`'s engine options.

        Raises:
            ValueError: an option that applies to generation models only, or a bad model.
        """
        wrong = sorted(k for k in engine_kwargs if k in GENERATION_ONLY_ARGS)
        if wrong:
            flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
            raise ValueError(f"{model} is an embedding model (no KV cache or scheduler): "
                             f"{flags} applies to generation models only")
        return cls(EmbeddingRunner(EmbeddingConfig(model=model, **engine_kwargs)))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._is_closed

    async def embed(self, token_ids: list[list[int]]) -> np.ndarray:
        """Embeddings of inputs already checked (non-empty, in the vocabulary, not too long).

        Returns:
            float32 [len(token_ids), dim], normalised as the model folder says.
        Raises:
            WorkerStopped: the worker is shut down (or was, before the job ran).
        """
        job = _Job(token_ids)
        with self._lock:
            if self._is_closed:
                raise WorkerStopped("the embedding worker is shut down")
            self.num_waiting += len(token_ids)
            self._jobs.put(job)
        # cancelling the awaiting task cancels the job unless the worker has started it
        return await asyncio.wrap_future(job.future)

    def live(self) -> dict:
        """Gauges and counters for /metrics (in the engine's names)."""
        return {"num_running": self.num_running, "num_waiting": self.num_waiting,
                "total_prompt_tokens": self.total_prompt_tokens,
                "total_embedding_batches": self.num_batches}

    def shutdown(self) -> None:
        """Fail the queued jobs (WorkerStopped), let the running batch end, stop the thread.
        Idempotent; blocks until the thread has ended."""
        with self._lock:
            if not self._is_closed:
                self._is_closed = True
                self._fail_queued()
                self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._take(job)
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(WorkerStopped("the server is shutting down"))

    def _take(self, job: _Job) -> None:
        with self._lock:
            self.num_waiting -= len(job.token_ids)

    def _next_batch(self) -> list[_Job] | None:
        """The oldest job and those queued behind it within the budget; None to stop."""
        first, self._carry = self._carry or self._jobs.get(), None
        if first is None:
            return None
        batch, tokens = [first], first.num_tokens
        while tokens < self.batch_tokens:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._jobs.put(None)  # stop after this batch
                break
            if tokens + job.num_tokens > self.batch_tokens:
                self._carry = job
                break
            batch.append(job)
            tokens += job.num_tokens
        for job in batch:
            self._take(job)
        # skip jobs whose callers went away; the rest can no longer be cancelled
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        inputs = [ids for job in batch for ids in job.token_ids]
        self.num_running = len(inputs)
        try:
            out = self.runner.embed_token_ids(inputs)
        except BaseException as e:  # a bug (inputs were checked): fail the jobs, keep serving
            logger.exception("embedding batch of %d inputs failed", len(inputs))
            for job in batch:
                job.future.set_exception(e)
            return
        finally:
            self.num_running = 0
        self.total_prompt_tokens += sum(len(ids) for ids in inputs)
        self.num_batches += 1
        start = 0
        for job in batch:
            end = start + len(job.token_ids)
            job.future.set_result(out[start:end])
            start = end
