"""/v1/embeddings on a real server running all-MiniLM-L6-v2, through the official openai
client and raw HTTP: float and base64, token-id inputs, usage, parity with the in-process
LLM(..., task="embed"), and errors as the SDK's exception classes."""

import base64

import httpx
import numpy as np
import openai
import pytest

from engine import LLM
from server_utils import API_KEY, EMBEDDING_MODEL, error_of

TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The sky is blue.",
         "Ein Mann isst.", "def f(x):\n    return x  # 🙂"]
LONG = "word " * 400  # 402 tokens with [CLS] and [SEP]; the model takes 256


@pytest.fixture(scope="module")
def server(embedding_server):
    return embedding_server[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def reference(minilm_path):
    """The in-process embedder on the same folder: what the server must reproduce."""
    return LLM(minilm_path, task="embed")


def vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    assert all(d.object == "embedding" for d in response.data)
    return np.array([d.embedding for d in response.data], np.float32)


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"})


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    cosine = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1)
                                           * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.99999


def test_sdk_default_and_float_match_the_in_process_model(client, reference, server):
    want = reference.embed(TEXTS)
    default = client.embeddings.create(model=EMBEDDING_MODEL, input=TEXTS)  # base64 inside
    as_float = client.embeddings.create(model=EMBEDDING_MODEL, input=TEXTS,
                                        encoding_format="float", user="someone")
    for r in (default, as_float):
        assert r.object == "list" and r.model == EMBEDDING_MODEL
        assert_same(vectors(r), want)
    tokenizer = reference.get_tokenizer()
    counts = [len(tokenizer.encode(t, add_special_tokens=True)) for t in TEXTS]
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == sum(counts)
    assert default.usage.prompt_tokens == sum(counts)
    tokenize = httpx.post(server.url + "/tokenize", json={"prompt": TEXTS[0]},
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert tokenize.json()["count"] == counts[0]


def test_base64_is_little_endian_float32(client, reference, server):
    want = reference.embed(TEXTS[:2])
    r = client.embeddings.create(model=EMBEDDING_MODEL, input=TEXTS[:2],
                                 encoding_format="base64")
    assert all(isinstance(d.embedding, str) for d in r.data)  # the SDK leaves it to us
    got = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in r.data])
    assert_same(got, want)
    raw = post(server, {"model": EMBEDDING_MODEL, "input": TEXTS[:2],
                        "encoding_format": "base64"})
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["usage"] == {"prompt_tokens": r.usage.prompt_tokens,
                             "total_tokens": r.usage.prompt_tokens}
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
                        for d in body["data"]])
    assert decoded.shape == (2, 384)
    assert_same(decoded, want)


def test_token_id_inputs(client, reference):
    ids = [reference.get_tokenizer().encode(t, add_special_tokens=True) for t in TEXTS[:3]]
    want = reference.embed(TEXTS[:3])
    one = client.embeddings.create(model=EMBEDDING_MODEL, input=ids[0],
                                   encoding_format="float")
    assert_same(vectors(one), want[:1])
    assert one.usage.prompt_tokens == len(ids[0])
    many = client.embeddings.create(model=EMBEDDING_MODEL, input=ids)
    assert_same(vectors(many), want)
    assert many.usage.prompt_tokens == sum(map(len, ids))
    bare = [7592, 2088]  # "hello world" without [CLS] / [SEP]: used exactly as given
    r = client.embeddings.create(model=EMBEDDING_MODEL, input=[bare])
    assert_same(vectors(r), reference.embed([bare]))
    assert r.usage.prompt_tokens == 2


def test_dimensions_must_be_the_models(client):
    r = client.embeddings.create(model=EMBEDDING_MODEL, input="hi", dimensions=384)
    assert len(r.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBEDDING_MODEL, input="hi", dimensions=128)
    assert e.value.status_code == 400 and e.value.param == "dimensions"
    assert "384" in e.value.message and "128" in e.value.message


def test_over_long_input_is_rejected_unless_truncation_is_asked(client, reference):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBEDDING_MODEL, input=["short", LONG])
    assert e.value.code == "context_length_exceeded" and e.value.param == "input[1]"
    assert "index 1" in e.value.message and "402" in e.value.message
    assert "256" in e.value.message
    r = client.embeddings.create(model=EMBEDDING_MODEL, input=["short", LONG],
                                 extra_body={"truncate_prompt_tokens": -1})
    assert_same(vectors(r), reference.embed(["short", LONG], truncate=True))
    assert r.usage.prompt_tokens == 3 + 256
    cut = client.embeddings.create(model=EMBEDDING_MODEL, input=LONG,
                                   extra_body={"truncate_prompt_tokens": 10})
    assert cut.usage.prompt_tokens == 10
    ids = reference.get_tokenizer().encode(LONG, add_special_tokens=True)
    assert_same(vectors(cut), reference.embed([ids[:9] + ids[-1:]]))  # [SEP] kept


def test_generation_endpoints_refuse_an_embedding_model(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=EMBEDDING_MODEL, prompt="Hello", max_tokens=2)
    assert e.value.code == "model_not_generation" and e.value.param == "model"
    assert "embedding model" in e.value.message and "/v1/completions" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=EMBEDDING_MODEL,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert e.value.code == "model_not_generation"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hi")
    card = client.models.retrieve(EMBEDDING_MODEL)
    assert card.id == EMBEDDING_MODEL and card.model_extra["embedding_dim"] == 384
    assert card.model_extra["max_model_len"] == 256


OK = {"model": EMBEDDING_MODEL, "input": "hello"}
# (id, body, param the error names)
BAD = [
    ("missing-input", {"model": EMBEDDING_MODEL}, "input"),
    ("missing-model", {"input": "hi"}, "model"),
    ("empty-string", {**OK, "input": ""}, "input"),
    ("empty-string-in-list", {**OK, "input": ["a", ""]}, "input[1]"),
    ("empty-list", {**OK, "input": []}, "input"),
    ("empty-id-list", {**OK, "input": [[1, 2], []]}, "input"),
    ("id-outside-vocab", {**OK, "input": [101, 30522]}, "input"),
    ("negative-id", {**OK, "input": [[101, -1]]}, "input"),
    ("input-number", {**OK, "input": 5}, "input"),
    ("input-object", {**OK, "input": {"text": "hi"}}, "input"),
    ("mixed-list", {**OK, "input": ["a", [101]]}, "input"),
    ("float-ids", {**OK, "input": [101.0, 102.0]}, "input"),
    ("bool-ids", {**OK, "input": [True, False]}, "input"),
    ("too-many-inputs", {**OK, "input": ["a"] * 2049}, "input"),
    ("format-hex", {**OK, "encoding_format": "hex"}, "encoding_format"),
    ("dimensions-zero", {**OK, "dimensions": 0}, "dimensions"),
    ("dimensions-string", {**OK, "dimensions": "384"}, "dimensions"),
    ("user-number", {**OK, "user": 7}, "user"),
    ("unknown-field", {**OK, "temperature": 0.5}, "temperature"),
    ("truncate-zero", {**OK, "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("truncate-over-limit", {**OK, "truncate_prompt_tokens": 257}, "truncate_prompt_tokens"),
    ("over-long-ids", {**OK, "input": [[101] * 257]}, "input[0]"),
]


@pytest.mark.parametrize("name,body,param", BAD, ids=[c[0] for c in BAD])
def test_bad_embedding_requests_are_400s_in_openais_shape(server, name, body, param):
    r = post(server, body)
    assert r.status_code == 400, r.text
    error = error_of(r)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_server_still_serves_after_bad_requests(server):
    r = post(server, OK)
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
