"""Request bodies, as OpenAI documents them, validated strictly.

Strict types ("16" is not an integer, true is not a number) and unknown fields rejected, as
OpenAI does ("Unrecognized request argument supplied"). Union-typed fields (prompt, stop,
content, input) have validators of their own so that their errors name one expectation.
Ranges that depend on the model (token ids, context length) are checked by the handlers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

MAX_STOP = 16        # OpenAI allows 4; more costs a little per token
MAX_LOGPROBS = 20    # SamplingParams.MAX_LOGPROBS
MAX_N = 128          # OpenAI's limit


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_prompt(value: Any) -> str | list:
    """A string, a list of strings, a list of token ids or a list of lists of token ids."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return value
        if all(_is_token(v) for v in value):
            return value
        if all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value):
            return value
    raise ValueError("expected a string, a non-empty list of strings, a non-empty list of token "
                     "ids (integers >= 0) or a non-empty list of such lists")


def _check_stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or len(value) > MAX_STOP
            or not all(isinstance(s, str) and s for s in value)):
        raise ValueError(f"expected a non-empty string or a list of at most {MAX_STOP} "
                         "non-empty strings")
    return value


def _check_content(value: Any) -> str:
    """A string, or a list of text parts ({"type": "text", "text": ...}) joined by newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"part {i} has type {kind!r}; only text parts "
                                 "({'type': 'text', 'text': ...}) are supported")
            if set(part) != {"type", "text"} or not isinstance(part["text"], str):
                raise ValueError(f"part {i} must be exactly {{'type': 'text', 'text': <string>}}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError("expected a string or a non-empty list of text parts")


def _check_logit_bias(value: Any) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("expected an object mapping token ids (as strings) to biases")
    out = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ValueError(f"key {key!r} is not a token id (a string of digits)")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) \
                or not -100 <= bias <= 100:
            raise ValueError(f"bias of token {key} must be a number in [-100, 100], got {bias!r}")
        out[int(key)] = float(bias)
    return out


def _unsupported(what: str):
    """A field this server accepts only empty (None, false, [], "none")."""
    def check(value: Any) -> None:
        if value in (None, False, [], "none"):
            return None
        raise ValueError(f"{what} is not supported by this server")
    return Annotated[Any, PlainValidator(check)]


NoEcho = _unsupported("echo")
NoSuffix = _unsupported("suffix")
NoTools = _unsupported("tools (function calling)")
NoToolChoice = _unsupported("tool_choice other than 'none'")
Prompt = Annotated[Any, PlainValidator(_check_prompt)]
Stop = Annotated[Any, PlainValidator(_check_stop)]
Content = Annotated[Any, PlainValidator(_check_content)]
LogitBias = Annotated[Any, PlainValidator(_check_logit_bias)]
Seed = Annotated[int, Field(ge=-(1 << 63), lt=1 << 64)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Content
    name: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text"]


class _Sampling(_Strict):
    """Fields that completions and chat share, with OpenAI's ranges and vLLM's extensions."""
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: LogitBias = None
    seed: Seed | None = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    skip_special_tokens: bool = True


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: NoEcho = False
    suffix: NoSuffix = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: NoTools = None
    tool_choice: NoToolChoice = None
    parallel_tool_calls: bool | None = None
    store: Literal[False] | None = None
    metadata: dict[str, str] | None = None


class EmbeddingRequest(_Strict):
    """OpenAI's fields, and vLLM's truncate_prompt_tokens (-1: the model's maximum)."""
    model: str
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)


class TokenizeRequest(_Strict):
    """Exactly one of prompt (text) or messages (rendered with the chat template)."""
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]
