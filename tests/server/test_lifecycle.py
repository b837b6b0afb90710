"""Disconnects abort requests and free their KV blocks; a full queue is 503; SIGTERM is
graceful and flushes usage; keys and the ledger survive a restart."""

import os
import re
import threading
import time

import httpx
import pytest

from engine.cli import main as cli
from engine.server.db import connect
from engine.server.keys import KeyStore
from engine.server.ledger import Ledger
from server_utils import API_KEY, MODEL, error_of

# 480 tokens: over 10 s at this machine's best single-sequence speed (about 45 tokens/s)
LONG = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 480,
        "ignore_eos": True, "temperature": 0}
DEADLINE_S = 6


def engine_gauges(server) -> dict:
    text = httpx.get(server.url + "/metrics").text
    return {name: float(value) for name, value in
            re.findall(r"^engine_(num_running|kv_blocks_used|num_requests_in_flight) (\S+)$",
                       text, re.M)}


def wait_until_idle(server, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        gauges = engine_gauges(server)
        if all(v == 0 for v in gauges.values()) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.05)


def logged_lines(server) -> int:
    """Lines already in the server's access log (a restart on the same port appends)."""
    return len(server.access_lines()) if os.path.exists(server.access_log) else 0


def access_line(server, status: int, timeout_s: float = 5.0, since: int = 0) -> dict:
    """The last access-log line with this status, among those after the first `since`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [x for x in server.access_lines()[since:] if x["status"] == status]
        if lines:
            return lines[-1]
        time.sleep(0.05)
    raise AssertionError(f"no access line with status {status}")


def test_disconnected_stream_is_aborted_and_frees_its_blocks(api_server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=api_server.url, headers=headers, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            busy = engine_gauges(api_server)
            assert busy["num_running"] == 1 and busy["kv_blocks_used"] > 0
        # 480 tokens take over 10 s; the abort frees the blocks at once
        assert wait_until_idle(api_server, 3.0) == {"num_running": 0, "kv_blocks_used": 0,
                                                    "num_requests_in_flight": 0}
    assert access_line(api_server, 499)["stream"] is True


def test_disconnected_plain_request_is_aborted_and_frees_its_blocks(api_server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(api_server.url + "/v1/completions", json=LONG, headers=headers, timeout=1.5)
    assert wait_until_idle(api_server, 3.0)["kv_blocks_used"] == 0
    line = access_line(api_server, 499)
    # aborted before it could finish (a cold server may not have produced a token yet)
    assert line["stream"] is False and 0 <= line["completion_tokens"] < 480


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lifecycle")
    store = KeyStore(connect(str(path)))
    _, secret = store.create("k1", rpm=1000)
    store.conn.close()
    return path, secret


@pytest.fixture(scope="module")
def small_server(start_server, data_dir):
    """One sequence at a time and a queue of one: the third request finds the server full."""
    path, _ = data_dir
    return start_server(path, "--max-num-seqs", "1", "--max-queue", "1",
                        "--shutdown-timeout", str(DEADLINE_S),
                        "--max-model-len", "4096", "--num-kv-blocks", "256")


def post_in_thread(server, secret, body, results, name):
    def run():
        try:
            results[name] = httpx.post(server.url + "/v1/completions", json=body, timeout=60,
                                       headers={"Authorization": f"Bearer {secret}"})
        except httpx.HTTPError as e:
            results[name] = e
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_for_in_flight(server, count, done=(), timeout_s=20.0):
    """Until the engine holds `count` requests, less those already in `done`."""
    deadline = time.monotonic() + timeout_s
    while engine_gauges(server).get("num_requests_in_flight", 0) < count - len(done):
        assert time.monotonic() < deadline, f"never {count} requests in flight"
        time.sleep(0.02)


def test_full_queue_is_503_with_retry_after(small_server, data_dir):
    _, secret = data_dir
    results = {}
    body = {**LONG, "max_tokens": 100}  # long enough to still be running when the third comes
    threads = [post_in_thread(small_server, secret, body, results, name) for name in "ab"]
    wait_for_in_flight(small_server, 2)
    r = httpx.post(small_server.url + "/v1/completions", json=body,
                   headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert error_of(r)["code"] == "server_overloaded" and "capacity" in error_of(r)["message"]
    for t in threads:
        t.join()
    assert [results[n].status_code for n in "ab"] == [200, 200]  # the admitted ones finish


def test_sigterm_is_graceful_then_keys_and_ledger_survive_a_restart(small_server, data_dir,
                                                                    start_server):
    path, secret = data_dir
    ledger = Ledger(connect(str(path)))
    before = sum(row["output_tokens"] for row in ledger.rows("k1"))
    results = {}
    short = post_in_thread(small_server, secret, {**LONG, "max_tokens": 3}, results, "short")
    wait_for_in_flight(small_server, 1, results)  # short first; long queues behind it
    # 3000 tokens outlast the deadline even on a quiet machine (SmolLM2 decodes ~50-150 tok/s)
    long = post_in_thread(small_server, secret, {**LONG, "max_tokens": 3000}, results, "long")
    wait_for_in_flight(small_server, 2, results)
    start = time.monotonic()
    stopper = threading.Thread(target=lambda: results.update(exit=small_server.stop()))
    stopper.start()
    deadline = time.monotonic() + 3
    while True:  # it stops accepting at once
        try:
            httpx.get(small_server.url + "/health", timeout=2)
        except httpx.ConnectError:
            break
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    short.join()
    long.join()
    stopper.join()
    elapsed = time.monotonic() - start
    status = results["exit"]
    assert status == 0 and elapsed < DEADLINE_S + 8, (status, elapsed,
                                                      small_server.stderr()[-2000:])
    assert results["short"].status_code == 200  # in flight: finished
    aborted = results["long"]  # past the deadline: aborted, with an answer
    assert aborted.status_code == 503 and error_of(aborted)["code"] == "aborted"
    produced = results["short"].json()["usage"]["completion_tokens"]
    rows = ledger.rows("k1")
    after = sum(row["output_tokens"] for row in rows)
    assert after - before >= produced + 1  # both billed, the aborted one for what it made
    assert sum(row["num_requests"] for row in rows) >= 2

    restarted = start_server(path, "--log-prompts")
    seen = logged_lines(restarted)
    r = httpx.post(restarted.url + "/v1/completions", json={**LONG, "max_tokens": 3},
                   headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 200  # the key survived
    line = access_line(restarted, 200, since=seen)  # the operator asked for the text this time
    assert line["prompt"] == [LONG["prompt"]]
    assert line["completion"] == [r.json()["choices"][0]["text"]]
    wrong = httpx.get(restarted.url + "/v1/models", headers={"Authorization": "Bearer sk-x"})
    assert wrong.status_code == 401  # and auth is still on
    final = sum(row["output_tokens"] for row in ledger.rows("k1"))
    assert final == after + 3  # the ledger survived and goes on
    metrics = httpx.get(restarted.url + "/metrics").text
    assert f'engine_usage_output_tokens_total{{key="k1",model="{MODEL}"}} {float(final)}' \
        in metrics
    ledger.conn.close()


def test_serve_with_a_bad_model_exits_with_a_message(tmp_path, capsys):
    assert cli(["serve", str(tmp_path / "missing.gguf"), "--data-dir", str(tmp_path)]) == 2
    assert "is neither an existing path" in capsys.readouterr().err
