"""The official openai client against a real server: completions, chat, streaming, n > 1,
logprobs, stop, seeds, and errors as the SDK's exception classes."""

import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from server_utils import API_KEY, MODEL, error_of

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """The offline engine on the same weights: what the server must reproduce."""
    return LLM(smollm2_gguf, max_model_len=512, num_kv_blocks=128)


def count_tokens(api_server, **body) -> int:
    r = httpx.post(api_server.url + "/tokenize", json={"model": MODEL, **body},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["count"]


def test_completion_matches_the_offline_engine(client, reference, api_server):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    expected = reference.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8))[0]
    choice = r.choices[0]
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert choice.text == expected.outputs[0].text and "Paris" in choice.text
    assert choice.finish_reason == "length" and choice.index == 0
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids) == count_tokens(
        api_server, prompt=PROMPT)
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_token_id_prompts_and_prompt_lists(client, reference):
    ids = reference.get_tokenizer().encode(PROMPT)
    texts = client.completions.create(model=MODEL, prompt=[PROMPT, "1, 2, 3,"], max_tokens=4,
                                      temperature=0)
    assert [c.index for c in texts.choices] == [0, 1]
    assert texts.choices[0].text != texts.choices[1].text
    one = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert one.choices[0].text == texts.choices[0].text  # same tokens, text or ids
    many = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=4,
                                     temperature=0)
    assert [c.text for c in many.choices] == [texts.choices[0].text] * 2
    assert many.usage.prompt_tokens == 2 * len(ids) and many.usage.completion_tokens == 8


def test_chat_completion(client, reference, api_server):
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                       temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    expected = reference.chat([{"role": m["role"], "content": m["content"]
                                if isinstance(m["content"], str) else m["content"][0]["text"]}
                               for m in messages], SamplingParams(temperature=0, max_tokens=6))[0]
    assert choice.message.content == expected.outputs[0].text
    assert r.usage.prompt_tokens == count_tokens(api_server, messages=messages)
    assert r.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_max_completion_tokens_limits_chat(client):
    r = client.chat.completions.create(model=MODEL, max_completion_tokens=3, temperature=0,
                                       messages=[{"role": "user", "content": "Count to ten."}])
    assert r.usage.completion_tokens <= 3
    assert r.choices[0].finish_reason in ("length", "stop")


def test_streamed_completion_with_usage(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 3  # it streamed, not one lump
    assert "".join(c.choices[0].text for c in text_chunks) == plain.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in text_chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_streamed_chat_with_usage(client):
    messages = [{"role": "user", "content": "Say hello."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                           temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == plain.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_stream_without_include_usage_has_no_usage(client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3,
                                            stream=True))
    assert chunks and all(c.usage is None and c.choices for c in chunks)


def test_n_greater_than_one(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, n=3,
                                  temperature=1.0, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.text for c in r.choices}) >= 2  # three draws, not one copied
    chat = client.chat.completions.create(model=MODEL, n=2, max_tokens=4, temperature=1.0,
                                          seed=7, messages=[{"role": "user", "content": "Hi"}])
    assert sorted(c.index for c in chat.choices) == [0, 1]
    assert chat.usage.completion_tokens <= 8


def test_streamed_n_greater_than_one(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time",
                                            max_tokens=5, n=2, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts[0] == texts[1] and texts[0]  # greedy: both choices agree
    assert chunks[-1].usage.completion_tokens == 10


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, token, top in zip(lp.token_logprobs, lp.tokens, lp.top_logprobs):
        assert chosen <= 0 and len(top) == 3
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely
        assert top[token] == pytest.approx(chosen)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2,
                                       messages=[{"role": "user", "content": "Hi"}])
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    no_top = client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0,
                                            logprobs=True,
                                            messages=[{"role": "user", "content": "Hi"}])
    assert all(e.top_logprobs == [] for e in no_top.choices[0].logprobs.content)


def test_stop_strings(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert "." in full.choices[0].text  # " Paris.\n\nThe answer is:"
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                  stop=["."])
    assert r.choices[0].text == full.choices[0].text.split(".")[0]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                         temperature=0, stop="\n", stream=True)
    text = "".join(c.choices[0].text for c in streamed if c.choices)
    assert text == full.choices[0].text.split("\n")[0] and "\n" not in text


def test_seed_reproducibility(client):
    def draw(seed):
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                         temperature=1.0, seed=seed).choices[0].text

    first = draw(1234)
    assert draw(1234) == first
    assert any(draw(seed) != first for seed in (1, 2))


def test_extensions_top_k_min_p_repetition_penalty(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=1.0,
                                  seed=3, logprobs=1,
                                  extra_body={"top_k": 1, "min_p": 0.1,
                                              "repetition_penalty": 1.0})
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.choices[0].text == greedy.choices[0].text  # top_k=1 is greedy whatever the seed


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_tokenize_and_detokenize(api_server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(api_server.url + "/tokenize", json={"model": MODEL, "prompt": PROMPT},
                   headers=headers).json()
    assert r["count"] == len(r["tokens"]) == 5 and r["max_model_len"] == 512
    back = httpx.post(api_server.url + "/detokenize", json={"model": MODEL,
                                                            "tokens": r["tokens"]},
                      headers=headers).json()
    assert back == {"prompt": PROMPT}


def test_errors_are_the_sdk_exception_classes(client, api_server):
    bad_key = openai.OpenAI(base_url=api_server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert "gpt-4" in e.value.message and e.value.param == "model"
    long_prompt = "hi " * 600
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=1)
    assert e.value.code == "context_length_exceeded" and "512 tokens" in e.value.message
    n = count_tokens(api_server, prompt=long_prompt)
    assert f"requested {n + 1} tokens ({n} in the prompt, 1 for the completion)" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=1, temperature=-1,
                                       messages=[{"role": "user", "content": "hi"}])
    assert e.value.param == "temperature"


def test_embeddings_on_a_generation_model_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="hello")
    assert "generation model" in e.value.message and "embedding model" in e.value.message
    assert e.value.code == "model_not_embedding"


def test_missing_key_is_401_in_openai_shape(api_server):
    r = httpx.post(api_server.url + "/v1/completions",
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 401 and error_of(r)["code"] == "missing_api_key"
    r = httpx.get(api_server.url + "/v1/models", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401


def test_response_headers_carry_a_request_id(api_server):
    r = httpx.get(api_server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.headers["x-request-id"].startswith("req-")
