"""EngineMetrics with a synthetic clock: gauges, windowed rates, latencies, bounded memory."""

import threading

import pytest

from engine.metrics import EngineMetrics


class FakeClock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


def make(window_s=10.0, latency_window=4096):
    clock = FakeClock()
    return EngineMetrics(window_s=window_s, latency_window=latency_window, clock=clock), clock


def test_empty_snapshot_is_all_zeros():
    snap, _ = make()
    s = snap.snapshot()
    assert s["kv_cache_usage"] == 0.0 and s["prefix_cache_hit_rate"] == 0.0
    assert s["prefill_tokens_per_s"] == 0.0 and s["decode_tokens_per_s"] == 0.0
    assert s["ttft"] == {"count": 0, "mean": 0.0, "p50": 0.0, "p99": 0.0}
    assert s["itl"]["count"] == 0 and s["requests_finished"] == {}


def test_gauges_follow_the_last_step():
    m, clock = make()
    m.on_step(100, 0, 0.5, num_running=1, num_waiting=3, kv_blocks_used=10, kv_blocks_total=40)
    clock.t += 1
    m.on_step(0, 4, 0.1, num_running=4, num_waiting=0, kv_blocks_used=12, kv_blocks_total=40)
    s = m.snapshot()
    assert (s["num_running"], s["num_waiting"]) == (4, 0)
    assert (s["kv_blocks_used"], s["kv_blocks_total"]) == (12, 40)
    assert s["kv_cache_usage"] == pytest.approx(0.3)
    assert s["num_steps"] == 2 and s["total_step_seconds"] == pytest.approx(0.6)
    assert (s["total_prefill_tokens"], s["total_decode_tokens"]) == (100, 4)


def test_rates_cover_a_sliding_window():
    m, clock = make(window_s=10.0)
    # 20 s of steady work: one step a second, each 1 s long, 50 prefill + 10 decode tokens
    for _ in range(20):
        clock.t += 1.0
        m.on_step(50, 10, 1.0, 1, 0, 1, 10)
    s = m.snapshot()
    assert s["prefill_tokens_per_s"] == pytest.approx(50.0)
    assert s["decode_tokens_per_s"] == pytest.approx(10.0)
    assert (s["total_prefill_tokens"], s["total_decode_tokens"]) == (1000, 200)
    # idle for 5 s: half the window is empty, the rate halves; totals stay
    clock.t += 5.0
    assert m.snapshot()["decode_tokens_per_s"] == pytest.approx(5.0)
    clock.t += 10.0
    s = m.snapshot()
    assert s["decode_tokens_per_s"] == 0.0 and s["total_decode_tokens"] == 200


def test_rate_right_after_start_uses_the_time_since_the_first_step():
    m, clock = make(window_s=10.0)
    clock.t += 2.0
    m.on_step(0, 30, 2.0, 1, 0, 1, 10)  # began at t0, ended 2 s later
    assert m.snapshot()["decode_tokens_per_s"] == pytest.approx(15.0)


def test_ttft_and_itl_from_synthetic_times():
    m, _ = make()
    m.on_request_arrived("a", 0.0, num_prompt_tokens=7)
    m.on_request_arrived("b", 1.0, num_prompt_tokens=3)
    m.on_token("a", 0.5)            # ttft 0.5
    m.on_token("b", 1.25)           # ttft 0.25
    m.on_token("a", 0.6)            # itl 0.1
    m.on_token("a", 0.9)            # itl 0.3
    m.on_token("b", 1.45, num_tokens=2)  # itl 0.2 (n=2: two tokens at once)
    s = m.snapshot()
    assert s["ttft"]["count"] == 2 and s["ttft"]["mean"] == pytest.approx(0.375)
    assert s["ttft"]["p50"] == pytest.approx(0.375)
    assert s["itl"]["count"] == 3 and s["itl"]["mean"] == pytest.approx(0.2)
    assert s["itl"]["p50"] == pytest.approx(0.2) and s["itl"]["p99"] == pytest.approx(0.298)
    assert s["total_prompt_tokens"] == 10 and s["total_generation_tokens"] == 6
    assert s["num_requests_arrived"] == 2 and s["num_requests_in_flight"] == 2


def test_percentiles_over_many_samples():
    m, _ = make()
    m.on_request_arrived("r", 0.0)
    t = 0.0
    for i in range(1, 101):  # itls 0.01 .. 1.00 (first token gives the ttft)
        t += i / 100
        m.on_token("r", t)
    itl = m.snapshot()["itl"]
    assert itl["count"] == 99
    assert itl["p50"] == pytest.approx(0.51) and itl["p99"] == pytest.approx(0.9902)


def test_finished_requests_by_reason_and_state_released():
    m, _ = make()
    for rid, reason in [("a", "stop"), ("b", "length"), ("c", "stop"), ("d", "abort")]:
        m.on_request_arrived(rid, 0.0)
        m.on_token(rid, 1.0)
        m.on_request_finished(rid, reason)
    s = m.snapshot()
    assert s["requests_finished"] == {"stop": 2, "length": 1, "abort": 1}
    assert s["num_requests_in_flight"] == 0
    assert not m._arrival and not m._last_token
    # a token after the request finished opens no new ttft (no arrival known)
    m.on_token("a", 5.0)
    assert m.snapshot()["ttft"]["count"] == 4


def test_prefix_cache_hit_rate():
    m, _ = make()
    m.on_prefix_cache(100, 25)
    m.on_prefix_cache(100, 75)
    s = m.snapshot()
    assert s["prefix_cache_hit_rate"] == pytest.approx(0.5)
    assert (s["prefix_cache_query_tokens"], s["prefix_cache_hit_tokens"]) == (200, 100)
    with pytest.raises(ValueError, match="hit_tokens"):
        m.on_prefix_cache(10, 11)


def test_memory_is_bounded():
    m, clock = make(window_s=1.0, latency_window=64)
    m.on_request_arrived("r", 0.0)
    for i in range(10_000):
        m.on_token("r", i * 0.001)
        clock.t += 0.001
        m.on_step(0, 1, 0.001, 1, 0, 1, 1)
    m.snapshot()
    assert len(m._itl.recent) == 64 and m._itl.count == 9_999
    assert len(m._steps) <= 1001  # only the last second of steps remains


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="window_s"):
        EngineMetrics(window_s=0)
    with pytest.raises(ValueError, match="latency_window"):
        EngineMetrics(latency_window=0)
    m, _ = make()
    with pytest.raises(ValueError, match="on_step"):
        m.on_step(-1, 0, 0.1, 0, 0, 0, 1)


def test_concurrent_writers_and_readers():
    m = EngineMetrics()

    def writer(k):
        for i in range(2000):
            rid = f"{k}-{i % 10}"
            m.on_request_arrived(rid, 0.0)
            m.on_token(rid, 0.1)
            m.on_step(1, 1, 0.0, 1, 0, 1, 2)
            m.on_request_finished(rid, "stop")

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        m.snapshot()
    for th in threads:
        th.join()
    s = m.snapshot()
    assert s["num_steps"] == 8000 and s["requests_finished"] == {"stop": 8000}
    assert s["total_generation_tokens"] == 8000 and s["num_requests_in_flight"] == 0
