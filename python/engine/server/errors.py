"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Handlers raise APIError; the app turns it (and anything Starlette raises for routing) into
that body. Client input must never reach the 500 handler: it exists only for our own bugs.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("engine.server")

_DEFAULT_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                  403: "permission_error", 404: "invalid_request_error",
                  405: "invalid_request_error", 413: "invalid_request_error",
                  429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered to the client.

    Args:
        status: the HTTP status.
        message: what was wrong and what was expected.
        param: the request field at fault (dotted path), if any.
        code: a short machine-readable code ("context_length_exceeded", ...).
        type: OpenAI's error type; by default derived from the status.
        headers: extra response headers (Retry-After, ...).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _DEFAULT_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _record(request: Request, error: APIError) -> None:
    ctx = getattr(request.state, "ctx", None)
    if ctx is not None:
        ctx.error_code = error.code


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    _record(request, exc)
    return exc.response()


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        error = APIError(404, f"no route {request.method} {request.url.path}; see /docs for "
                         "the routes this server has", code="unknown_url")
    elif exc.status_code == 405:
        error = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                         code="method_not_allowed")
    else:
        error = APIError(exc.status_code, str(exc.detail), code="http_error")
    error.headers.update(exc.headers or {})
    _record(request, error)
    return error.response()


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    error = bad_request(f"invalid request: {exc.errors()[:1]}", code="invalid_request")
    _record(request, error)
    return error.response()


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    error = APIError(500, "internal server error; the server log has the details",
                     code="internal_error")
    _record(request, error)
    return error.response()


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error raised while handling a request in OpenAI's shape."""
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)
