"""One sequence being generated: its tokens, its cache blocks, its text, its state."""

from __future__ import annotations

import enum

from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion: prompt and output tokens, KV blocks, generator state, text so far."""

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, rng_state: int, detokenizer):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index                        # which of the request's n completions
        self.token_ids = list(prompt_token_ids)   # prompt, then generated tokens
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0              # tokens whose K/V are in the cache
        self.block_table: list[int] = []          # physical block of each logical block
        self.block_hashes: list[int] = []         # prefix-cache hash of each full block, in order
        self.num_cached_tokens = 0                # prompt tokens found in the prefix cache
        self.pending_children: list[Sequence] = []  # n > 1: forked once the prompt is computed
        self.logprobs: list[dict[int, float]] = []  # per output token, when asked
        self.prompt_logprobs: list[dict[int, float]] = []  # for prompt tokens 1.., when asked
        self.cumulative_logprob = 0.0
        self.params = params
        self.rng_state = rng_state                # SplitMix64 state, advanced by the sampler
        self.detokenizer = detokenizer
        self.text = ""
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
