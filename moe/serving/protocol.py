"""Request bodies of the OpenAI-compatible API (OpenAI's fields plus vLLM's extras), validated by
pydantic, and their translation into :class:`moe.SamplingParams`.

Unknown fields are ignored (as OpenAI's and vLLM's servers do), wrong types and ranges are
rejected with the field's name; the server turns both into a 400 in OpenAI's error shape.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..sampling_params import SamplingParams


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """The body of every error answer (:meth:`ApiError.body`); the OpenAPI document gives its schema."""
    error: ErrorInfo


class ApiError(Exception):
    """An error answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param
        self.type = type_ or {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                              429: "RateLimitError", 503: "ServiceUnavailableError"}.get(status, "InternalServerError")

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.status)
        return ErrorResponse(error=info).model_dump()


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class _SamplingFields(_Body):
    """Fields both endpoints share."""
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    cache_salt: str | None = None
    request_id: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo: the prompt back (and its log-probs), nothing new
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def _structured(req: _SamplingFields):
    """The request's structured-output constraint, or None. Imported lazily: only such requests
    need the grammar library."""
    spec: dict[str, Any] = {}
    field = "structured_outputs"
    if req.structured_outputs:
        spec = {k: v for k, v in req.structured_outputs.items() if v not in (None, False)}
    elif req.guided_json is not None:
        spec, field = {"json": req.guided_json}, "guided_json"
    elif req.guided_regex is not None:
        spec, field = {"regex": req.guided_regex}, "guided_regex"
    elif req.guided_choice is not None:
        spec, field = {"choice": req.guided_choice}, "guided_choice"
    elif req.response_format is not None and req.response_format.type != "text":
        field = "response_format"
        if req.response_format.type == "json_object":
            spec = {"json_object": True}
        else:
            schema = (req.response_format.json_schema or {}).get("schema")
            if schema is None:
                raise ApiError("response_format.json_schema.schema is required for type json_schema",
                               param="response_format")
            spec = {"json": schema}
    if not spec:
        return None
    from ..structured_output import StructuredOutputsParams

    try:
        return StructuredOutputsParams(**spec)
    except (TypeError, ValueError) as e:
        raise ApiError(f"invalid {field}: {e}", param=field) from e


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    try:
        return {int(k): float(v) for k, v in bias.items()}
    except ValueError as e:
        raise ApiError(f"logit_bias keys must be token ids (integers as strings): {e}", param="logit_bias") from e


def to_sampling_params(req: _SamplingFields, max_tokens: int | None, logprobs: int | None,
                       defaults: dict[str, Any] | None = None) -> SamplingParams:
    """SamplingParams for a request. A sampling field the request leaves unset takes the model's
    default (``defaults``: its generation_config.json's, see moe.sampling_params.generation_defaults),
    else SamplingParams'; the rest pass by their vLLM names."""
    defaults = defaults or {}
    kw: dict[str, Any] = dict(max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
                              stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
                              prompt_logprobs=req.prompt_logprobs, skip_special_tokens=req.skip_special_tokens,
                              include_stop_str_in_output=req.include_stop_str_in_output, seed=req.seed, n=req.n)
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        value = getattr(req, name)
        if value is None:
            value = defaults.get(name)
        if value is not None:
            kw[name] = value
    if getattr(req, "echo", False) and logprobs is not None and req.prompt_logprobs is None:
        kw["prompt_logprobs"] = logprobs  # the echoed prompt's tokens come with their log-probs (vLLM, OpenAI)
    bias = _logit_bias(req.logit_bias)
    if bias is not None:
        kw["logit_bias"] = bias
    structured = _structured(req)
    if structured is not None:
        kw["structured_outputs"] = structured
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise ApiError(str(e), param=sampling_param_of(str(e))) from e


def sampling_param_of(message: str) -> str | None:
    """The request field a validation message names (``SamplingParams.<field>=...``), for ``param``."""
    m = re.match(r"SamplingParams\.(\w+)=", message)
    return m.group(1) if m else None
