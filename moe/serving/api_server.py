"""The OpenAI-compatible HTTP server (FastAPI), a thin layer over :class:`AsyncLLM`.

Endpoints: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /tokenize,
/detokenize, /version. Shapes follow OpenAI's API as vLLM serves it, so unmodified OpenAI clients
and ``vllm bench serve`` work. Errors use OpenAI's ``{"error": {...}}`` body.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .. import __version__
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .async_llm import AsyncLLM, EngineDeadError, RequestAborted, RequestError
from .metrics import ServerMetrics
from .protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
    sampling_param_of,
    to_sampling_params,
)
from .streaming import (
    SSE_DONE,
    ChoiceStream,
    chat_logprobs,
    completion_logprobs,
    merge,
    sse,
)


@dataclass
class ServerConfig:
    model_path: str
    served_model_names: list[str]
    api_key: str | None = None
    max_queued_requests: int = 1024
    health_step_timeout: float = 60.0  # busy but no step completed for this long: /health is 503
    disconnect_poll_s: float = 0.1


class ServerState:
    def __init__(self, llm: AsyncLLM, config: ServerConfig):
        self.llm, self.config = llm, config
        self.engine = llm.engine
        self.tokenizer = llm.engine.tokenizer
        self.max_model_len = llm.engine.max_model_len
        self.metrics = ServerMetrics(llm, config.served_model_names[0])
        self.draining = False
        self.created = int(time.time())


# ---- errors ----------------------------------------------------------------------------------
def error_response(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> ApiError:
    errs = exc.errors()
    if not errs:
        return ApiError("invalid request body")
    first = errs[0]
    if first.get("type") == "json_invalid":
        return ApiError(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}",
                        param="body")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    return ApiError(f"invalid field {where!r}: {first.get('msg')} (got {first.get('input')!r})", param=param)


class _ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` on /v1/*. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware would hide client disconnects from ``request.is_disconnected()``."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if auth != self.expected:
                response = error_response(ApiError("invalid API key: send 'Authorization: Bearer <key>'", 401))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- the app ---------------------------------------------------------------------------------
# What the OpenAPI document (/openapi.json) says each route answers, as it answers: errors in OpenAI's
# shape with 4xx / 5xx statuses (a malformed body is a 400 here, not FastAPI's 422), generation as
# JSON or, with "stream": true, as server-sent events.
_ERRORS: dict = {"4XX": {"model": ErrorResponse, "description": "the request cannot be served as sent"},
                 "5XX": {"model": ErrorResponse, "description": "the engine failed, is dead or is shutting down"}}
_GENERATION = {**_ERRORS, 200: {"description": "the completion; with stream: server-sent events",
                                "content": {"application/json": {}, "text/event-stream": {}}}}
_HEALTH = {200: {"description": "ready (empty body)"},
           503: {"description": "dead, stalled or draining: a JSON body says which",
                 "content": {"application/json": {"schema": {"type": "object"}}}}}


def build_app(llm: AsyncLLM, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="moe OpenAI-compatible server", version=__version__)
    state = ServerState(llm, config)
    app.state.server = state

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        return error_response(_validation_error(e))

    if config.api_key is not None:
        app.add_middleware(_ApiKeyMiddleware, api_key=config.api_key)

    @app.get("/health", response_class=Response, responses=_HEALTH)
    async def health():
        if llm.dead is not None:
            return JSONResponse({"status": "dead", "error": str(llm.dead)}, status_code=503)
        stalled = time.monotonic() - llm.last_step_time
        if llm.busy and stalled > config.health_step_timeout:
            return JSONResponse({"status": "stalled", "seconds_since_last_step": round(stalled, 1)}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", responses=_ERRORS)
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "moe", "root": config.model_path,
             "parent": None, "max_model_len": state.max_model_len, "permission": []}
            for name in config.served_model_names]}

    @app.post("/tokenize", responses=_ERRORS)
    async def tokenize(req: TokenizeRequest):
        _check_model(state, req.model)
        if req.messages is not None:
            text = _chat_prompt(state, req.messages, req.add_generation_prompt)
        elif req.prompt is not None:
            text = req.prompt
        else:
            raise ApiError("give 'prompt' or 'messages'", param="prompt")
        ids = _tokenizer(state).encode(text, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.post("/detokenize", responses=_ERRORS)
    async def detokenize(req: DetokenizeRequest):
        _check_model(state, req.model)
        _check_ids(state, req.tokens, "tokens")
        return {"prompt": _tokenizer(state).decode(req.tokens, skip_special_tokens=False)}

    @app.post("/v1/completions", responses=_GENERATION)
    async def completions(req: CompletionRequest, request: Request):
        _admit(state)
        _check_model(state, req.model)
        if req.max_tokens == 0 and not req.echo:
            raise ApiError("max_tokens=0 generates nothing: it needs echo (the prompt back, with logprobs its "
                           "log-probs); else ask for at least 1", param="max_tokens")
        prompts = _completion_prompts(state, req.prompt)
        # echo with max_tokens 0 (vLLM's echo without generation): one token is run and left out of the answer
        plist = _prepare(state, req, prompts, 1 if req.max_tokens == 0 else req.max_tokens, req.logprobs)
        return await _respond(state, request, req, prompts, plist, chat=False, logprobs_n=req.logprobs)

    @app.post("/v1/chat/completions", responses=_GENERATION)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        _admit(state)
        _check_model(state, req.model)
        text = _chat_prompt(state, req.messages, req.add_generation_prompt)
        prompts = [(text, _tokenizer(state).encode(text))]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        n_lp = (req.top_logprobs or 0) if req.logprobs else None
        plist = _prepare(state, req, prompts, max_tokens, n_lp)
        return await _respond(state, request, req, prompts, plist, chat=True, logprobs_n=n_lp)

    return app


# ---- request preparation ---------------------------------------------------------------------
def _tokenizer(state: ServerState):
    if state.tokenizer is None:
        raise ApiError("this checkpoint has no tokenizer.json: send prompts as token ids", param="prompt")
    return state.tokenizer


def _admit(state: ServerState) -> None:
    """Refuse before any tokenizing when the server cannot take the request."""
    if state.llm.dead is not None:
        raise ApiError(f"the engine is dead: {state.llm.dead}", 503)
    if state.draining:
        raise ApiError("the server is shutting down and admits no new requests", 503)
    if state.llm.num_unstarted >= state.config.max_queued_requests:
        raise ApiError(f"the server is overloaded: {state.config.max_queued_requests} requests are already "
                       "waiting (--max-queued-requests); retry later", 429)


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in state.config.served_model_names:
        raise ApiError(f"the model {model!r} does not exist; this server serves "
                       f"{state.config.served_model_names}", 404, param="model")


def _check_ids(state: ServerState, ids: list[int], param: str) -> None:
    vocab = state.engine.model_config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ApiError(f"token id(s) {bad[:5]} are outside the vocabulary [0, {vocab})", param=param)


def _completion_prompts(state: ServerState, prompt) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if not items:
        raise ApiError("the prompt is empty", param="prompt")
    out = []
    for p in items:
        if isinstance(p, str):
            out.append((p, _tokenizer(state).encode(p)))
        else:
            _check_ids(state, p, "prompt")
            text = state.tokenizer.decode(p, skip_special_tokens=False) if state.tokenizer is not None else None
            out.append((text, list(p)))
    return out


def _chat_prompt(state: ServerState, messages: list[dict], add_generation_prompt: bool) -> str:
    flat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ApiError(f"messages[{i}] needs a 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: only text is supported
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ApiError(f"messages[{i}].content: only text parts are supported", param="messages")
                parts.append(part.get("text", ""))
            content = "".join(parts)
        flat.append({**m, "content": content if content is not None else ""})
    try:
        return _tokenizer(state).apply_chat_template(flat, add_generation_prompt=add_generation_prompt)
    except ValueError as e:
        raise ApiError(f"{e} (this server has no usable chat template: start it with --chat-template FILE)",
                       param="messages") from e


def _prepare(state: ServerState, req, prompts: list[tuple[str | None, list[int]]], max_tokens: int | None,
             logprobs: int | None) -> list[SamplingParams]:
    """One SamplingParams per prompt (max_tokens defaults to what fits), after the length checks."""
    limit = state.max_model_len
    defaults = state.engine.default_sampling_params
    plist = []
    for _, ids in prompts:
        if not ids:
            raise ApiError("the prompt is empty: give at least one token", param="prompt")
        if len(ids) >= limit:
            raise ApiError(f"the prompt has {len(ids)} tokens but this model's maximum context length "
                           f"(max_model_len) is {limit}: shorten the prompt", param="prompt")
        # unset: the model's default (generation_config.json's max_new_tokens) if it fits, else what
        # fits in the context and in the whole KV cache
        room = min(limit, state.engine.kv_cache_tokens) - len(ids)
        want = max_tokens if max_tokens is not None else min(defaults.get("max_tokens", room), room)
        if want < 1:
            raise ApiError(f"the prompt has {len(ids)} tokens and the KV cache holds {state.engine.kv_cache_tokens}: "
                           "no room for an output token; shorten the prompt", param="prompt")
        if len(ids) + want > limit:
            raise ApiError(f"this model's maximum context length (max_model_len) is {limit} tokens, but {len(ids)} "
                           f"prompt tokens + max_tokens {want} = {len(ids) + want}: lower max_tokens or shorten "
                           "the prompt", param="max_tokens")
        if len(ids) + want > state.engine.kv_cache_tokens:
            raise ApiError(f"the request needs {len(ids) + want} tokens of KV cache but the cache holds "
                           f"{state.engine.kv_cache_tokens}: lower max_tokens", param="max_tokens")
        plist.append(to_sampling_params(req, want, logprobs, defaults))
    return plist


# ---- answering -------------------------------------------------------------------------------
async def _respond(state: ServerState, request: Request, req, prompts, plist, chat: bool, logprobs_n):
    base = request.headers.get("x-request-id") or req.request_id or uuid.uuid4().hex
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{base}"
    unique = uuid.uuid4().hex[:8]  # a client may reuse its request id; the engine's must be unique
    gens = []
    for i, ((text, ids), params) in enumerate(zip(prompts, plist)):
        prompt: dict[str, Any] = {"prompt_token_ids": ids, "prompt": text}
        if req.cache_salt is not None:
            prompt["cache_salt"] = req.cache_salt
        try:
            gen = state.llm.generate(prompt, params, f"{rid}-{i}-{unique}", stream=bool(req.stream))
        except Exception as e:
            for j in range(i):  # the prompts queued before this one: nobody will read them
                state.llm.abort(f"{rid}-{j}-{unique}")
            raise _exception_to_api(e) from e
        gens.append(_tracked(state, gen))
    answer = _Answer(state, req, prompts, rid, chat, logprobs_n)
    if req.stream:
        return StreamingResponse(answer.stream(merge(gens)), media_type="text/event-stream")
    return await _unless_disconnected(request, answer.full(merge(gens)), state.config.disconnect_poll_s)


async def _tracked(state: ServerState, gen: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """The request's outputs, observed by the metrics on the way."""
    tracker = state.metrics.tracker()
    done = False
    try:
        async for out in gen:
            tracker.observe(out)
            done = out.finished
            yield out
    finally:
        if not done:
            tracker.aborted()


async def _unless_disconnected(request: Request, work, poll_s: float):
    """Run a non-streaming answer, cancelling it (and so aborting its requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return Response(status_code=499)
    finally:
        if not task.done():
            task.cancel()


def _exception_to_api(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, RequestError):  # (the engine's checks: a field it names is the param)
        return ApiError(str(e), 400, param=sampling_param_of(str(e)))
    if isinstance(e, RequestAborted):
        return ApiError(f"{e} (the server is shutting down or the request was cancelled)", 503)
    if isinstance(e, EngineDeadError):
        return ApiError(str(e), 503)
    return ApiError(f"internal error: {type(e).__name__}: {e}", 500)


class _Answer:
    """Builds the response bodies of one request (all its prompts and choices)."""

    def __init__(self, state: ServerState, req, prompts, rid: str, chat: bool, logprobs_n: int | None):
        self.state, self.req, self.prompts, self.rid, self.chat = state, req, prompts, rid, chat
        self.n = req.n
        self.logprobs_n = logprobs_n
        self.created = int(time.time())
        self.model = req.model or state.config.served_model_names[0]
        self.echo = bool(getattr(req, "echo", False)) and not chat
        self.echo_only = self.echo and req.max_tokens == 0  # the prompt back, the generated token left out

    def _lp(self, token_ids, lps, offset: int = 0, echoed: RequestOutput | None = None):
        """The choice's log-probs object; with ``echoed`` (the first piece of an echoed completion) the
        prompt's tokens and log-probs lead (its first token's null), offsets counted from the prompt."""
        if self.logprobs_n is None or lps is None:
            return None
        if echoed is not None and echoed.prompt_logprobs is not None:
            token_ids = list(echoed.prompt_token_ids) + list(token_ids)
            lps = list(echoed.prompt_logprobs) + list(lps)
            offset = 0
        tok = self.state.tokenizer
        if self.chat:
            return chat_logprobs(tok, token_ids, lps, self.logprobs_n)
        return completion_logprobs(tok, token_ids, lps, self.logprobs_n, offset)

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # -- whole answer
    async def full(self, outputs) -> JSONResponse:
        finals: dict[int, RequestOutput] = {}
        try:
            async for i, out in outputs:
                if out.finished:
                    finals[i] = out
        except Exception as e:  # noqa: BLE001 -- answered in OpenAI's shape
            return error_response(_exception_to_api(e))
        choices = []
        prompt_tokens = completion_tokens = 0
        for i in range(len(self.prompts)):
            out = finals[i]
            prompt_tokens += len(out.prompt_token_ids)
            for comp in out.outputs:
                ids, lps, text = ([], [], "") if self.echo_only else (comp.token_ids, comp.logprobs, comp.text)
                completion_tokens += len(ids)
                index = i * self.n + comp.index
                if self.chat:
                    choices.append({"index": index, "message": {"role": "assistant", "content": comp.text},
                                    "logprobs": self._lp(comp.token_ids, comp.logprobs),
                                    "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason})
                else:
                    prefix = (self.prompts[i][0] or "") if self.echo else ""
                    choices.append({"index": index, "text": prefix + text,
                                    "logprobs": self._lp(ids, lps, len(prefix), out if self.echo else None),
                                    "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason,
                                    "prompt_logprobs": _prompt_logprobs(out)})
        choices.sort(key=lambda c: c["index"])
        body = {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": self._usage(prompt_tokens, completion_tokens)}
        return JSONResponse(body)

    # -- streamed answer
    def _chunk(self, choices: list[dict], usage: dict | None = None, with_usage_field: bool = False) -> str:
        body = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if usage is not None or with_usage_field:
            body["usage"] = usage
        return sse(body)

    def _stream_choice(self, index: int, text: str, lps, finish: str | None, stop_reason, first: bool) -> dict:
        if self.chat:
            delta: dict[str, Any] = {"content": text}
            if first:
                delta = {"role": "assistant", "content": text}
            return {"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish,
                    "stop_reason": stop_reason}
        return {"index": index, "text": text, "logprobs": lps, "finish_reason": finish, "stop_reason": stop_reason}

    async def stream(self, outputs) -> AsyncIterator[str]:
        opts = self.req.stream_options
        include_usage = bool(opts and opts.include_usage)
        streams: dict[int, ChoiceStream] = {}
        started: set[int] = set()
        prompt_tokens: dict[int, int] = {}
        completion_tokens: dict[int, int] = {}
        try:
            if self.chat:  # the role comes first, as OpenAI sends it
                first = [self._stream_choice(i * self.n + j, "", None, None, None, True)
                         for i in range(len(self.prompts)) for j in range(self.n)]
                started.update(c["index"] for c in first)
                yield self._chunk(first, with_usage_field=include_usage)
            async for i, out in outputs:
                prompt_tokens[i] = len(out.prompt_token_ids)
                delta = out.delta  # one sample's new tokens and text (stop-string tails held back)
                index = i * self.n + delta.index
                cs = streams.setdefault(index, ChoiceStream())
                if cs.finished:
                    continue
                text, tokens, lps = cs.advance(delta)
                completion_tokens[index] = len(out.outputs[delta.index].token_ids)
                if self.echo_only:
                    text, tokens, lps, completion_tokens[index] = "", [], [], 0
                prefix = ""
                echoed = self.echo and index not in started
                if echoed:
                    prefix = self.prompts[i][0] or ""
                finish = delta.finish_reason
                if not (text or tokens or prefix or finish):
                    continue
                shift = len(self.prompts[i][0] or "") if self.echo else 0  # (offsets count the echoed prompt)
                lp = self._lp(tokens, lps if lps is not None or not echoed else [], shift + cs.text_sent - len(text),
                              out if echoed else None) if tokens or echoed else None
                choice = self._stream_choice(index, prefix + text, lp, finish,
                                             delta.stop_reason if finish else None, index not in started)
                started.add(index)
                yield self._chunk([choice], with_usage_field=include_usage)
            if include_usage:
                yield self._chunk([], self._usage(sum(prompt_tokens.values()), sum(completion_tokens.values())))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- after the headers went out, errors travel in the stream
            yield sse(_exception_to_api(e).body())
        yield SSE_DONE


def _prompt_logprobs(out: RequestOutput):
    if out.prompt_logprobs is None:
        return None
    return [None if e is None else {str(k): {"logprob": v} for k, v in e.items()} for e in out.prompt_logprobs]
