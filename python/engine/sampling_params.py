"""Per-request sampling controls, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

_FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class SamplingParams:
    """How to pick each new token and when to stop (the names vLLM and OpenAI use).

    Args:
        n: completions per prompt.
        temperature: 0 is greedy; higher flattens the distribution.
        top_p: keep the smallest set of tokens whose probability reaches top_p (1 = off).
        top_k: keep the k most probable tokens (0 or -1 = off).
        min_p: drop tokens below min_p times the top token's probability (0 = off).
        max_tokens: most new tokens to generate.
        stop: strings that end generation; they are not included in the text.
        stop_token_ids: token ids that end generation (besides EOS).
        seed: makes sampling reproducible for this request whatever else runs beside it.
        ignore_eos: keep generating after EOS.
        skip_special_tokens: leave special tokens out of the text.
        presence_penalty: subtract this from the logit of every token already generated
            (OpenAI; in [-2, 2], 0 = off).
        frequency_penalty: subtract this times the token's count in the output so far
            (OpenAI; in [-2, 2], 0 = off).
        repetition_penalty: divide positive (multiply negative) logits of tokens seen in the
            prompt or the output by this (CTRL / Hugging Face; > 0, 1 = off).
        logit_bias: token id -> value in [-100, 100] added to its logit before sampling.
            Ids are checked against the vocabulary by `check_vocab`.
        min_tokens: EOS and stop_token_ids cannot be drawn before this many new tokens.
        logprobs: return the log-probability of each generated token and of the top
            `logprobs` tokens at that position (0..20; None = off, 0 = the chosen token only).
        prompt_logprobs: the same for every prompt token after the first (0..20; None = off).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    MAX_LOGPROBS = 20

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._check_int("n", self.n, minimum=1)
        # finite, and representable as the float32 the sampler takes
        self._check_number("temperature", self.temperature, 0.0, _FLOAT32_MAX)
        self._check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        self._check_int("top_k", self.top_k, minimum=0)
        self._check_number("min_p", self.min_p, 0.0, 1.0)
        if self.max_tokens is not None:
            self._check_int("max_tokens", self.max_tokens, minimum=1)
        if self.seed is not None:
            self._check_int("seed", self.seed, minimum=None)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            self._check_int("stop_token_ids", t, minimum=0)
        self._check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self._check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        self._check_number("repetition_penalty", self.repetition_penalty, 0.0, None,
                           low_open=True)
        if self.repetition_penalty == float("inf"):
            raise ValueError("SamplingParams.repetition_penalty must be finite, got inf")
        self._check_logit_bias()
        self._check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"SamplingParams.min_tokens must be <= max_tokens "
                             f"({self.max_tokens}), got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                self._check_int(name, value, minimum=0)
                if value > self.MAX_LOGPROBS:
                    raise ValueError(f"SamplingParams.{name} must be <= {self.MAX_LOGPROBS}, "
                                     f"got {value}")

    def _check_logit_bias(self):
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"SamplingParams.logit_bias must be a dict of token id -> bias, "
                             f"got {type(self.logit_bias).__name__}")
        for token_id, bias in self.logit_bias.items():
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise ValueError(f"SamplingParams.logit_bias keys must be token ids "
                                 f"(integers >= 0), got {token_id!r}")
            self._check_number("logit_bias", bias, -100.0, 100.0)
        self.logit_bias = {t: float(b) for t, b in self.logit_bias.items()} or None

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError naming the first logit_bias or stop_token_ids id that is not
        in [0, vocab_size)."""
        for name, ids in (("logit_bias", self.logit_bias or {}),
                          ("stop_token_ids", self.stop_token_ids)):
            for t in ids:
                if not 0 <= t < vocab_size:
                    raise ValueError(f"SamplingParams.{name} token id {t} is out of the "
                                     f"vocabulary [0, {vocab_size})")

    @staticmethod
    def _check_int(name, value, minimum):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"SamplingParams.{name} must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise ValueError(f"SamplingParams.{name} must be >= {minimum}, got {value}")

    @staticmethod
    def _check_number(name, value, low, high, low_open=False):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"SamplingParams.{name} must be a number, got {value!r}")
        if value < low or (low_open and value == low) or (high is not None and value > high):
            bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
            raise ValueError(f"SamplingParams.{name} must be in {bounds}, got {value}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether presence, frequency or repetition penalty changes any logit."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)
