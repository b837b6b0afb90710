"""/v1/embeddings under the server's controls: keys and scopes, tokens-per-minute limits, the
usage ledger, /metrics and the access log (prompt tokens only), and concurrent requests run
off the event loop (batched, each answered correctly, /health answering meanwhile)."""

import re
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from engine import LLM
from engine.server.db import connect
from engine.server.ledger import Ledger
from server_utils import API_KEY, EMBEDDING_MODEL


@pytest.fixture(scope="module")
def server(embedding_server):
    return embedding_server[0]


@pytest.fixture(scope="module")
def secrets(embedding_server):
    return embedding_server[1]


def sdk(server, secret):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0,
                         timeout=120)


def metric(server, name: str, **labels) -> float:
    """One sample of /metrics (0 when absent)."""
    text = httpx.get(server.url + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) \
                == (want or ""):
            return float(m.group(3))
    return 0.0


def test_keys_and_scopes_apply(server, secrets):
    with pytest.raises(openai.AuthenticationError):
        sdk(server, "sk-not-a-real-key-000000000000000000000000").embeddings.create(
            model=EMBEDDING_MODEL, input="hi")
    with pytest.raises(openai.PermissionDeniedError) as e:
        sdk(server, secrets["emb-chat-only"]).embeddings.create(model=EMBEDDING_MODEL,
                                                                input="hi")
    assert e.value.code == "endpoint_not_allowed"


def test_tokens_per_minute_limit_counts_prompt_tokens(server, secrets):
    client = sdk(server, secrets["emb-tpm"])  # 60 tokens a minute
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBEDDING_MODEL, input="word " * 70)  # 72 tokens
    assert e.value.code == "tokens_exceed_tpm"
    first = client.embeddings.create(model=EMBEDDING_MODEL, input="word " * 38)
    assert first.usage.prompt_tokens == 40
    with pytest.raises(openai.RateLimitError) as e:
        client.embeddings.create(model=EMBEDDING_MODEL, input="word " * 38)
    assert int(e.value.response.headers["retry-after"]) >= 1


def test_ledger_metrics_and_access_log_count_prompt_tokens(server):
    labels = {"key": "api-key", "model": EMBEDDING_MODEL}
    before_in = metric(server, "engine_usage_input_tokens_total", **labels)
    before_requests = metric(server, "engine_usage_requests_total", **labels)
    before_ok = metric(server, "engine_http_requests_total", endpoint="/v1/embeddings",
                       status="200")
    r = httpx.post(server.url + "/v1/embeddings", timeout=120,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": EMBEDDING_MODEL, "input": ["one two three", "four"]})
    assert r.status_code == 200, r.text
    used = r.json()["usage"]["prompt_tokens"]
    assert used == 5 + 3
    assert metric(server, "engine_usage_input_tokens_total", **labels) == before_in + used
    assert metric(server, "engine_usage_requests_total", **labels) == before_requests + 1
    assert metric(server, "engine_usage_output_tokens_total", **labels) == 0
    assert metric(server, "engine_http_requests_total", endpoint="/v1/embeddings",
                  status="200") == before_ok + 1
    conn = connect(server.data_dir)
    rows = [row for row in Ledger(conn).rows("api-key") if row["model"] == EMBEDDING_MODEL]
    conn.close()
    assert sum(row["input_tokens"] for row in rows) == before_in + used
    assert sum(row["output_tokens"] for row in rows) == 0
    line = next(line for line in server.access_lines()
                if line["request_id"] == r.headers["x-request-id"])
    assert (line["endpoint"], line["status"], line["key"]) == ("/v1/embeddings", 200,
                                                                "api-key")
    assert (line["prompt_tokens"], line["completion_tokens"]) == (used, 0)
    assert "one two three" not in str(line)  # no prompt text without --log-prompts


def test_concurrent_requests_are_answered_and_health_stays_up(server, minilm_path):
    """Eight clients at once, one of them slow (hundreds of texts): every answer is its own
    inputs' embeddings, and /health answers while the slow one is still running."""
    big = [f"sentence number {i} about things that happen on day {i % 7}" for i in range(400)]
    small = [[f"client {c} says hello {k}" for k in range(3)] for c in range(7)]
    results, errors = {}, []
    batches_before = metric(server, "engine_embedding_batches_total")
    tokens_before = metric(server, "engine_prompt_tokens_total")

    def call(key, texts):
        try:
            r = httpx.post(server.url + "/v1/embeddings", timeout=300,
                           headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"model": EMBEDDING_MODEL, "input": texts,
                                 "encoding_format": "float"})
            assert r.status_code == 200, r.text
            results[key] = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    slow = threading.Thread(target=call, args=("big", big))
    slow.start()
    time.sleep(0.3)  # the big job first: the small ones queue behind it, then batch together
    others = [threading.Thread(target=call, args=(c, texts)) for c, texts in enumerate(small)]
    for t in others:
        t.start()
    start = time.monotonic()
    health = httpx.get(server.url + "/health", timeout=30)
    health_s = time.monotonic() - start
    big_running = slow.is_alive()
    for t in [slow, *others]:
        t.join(300)
    assert not errors, errors
    assert health.status_code == 200 and health_s < 2.0
    assert big_running, "the slow request ended before /health was asked: make it slower"
    reference = LLM(minilm_path, task="embed")
    np.testing.assert_allclose(results["big"], reference.embed(big), atol=1e-5)
    for c, texts in enumerate(small):
        np.testing.assert_allclose(results[c], reference.embed(texts), atol=1e-5)
    assert metric(server, "engine_num_waiting") == 0
    # the small requests queued behind the big one ran together, not one batch each
    assert metric(server, "engine_embedding_batches_total") - batches_before < 1 + len(small)
    tokens = sum(len(ids) for texts in [big, *small] for ids in reference.embedder.tokenize(texts))
    assert metric(server, "engine_prompt_tokens_total") - tokens_before == tokens
