"""The smaller endpoints: /v1/models, /tokenize, /detokenize and /v1/embeddings."""

from __future__ import annotations

import asyncio

from fastapi import Request

from engine.server.body import parse
from engine.server.errors import bad_request
from engine.server.prompts import check_token_ids, render_messages
from engine.server.protocol import DetokenizeRequest, EmbeddingRequest, TokenizeRequest
from engine.server.state import ServerState, model_for, principal_for


async def list_models(request: Request, state: ServerState) -> dict:
    principal = await principal_for(request, state, "models")
    key = principal.key
    return {"object": "list",
            "data": [m.card() for m in state.models if key is None or key.allows_model(m.name)]}


async def get_model(request: Request, state: ServerState, name: str) -> dict:
    principal = await principal_for(request, state, "models")
    return model_for(request, state, principal, name).card()


async def tokenize(request: Request, state: ServerState) -> dict:
    """{"prompt": text} or {"messages": [...]} -> {"count", "max_model_len", "tokens"}."""
    principal = await principal_for(request, state, "tokenize")
    req = await parse(request, TokenizeRequest, state.config.max_body_bytes)
    model = model_for(request, state, principal, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of 'prompt' (text) or 'messages' (a conversation)",
                          "prompt")
    state.limiter.admit(principal, model.name).settle()  # counts toward the key's rpm
    tokenizer = model.require_tokenizer()
    if req.messages is not None:
        text = render_messages(model, req.messages, req.add_generation_prompt)
        ids = await asyncio.to_thread(tokenizer.encode, text, False)
    else:
        ids = await asyncio.to_thread(tokenizer.encode, req.prompt, req.add_special_tokens)
    return {"count": len(ids), "max_model_len": model.context_limit, "tokens": ids}


async def detokenize(request: Request, state: ServerState) -> dict:
    """{"tokens": [...]} -> {"prompt": text} (special tokens kept)."""
    principal = await principal_for(request, state, "tokenize")
    req = await parse(request, DetokenizeRequest, state.config.max_body_bytes)
    model = model_for(request, state, principal, req.model)
    check_token_ids(model, req.tokens, "tokens")
    state.limiter.admit(principal, model.name).settle()
    tokenizer = model.require_tokenizer()
    return {"prompt": tokenizer.decode(req.tokens, skip_special_tokens=False)}


async def create_embeddings(request: Request, state: ServerState):
    """Embeddings need an embedding model (engine.server.embeddings.EmbeddingServedModel,
    whose embed_request tokenizes, checks, admits and runs the request)."""
    principal = await principal_for(request, state, "embeddings")
    req = await parse(request, EmbeddingRequest, state.config.max_body_bytes)
    model = model_for(request, state, principal, req.model)
    if not model.is_embedding:
        raise bad_request(f"model {model.name!r} is a generation model; /v1/embeddings needs an "
                          "embedding model", "model", "model_not_embedding")
    return await model.embed_request(request, state, principal, req)
