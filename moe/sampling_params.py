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


# generation_config.json keys that become default sampling parameters (vLLM's list); HF's
# max_new_tokens is our max_tokens. Other keys (do_sample, eos_token_id, ...) are not sampling
# defaults (the engine reads eos_token_id for its stop ids); do_sample is ignored as vLLM does.
GENERATION_DEFAULT_KEYS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "temperature", "top_k",
                           "top_p", "min_p", "max_new_tokens")


def generation_defaults(model_dir, source: str = "auto", override: dict | None = None) -> dict:
    """The default sampling parameters a model's authors wrote into its ``generation_config.json``,
    as ``SamplingParams`` keyword arguments: what a request or ``LLM.generate`` call leaves unset.

    ``source`` is ``"auto"`` (the checkpoint's file), ``"vllm"`` (none: the neutral defaults of
    :class:`SamplingParams`) or a directory holding a ``generation_config.json``; ``override``
    (a dict of the same keys) is laid over it. Values are checked here, with the file named."""
    import json
    from pathlib import Path

    names: list[str] = []  # where the values came from, for an error
    config: dict = {}
    if source != "vllm":
        path = Path(model_dir if source == "auto" else source)
        if path.is_dir():
            path = path / "generation_config.json"
        if source != "auto" and not path.is_file():
            raise ValueError(f"generation_config={source!r}: no generation_config.json there; give the directory "
                             "that holds one, 'auto' (the model's own) or 'vllm' (no model defaults)")
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ValueError(f"{path} is not readable JSON ({e}): fix it, or pass generation_config='vllm' "
                                 "to ignore it") from None
            if not isinstance(config, dict):
                raise ValueError(f"{path} must hold a JSON object: fix it, or pass generation_config='vllm'")
            names.append(str(path))
    if override:
        if not isinstance(override, dict):
            raise ValueError(f"override_generation_config={override!r} must be a dict such as {{\"temperature\": 0.6}}")
        unknown = sorted(set(override) - set(GENERATION_DEFAULT_KEYS))
        if unknown:
            raise ValueError(f"override_generation_config: {', '.join(unknown)}: not a sampling default; the keys are "
                             f"{', '.join(GENERATION_DEFAULT_KEYS)}")
        config = {**config, **override}
        names.append("override_generation_config")
    out = {k: config[k] for k in GENERATION_DEFAULT_KEYS if config.get(k) is not None}
    if "max_new_tokens" in out:
        out["max_tokens"] = out.pop("max_new_tokens")
    try:
        SamplingParams(**out)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the default sampling parameters from {' + '.join(names)} are invalid: {e}; fix them, or "
                         "pass generation_config='vllm' to ignore the model's") from None
    return out
