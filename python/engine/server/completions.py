"""POST /v1/completions and POST /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from engine.server.body import parse
from engine.server.errors import bad_request
from engine.server.generation import Generation, run_to_end, stream_response
from engine.server.limits import Principal
from engine.server.models import ServedModel
from engine.server.prompts import (EncodedPrompt, check_choices, check_context, encode_chat,
                                   encode_completion_prompts, sampling_params)
from engine.server.protocol import ChatCompletionRequest, CompletionRequest
from engine.server.responses import (ChoiceStream, LogprobFormatter, chat_choice,
                                     completion_choice)
from engine.server.state import ServerState, context, model_for, principal_for


async def create_completion(request: Request, state: ServerState):
    principal = await principal_for(request, state, "completions")
    req = await parse(request, CompletionRequest, state.config.max_body_bytes)
    model = _generation_model(model_for(request, state, principal, req.model), "completions")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request(f"best_of ({req.best_of}) must equal n ({req.n}): this server does "
                          "not rank candidates", "best_of")
    _check_stream_options(req)
    prompts = await encode_completion_prompts(model, req.prompt)
    check_choices(len(prompts), req.n)
    check_context(model, prompts, req.max_tokens, "prompt")
    fmt = LogprobFormatter(model.tokenizer, req.logprobs) if req.logprobs is not None else None
    gen = _start(request, state, principal, model, prompts, req, req.logprobs, "cmpl")
    base = {"id": gen.request_id, "object": "text_completion", "created": int(time.time()),
            "model": model.name}
    if req.stream:
        return stream_response(gen, _completion_chunks(gen, req, base, fmt), _settler(gen, state))
    try:
        await run_to_end(request, gen)
    finally:
        gen.settle(state.config.log_prompts)
    choices = [completion_choice(i * req.n + o.index, o, fmt)
               for i in sorted(gen.finals) for o in gen.finals[i].outputs]
    return JSONResponse({**base, "choices": choices, "usage": gen.usage(),
                         "system_fingerprint": None})


async def create_chat_completion(request: Request, state: ServerState):
    principal = await principal_for(request, state, "chat")
    req = await parse(request, ChatCompletionRequest, state.config.max_body_bytes)
    model = _generation_model(model_for(request, state, principal, req.model),
                              "chat/completions")
    _check_stream_options(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
        raise bad_request(f"max_tokens ({req.max_tokens}) and max_completion_tokens "
                          f"({req.max_completion_tokens}) disagree; give one of them",
                          "max_completion_tokens")
    prompt = await encode_chat(model, req.messages)
    check_choices(1, req.n)
    check_context(model, [prompt], max_tokens, "messages")
    num_top = (req.top_logprobs or 0) if req.logprobs else None
    fmt = LogprobFormatter(model.tokenizer, num_top) if num_top is not None else None
    gen = _start(request, state, principal, model, [prompt], req, num_top, "chatcmpl")
    base = {"id": gen.request_id, "object": "chat.completion", "created": int(time.time()),
            "model": model.name}
    if req.stream:
        base["object"] = "chat.completion.chunk"
        return stream_response(gen, _chat_chunks(gen, req, base, fmt), _settler(gen, state))
    try:
        await run_to_end(request, gen)
    finally:
        gen.settle(state.config.log_prompts)
    choices = [chat_choice(o.index, o, fmt) for o in gen.finals[0].outputs]
    return JSONResponse({**base, "choices": choices, "usage": gen.usage(),
                         "system_fingerprint": None})


def _generation_model(model: ServedModel, endpoint: str) -> ServedModel:
    """The model, unless it is an embedding model (400, as /v1/embeddings answers for a
    generation model)."""
    if model.is_embedding:
        raise bad_request(f"model {model.name!r} is an embedding model; /v1/{endpoint} needs a "
                          "generation model (use /v1/embeddings)", "model",
                          "model_not_generation")
    return model


def _check_stream_options(req) -> None:
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")


def _start(request: Request, state: ServerState, principal: Principal, model: ServedModel,
           prompts: list[EncodedPrompt], req, logprobs: int | None, prefix: str) -> Generation:
    """Build every prompt's SamplingParams, then admit (429 / 503) and set up the run."""
    params = [sampling_params(model, req, p.max_tokens, logprobs) for p in prompts]
    ctx = context(request)
    ctx.is_stream = req.stream
    admission = state.limiter.admit(
        principal, model.name, prompt_tokens=sum(len(p.token_ids) for p in prompts),
        max_completion_tokens=sum(req.n * p.max_tokens for p in prompts),
        num_engine_requests=len(prompts))
    return Generation(model, prompts, params, f"{prefix}-{uuid.uuid4().hex}", admission, ctx)


def _settler(gen: Generation, state: ServerState):
    return lambda: gen.settle(state.config.log_prompts)


def _usage_fields(req, gen: Generation, is_final: bool) -> dict:
    if not (req.stream_options and req.stream_options.include_usage):
        return {}
    return {"usage": gen.usage() if is_final else None}


async def _completion_chunks(gen: Generation, req: CompletionRequest, base: dict,
                             fmt: LogprobFormatter | None) -> AsyncIterator[dict]:
    streams: dict[int, ChoiceStream] = {}
    async for i, out in gen.outputs():
        choices = []
        for o in out.outputs:
            index = i * req.n + o.index
            cs = streams.setdefault(index, ChoiceStream())
            offset = cs.num_chars
            text, ids, lps, reason = cs.delta(o)
            if not (text or reason or (fmt and ids)):
                continue
            logprobs = fmt.completion(ids, lps, offset) if fmt and lps is not None else None
            choices.append({"index": index, "text": text, "logprobs": logprobs,
                            "finish_reason": reason})
        if choices:
            yield {**base, "choices": choices, **_usage_fields(req, gen, False)}
    if gen.is_complete and _usage_fields(req, gen, True):
        yield {**base, "choices": [], **_usage_fields(req, gen, True)}


async def _chat_chunks(gen: Generation, req: ChatCompletionRequest, base: dict,
                       fmt: LogprobFormatter | None) -> AsyncIterator[dict]:
    # the role first, as OpenAI sends it; this also gets the headers out at once
    yield {**base, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}
                               for k in range(req.n)], **_usage_fields(req, gen, False)}
    streams: dict[int, ChoiceStream] = {}
    async for _, out in gen.outputs():
        choices = []
        for o in out.outputs:
            cs = streams.setdefault(o.index, ChoiceStream())
            text, ids, lps, reason = cs.delta(o)
            if not (text or reason or (fmt and ids)):
                continue
            choices.append({"index": o.index, "delta": {"content": text} if text else {},
                            "logprobs": fmt.chat(ids, lps) if fmt and lps is not None else None,
                            "finish_reason": reason})
        if choices:
            yield {**base, "choices": choices, **_usage_fields(req, gen, False)}
    if gen.is_complete and _usage_fields(req, gen, True):
        yield {**base, "choices": [], **_usage_fields(req, gen, True)}
