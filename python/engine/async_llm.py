"""The asyncio front end for servers: AsyncLLM(model).generate(prompt, params, request_id).

The engine loop runs on its own thread; the event loop never runs a step and the engine
thread never awaits. They meet through two queues: a thread-safe command queue into the
engine thread (add / abort / call / shutdown), and one asyncio.Queue per request back out,
filled with loop.call_soon_threadsafe. LLMEngine is not thread-safe: it is built, stepped
and aborted on the engine thread only.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from engine.engine import EngineConfig, LLMEngine
from engine.model.registry import DEFAULT_MODEL
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger("engine")

_END = object()  # the stream ends without a further output (abort, shutdown)


@dataclass(eq=False)  # compared by identity: a stream is one generate() call
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class AsyncLLM:
    """An engine on a background thread, driven from asyncio.

    Args:
        model: a Hugging Face folder, a .gguf file, or a packaged model's name.
        idle_wait_s: longest the idle engine thread sleeps on the command queue at a time.
        **engine_kwargs: EngineConfig fields (max_model_len, num_kv_blocks, ...).

    Raises:
        ValueError (or what loading raises): the engine could not be built.
    """

    def __init__(self, model: str = DEFAULT_MODEL, idle_wait_s: float = 1.0, **engine_kwargs):
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._idle_wait_s = idle_wait_s
        self._lock = threading.Lock()  # orders "is it open? then enqueue" against closing
        self._is_closed = False
        self._error: BaseException | None = None
        self.engine: LLMEngine | None = None  # touch it through run_in_engine() only
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(model, engine_kwargs, ready),
                                        name="engine-loop", daemon=True)
        self._thread.start()
        ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    # ---- public API (event loop side) -----------------------------------------------

    async def generate(self, prompt, sampling_params: SamplingParams | None,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield a RequestOutput each time it progresses.

        Outputs are cumulative (text and token_ids so far); the last one is finished.
        If the request is aborted (abort(), shutdown()) the stream just ends: the last
        output seen, if any, is not finished. If the consumer stops early (break, or its
        task is cancelled) the request is aborted and its KV blocks freed; wrap the stream
        in contextlib.aclosing() to have that happen at the break rather than when the
        event loop finalizes the abandoned generator.

        Args:
            prompt: text, a list of token ids, or {"prompt_token_ids": [...]}.
            sampling_params: None means SamplingParams().
            request_id: unique among requests in flight.

        Raises:
            ValueError: from LLMEngine.add_request (bad or too long prompt, id in use).
            RuntimeError: the engine is shut down or its loop failed.
        """
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._submit(("add", request_id, prompt, sampling_params or SamplingParams(), stream))
        is_done = False
        try:
            while True:
                item = await stream.queue.get()
                if item is _END:
                    is_done = True
                    return
                if isinstance(item, BaseException):
                    is_done = True
                    raise item
                is_done = item.finished
                yield item
                if is_done:
                    return
        finally:
            if not is_done:  # consumer left early: free the request's blocks now
                self._submit(("abort", request_id, stream), strict=False)

    async def abort(self, request_id: str) -> None:
        """Abort a request; the engine frees its blocks and its stream ends. Unknown or
        finished ids are ignored. Returns once the engine thread has done it."""
        await self.run_in_engine(lambda _: self._abort(request_id, None))

    async def run_in_engine(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps and return its result (or raise
        its exception). The only safe way to read engine state from outside."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._submit(("call", fn, loop, future))
        return await future

    def get_tokenizer(self):
        return self.engine.tokenizer

    @property
    def metrics(self):
        """The engine's EngineMetrics (thread-safe to read), or None if it keeps none."""
        return getattr(self.engine, "metrics", None)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._is_closed

    def shutdown(self) -> None:
        """Abort every request in flight (their streams end) and stop the engine thread.
        Idempotent; blocks until the current step is done."""
        self._submit(("shutdown",), strict=False)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.shutdown)

    def _submit(self, command: tuple, strict: bool = True) -> None:
        with self._lock:
            if not self._is_closed:
                self._commands.put(command)
                return
        if strict:
            raise RuntimeError("AsyncLLM is shut down" if self._error is None else
                               f"AsyncLLM: the engine loop failed: {self._error!r}")

    # ---- the engine thread ----------------------------------------------------------

    def _main(self, model: str, engine_kwargs: dict, ready: threading.Event) -> None:
        try:
            self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        except BaseException as e:  # re-raised by __init__ on the caller's thread
            self._error = e
            self._is_closed = True
            ready.set()
            return
        ready.set()
        try:
            self._loop()
        except BaseException as e:
            logger.exception("engine loop failed")
            self._error = e
        finally:
            self._close()

    def _loop(self) -> None:
        while True:
            is_busy = self.engine.has_unfinished_requests()
            commands = self._take_commands(block=not is_busy)
            for i, command in enumerate(commands):
                if command[0] == "shutdown":
                    for later in commands[i + 1:]:
                        _reject(later)
                    return
                self._handle(command)
            if self.engine.has_unfinished_requests():
                self._route(self.engine.step())

    def _take_commands(self, block: bool) -> list[tuple]:
        """What is queued now; when idle, first sleep until a command comes (or idle_wait_s)."""
        commands = []
        if block:
            try:
                commands.append(self._commands.get(timeout=self._idle_wait_s))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt, params, stream = command
            try:
                if request_id in self._streams:
                    raise ValueError(f"request id {request_id!r} is already in use")
                self.engine.add_request(request_id, prompt, params)
            except Exception as e:  # a caller's error: it belongs to that caller's stream
                stream.put(e)
                return
            self._streams[request_id] = stream
        elif kind == "abort":
            self._abort(command[1], command[2])
        elif kind == "call":
            _, fn, loop, future = command
            try:
                result, error = fn(self.engine), None
            except Exception as e:
                result, error = None, e
            _resolve(loop, future, result, error)

    def _abort(self, request_id: str, stream: _Stream | None) -> None:
        """Abort request_id; with a stream, only if it is still that stream's request."""
        current = self._streams.get(request_id)
        if current is None or (stream is not None and current is not stream):
            return
        del self._streams[request_id]
        self.engine.abort_request(request_id)
        current.put(_END)

    def _route(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _close(self) -> None:
        """Refuse new commands, end every stream, abort what is in flight."""
        with self._lock:
            self._is_closed = True
        error = self._error
        for request_id, stream in list(self._streams.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("abort of %r failed during shutdown", request_id)
            stream.put(_END if error is None else RuntimeError(f"engine loop failed: {error!r}"))
        self._streams.clear()
        while True:  # commands that raced with closing
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            _reject(command)


def _reject(command: tuple) -> None:
    """Answer a command that came too late: the engine thread is closing."""
    if command[0] == "add":
        command[4].put(RuntimeError("AsyncLLM is shut down"))
    elif command[0] == "call":
        _resolve(command[2], command[3], None, RuntimeError("AsyncLLM is shut down"))


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result, error) -> None:
    def settle():
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop is closed
        pass
