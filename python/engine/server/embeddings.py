"""POST /v1/embeddings on an embedding model (routes.create_embeddings does auth, scopes and
the model check, then calls EmbeddingServedModel.embed_request).

Inputs as OpenAI documents them: a string, a list of strings, a list of token ids or a list
of token-id lists; at most MAX_INPUTS of them; no empty strings. Texts get the model's
special tokens ([CLS] ... [SEP]); token ids are used as given. An input over the model's
maximum is a 400 naming its index, its length and the limit, unless the request asks for
truncation with vLLM's extension `truncate_prompt_tokens` (k: keep at most k tokens, a
text's special tokens kept; -1: the model's maximum). `encoding_format` "base64" is the
little-endian float32 bytes of each vector, base64-encoded (what OpenAI's client decodes).
Usage is prompt tokens only: the tokens embedded, after any truncation.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from engine.embedding import _truncate_encoding
from engine.server.embed_worker import EmbeddingWorker, WorkerStopped
from engine.server.errors import APIError, bad_request
from engine.server.generation import _wait_for_disconnect
from engine.server.limits import Principal
from engine.server.models import ServedModel
from engine.server.prompts import check_token_ids
from engine.server.protocol import EmbeddingRequest
from engine.server.state import ServerState, context

MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request


class EmbeddingServedModel(ServedModel):
    """An embedding model behind an EmbeddingWorker (is_embedding: generation endpoints
    refuse it, /v1/embeddings serves it).

    Args:
        name: the name clients use in "model".
        worker: the running worker (its runner gives the tokenizer and limits).
    """

    is_embedding = True

    def __init__(self, name: str, worker: EmbeddingWorker):  # no AsyncLLM: not super()'s
        runner = worker.runner
        self.name = name
        self.worker = worker
        self.llm = None
        self.tokenizer = runner.tokenizer
        self.vocab_size = runner.vocab_size
        self.dim = runner.dim
        self.max_model_len = runner.max_input_len
        self.context_limit = runner.max_input_len  # the longest input, special tokens included
        self.created = int(time.time())

    def card(self) -> dict:
        return {**super().card(), "embedding_dim": self.dim}

    async def embed_request(self, request: Request, state: ServerState, principal: Principal,
                            req: EmbeddingRequest) -> Response:
        """The /v1/embeddings response body for a validated request.

        Raises:
            APIError: 400 for bad inputs or dimensions, 429 / 503 from admission, 503 when
                the server is shutting down, 499 (never seen) if the client went away.
        """
        if req.dimensions is not None and req.dimensions != self.dim:
            raise bad_request(f"model {self.name!r} makes {self.dim}-dimensional embeddings and "
                              f"cannot shorten them; dimensions={req.dimensions} is not "
                              f"supported (omit it, or send {self.dim})", "dimensions")
        inputs = await encode_inputs(self, req)
        num_tokens = sum(len(ids) for ids in inputs)
        ctx = context(request)
        ctx.is_stream = False
        ctx.prompt_tokens, ctx.completion_tokens = num_tokens, 0
        admission = state.limiter.admit(principal, self.name, prompt_tokens=num_tokens,
                                        num_engine_requests=1)
        try:
            vectors = await _embed_unless_disconnected(request, self.worker, inputs)
        except BaseException:
            admission.prompt_tokens = 0  # nothing delivered: billed as a request, no tokens
            raise
        finally:
            admission.settle()
        if state.config.log_prompts:
            ctx.prompt_text = req.input
        body = await asyncio.to_thread(render, self.name, vectors, req.encoding_format,
                                       num_tokens)
        return Response(body, media_type="application/json")


def _input_items(value) -> tuple[list, bool]:
    """(the inputs, whether the request gave a single one)."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return [value], True
    return list(value), False


def _truncation(req: EmbeddingRequest, limit: int) -> int | None:
    k = req.truncate_prompt_tokens
    if k is None:
        return None
    if k == -1:
        return limit
    if k == 0 or k > limit:
        raise bad_request(f"truncate_prompt_tokens must be -1 (the model's maximum) or 1 to "
                          f"{limit} (this model's maximum input), got {k}",
                          "truncate_prompt_tokens")
    return k


def _encode_texts(tokenizer, texts: list[str], keep: int | None) -> list[list[int]]:
    """Token ids with special tokens; cut to `keep` tokens (special tokens kept) if given."""
    out = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=True)
        if keep is not None and len(ids) > keep:
            ids = _truncate_encoding(ids, tokenizer.encode(text, add_special_tokens=False), keep)
        out.append(ids)
    return out


async def encode_inputs(model: EmbeddingServedModel, req: EmbeddingRequest) -> list[list[int]]:
    """One list of token ids per input, checked and (if asked) truncated.

    Raises:
        APIError: 400 for too many inputs, an empty string, ids outside the vocabulary, or
            an input over the model's maximum (context_length_exceeded).
    """
    items, single = _input_items(req.input)
    if len(items) > MAX_INPUTS:
        raise bad_request(f"input has {len(items)} items; at most {MAX_INPUTS} per request",
                          "input")
    limit = model.context_limit
    keep = _truncation(req, limit)

    def name(i: int) -> str:
        return "input" if single else f"input[{i}]"

    texts = [i for i, item in enumerate(items) if isinstance(item, str)]
    for i in texts:
        if not items[i]:
            raise bad_request(f"{name(i)} is an empty string; every input must have text",
                              name(i))
    encoded: list = list(items)
    if texts:
        tokenizer = model.require_tokenizer()
        ids = await asyncio.to_thread(_encode_texts, tokenizer, [items[i] for i in texts], keep)
        for i, one in zip(texts, ids):
            encoded[i] = one
    for i, item in enumerate(items):
        if isinstance(item, str):
            continue
        check_token_ids(model, item, name(i))
        encoded[i] = list(item[:keep] if keep is not None else item)
    for i, ids in enumerate(encoded):
        if len(ids) > limit:
            raise APIError(400, f"this model's maximum input length is {limit} tokens; the "
                           f"input at index {i} has {len(ids)} tokens. Shorten it, or send "
                           "truncate_prompt_tokens to cut it", param=name(i),
                           code="context_length_exceeded")
    return encoded


async def _embed_unless_disconnected(request: Request, worker: EmbeddingWorker,
                                     inputs: list[list[int]]) -> np.ndarray:
    """The worker's embeddings; a client that goes away first cancels its job."""
    task = asyncio.ensure_future(worker.embed(inputs))
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # drops the job unless the worker has started it
    if task.cancelled() or not task.done():
        context(request).is_disconnected = True
        raise APIError(499, "client disconnected", code="client_disconnected")
    try:
        return task.result()
    except WorkerStopped as e:
        raise APIError(503, f"the request was not run: {e}", code="engine_unavailable",
                       headers={"Retry-After": "5"}) from None


def render(model_name: str, vectors: np.ndarray, encoding_format: str,
           prompt_tokens: int) -> bytes:
    """The response body (JSON bytes); built off the event loop, it can be megabytes."""
    if encoding_format == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        data = vectors.astype(np.float32).tolist()
    body = {"object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": e}
                     for i, e in enumerate(data)],
            "model": model_name,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
    return json.dumps(body, separators=(",", ":")).encode()
