"""The models a server answers for, by the names clients send."""

from __future__ import annotations

import os
import time

from engine.async_llm import AsyncLLM
from engine.model.registry import PACKAGED_MODELS
from engine.server.errors import APIError


def default_served_name(model: str) -> str:
    """A packaged model's name as given; a path's file or folder name without .gguf."""
    if model in PACKAGED_MODELS:
        return model
    base = os.path.basename(os.path.normpath(model))
    return base[:-5] if base.endswith(".gguf") else base


class ServedModel:
    """A generation model behind AsyncLLM, with what handlers need to validate requests.

    Embedding models are served by engine.server.embeddings.EmbeddingServedModel, with
    `is_embedding = True` and a coroutine `embed_request(request, state, principal, req)`
    returning the response; /v1/embeddings calls it after auth, scopes and the model check,
    and the generation endpoints refuse it.

    Args:
        name: the name clients use in "model".
        llm: the running engine.
    """

    is_embedding = False

    def __init__(self, name: str, llm: AsyncLLM):
        self.name = name
        self.llm = llm
        engine = llm.engine  # read-only facts fixed at start-up; safe from the event loop
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.model_config.vocab_size
        self.max_model_len = engine.max_model_len
        # the longest sequence that fits: the context window or, if smaller, the KV cache
        self.context_limit = min(engine.max_model_len, engine.num_blocks * engine.config.block_size)
        self.created = int(time.time())

    def card(self) -> dict:
        """The /v1/models entry."""
        return {"id": self.name, "object": "model", "created": self.created,
                "owned_by": "engine", "max_model_len": self.context_limit}

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise APIError(400, f"model {self.name!r} was started without a tokenizer; send "
                           "token ids", code="no_tokenizer")
        return self.tokenizer


class ModelRegistry:
    """Name -> ServedModel; unknown names are a 404 in OpenAI's words."""

    def __init__(self, models: list[ServedModel]):
        self.models = {m.name: m for m in models}

    def get(self, name: str | None) -> ServedModel:
        """The model of that name (None: the only one, for /tokenize and /detokenize).

        Raises:
            APIError: 404 for a name this server does not serve.
        """
        if name is None and len(self.models) == 1:
            return next(iter(self.models.values()))
        model = self.models.get(name)
        if model is None:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{sorted(self.models)}", param="model", code="model_not_found")
        return model

    def __iter__(self):
        return iter(self.models.values())
