"""One JSON line per request on the "engine.access" logger, written when the response ends
(for a stream: after its last event). Prompt and completion text only with log_prompts."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field

access_logger = logging.getLogger("engine.access")


@dataclass
class RequestContext:
    """Facts about one request that handlers fill in; the middleware logs them."""
    request_id: str
    method: str
    endpoint: str
    start: float = field(default_factory=time.monotonic)
    key: str | None = None
    model: str | None = None
    status: int | None = None
    is_stream: bool | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_at: float | None = None
    error_code: str | None = None
    is_disconnected: bool = False
    prompt_text: str | list | None = None
    completion_text: list[str] | None = None

    def on_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def record(self, log_prompts: bool) -> dict:
        now = time.monotonic()
        line = {"ts": round(time.time(), 3), "request_id": self.request_id, "key": self.key,
                "model": self.model, "method": self.method, "endpoint": self.endpoint,
                "status": 499 if self.is_disconnected else self.status,
                "stream": self.is_stream, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "ttft_s": (round(self.first_token_at - self.start, 4)
                           if self.first_token_at is not None else None),
                "latency_s": round(now - self.start, 4), "error": self.error_code}
        if log_prompts:
            line["prompt"] = self.prompt_text
            line["completion"] = self.completion_text
        return line


class AccessLogMiddleware:
    """Pure ASGI middleware (it must see the end of streamed bodies, which BaseHTTPMiddleware
    buffers): gives each request a RequestContext and an x-request-id, logs it at the end.

    Args:
        app: the ASGI app.
        log_prompts: also log prompt and completion text.
        on_done: called with each finished RequestContext (metrics).
    """

    def __init__(self, app, log_prompts: bool = False, on_done=None):
        self.app = app
        self.log_prompts = log_prompts
        self.on_done = on_done

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = RequestContext(f"req-{uuid.uuid4().hex[:24]}", scope["method"], scope["path"])
        scope.setdefault("state", {})["ctx"] = ctx

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                ctx.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", ctx.request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            if ctx.status is None:
                ctx.status = 500
            raise
        finally:
            if ctx.status is None:  # cancelled (shutdown deadline) before answering
                ctx.status = 499
            try:
                access_logger.info(json.dumps(ctx.record(self.log_prompts), ensure_ascii=False))
                if self.on_done is not None:
                    self.on_done(ctx)
            except Exception:  # logging must never break a response
                logging.getLogger("engine.server").exception("access log failed")


def configure_access_log(path: str | None) -> None:
    """Send access lines to a file (or stderr when path is None), one JSON object a line."""
    access_logger.handlers.clear()
    handler = logging.FileHandler(path) if path else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_logger.addHandler(handler)
    access_logger.setLevel(logging.INFO)
    access_logger.propagate = False
