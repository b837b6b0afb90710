"""The ASGI application: routes, error handlers, lifespan (shutdown flushes usage)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from engine.async_llm import AsyncLLM
from engine.server import completions, routes
from engine.server.access_log import AccessLogMiddleware
from engine.server.auth import Authenticator
from engine.server.config import ServerConfig
from engine.server.db import connect
from engine.server.embed_worker import EmbeddingWorker
from engine.server.embeddings import EmbeddingServedModel
from engine.server.errors import install_error_handlers
from engine.server.keys import KeyStore
from engine.server.ledger import Ledger, PriceTable
from engine.server.limits import Limiter
from engine.server.metrics import ServerMetrics
from engine.server.models import ModelRegistry, ServedModel, default_served_name
from engine.server.state import ServerState

logger = logging.getLogger("engine.server")


Backend = AsyncLLM | EmbeddingWorker  # a generation engine, or an embedding model's worker


def build_state(config: ServerConfig, llm: Backend) -> ServerState:
    """Open the database and price table and wire the pieces around a running engine."""
    conn = connect(config.data_dir)
    keys, ledger = KeyStore(conn), Ledger(conn)
    prices = PriceTable.load(config.price_table) if config.price_table else PriceTable()
    name = config.served_model_name or default_served_name(config.model)
    if isinstance(llm, EmbeddingWorker):
        model = EmbeddingServedModel(name, llm)
        max_in_flight = config.max_queue  # API requests queued on the worker
    else:
        model = ServedModel(name, llm)
        max_in_flight = llm.engine.config.max_num_seqs + config.max_queue
    if config.price_table and not prices.has_price(model.name):
        logger.warning("the price table has no entry for %r (nor '*'): its usage costs 0 USD, "
                       "and budgets do not limit it", model.name)
    return ServerState(config, ModelRegistry([model]), keys, ledger,
                       Authenticator(keys, config.api_key),
                       Limiter(ledger, prices, max_in_flight), ServerMetrics(ledger))


def build_app(config: ServerConfig, llm: Backend) -> tuple[AccessLogMiddleware, ServerState]:
    """The ASGI app serving `llm` (which it shuts down at the end of its lifespan): an
    AsyncLLM, or an EmbeddingWorker for an embedding model.

    Returns:
        (the ASGI app, wrapped in the access log; the shared state).
    """
    state = build_state(config, llm)
    app = FastAPI(title="engine", version="0.1.0", lifespan=_lifespan(state, llm))
    install_error_handlers(app)

    def route(path: str, handler, method: str = "POST"):
        async def endpoint(request: Request):
            return await handler(request, state)
        app.add_api_route(path, endpoint, methods=[method], name=handler.__name__)

    route("/v1/completions", completions.create_completion)
    route("/v1/chat/completions", completions.create_chat_completion)
    route("/v1/embeddings", routes.create_embeddings)
    route("/v1/models", routes.list_models, "GET")
    route("/tokenize", routes.tokenize)
    route("/detokenize", routes.detokenize)

    @app.get("/v1/models/{name:path}")
    async def get_model(request: Request, name: str):
        return await routes.get_model(request, state, name)

    @app.get("/health")
    async def health():
        if not llm.is_running:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        state.metrics.update_engine(await _engine_live(llm))
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    asgi = AccessLogMiddleware(app, config.log_prompts, on_done=state.metrics.on_request_done)
    return asgi, state


async def _engine_live(llm: Backend) -> dict:
    """Engine gauges read on the engine thread now (the metrics' own gauges are as of the last
    step, which is stale after an abort on an idle engine)."""
    if isinstance(llm, EmbeddingWorker):
        return llm.live()
    def read(engine):
        bm, sched = engine.block_manager, engine.scheduler
        return {"num_running": len(sched.running), "num_waiting": len(sched.waiting),
                "kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
                "kv_blocks_total": bm.num_blocks, "num_requests_in_flight": len(engine.requests)}
    live = dict(llm.metrics.snapshot()) if llm.metrics else {}
    with contextlib.suppress(RuntimeError):  # shut down: the snapshot is what there is
        live.update(await llm.run_in_engine(read))
    return live


def _lifespan(state: ServerState, llm: Backend):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has stopped accepting and waited (up to the deadline) for in-flight
        # requests, then cancelled the rest; let their settlements run before closing.
        await _drain(state, 2.0)
        await asyncio.to_thread(llm.shutdown)
        await _drain(state, 2.0)
        if state.limiter.num_in_flight:
            logger.warning("%d requests still unsettled at shutdown",
                           state.limiter.num_in_flight)
        state.keys.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        state.keys.conn.close()
        logger.info("usage flushed; server stopped")
    return lifespan


async def _drain(state: ServerState, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while state.limiter.num_in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
