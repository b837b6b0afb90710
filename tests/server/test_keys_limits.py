"""Keys, scopes, rate limits, quotas and the ledger, against a real server whose keys are
changed from outside (the `engine keys` CLI) while it runs."""

import json
import threading
import time

import httpx
import openai
import pytest

from engine.cli import main as cli
from engine.server.db import connect
from engine.server.keys import KeyStore
from server_utils import MODEL, error_of

# USD per million tokens: a token in costs 0.001, a token out 0.002
PRICES = {MODEL: {"input_per_million": 1000.0, "output_per_million": 2000.0}}
KEYS = {
    "full": {},
    "chat-only": {"endpoints": ["chat", "models"]},
    "other-model": {"models": ["another-model"]},
    "rpm": {"rpm": 60},
    "tpm": {"tpm": 600},
    "quota": {"token_quota": 30},
    "quota-concurrent": {"token_quota": 40},
    "budget": {"budget_usd": 0.02},
    "ledger": {},
}


@pytest.fixture(scope="module")
def keyed(start_server, tmp_path_factory):
    """(server, name -> secret, status of a keyless request before any key existed): the
    server starts with no keys (no auth), then the keys are created beside it."""
    data_dir = tmp_path_factory.mktemp("keys")
    prices = data_dir / "prices.json"
    prices.write_text(json.dumps(PRICES))
    server = start_server(data_dir, "--price-table", str(prices))
    keyless = complete(server, None).status_code
    store = KeyStore(connect(str(data_dir)))
    secrets = {name: store.create(name, **spec)[1] for name, spec in KEYS.items()}
    store.conn.close()
    return server, secrets, keyless


def sdk(server, secret):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0, timeout=60)


def complete(server, secret, **body):
    return httpx.post(server.url + "/v1/completions", timeout=60,
                      headers={"Authorization": f"Bearer {secret}"} if secret else {},
                      json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2,
                            **body})


def keys_cli(server, capsys, *args) -> str:
    capsys.readouterr()
    assert cli(["keys", "--data-dir", server.data_dir, *args]) == 0
    return capsys.readouterr().out


def new_secret(output: str) -> str:
    return output.strip().splitlines()[-1]


def test_no_keys_means_no_auth_until_the_first_key(keyed):
    server, _, keyless = keyed
    assert keyless == 200  # before any key existed
    r = complete(server, None)
    assert r.status_code == 401  # the keys created since turned auth on, without a restart


def test_missing_wrong_and_malformed_keys_are_401(keyed):
    server, _, _ = keyed
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and error_of(r)["code"] == "missing_api_key"
    for secret in ("sk-" + "x" * 43, "not-a-key", "sk-short"):
        with pytest.raises(openai.AuthenticationError) as e:
            sdk(server, secret).models.list()
        assert e.value.code == "invalid_api_key"


def test_keys_created_revoked_and_rotated_while_running(keyed, capsys):
    server, _, _ = keyed
    secret = new_secret(keys_cli(server, capsys, "create", "--name", "late", "--rpm", "100"))
    assert secret.startswith("sk-")
    assert complete(server, secret).status_code == 200  # no restart needed
    rotated = new_secret(keys_cli(server, capsys, "rotate", "late"))
    r = complete(server, secret)
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert complete(server, rotated).status_code == 200
    keys_cli(server, capsys, "revoke", "late")
    with pytest.raises(openai.AuthenticationError) as e:
        sdk(server, rotated).completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert e.value.code == "revoked_api_key" and "late" in e.value.message
    listed = [json.loads(line) for line in keys_cli(server, capsys, "list").splitlines()]
    late = next(k for k in listed if k["name"] == "late")
    assert late["revoked_at"] and late["rpm"] == 100 and rotated not in json.dumps(listed)


def test_out_of_scope_is_403(keyed):
    server, secrets, _ = keyed
    chat_only = sdk(server, secrets["chat-only"])
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat_only.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert e.value.code == "endpoint_not_allowed" and "completions" in e.value.message
    r = chat_only.chat.completions.create(model=MODEL, max_tokens=1,
                                          messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.PermissionDeniedError):
        chat_only.embeddings.create(model=MODEL, input="hi")
    other = sdk(server, secrets["other-model"])
    with pytest.raises(openai.PermissionDeniedError) as e:
        other.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert e.value.code == "model_not_allowed" and e.value.param == "model"
    assert other.models.list().data == []  # it sees only the models it may use


def retry_after_s(response: httpx.Response) -> float:
    seconds = int(response.headers["retry-after"])
    ms = int(response.headers["retry-after-ms"])
    assert 1 <= seconds and 0 < ms <= seconds * 1000
    return ms / 1000


def test_rpm_limit_gives_429_with_a_retry_after_that_holds(keyed):
    server, secrets, _ = keyed
    headers = {"Authorization": f"Bearer {secrets['rpm']}"}  # 60 rpm: one a second
    with httpx.Client(base_url=server.url, headers=headers) as http:
        def tokenize():
            return http.post("/tokenize", json={"model": MODEL, "prompt": "hi"})

        start, num_ok = time.monotonic(), 0
        while (r := tokenize()).status_code == 200 and num_ok < 200:
            num_ok += 1
        elapsed = time.monotonic() - start
        assert r.status_code == 429 and 60 <= num_ok <= 60 + elapsed + 1, (num_ok, elapsed)
        error = error_of(r)
        assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
        wait = retry_after_s(r)
        assert wait <= 1.0
        if wait < 0.3:  # so little left that the next check could race it: spend one more
            time.sleep(wait)
            assert tokenize().status_code == 200
            wait = retry_after_s(r := tokenize())
        with pytest.raises(openai.RateLimitError) as e:  # the SDK's class, too
            sdk(server, secrets["rpm"]).completions.create(model=MODEL, prompt="hi",
                                                           max_tokens=1)
        time.sleep(retry_after_s(e.value.response))
        assert tokenize().status_code == 200  # recovered when it said


def test_tpm_limit_gives_429_with_a_retry_after_that_holds(keyed):
    server, secrets, _ = keyed
    secret = secrets["tpm"]  # 600 tokens a minute: 10 a second
    big_prompt = [504] * 450  # token ids: exact counts
    # the prefix cache makes the limited request below quick, so that little refills meanwhile
    assert complete(server, secrets["full"], prompt=big_prompt, max_tokens=1).status_code == 200
    big = complete(server, secret, prompt=big_prompt, max_tokens=1)
    assert big.status_code == 200 and big.json()["usage"]["total_tokens"] == 451
    # 149 tokens are left (plus the refill since): 179 are 30 short, 3 s of refill
    r = complete(server, secret, prompt=[1812] * 179, max_tokens=1)
    assert r.status_code == 429, r.text
    error = error_of(r)
    assert error["type"] == "tokens" and "600 tokens per minute" in error["message"]
    wait = retry_after_s(r)
    assert wait <= 3.0
    time.sleep(wait)
    r = complete(server, secret, prompt=[1812] * 179, max_tokens=1)
    assert r.status_code == 200, r.text  # recovered when it said
    too_big = complete(server, secret, prompt=[[504] * 400, [504] * 300], max_tokens=1)
    assert too_big.status_code == 400 and error_of(too_big)["code"] == "tokens_exceed_tpm"


def test_exhausted_token_quota_gives_429(keyed):
    server, secrets, _ = keyed
    total = 0
    for _ in range(10):
        r = complete(server, secrets["quota"], max_tokens=10, ignore_eos=True)
        if r.status_code != 200:
            break
        total += r.json()["usage"]["total_tokens"]
    assert r.status_code == 429 and error_of(r)["code"] == "insufficient_quota"
    assert "retry-after" not in r.headers  # waiting does not bring a spent quota back
    prompt_tokens = complete(server, secrets["full"]).json()["usage"]["prompt_tokens"]
    assert total + prompt_tokens > 30  # refused only when the prompt no longer fits
    assert total <= 30 + 10  # overrun by at most one request's max_tokens
    with pytest.raises(openai.RateLimitError) as e:
        sdk(server, secrets["quota"]).completions.create(model=MODEL, prompt="Once upon a time",
                                                         max_tokens=1)
    assert e.value.code == "insufficient_quota"


def test_concurrent_requests_cannot_overrun_a_quota(keyed):
    server, secrets, _ = keyed
    results = []

    def one():
        results.append(complete(server, secrets["quota-concurrent"], max_tokens=10,
                                ignore_eos=True))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 429]
    assert len(ok) + len(refused) == 6 and refused and ok
    assert {error_of(r)["code"] for r in refused} <= {"quota_reserved", "insufficient_quota"}
    used = sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert used <= 40 + 10


def test_budget_under_the_price_table(keyed, capsys):
    server, secrets, _ = keyed
    spent = 0.0
    for _ in range(10):
        r = complete(server, secrets["budget"], max_tokens=5, ignore_eos=True)
        if r.status_code != 200:
            break
        u = r.json()["usage"]
        spent += u["prompt_tokens"] * 0.001 + u["completion_tokens"] * 0.002
    assert r.status_code == 429 and error_of(r)["code"] == "insufficient_quota"
    assert "USD" in error_of(r)["message"]
    prompt_cost = complete(server, secrets["full"]).json()["usage"]["prompt_tokens"] * 0.001
    assert spent + prompt_cost > 0.02 and spent <= 0.02 + 5 * 0.002 + 1e-9
    rows = json.loads(keys_cli(server, capsys, "usage", "budget", "--json"))
    assert sum(row["cost_usd"] for row in rows) == pytest.approx(spent)


def test_ledger_equals_the_usage_returned(keyed, capsys):
    server, secrets, _ = keyed
    client = sdk(server, secrets["ledger"])
    usages = [
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=3).usage,
        client.completions.create(model=MODEL, prompt=["a b", "c d e"], max_tokens=2,
                                  n=2).usage,
        client.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": "Hi"}]).usage,
    ]
    stream = client.chat.completions.create(model=MODEL, max_tokens=5, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Yo"}])
    usages.append([c for c in stream][-1].usage)
    rows = json.loads(keys_cli(server, capsys, "usage", "ledger", "--json"))
    assert len(rows) == 1 and rows[0]["model"] == MODEL and rows[0]["num_requests"] == 4
    assert rows[0]["input_tokens"] == sum(u.prompt_tokens for u in usages)
    assert rows[0]["output_tokens"] == sum(u.completion_tokens for u in usages)
    assert rows[0]["cost_usd"] == pytest.approx(
        sum(u.prompt_tokens * 0.001 + u.completion_tokens * 0.002 for u in usages))
    table = keys_cli(server, capsys, "usage", "ledger")
    assert "ledger" in table and str(rows[0]["output_tokens"]) in table
    metrics = httpx.get(server.url + "/metrics").text
    line = f'engine_usage_output_tokens_total{{key="ledger",model="{MODEL}"}}'
    assert f"{line} {float(rows[0]['output_tokens'])}" in metrics


def test_access_log_names_the_key_and_never_the_text(keyed):
    server, secrets, _ = keyed
    r = complete(server, secrets["full"], prompt="a very secret prompt", max_tokens=2)
    request_id = r.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [line for line in server.access_lines() if line["request_id"] == request_id]
        if lines:
            break
        time.sleep(0.05)
    (line,) = lines
    assert line["key"] == "full" and line["model"] == MODEL and line["status"] == 200
    assert line["endpoint"] == "/v1/completions"
    assert line["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert line["completion_tokens"] == 2 and 0 < line["ttft_s"] <= line["latency_s"]
    with open(server.access_log) as f:
        text = f.read()
    assert "secret prompt" not in text and secrets["full"] not in text
    assert "prompt" not in line and "completion" not in line
