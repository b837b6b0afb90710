"""What generation returns, shaped like vLLM's RequestOutput."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length" or None while running
    stop_reason: str | int | None = None  # the stop string or token that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: chosen and top-N ids -> logprob
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None  # first entry None, as in vLLM

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)
