"""Sampling parameters, validated on construction (vLLM's names and meanings)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .structured_output import StructuredOutputsParams


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    n: int = 1  # samples per prompt; they share the prompt's KV blocks (through the prefix cache)
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token already in the output
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output
    repetition_penalty: float = 1.0  # HF/vLLM: prompt and output tokens' logits / (if > 0) or * (if < 0) this
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    structured_outputs: StructuredOutputsParams | None = None
    _stop: tuple[str, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(field_: str, value, need: str) -> ValueError:
            return ValueError(f"SamplingParams.{field_}={value!r} is invalid: {need}")

        for name in ("temperature", "top_p", "min_p"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise bad(name, getattr(self, name), "must be a number")
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise bad(name, getattr(self, name), "must be a number")
        for name in ("top_k", "min_tokens", "n"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise bad(name, getattr(self, name), "must be an integer")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)):
            raise bad("max_tokens", self.max_tokens, "must be an integer or None")
        if self.temperature < 0:
            raise bad("temperature", self.temperature, "must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", self.top_k, "must be -1 or 0 (disabled) or a positive count")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "must be in [0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "must be at least 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"must not exceed max_tokens ({self.max_tokens})")
        if self.n < 1:
            raise bad("n", self.n, "must be at least 1 (the number of samples per prompt)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, getattr(self, name), "must be in [-2, 2]")
        if not self.repetition_penalty > 0 or self.repetition_penalty == float("inf"):
            raise bad("repetition_penalty", self.repetition_penalty, "must be a finite number > 0 (1 is off)")
        if self.logit_bias is not None:
            self.logit_bias = _checked_logit_bias(self.logit_bias, bad)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise bad("structured_outputs", self.structured_outputs, "must be a StructuredOutputsParams")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise bad(name, v, "must be >= 0 (the number of top log-probs to return)")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise bad("stop", self.stop, "must be non-empty strings")
        self._stop = tuple(stop)
        if self.stop_token_ids is not None and any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "must be non-negative token ids")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self._stop

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def processes_logits(self) -> bool:
        """Does sampling change the logits beyond temperature and filters (penalties, bias, a
        grammar)? Such requests are sampled from processed logits and never speculate."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or bool(self.logit_bias) or self.structured_outputs is not None)


def _checked_logit_bias(bias, bad) -> dict[int, float]:
    """Token ids (ints, or digit strings as JSON objects carry them) -> biases in [-100, 100]."""
    if not isinstance(bias, dict):
        raise bad("logit_bias", bias, "must be a dict of token id -> bias")
    out: dict[int, float] = {}
    for k, v in bias.items():
        if isinstance(k, str) and k.strip().lstrip("-").isdigit():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise bad("logit_bias", bias, f"key {k!r} is not a token id (a non-negative integer)")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise bad("logit_bias", bias, f"the bias of token {k} ({v!r}) must be a number in [-100, 100]")
        out[k] = float(v)
    return out
