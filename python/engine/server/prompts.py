"""From a validated request to engine inputs: token ids (tokenized here, on the front end,
so that limits and the context window are checked before admission) and SamplingParams."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from engine.server.errors import APIError, bad_request
from engine.server.models import ServedModel
from engine.server.protocol import ChatCompletionRequest, CompletionRequest, Message

MAX_CHOICES = 256  # prompts x n in one request


@dataclass
class EncodedPrompt:
    text: str | None
    token_ids: list[int]
    max_tokens: int = 0  # completion tokens allowed for this prompt (set by check_context)

    def engine_input(self) -> dict:
        return {"prompt": self.text, "prompt_token_ids": self.token_ids}


async def encode_completion_prompts(model: ServedModel, prompt) -> list[EncodedPrompt]:
    """The prompts of a completions request: text (tokenized with the model's special-token
    policy) or token ids (checked against the vocabulary)."""
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) \
        else prompt
    out = []
    for i, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            tokenizer = model.require_tokenizer()
            ids = await asyncio.to_thread(tokenizer.encode, item)
            out.append(EncodedPrompt(item, ids))
        else:
            check_token_ids(model, item, param)
            out.append(EncodedPrompt(None, list(item)))
        if not out[-1].token_ids:
            raise bad_request(f"{param} is empty: at least one token is needed", param)
    return out


def check_token_ids(model: ServedModel, ids: list[int], param: str) -> None:
    for i, t in enumerate(ids):
        if not 0 <= t < model.vocab_size:
            raise bad_request(f"{param}[{i}] is token id {t}, outside the vocabulary "
                              f"[0, {model.vocab_size})", param, "invalid_token_id")


def render_messages(model: ServedModel, messages: list[Message],
                    add_generation_prompt: bool = True) -> str:
    """The conversation through the model's chat template (developer counts as system)."""
    tokenizer = model.require_tokenizer()
    conversation = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content} for m in messages]
    try:
        return tokenizer.apply_chat_template(conversation,
                                             add_generation_prompt=add_generation_prompt)
    except ValueError as e:  # no template, or the template rejected the conversation
        raise bad_request(f"messages: {e}", "messages", "invalid_messages") from None


async def encode_chat(model: ServedModel, messages: list[Message]) -> EncodedPrompt:
    text = render_messages(model, messages)
    # the template writes any BOS itself (as LLM.chat does)
    ids = await asyncio.to_thread(model.tokenizer.encode, text, False)
    return EncodedPrompt(text, ids)


def check_context(model: ServedModel, prompts: list[EncodedPrompt], max_tokens: int | None,
                  param: str) -> None:
    """Set each prompt's max_tokens (max_tokens, or the rest of the context when None).

    Raises:
        APIError: 400 context_length_exceeded, stating the limit and the counts.
    """
    limit = model.context_limit
    for i, p in enumerate(prompts):
        name = param if len(prompts) == 1 else f"{param}[{i}]"
        n = len(p.token_ids)
        if max_tokens is None:
            if n >= limit:
                raise APIError(400, f"this model's maximum context length is {limit} tokens; "
                               f"the {name} has {n} tokens, which leaves no room for a "
                               "completion. Shorten it", param=name,
                               code="context_length_exceeded")
            p.max_tokens = limit - n
        elif n + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; you "
                           f"requested {n + max_tokens} tokens ({n} in the {name}, {max_tokens} "
                           "for the completion). Shorten the prompt or lower max_tokens",
                           param=name, code="context_length_exceeded")
        else:
            p.max_tokens = max_tokens


def check_choices(num_prompts: int, n: int) -> None:
    if num_prompts * n > MAX_CHOICES:
        raise bad_request(f"{num_prompts} prompts x n={n} is {num_prompts * n} completions; at "
                          f"most {MAX_CHOICES} per request", "n")


def sampling_params(model: ServedModel, req: CompletionRequest | ChatCompletionRequest,
                    max_tokens: int, logprobs: int | None) -> SamplingParams:
    """The engine's SamplingParams for one prompt of the request.

    Raises:
        APIError: 400 for ids outside the vocabulary or combinations SamplingParams refuses.
    """
    for name, ids in (("logit_bias", list(req.logit_bias or {})),
                      ("stop_token_ids", req.stop_token_ids or [])):
        for t in ids:
            if not 0 <= t < model.vocab_size:
                raise bad_request(f"{name} has token id {t}, outside the vocabulary "
                                  f"[0, {model.vocab_size})", name, "invalid_token_id")
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k, min_p=req.min_p,
            max_tokens=max_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids or [],
            seed=req.seed, ignore_eos=req.ignore_eos,
            skip_special_tokens=req.skip_special_tokens,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, logit_bias=req.logit_bias,
            min_tokens=req.min_tokens, logprobs=logprobs)
    except ValueError as e:
        raise bad_request(str(e).removeprefix("SamplingParams."), code="invalid_value") from None
