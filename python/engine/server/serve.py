"""`engine serve`: load the model, then run the app under uvicorn until SIGTERM / SIGINT.

Shutdown: uvicorn stops accepting and waits for in-flight requests; after shutdown_timeout_s
the engine is stopped, which aborts what is left (those clients get a 503 or a stream error
event, and what was produced is billed); then the app's lifespan flushes the ledger. A
shutdown by signal that went this way exits with status 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from engine.async_llm import AsyncLLM
from engine.embedding import is_embedding_model
from engine.server.access_log import configure_access_log
from engine.server.app import build_app
from engine.server.config import ServerConfig
from engine.server.embed_worker import EmbeddingWorker

logger = logging.getLogger("engine.server")


_BACKSTOP_S = 5.0  # uvicorn cancels handlers this long after our own deadline


class _Server(uvicorn.Server):
    """uvicorn, plus the deadline: when in-flight requests are still running shutdown_timeout_s
    after the signal, the engine is stopped, which aborts them; their handlers then answer
    (503, or an error event on a stream) and bill what was produced, so clients get an answer
    rather than a dropped connection."""

    def __init__(self, config: uvicorn.Config, llm: AsyncLLM | EmbeddingWorker,
                 deadline_s: float):
        super().__init__(config)
        self.llm = llm
        self.deadline_s = deadline_s

    async def shutdown(self, sockets=None) -> None:
        task = asyncio.create_task(self._abort_after_deadline())
        try:
            await super().shutdown(sockets)
        finally:
            task.cancel()

    async def _abort_after_deadline(self) -> None:
        await asyncio.sleep(self.deadline_s)
        logger.warning("shutdown deadline (%.1f s) passed: aborting the requests in flight",
                       self.deadline_s)
        await asyncio.to_thread(self.llm.shutdown)


def load_backend(config: ServerConfig) -> AsyncLLM | EmbeddingWorker:
    """An EmbeddingWorker for an embedding model (is_embedding_model), else an AsyncLLM."""
    if is_embedding_model(config.model):
        return EmbeddingWorker.load(config.model, config.engine_kwargs)
    return AsyncLLM(config.model, **config.engine_kwargs)


def run_server(config: ServerConfig) -> None:
    """Serve until a signal stops the server.

    Raises:
        ValueError: the model or a setting is invalid (before anything listens).
    """
    llm = load_backend(config)
    try:
        app, state = build_app(config, llm)
    except BaseException:
        llm.shutdown()
        raise
    configure_access_log(config.access_log)
    auth = "keys from " + config.data_dir if state.auth.store.list() or config.api_key else "none"
    logger.info("serving %s on http://%s:%d (auth: %s)", ", ".join(state.models.models),
                config.host, config.port, auth)
    server = _Server(uvicorn.Config(
        app, host=config.host, port=config.port, access_log=False, log_level="warning",
        timeout_graceful_shutdown=config.shutdown_timeout_s + _BACKSTOP_S, lifespan="on"),
        llm, config.shutdown_timeout_s)
    # uvicorn re-raises the signal that stopped it once it is done; a graceful stop is a
    # success, so that re-raise is made a no-op (the default handler returns after run()).
    previous = {sig: signal.signal(sig, lambda *_: None)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if llm.is_running:  # the lifespan never ran (bind failure)
            llm.shutdown()
    if not server.started:
        raise ValueError(f"could not listen on {config.host}:{config.port} (see the log above)")
