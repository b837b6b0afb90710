"""Malformed requests, table-driven: each gets the right 4xx in OpenAI's error shape (never a
500), and the server keeps serving."""

import json

import httpx
import pytest

from server_utils import API_KEY, MODEL, error_of

C, CHAT, EMB = "/v1/completions", "/v1/chat/completions", "/v1/embeddings"
OK = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def body(**changes):
    return {**OK, **changes}


def chat(**changes):
    return {**OK_CHAT, **changes}


def without(base, field):
    return {k: v for k, v in base.items() if k != field}


def msgs(*messages):
    return chat(messages=list(messages))


# (id, path, JSON body or raw bytes, status, param or None)
CASES = [
    # the body itself
    ("not-json", C, b"{", 400, None),
    ("empty-body", C, b"", 400, None),
    ("json-array", C, b"[1, 2]", 400, None),
    ("json-string", C, b'"hello"', 400, None),
    ("invalid-utf8", C, b'{"model": "smollm2", "prompt": "\xff\xfe"}', 400, None),
    ("nan-literal", C, b'{"model": "smollm2", "prompt": "a", "temperature": NaN}', 400, None),
    ("deeply-nested", C, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    ("nested-in-field", C, body(prompt=json.loads("[" * 500 + "]" * 500)), 400, "prompt"),
    ("20mb-body", C, b'{"model": "smollm2", "prompt": "' + b"a" * (20 << 20) + b'"}', 413,
     None),
    # model
    ("missing-model", C, without(OK, "model"), 400, "model"),
    ("model-not-string", C, body(model=123), 400, "model"),
    ("unknown-model", C, body(model="gpt-5"), 404, "model"),
    # prompt
    ("missing-prompt", C, without(OK, "prompt"), 400, "prompt"),
    ("prompt-number", C, body(prompt=123), 400, "prompt"),
    ("prompt-empty-list", C, body(prompt=[]), 400, "prompt"),
    ("prompt-mixed-list", C, body(prompt=["a", 1]), 400, "prompt"),
    ("prompt-negative-id", C, body(prompt=[-1, 5]), 400, "prompt"),
    ("prompt-id-outside-vocab", C, body(prompt=[1, 10**9]), 400, "prompt"),
    ("prompt-empty-string", C, body(prompt=""), 400, "prompt"),
    ("prompt-over-context", C, body(prompt="hello " * 700), 400, "prompt"),
    # max_tokens
    ("max-tokens-negative", C, body(max_tokens=-5), 400, "max_tokens"),
    ("max-tokens-zero", C, body(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-huge", C, body(max_tokens=10**9), 400, "prompt"),
    ("max-tokens-string", C, body(max_tokens="16"), 400, "max_tokens"),
    ("max-tokens-float", C, body(max_tokens=1.5), 400, "max_tokens"),
    # sampling fields
    ("temperature-negative", C, body(temperature=-0.5), 400, "temperature"),
    ("temperature-too-high", C, body(temperature=3), 400, "temperature"),
    ("temperature-string", C, body(temperature="hot"), 400, "temperature"),
    ("temperature-bool", C, body(temperature=True), 400, "temperature"),
    ("top-p-above-one", C, body(top_p=1.5), 400, "top_p"),
    ("top-p-zero", C, body(top_p=0), 400, "top_p"),
    ("n-zero", C, body(n=0), 400, "n"),
    ("n-huge", C, body(n=1000), 400, "n"),
    ("stop-number", C, body(stop=5), 400, "stop"),
    ("stop-too-many", C, body(stop=[str(i) for i in range(17)]), 400, "stop"),
    ("stop-empty-string", C, body(stop=[""]), 400, "stop"),
    ("logit-bias-outside-vocab", C, body(logit_bias={"99999999": 1}), 400, "logit_bias"),
    ("logit-bias-bad-key", C, body(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit-bias-too-big", C, body(logit_bias={"5": 500}), 400, "logit_bias"),
    ("logprobs-too-many", C, body(logprobs=21), 400, "logprobs"),
    ("presence-penalty-range", C, body(presence_penalty=3), 400, "presence_penalty"),
    ("frequency-penalty-range", C, body(frequency_penalty=-3), 400, "frequency_penalty"),
    ("seed-string", C, body(seed="abc"), 400, "seed"),
    ("seed-too-big", C, body(seed=2**70), 400, "seed"),
    ("top-k-below-minus-one", C, body(top_k=-2), 400, "top_k"),
    ("repetition-penalty-zero", C, body(repetition_penalty=0), 400, "repetition_penalty"),
    ("min-tokens-over-max", C, body(min_tokens=5, max_tokens=2), 400, None),
    ("stop-token-outside-vocab", C, body(stop_token_ids=[10**8]), 400, "stop_token_ids"),
    ("unknown-field", C, body(foo=1), 400, "foo"),
    ("echo-true", C, body(echo=True), 400, "echo"),
    ("best-of-not-n", C, body(best_of=3), 400, "best_of"),
    ("stream-not-bool", C, body(stream="yes"), 400, "stream"),
    ("stream-options-without-stream", C, body(stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("too-many-choices", C, body(prompt=["a"] * 100, n=3), 400, "n"),
    # chat
    ("chat-no-messages", CHAT, without(OK_CHAT, "messages"), 400, "messages"),
    ("chat-empty-messages", CHAT, chat(messages=[]), 400, "messages"),
    ("chat-unknown-role", CHAT, msgs({"role": "wizard", "content": "hi"}), 400,
     "messages[0].role"),
    ("chat-message-not-object", CHAT, msgs("hello"), 400, "messages[0]"),
    ("chat-missing-content", CHAT, msgs({"role": "user"}), 400, "messages[0].content"),
    ("chat-content-number", CHAT, msgs({"role": "user", "content": 5}), 400,
     "messages[0].content"),
    ("chat-image-part", CHAT, msgs({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}), 400, "messages[0].content"),
    ("chat-tool-role", CHAT, msgs({"role": "tool", "content": "x", "tool_call_id": "1"}), 400,
     "messages[0].role"),
    ("chat-top-logprobs-alone", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("chat-top-logprobs-too-many", CHAT, chat(logprobs=True, top_logprobs=21), 400,
     "top_logprobs"),
    ("chat-logprobs-int", CHAT, chat(logprobs=3), 400, "logprobs"),
    ("chat-tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "tools"),
    ("chat-json-mode", CHAT, chat(response_format={"type": "json_object"}), 400,
     "response_format.type"),
    ("chat-max-completion-negative", CHAT, chat(max_completion_tokens=-1), 400,
     "max_completion_tokens"),
    ("chat-max-tokens-disagree", CHAT, chat(max_tokens=3, max_completion_tokens=4), 400,
     "max_completion_tokens"),
    ("chat-over-context", CHAT, msgs({"role": "user", "content": "hello " * 700}), 400,
     "messages"),
    # embeddings, tokenize, routes
    ("embeddings-generation-model", EMB, {"model": MODEL, "input": "hi"}, 400, "model"),
    ("embeddings-missing-input", EMB, {"model": MODEL}, 400, "input"),
    ("embeddings-bad-format", EMB, {"model": MODEL, "input": "hi", "encoding_format": "hex"},
     400, "encoding_format"),
    ("tokenize-both", "/tokenize", {"model": MODEL, "prompt": "a",
                                    "messages": [{"role": "user", "content": "b"}]}, 400,
     "prompt"),
    ("detokenize-outside-vocab", "/detokenize", {"model": MODEL, "tokens": [10**9]}, 400,
     "tokens"),
    ("unknown-route", "/v1/fine_tuning/jobs", {}, 404, None),
]


@pytest.fixture(scope="module")
def http(api_server):
    with httpx.Client(base_url=api_server.url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client


def test_the_table_is_big_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, path, payload, status, param", CASES, ids=[c[0] for c in CASES])
def test_malformed_request(http, name, path, payload, status, param):
    if isinstance(payload, bytes):
        r = http.post(path, content=payload, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=payload)
    assert r.status_code == status, (r.status_code, r.text[:500])
    error = error_of(r)
    if param is not None:
        assert error["param"] == param, error
    if status == 400:
        assert error["type"] == "invalid_request_error"


def test_wrong_method_is_405(http):
    r = http.get(C)
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


def test_context_errors_state_the_limit_and_the_count(http):
    r = http.post(C, json=body(prompt="hello " * 700))
    message = error_of(r)["message"]
    count = http.post("/tokenize", json={"model": MODEL, "prompt": "hello " * 700}).json()["count"]
    assert "512 tokens" in message and f"{count} in the prompt" in message
    r = http.post(C, json=body(max_tokens=10**9))
    assert "1000000" in error_of(r)["message"]


def test_the_server_keeps_serving_afterwards(http):
    for name, path, payload, *_ in CASES[:10]:  # the worst of the bodies, once more
        if isinstance(payload, bytes):
            http.post(path, content=payload)
    r = http.post(C, json={"model": MODEL, "prompt": "The capital of France is",
                           "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["text"]
    assert http.get("/health").json() == {"status": "ok"}
    metrics = http.get("/metrics").text
    assert 'status="500"' not in metrics
