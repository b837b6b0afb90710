"""AsyncLLM on the real SmolLM2-135M-Instruct: streaming, concurrency, aborts, errors, shutdown.

Sync tests that each drive their coroutine with asyncio.run (no pytest-asyncio); one AsyncLLM
is shared by the module, across event loops.
"""

import asyncio
import contextlib
import os
import threading
import time

import pytest

from engine import LLM, SamplingParams
from engine.async_llm import AsyncLLM

ENGINE_KWARGS = dict(max_model_len=256, num_kv_blocks=64)


@pytest.fixture(scope="module")
def async_llm(smollm2_gguf):
    llm = AsyncLLM(smollm2_gguf, **ENGINE_KWARGS)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return LLM(smollm2_gguf, **ENGINE_KWARGS)


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


async def collect(async_llm, prompt, params, request_id):
    return [out async for out in async_llm.generate(prompt, params, request_id)]


async def engine_state(async_llm):
    """(free blocks, total blocks, has unfinished requests), read on the engine thread."""
    return await async_llm.run_in_engine(
        lambda e: (e.block_manager.num_free_blocks, e.num_blocks, e.has_unfinished_requests()))


async def wait_until_idle(async_llm, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        free, total, is_busy = await engine_state(async_llm)
        if (free == total and not is_busy) or time.monotonic() > deadline:
            return free, total, is_busy
        await asyncio.sleep(0.01)


def test_concurrent_generate_matches_llm_generate(async_llm, llm):
    prompts = ["The capital of France is", "1, 2, 3, 4,", {"prompt_token_ids": [504, 3575, 282]}]
    params = greedy(6)

    async def main():
        return await asyncio.gather(*(collect(async_llm, p, params, f"cc-{i}")
                                      for i, p in enumerate(prompts)))

    streams = asyncio.run(main())
    expected = llm.generate(prompts, params)
    for stream, ref in zip(streams, expected):
        last = stream[-1]
        assert last.finished and last.outputs[0].finish_reason == "length"
        assert last.outputs[0].token_ids == ref.outputs[0].token_ids
        assert last.outputs[0].text == ref.outputs[0].text
        assert last.prompt_token_ids == ref.prompt_token_ids


def test_stream_is_cumulative_and_only_the_last_is_finished(async_llm):
    outs = asyncio.run(collect(async_llm, "Once upon a time", greedy(5), "stream"))
    assert len(outs) == 5 and all(o.request_id == "stream" for o in outs)
    assert [o.finished for o in outs] == [False] * 4 + [True]
    for prev, cur in zip(outs, outs[1:]):
        p, c = prev.outputs[0], cur.outputs[0]
        assert c.token_ids[:len(p.token_ids)] == p.token_ids and len(c.token_ids) > len(p.token_ids)
        assert c.text.startswith(p.text)
    assert outs[-1].outputs[0].text == async_llm.get_tokenizer().decode(outs[-1].outputs[0].token_ids)


def test_break_with_aclosing_aborts_at_once(async_llm):
    async def main():
        seen = []
        async with contextlib.aclosing(
                async_llm.generate("Tell me a story", greedy(200), "brk-a")) as stream:
            async for out in stream:
                seen.append(out)
                if len(seen) == 2:
                    break
        # the abort was queued before this call, and the engine thread runs commands in order
        return seen, await engine_state(async_llm)

    seen, (free, total, is_busy) = asyncio.run(main())
    assert len(seen) == 2 and not seen[-1].finished
    assert free == total and not is_busy


def test_plain_break_aborts_when_the_generator_is_finalized(async_llm):
    async def main():
        seen = []
        async for out in async_llm.generate("Tell me a story", greedy(200), "brk-b"):
            seen.append(out)
            if len(seen) == 2:
                break
        return seen, await wait_until_idle(async_llm, timeout_s=5.0)

    seen, (free, total, is_busy) = asyncio.run(main())
    assert len(seen) == 2  # 200 tokens would take far longer than the 5 s waited
    assert free == total and not is_busy


def test_cancelled_consumer_aborts_its_request(async_llm):
    async def main():
        first = asyncio.Event()

        async def consume():
            async for _ in async_llm.generate("Tell me a story", greedy(200), "cancel"):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await engine_state(async_llm)

    free, total, is_busy = asyncio.run(main())
    assert free == total and not is_busy


def test_abort_from_another_task_ends_the_stream(async_llm):
    async def main():
        seen = []

        async def consume():
            async for out in async_llm.generate("Tell me a story", greedy(200), "abt"):
                seen.append(out)

        task = asyncio.create_task(consume())
        while not seen:
            await asyncio.sleep(0.005)
        await async_llm.abort("abt")
        await asyncio.wait_for(task, timeout=5.0)  # ends normally, no exception
        await async_llm.abort("abt")  # a second abort, or of an unknown id, is a no-op
        return seen, await engine_state(async_llm)

    seen, (free, total, is_busy) = asyncio.run(main())
    assert 1 <= len(seen) < 200 and not seen[-1].finished
    assert free == total and not is_busy


def test_add_request_errors_surface_from_generate(async_llm):
    async def main():
        with pytest.raises(ValueError, match="max_model_len"):
            await collect(async_llm, {"prompt_token_ids": [504] * 300}, greedy(4), "long")
        with pytest.raises(ValueError, match="empty"):
            await collect(async_llm, "", greedy(4), "empty")
        # the engine carries on, and the failed ids are free again
        return await collect(async_llm, "Hello", greedy(2), "long")

    outs = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 2


def test_duplicate_request_id_fails_only_the_newcomer(async_llm):
    async def main():
        first = async_llm.generate("Hello", greedy(3), "dup")
        out = await anext(first)  # "dup" is in flight now
        with pytest.raises(ValueError, match="already in use"):
            await collect(async_llm, "Hello", greedy(3), "dup")
        rest = [o async for o in first]
        return [out] + rest

    outs = asyncio.run(main())
    assert len(outs) == 3 and outs[-1].finished


def test_event_loop_stays_responsive_while_the_engine_works(async_llm):
    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        start = time.monotonic()
        outs = await collect(async_llm, "Tell me a story", greedy(20), "tick")
        elapsed = time.monotonic() - start
        stop.set()
        await task
        return outs, ticks, elapsed

    outs, ticks, elapsed = asyncio.run(main())
    assert outs[-1].finished
    # free, it ticks ~90% of elapsed / 10 ms; blocked by the steps, about once per output
    assert ticks >= max(5, int(elapsed / 0.01 * 0.3)), (ticks, elapsed)


def _thread_cpu_ticks(thread):
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_idle_engine_thread_does_not_spin(async_llm):
    asyncio.run(wait_until_idle(async_llm))
    before = _thread_cpu_ticks(async_llm._thread)
    time.sleep(0.5)
    assert _thread_cpu_ticks(async_llm._thread) - before <= 5  # clock ticks, 10 ms each


def test_run_in_engine_runs_on_the_engine_thread_and_raises(async_llm):
    async def main():
        name = await async_llm.run_in_engine(lambda e: threading.current_thread().name)
        with pytest.raises(ZeroDivisionError):
            await async_llm.run_in_engine(lambda e: 1 / 0)
        return name

    assert asyncio.run(main()) == "engine-loop"
    assert async_llm.metrics is getattr(async_llm.engine, "metrics", None)


def test_shutdown_ends_streams_and_refuses_new_requests(smollm2_gguf):
    async def main():
        async with AsyncLLM(smollm2_gguf, max_model_len=64, num_kv_blocks=8) as llm:
            seen = []

            async def consume():
                async for out in llm.generate("Tell me a story", greedy(60), "sd"):
                    seen.append(out)

            task = asyncio.create_task(consume())
            while not seen:
                await asyncio.sleep(0.005)
        await asyncio.wait_for(task, timeout=5.0)  # the stream ended with the engine
        assert not llm.is_running and not seen[-1].finished
        with pytest.raises(RuntimeError, match="shut down"):
            await collect(llm, "Hello", greedy(2), "late")
        llm.shutdown()  # idempotent

    asyncio.run(main())


def test_bad_engine_config_raises_from_the_constructor(smollm2_gguf):
    with pytest.raises(ValueError, match="block_size"):
        AsyncLLM(smollm2_gguf, block_size=0)
