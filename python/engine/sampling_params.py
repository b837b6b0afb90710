"""Per-request sampling controls, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._check_int("n", self.n, minimum=1)
        self._check_number("temperature", self.temperature, 0.0, None)
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
