"""Admission control: server capacity, per-key rate limits, quotas and reservations.

Rate limits are token buckets holding a minute's allowance and refilled continuously
(rpm / 60 requests per second, tpm / 60 tokens per second). A request is admitted when the
request bucket holds 1 and the token bucket holds its prompt; the prompt is taken at
admission and completion tokens as they are produced (the bucket may go into debt). A 429's
Retry-After is the time until the buckets hold what the request needs, counting the
completion tokens that requests in flight may still take, so a client that waits it out is
admitted unless something else spends the key's allowance meanwhile.

Quotas (total tokens or a USD budget) reserve prompt + n * max_tokens at admission and settle
to the actual usage at the end, so concurrent requests can overrun a quota by at most one
request's completion tokens: each is admitted only if the ledger, every reservation in
flight and its own prompt fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from engine.server.errors import APIError
from engine.server.keys import ApiKey
from engine.server.ledger import Ledger, PriceTable


@dataclass(frozen=True)
class Principal:
    """Who makes a request: a stored key, the static --api-key, or anonymous (no auth)."""
    name: str
    key: ApiKey | None = None


class TokenBucket:
    """`per_minute` units of capacity, refilled at per_minute / 60 per second."""

    def __init__(self, per_minute: int, now: float):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.tokens = self.capacity
        self.updated = now

    def level(self, now: float) -> float:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return self.tokens

    def seconds_until(self, amount: float, now: float) -> float:
        """Time until the bucket holds min(amount, capacity); 0 if it does now."""
        return max(0.0, min(amount, self.capacity) - self.level(now)) / self.rate

    def take(self, amount: float, now: float) -> None:
        self.level(now)
        self.tokens -= amount


@dataclass
class _KeyState:
    rpm: TokenBucket | None = None
    tpm: TokenBucket | None = None
    reserved_tokens: int = 0      # quota reservations of requests in flight
    reserved_cost: float = 0.0
    outstanding: int = 0          # completion tokens requests in flight may still produce


def _retry_error(message: str, seconds: float, type: str, code: str) -> APIError:
    seconds = max(seconds, 0.001)
    return APIError(429, message, type=type, code=code,
                    headers={"Retry-After": str(math.ceil(seconds)),
                             "retry-after-ms": str(math.ceil(seconds * 1000))})


class Limiter:
    """Admits requests or answers 429 / 503; one per server, used from the event loop only.

    Args:
        ledger: where settled usage goes (and quota usage is read from).
        prices: the price table, for budgets and the ledger's cost column.
        max_in_flight: most engine requests admitted at once (running + queued).
        clock: monotonic seconds (tests inject one).
    """

    def __init__(self, ledger: Ledger, prices: PriceTable, max_in_flight: int,
                 clock: Callable[[], float] = time.monotonic):
        self.ledger = ledger
        self.prices = prices
        self.max_in_flight = max_in_flight
        self.num_in_flight = 0
        self.clock = clock
        self._keys: dict[str, _KeyState] = {}

    def admit(self, principal: Principal, model: str, prompt_tokens: int = 0,
              max_completion_tokens: int = 0, num_engine_requests: int = 0) -> Admission:
        """Admit a request or raise.

        Args:
            prompt_tokens: the request's prompt tokens (all prompts).
            max_completion_tokens: the most completion tokens it may produce (all choices).
            num_engine_requests: engine requests it adds (0 for tokenize and the like).
        Raises:
            APIError: 503 when the server is full, 429 for a rate limit or quota, 400 when the
                prompt alone is over the key's tokens-per-minute limit.
        """
        if num_engine_requests and self.num_in_flight + num_engine_requests > self.max_in_flight:
            raise APIError(503, f"the server is at capacity ({self.num_in_flight} requests in "
                           f"flight, limit {self.max_in_flight}); retry shortly",
                           code="server_overloaded", headers={"Retry-After": "1"})
        key = principal.key
        state = self._state(key) if key is not None else _KeyState()
        now = self.clock()
        if key is not None:
            self._check_rates(key, state, prompt_tokens, now)
            reserved = self._check_quota(key, state, model, prompt_tokens, max_completion_tokens)
        else:
            reserved = (0, 0.0)
        if state.rpm is not None:
            state.rpm.take(1, now)
        if state.tpm is not None and prompt_tokens:
            state.tpm.take(prompt_tokens, now)
        state.reserved_tokens += reserved[0]
        state.reserved_cost += reserved[1]
        state.outstanding += max_completion_tokens
        self.num_in_flight += num_engine_requests
        return Admission(self, principal, state, model, prompt_tokens, max_completion_tokens,
                         num_engine_requests, reserved)

    def _state(self, key: ApiKey) -> _KeyState:
        state = self._keys.setdefault(key.name, _KeyState())
        now = self.clock()
        for limit, attr in ((key.rpm, "rpm"), (key.tpm, "tpm")):
            bucket = getattr(state, attr)
            if limit is None:
                setattr(state, attr, None)
            elif bucket is None or bucket.capacity != limit:
                setattr(state, attr, TokenBucket(limit, now))
        return state

    def _check_rates(self, key: ApiKey, state: _KeyState, prompt_tokens: int, now: float) -> None:
        if state.tpm is not None and prompt_tokens > state.tpm.capacity:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens, more than key "
                           f"{key.name!r} may send in a minute (tpm {key.tpm}); no wait helps: "
                           "shorten the prompt", param="prompt", code="tokens_exceed_tpm")
        if state.rpm is not None and state.rpm.level(now) < 1:
            wait = state.rpm.seconds_until(1, now)
            raise _retry_error(f"rate limit reached for key {key.name!r}: {key.rpm} requests per "
                               f"minute; retry in {wait:.2f} s", wait, "requests",
                               "rate_limit_exceeded")
        if state.tpm is not None and prompt_tokens and state.tpm.level(now) < prompt_tokens:
            wait = state.tpm.seconds_until(prompt_tokens + state.outstanding, now)
            raise _retry_error(f"rate limit reached for key {key.name!r}: {key.tpm} tokens per "
                               f"minute; this prompt needs {prompt_tokens}, "
                               f"{max(0, int(state.tpm.tokens))} are available; retry in "
                               f"{wait:.2f} s", wait, "tokens", "rate_limit_exceeded")

    def _check_quota(self, key: ApiKey, state: _KeyState, model: str, prompt_tokens: int,
                     max_completion_tokens: int) -> tuple[int, float]:
        if key.token_quota is None and key.budget_usd is None:
            return 0, 0.0
        used_tokens, used_cost = self.ledger.totals(key.name)
        if key.token_quota is not None:
            limit, used, held, need = (key.token_quota, used_tokens, state.reserved_tokens,
                                       prompt_tokens)
            unit = "tokens"
        else:
            limit, used, held = key.budget_usd, used_cost, state.reserved_cost
            need = self.prices.cost(model, prompt_tokens, 0)
            unit = "USD"
        if used >= limit or used + need > limit:
            raise APIError(429, f"key {key.name!r} has used {used:g} of its quota of {limit:g} "
                           f"{unit}; this request needs {need:g} more. Ask the operator for a "
                           "larger quota", type="insufficient_quota", code="insufficient_quota")
        if used + held + need > limit:
            raise _retry_error(f"key {key.name!r}: {held:g} of its remaining quota "
                               f"({limit - used:g} {unit}) is reserved by requests in flight; "
                               "retry when they end", 1.0, "insufficient_quota", "quota_reserved")
        return (prompt_tokens + max_completion_tokens,
                self.prices.cost(model, prompt_tokens, max_completion_tokens))


@dataclass
class Admission:
    """One admitted request: feed it completion tokens as they come, settle it once."""
    limiter: Limiter
    principal: Principal
    state: _KeyState
    model: str
    prompt_tokens: int
    max_completion_tokens: int
    num_engine_requests: int
    reserved: tuple[int, float]
    completion_tokens: int = 0
    is_settled: bool = field(default=False)

    def set_completion_tokens(self, total: int) -> None:
        """The request has produced `total` completion tokens so far (all choices)."""
        delta = total - self.completion_tokens
        if delta <= 0:
            return
        self.completion_tokens = total
        self.state.outstanding -= min(delta, max(0, self.state.outstanding))
        if self.state.tpm is not None:
            self.state.tpm.take(delta, self.limiter.clock())

    def settle(self) -> float:
        """Write the usage to the ledger and release the reservations (idempotent).

        Returns:
            The request's cost in USD.
        """
        if self.is_settled:
            return 0.0
        self.is_settled = True
        limiter, state = self.limiter, self.state
        limiter.num_in_flight -= self.num_engine_requests
        state.reserved_tokens -= self.reserved[0]
        state.reserved_cost -= self.reserved[1]
        state.outstanding -= max(0, self.max_completion_tokens - self.completion_tokens)
        state.outstanding = max(0, state.outstanding)
        cost = limiter.prices.cost(self.model, self.prompt_tokens, self.completion_tokens)
        if self.num_engine_requests:  # tokenize and the like are not billed
            limiter.ledger.record(self.principal.name, self.model, self.prompt_tokens,
                                  self.completion_tokens, cost)
        return cost
