"""Engine outputs -> OpenAI response bodies and stream chunks (completions and chat)."""

from __future__ import annotations

import json
import math

from engine.outputs import CompletionOutput

_FLOOR = -9999.0  # OpenAI's stand-in for a log-probability of -inf (JSON has no infinities)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> str:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False,
                                                         allow_nan=False)
    return f"data: {text}\n\n"


def finish_reason(out: CompletionOutput) -> str | None:
    # "abort" never reaches a client as a finish reason: aborted requests end otherwise
    return out.finish_reason if out.finish_reason in ("stop", "length") else None


class LogprobFormatter:
    """Per-token log-probabilities in the completions or the chat format.

    Args:
        tokenizer: turns ids into the token strings clients see.
        num_top: how many alternatives to list per position.
    """

    def __init__(self, tokenizer, num_top: int):
        self.tokenizer = tokenizer
        self.num_top = num_top

    def piece(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _entries(self, token_ids: list[int], logprobs: list[dict[int, float]]):
        for token_id, entry in zip(token_ids, logprobs):
            chosen = _finite(entry.get(token_id, _FLOOR))
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:self.num_top]
            yield token_id, chosen, [(t, _finite(lp)) for t, lp in top]

    def completion(self, token_ids: list[int], logprobs: list[dict[int, float]],
                   offset: int = 0) -> dict:
        """{"tokens", "token_logprobs", "top_logprobs", "text_offset"}; offsets count from
        `offset` characters into the completion text."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, chosen, top in self._entries(token_ids, logprobs):
            piece = self.piece(token_id)
            out["tokens"].append(piece)
            out["token_logprobs"].append(chosen)
            out["top_logprobs"].append({self.piece(t): lp for t, lp in top})
            out["text_offset"].append(offset)
            offset += len(piece)
        return out

    def chat(self, token_ids: list[int], logprobs: list[dict[int, float]]) -> dict:
        """{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}"""
        content = []
        for token_id, chosen, top in self._entries(token_ids, logprobs):
            content.append({**self._token(token_id, chosen),
                            "top_logprobs": [self._token(t, lp) for t, lp in top]})
        return {"content": content}

    def _token(self, token_id: int, logprob: float) -> dict:
        piece = self.piece(token_id)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else _FLOOR


def completion_choice(index: int, out: CompletionOutput, fmt: LogprobFormatter | None) -> dict:
    logprobs = None
    if fmt is not None and out.logprobs is not None:
        logprobs = fmt.completion(out.token_ids, out.logprobs)
    return {"index": index, "text": out.text, "logprobs": logprobs,
            "finish_reason": finish_reason(out)}


def chat_choice(index: int, out: CompletionOutput, fmt: LogprobFormatter | None) -> dict:
    logprobs = None
    if fmt is not None and out.logprobs is not None:
        logprobs = fmt.chat(out.token_ids, out.logprobs)
    return {"index": index, "message": {"role": "assistant", "content": out.text},
            "logprobs": logprobs, "finish_reason": finish_reason(out)}


class ChoiceStream:
    """What one choice has sent so far; turns cumulative outputs into deltas."""

    def __init__(self):
        self.num_chars = 0
        self.num_tokens = 0
        self.is_done = False

    def delta(self, out: CompletionOutput) -> tuple[str, list[int], list | None, str | None]:
        """(new text, new token ids, their logprobs, finish reason) since the last call."""
        text = out.text[self.num_chars:] if len(out.text) > self.num_chars else ""
        new_ids = out.token_ids[self.num_tokens:]
        new_lps = out.logprobs[self.num_tokens:] if out.logprobs is not None else None
        self.num_chars = max(self.num_chars, len(out.text))
        self.num_tokens = len(out.token_ids)
        reason = finish_reason(out)
        self.is_done = out.finish_reason is not None
        return text, new_ids, new_lps, reason
