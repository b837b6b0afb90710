"""What every handler shares, and the steps each request starts with: who (401), may they
use this endpoint (403), which model (404) and may they use it (403)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from engine.server.access_log import RequestContext
from engine.server.auth import Authenticator, authorize
from engine.server.config import ServerConfig
from engine.server.keys import KeyStore
from engine.server.ledger import Ledger
from engine.server.limits import Limiter, Principal
from engine.server.metrics import ServerMetrics
from engine.server.models import ModelRegistry, ServedModel


@dataclass
class ServerState:
    config: ServerConfig
    models: ModelRegistry
    keys: KeyStore
    ledger: Ledger
    auth: Authenticator
    limiter: Limiter
    metrics: ServerMetrics


def context(request: Request) -> RequestContext:
    ctx = getattr(request.state, "ctx", None)
    if ctx is None:  # the app run without AccessLogMiddleware (embedded in another app)
        ctx = RequestContext("req-unlogged", request.method, request.url.path)
        request.state.ctx = ctx
    return ctx


async def principal_for(request: Request, state: ServerState, endpoint: str) -> Principal:
    """Authenticate the caller and check the endpoint is in their key's scope."""
    principal = await state.auth.authenticate(request)
    context(request).key = principal.name
    authorize(principal, endpoint=endpoint)
    return principal


def model_for(request: Request, state: ServerState, principal: Principal,
              name: str | None) -> ServedModel:
    """The requested model, if it exists (404) and the key may use it (403)."""
    model = state.models.get(name)
    context(request).model = model.name
    authorize(principal, model=model.name)
    return model
