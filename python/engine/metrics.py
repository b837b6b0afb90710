"""Engine metrics: counters and gauges the engine loop updates, read by servers and loggers.

Plain Python, thread-safe (one lock): the engine thread writes, any thread calls snapshot().
Memory is bounded: throughput uses a time window of recent steps, latency percentiles a
rolling window of recent samples; per-request state lives only while a request is in flight.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from typing import Callable


class _LatencyStats:
    """count and mean over every sample; p50/p99 over the most recent `window` samples."""

    def __init__(self, window: int):
        self.count = 0
        self.total = 0.0
        self.recent: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.recent.append(seconds)

    def summary(self) -> dict:
        ordered = sorted(self.recent)
        return {"count": self.count,
                "mean": self.total / self.count if self.count else 0.0,
                "p50": _percentile(ordered, 0.50),
                "p99": _percentile(ordered, 0.99)}


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); 0.0 when empty."""
    if not ordered:
        return 0.0
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class EngineMetrics:
    """Counters and gauges of one engine.

    Args:
        window_s: span of the sliding window for the tokens/s rates.
        latency_window: how many recent TTFT / ITL samples the percentiles are taken over.
        clock: monotonic seconds; on_step timestamps each step with it (tests inject one).
    """

    _MAX_STEPS = 1 << 16  # hard bound on the step window, whatever the step rate

    def __init__(self, window_s: float = 10.0, latency_window: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        if not window_s > 0:
            raise ValueError(f"EngineMetrics: window_s must be > 0, got {window_s!r}")
        if not isinstance(latency_window, int) or latency_window <= 0:
            raise ValueError(f"EngineMetrics: latency_window must be a positive integer, "
                             f"got {latency_window!r}")
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        # gauges, as of the last step
        self._num_running = self._num_waiting = 0
        self._kv_blocks_used = self._kv_blocks_total = 0
        # steps: (end time, num_prefill_tokens, num_decode_tokens), oldest first
        self._steps: deque[tuple[float, int, int]] = deque(maxlen=self._MAX_STEPS)
        self._first_step_start: float | None = None
        self._num_steps = 0
        self._total_step_seconds = 0.0
        self._total_prefill_tokens = self._total_decode_tokens = 0
        # requests
        self._arrival: dict[str, float] = {}     # in-flight request -> arrival time
        self._last_token: dict[str, float] = {}  # in-flight request -> time of its last token
        self._ttft = _LatencyStats(latency_window)
        self._itl = _LatencyStats(latency_window)
        self._finished: Counter[str] = Counter()
        self._num_arrived = 0
        self._total_prompt_tokens = self._total_generation_tokens = 0
        self._prefix_query_tokens = self._prefix_hit_tokens = 0

    # ---- updates (engine thread) -----------------------------------------------------

    def on_step(self, num_prefill_tokens: int, num_decode_tokens: int, seconds: float,
                num_running: int, num_waiting: int, kv_blocks_used: int,
                kv_blocks_total: int) -> None:
        """Record one engine step that just ended and took `seconds`, and the gauges after it."""
        if num_prefill_tokens < 0 or num_decode_tokens < 0 or seconds < 0:
            raise ValueError(f"EngineMetrics.on_step: token counts and seconds must be >= 0, got "
                             f"{num_prefill_tokens}, {num_decode_tokens}, {seconds}")
        now = self._clock()
        with self._lock:
            if self._first_step_start is None:
                self._first_step_start = now - seconds
            self._steps.append((now, num_prefill_tokens, num_decode_tokens))
            self._num_steps += 1
            self._total_step_seconds += seconds
            self._total_prefill_tokens += num_prefill_tokens
            self._total_decode_tokens += num_decode_tokens
            self._num_running, self._num_waiting = num_running, num_waiting
            self._kv_blocks_used, self._kv_blocks_total = kv_blocks_used, kv_blocks_total

    def on_request_arrived(self, request_id: str, t: float, num_prompt_tokens: int = 0) -> None:
        """A request was accepted at time t (same clock as on_token)."""
        with self._lock:
            self._arrival[request_id] = t
            self._num_arrived += 1
            self._total_prompt_tokens += num_prompt_tokens

    def on_token(self, request_id: str, t: float, num_tokens: int = 1) -> None:
        """The request produced output at time t: its first output gives the time to first
        token (from its arrival), each later one an inter-token latency."""
        with self._lock:
            self._total_generation_tokens += num_tokens
            last = self._last_token.get(request_id)
            if last is not None:
                self._itl.add(t - last)
            elif request_id in self._arrival:
                self._ttft.add(t - self._arrival[request_id])
            self._last_token[request_id] = t

    def on_request_finished(self, request_id: str, reason: str) -> None:
        """The request ended ("stop", "length", "abort", ...); its per-request state goes."""
        with self._lock:
            self._finished[reason] += 1
            self._arrival.pop(request_id, None)
            self._last_token.pop(request_id, None)

    def on_prefix_cache(self, query_tokens: int, hit_tokens: int) -> None:
        """A prefix-cache lookup over query_tokens prompt tokens found hit_tokens cached."""
        if not 0 <= hit_tokens <= query_tokens:
            raise ValueError(f"EngineMetrics.on_prefix_cache: need 0 <= hit_tokens <= "
                             f"query_tokens, got {hit_tokens}, {query_tokens}")
        with self._lock:
            self._prefix_query_tokens += query_tokens
            self._prefix_hit_tokens += hit_tokens

    # ---- reading (any thread) --------------------------------------------------------

    def snapshot(self) -> dict:
        """Returns a fresh dict of plain numbers (and two nested dicts); see the keys below."""
        now = self._clock()
        with self._lock:
            prefill_rate, decode_rate = self._window_rates(now)
            used, total = self._kv_blocks_used, self._kv_blocks_total
            queries = self._prefix_query_tokens
            return {
                "num_running": self._num_running,
                "num_waiting": self._num_waiting,
                "kv_blocks_used": used,
                "kv_blocks_total": total,
                "kv_cache_usage": used / total if total else 0.0,
                "prefix_cache_query_tokens": queries,
                "prefix_cache_hit_tokens": self._prefix_hit_tokens,
                "prefix_cache_hit_rate": self._prefix_hit_tokens / queries if queries else 0.0,
                "prefill_tokens_per_s": prefill_rate,
                "decode_tokens_per_s": decode_rate,
                "num_steps": self._num_steps,
                "total_step_seconds": self._total_step_seconds,
                "total_prefill_tokens": self._total_prefill_tokens,
                "total_decode_tokens": self._total_decode_tokens,
                "ttft": self._ttft.summary(),
                "itl": self._itl.summary(),
                "num_requests_arrived": self._num_arrived,
                "num_requests_in_flight": len(self._arrival),
                "requests_finished": dict(self._finished),
                "total_prompt_tokens": self._total_prompt_tokens,
                "total_generation_tokens": self._total_generation_tokens,
            }

    def _window_rates(self, now: float) -> tuple[float, float]:
        """Tokens of the steps that ended in the last window_s, over the wall time covered
        (the window, or less if the first step began more recently): idle time lowers it."""
        start = now - self.window_s
        while self._steps and self._steps[0][0] <= start:
            self._steps.popleft()
        if self._first_step_start is None:
            return 0.0, 0.0
        span = min(self.window_s, now - self._first_step_start)
        if span <= 0:
            return 0.0, 0.0
        prefill = sum(s[1] for s in self._steps)
        decode = sum(s[2] for s in self._steps)
        return prefill / span, decode / span
