"""Running one API request on the engine: its prompts as engine requests, merged outputs,
usage accounting, and the two ways out (one JSON body, or server-sent events).

Cancellation is how a request is aborted: a client that disconnects cancels the task that
reads the engine streams, each engine stream is closed (AsyncLLM aborts its request and
frees its KV blocks at once), and the admission is settled with the tokens produced so far.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable

from fastapi import Request
from starlette.responses import StreamingResponse

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.server.access_log import RequestContext
from engine.server.errors import APIError
from engine.server.limits import Admission
from engine.server.models import ServedModel
from engine.server.prompts import EncodedPrompt
from engine.server.responses import sse, usage


class Generation:
    """The engine requests of one API request.

    Args:
        model: where they run.
        prompts: the encoded prompts (one engine request each).
        params: SamplingParams per prompt.
        request_id: the API response id; engine ids are "<request_id>-<i>".
        admission: fed the completion tokens as they come; settled by `settle`.
        ctx: the access-log context.
    """

    def __init__(self, model: ServedModel, prompts: list[EncodedPrompt],
                 params: list[SamplingParams], request_id: str, admission: Admission,
                 ctx: RequestContext):
        self.model = model
        self.prompts = prompts
        self.params = params
        self.request_id = request_id
        self.admission = admission
        self.ctx = ctx
        self.finals: dict[int, RequestOutput] = {}
        self._tokens: dict[int, int] = {}
        self.prompt_tokens = sum(len(p.token_ids) for p in prompts)
        ctx.prompt_tokens = self.prompt_tokens
        ctx.completion_tokens = 0

    @property
    def completion_tokens(self) -> int:
        return sum(self._tokens.values())

    @property
    def is_complete(self) -> bool:
        return len(self.finals) == len(self.prompts)

    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.completion_tokens)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) as the engine produces them, all prompts merged.

        Raises:
            APIError: 400 for a prompt the engine refuses, 503 when the engine is shut down.
        """
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(i, queue)) for i in range(len(self.prompts))]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise _api_error(item)
                else:
                    self._account(i, item)
                    yield i, item
        finally:
            for task in tasks:  # each closes its engine stream, which aborts its request
                task.cancel()

    async def _pump(self, i: int, queue: asyncio.Queue) -> None:
        stream = self.model.llm.generate(self.prompts[i].engine_input(), self.params[i],
                                         f"{self.request_id}-{i}")
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as e:
            queue.put_nowait((i, e))

    def _account(self, i: int, out: RequestOutput) -> None:
        self._tokens[i] = sum(len(o.token_ids) for o in out.outputs)
        total = self.completion_tokens
        if total:
            self.ctx.on_first_token()
        self.ctx.completion_tokens = total
        self.admission.set_completion_tokens(total)
        if out.finished:
            self.finals[i] = out

    def settle(self, log_prompts: bool = False) -> None:
        """Bill what was produced and release the admission (idempotent)."""
        self.admission.settle()
        if log_prompts:
            self.ctx.prompt_text = [p.text for p in self.prompts]
            self.ctx.completion_text = [o.text for i in sorted(self.finals)
                                        for o in self.finals[i].outputs]


def _api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):  # the engine refused the request
        return APIError(400, str(e), code="invalid_request")
    return APIError(503, f"the engine is not accepting requests: {e}",
                    code="engine_unavailable", headers={"Retry-After": "5"})


async def run_to_end(request: Request, gen: Generation) -> None:
    """Run every prompt to completion, aborting if the client goes away first.

    Raises:
        APIError: from the engine; 503 if the requests were aborted by shutdown;
            499 (never seen by the client) if it disconnected.
    """
    async def consume():
        async for _ in gen.outputs():
            pass

    task = asyncio.create_task(consume())
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        gen.ctx.is_disconnected = True
        raise APIError(499, "client disconnected", code="client_disconnected")
    task.result()
    if not gen.is_complete:
        raise APIError(503, "the request was aborted: the server is shutting down",
                       code="aborted", headers={"Retry-After": "5"})


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def sse_events(gen: Generation, chunks: AsyncIterator[dict],
                     settle: Callable[[], None]) -> AsyncIterator[str]:
    """The stream's events: each chunk, an error event if the engine fails, then [DONE].
    The usage is settled (written to the ledger) before [DONE], so a client that has read
    the whole stream finds it billed; the response's close settles any other ending."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
        if not gen.is_complete:
            raise APIError(503, "the request was aborted: the server is shutting down",
                           code="aborted")
    except APIError as e:
        gen.ctx.error_code = e.code
        yield sse(e.body())
    except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream
        gen.ctx.is_disconnected = True
        raise
    settle()
    yield sse("[DONE]")


class SettlingStreamingResponse(StreamingResponse):
    """A StreamingResponse that calls on_close however it ends, even if it is cancelled
    before its body iterator ever starts (whose own finally would then never run)."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def stream_response(gen: Generation, chunks: AsyncIterator[dict],
                    on_close: Callable[[], None]) -> StreamingResponse:
    return SettlingStreamingResponse(sse_events(gen, chunks, on_close), on_close,
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})

