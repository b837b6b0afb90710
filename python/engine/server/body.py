"""Reading a request body: size limit, JSON, schema; every failure an APIError (413 or 400)."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from engine.server.errors import APIError, bad_request

T = TypeVar("T", bound=BaseModel)

# A body over the limit is still read and dropped up to this many bytes, so that the client,
# which is most likely still sending, gets to read the 413 instead of a reset connection.
_DRAIN_BYTES = 64 << 20


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, at most `limit` bytes.

    Raises:
        APIError: 413 when the body (or its Content-Length) is over the limit.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        await _drain(request, int(declared))
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await _drain(request, size)
            raise _too_large(size, limit, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: Request, size: int) -> None:
    if size > _DRAIN_BYTES:
        return
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > _DRAIN_BYTES:
                return
    except Exception:  # a disconnect or a consumed stream: nothing left to drain
        return


def _too_large(size: int, limit: int, at_least: bool = False) -> APIError:
    return APIError(413, f"request body is {'over ' if at_least else ''}{size} bytes; this "
                    f"server accepts at most {limit} bytes", code="request_too_large")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> object:
    """Parse a JSON body: strict UTF-8, no NaN/Infinity, bounded nesting.

    Raises:
        APIError: 400 naming the problem.
    """
    if not raw.strip():
        raise bad_request("request body is empty; expected a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8 (byte {e.start}); JSON bodies must "
                          "be UTF-8", code="invalid_json") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise bad_request("request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError is a ValueError, as is _reject_constant's
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None


def validate(model: type[T], data: object) -> T:
    """Validate parsed JSON against a request schema.

    Raises:
        APIError: 400 naming the first field at fault and what it expects.
    """
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, got {type(data).__name__}",
                          code="invalid_type")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _from_validation(e) from None
    except RecursionError:
        raise bad_request("request body is nested too deeply", code="invalid_json") from None


async def parse(request: Request, model: type[T], limit: int) -> T:
    """read_body + parse_json + validate."""
    return validate(model, parse_json(await read_body(request, limit)))


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _from_validation(e: ValidationError) -> APIError:
    error = e.errors(include_url=False)[0]
    param = _param(error["loc"])
    kind = error["type"]
    if kind == "missing":
        return bad_request(f"missing required parameter: {param!r}", param,
                           "missing_required_parameter")
    if kind == "extra_forbidden":
        return bad_request(f"unrecognized request argument supplied: {param}", param,
                           "unknown_parameter")
    message = error["msg"].removeprefix("Value error, ")
    got = repr(error.get("input"))
    if len(got) > 80:
        got = got[:77] + "..."
    code = "invalid_type" if kind.endswith("_type") else "invalid_value"
    return bad_request(f"invalid {param!r}: {message}; got {got}", param, code)
