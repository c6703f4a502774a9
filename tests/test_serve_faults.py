"""Misbehaving clients and overload: every failure is answered in OpenAI's error shape with the
right status, and the server keeps serving. Also SIGTERM under load, and engine failures inside
AsyncLLM (one bad request never hurts the others; a failed step ends every request with an error)."""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest
from test_serve import start_server

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("faults"), "--api-key", KEY, "--max-num-seqs", "1",
                     "--max-queued-requests", "2")
    yield s
    assert s.stop() == 0, s.tail()


def post(server, path: str, body, headers=AUTH, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{server.url}{path}", content=body, headers={**headers, "content-type": "application/json"},
                          timeout=60, **kw)
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60, **kw)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


def test_api_key(server):
    body = {"model": "default", "prompt": "hi", "max_tokens": 2}
    assert "API key" in error_of(post(server, "/v1/completions", body, headers={}), 401)["message"]
    error_of(post(server, "/v1/completions", body, headers={"Authorization": "Bearer wrong"}), 401)
    error_of(httpx.get(f"{server.url}/v1/models"), 401)
    assert post(server, "/v1/completions", body).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key

    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_model_404(server):
    err = error_of(post(server, "/v1/completions", {"model": "gpt-9", "prompt": "hi"}), 404)
    assert err["param"] == "model" and "gpt-9" in err["message"]
    error_of(post(server, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
             404)


def test_malformed_json_400(server):
    err = error_of(post(server, "/v1/completions", b'{"model": "default", "prompt": '), 400)
    assert "JSON" in err["message"]
    error_of(post(server, "/v1/chat/completions", b"not json"), 400)


INVALID = [  # (endpoint, field, value)
    ("completions", "temperature", -1.0), ("completions", "top_p", 1.5), ("completions", "top_p", 0.0),
    ("completions", "max_tokens", 0), ("completions", "max_tokens", "many"), ("completions", "n", 0),
    ("completions", "logprobs", -1), ("completions", "top_k", -5), ("completions", "min_p", 2.0),
    ("completions", "stop", [""]), ("completions", "stop_token_ids", [-3]), ("completions", "min_tokens", 99),
    ("completions", "prompt_logprobs", -2), ("completions", "seed", "x"), ("completions", "stream", "perhaps"),
    ("completions", "prompt", None), ("completions", "prompt", [5000000]), ("completions", "logit_bias", {"a": 1}),
    ("completions", "echo", [1]), ("chat/completions", "messages", []), ("chat/completions", "top_logprobs", 50),
    ("chat/completions", "max_completion_tokens", -1), ("chat/completions", "messages", [{"content": "no role"}]),
]


@pytest.mark.parametrize("endpoint,field,value", INVALID, ids=[f"{e}-{f}-{v}" for e, f, v in INVALID])
def test_invalid_field_400_names_it(server, endpoint, field, value):
    body = {"model": "default", "max_tokens": 4, "min_tokens": 0}
    body.update({"prompt": "hi"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "hi"}]})
    body[field] = value
    err = error_of(post(server, f"/v1/{endpoint}", body), 400)
    assert err["param"] == field, err
    assert err["type"] == "BadRequestError"


def test_over_long_prompt_and_too_many_tokens(server):
    long = " ".join(["word"] * 700)
    err = error_of(post(server, "/v1/completions", {"model": "default", "prompt": long, "max_tokens": 4}), 400)
    assert "max_model_len" in err["message"] and err["param"] == "prompt"
    err = error_of(post(server, "/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 600}), 400)
    assert "max_model_len" in err["message"] and err["param"] == "max_tokens"
    assert post(server, "/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 3}).status_code == 200


def test_queue_at_bound_answers_429_then_keeps_serving(server):
    """max_num_seqs 1, max_queued_requests 2: one runs, two wait, the next is refused."""
    body = {"model": "default", "prompt": "Count:", "max_tokens": 300, "ignore_eos": True, "temperature": 0.0,
            "stream": True}
    with httpx.Client(timeout=120, headers=AUTH) as c:
        with c.stream("POST", f"{server.url}/v1/completions", json=body) as running:
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # it has started
            waiting = [c.stream("POST", f"{server.url}/v1/completions", json={**body, "max_tokens": 2})
                       for _ in range(2)]
            responses = [w.__enter__() for w in waiting]  # headers back: both are queued
            err = error_of(c.post(f"{server.url}/v1/completions", json={**body, "stream": False}), 429)
            assert "max-queued-requests" in err["message"]
        for w in waiting:  # the refused request did not disturb the queued ones
            r = responses.pop(0)
            text = "".join(line for line in r.iter_lines())
            assert '"finish_reason":"length"' in text and text.endswith("[DONE]")
            w.__exit__(None, None, None)
    r = post(server, "/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_then_next_request_is_not_stuck_behind_it(server, stream):
    """max_num_seqs 1: a request whose client left must be aborted, or a new request would wait
    for all its 480 tokens."""
    body = {"model": "default", "prompt": "Count:", "max_tokens": 480, "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.Client(timeout=60, headers=AUTH) as c:
            with c.stream("POST", f"{server.url}/v1/completions", json=body) as r:
                lines = r.iter_lines()
                for _ in range(3):
                    next(line for line in lines if line.startswith("data:"))
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=httpx.Timeout(60, read=0.5))
    t0 = time.monotonic()
    r = post(server, "/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200
    alone = time.monotonic()
    post(server, "/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 2})
    alone = time.monotonic() - alone
    # the aborted request's remaining 477 steps would take far longer than a handful of requests
    assert time.monotonic() - t0 - alone < 2.0 + 5 * alone


def test_a_reused_client_request_id_does_not_collide(server):
    async def both():
        async with httpx.AsyncClient(headers={**AUTH, "x-request-id": "same"}, timeout=60) as c:
            body = {"model": "default", "prompt": "hi", "max_tokens": 3}
            return await asyncio.gather(*(c.post(f"{server.url}/v1/completions", json=body) for _ in range(2)))

    for r in asyncio.run(both()):
        assert r.status_code == 200 and r.json()["id"] == "cmpl-same", r.text


def test_sigterm_lets_admitted_requests_finish_and_exits_0(server):
    """Last test on the module's server (max_num_seqs 1, max_queued_requests 2): one request runs
    and two wait when SIGTERM arrives; new requests get 503 while it drains; all three complete;
    the exit code is 0."""
    results: list = [None] * 3
    started = [threading.Event() for _ in range(3)]
    admitted = [threading.Event() for _ in range(3)]

    def run(i: int) -> None:
        text = ""
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120, headers=AUTH,
                          json={"model": "default", "prompt": f"Story {i}", "max_tokens": 120 if i == 0 else 30,
                                "ignore_eos": True, "stream": True}) as r:
            admitted[i].set()  # the headers came: the request is queued in the engine
            for line in r.iter_lines():
                text += line
                started[i].set()  # the first event came: running
        results[i] = text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    threads[0].start()
    assert started[0].wait(120)  # running, so the next two are the only ones waiting
    for t in threads[1:]:
        t.start()
    assert admitted[1].wait(120) and admitted[2].wait(120)
    assert all(r is None for r in results), "a request finished before the signal: make them longer"
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:  # while draining: new requests are refused with 503 (or the socket is closed already)
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "default", "prompt": "x"}, headers=AUTH,
                       timeout=10)
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    except httpx.ConnectError:
        pass
    for t in threads:
        t.join(120)
    assert server.proc.wait(60) == 0, server.tail()
    for text in results:
        assert text is not None and text.count('"finish_reason":"length"') == 1 and text.endswith("[DONE]"), text


def test_sigterm_past_the_shutdown_timeout_aborts_what_still_runs(tmp_path):
    """Under load (three streams and one plain request running, max_num_seqs 4), SIGTERM with a
    0.5 s --shutdown-timeout: the drain's deadline passes with all four mid-generation, so each is
    aborted -- every stream ends with one finish_reason "abort" chunk then [DONE], the plain request
    gets a 200 with its text so far and finish_reason "abort" -- and the server exits 0."""
    server = start_server(tmp_path, "--max-num-seqs", "4", "--shutdown-timeout", "0.5")
    body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True}
    streams: list = [None] * 3
    whole: list = [None]
    started = [threading.Event() for _ in range(3)]

    def stream(i: int) -> None:
        text = ""
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                text += line + "\n"
                started[i].set()
        streams[i] = text

    def plain() -> None:
        whole[0] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)] + [threading.Thread(target=plain)]
    try:
        for t in threads:
            t.start()
        assert all(e.wait(120) for e in started)
        time.sleep(0.2)  # (the plain request was sent with the streams; it runs beside them)
        assert all(s is None for s in streams) and whole[0] is None, "a request finished first: make them longer"
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert server.proc.wait(60) == 0, server.tail()
    finally:
        server.stop()
    for text in streams:
        events = [e.removeprefix("data: ") for e in text.split("\n") if e]
        assert events[-1] == "[DONE]", text[-500:]
        finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
        assert finishes == ["abort"], text[-500:]
    r = whole[0]
    assert r is not None and r.status_code == 200, r
    assert r.json()["choices"][0]["finish_reason"] == "abort" and 1 <= r.json()["usage"]["completion_tokens"] < 480


# ---- AsyncLLM directly: engine-side failures -------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    from moe import LLM

    return LLM(dtype="float32", max_model_len=512, kv_cache_memory="16MiB").engine


def test_a_rejected_request_does_not_hurt_the_others(engine):
    from moe import SamplingParams
    from moe.serving.async_llm import AsyncLLM, RequestError

    llm = AsyncLLM(engine)
    llm.start()

    async def good():
        last = None
        async for out in llm.generate("Hello there", SamplingParams(max_tokens=6, temperature=0.0)):
            last = out
        return last

    async def bad():
        async for _ in llm.generate({"prompt_token_ids": [10**7]}, SamplingParams(max_tokens=6)):
            pass

    async def both():
        return await asyncio.gather(good(), bad(), good(), return_exceptions=True)

    try:
        a, b, c = asyncio.run(both())
        assert isinstance(b, RequestError) and "outside the vocabulary" in str(b)
        assert a.finished and c.finished and a.outputs[0].text == c.outputs[0].text
        assert len(a.outputs[0].token_ids) == 6 and llm.dead is None
    finally:
        llm.shutdown()


def test_a_failed_step_ends_every_request_and_marks_the_engine_dead(engine, monkeypatch):
    from moe import SamplingParams
    from moe.serving.async_llm import AsyncLLM, EngineDeadError

    def broken_step():
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(engine, "step", broken_step)
    llm = AsyncLLM(engine)
    dead: list = []
    llm.on_dead = dead.append
    llm.start()

    async def one():
        async for _ in llm.generate("Hello", SamplingParams(max_tokens=4)):
            pass

    async def both():
        return await asyncio.gather(one(), one(), return_exceptions=True)

    try:
        for r in asyncio.run(both()):
            assert isinstance(r, EngineDeadError) and "simulated kernel failure" in str(r)
        assert isinstance(llm.dead, RuntimeError) and dead == [llm.dead]
        with pytest.raises(EngineDeadError):
            llm.generate("again", SamplingParams())
    finally:
        llm.shutdown(1)


def test_health_is_503_while_a_step_is_stuck_and_when_dead(engine, monkeypatch):
    """/health: 200 when idle, 503 while the engine holds requests but no step has completed for
    health_step_timeout, 200 again once steps resume, 503 for good after a failed step."""
    from moe.serving.api_server import ServerConfig, build_app
    from moe.serving.async_llm import AsyncLLM

    gate = threading.Event()
    real_step = engine.step
    fail = threading.Event()

    def gated_step():
        gate.wait(30)
        if fail.is_set():
            raise RuntimeError("simulated failure")
        return real_step()

    monkeypatch.setattr(engine, "step", gated_step)
    llm = AsyncLLM(engine)
    app = build_app(llm, ServerConfig(model_path="m", served_model_names=["default"], health_step_timeout=0.3))
    llm.start()

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c:
            assert (await c.get("/health")).status_code == 200
            job = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}))
            await asyncio.sleep(0.8)  # the first step is held at the gate
            stuck = await c.get("/health")
            gate.set()
            done = await job
            healthy = await c.get("/health")
            gate.clear()
            fail.set()
            failed = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
            gate.set()
            failed = await failed
            return stuck, done, healthy, failed, await c.get("/health")

    try:
        stuck, done, healthy, failed, dead = asyncio.run(scenario())
    finally:
        gate.set()
        llm.shutdown(2)
    assert stuck.status_code == 503 and stuck.json()["status"] == "stalled"
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3
    assert healthy.status_code == 200
    assert failed.status_code == 503 and "simulated failure" in failed.json()["error"]["message"]
    assert dead.status_code == 503 and dead.json()["status"] == "dead"


def test_an_error_after_the_stream_started_is_an_sse_error_event(engine, monkeypatch):
    from moe.serving.api_server import ServerConfig, build_app
    from moe.serving.async_llm import AsyncLLM

    def reject(prompt, params, request_id, stream=False):
        raise ValueError("the engine refused this request")

    monkeypatch.setattr(engine, "add_request", reject)
    llm = AsyncLLM(engine)
    app = build_app(llm, ServerConfig(model_path="m", served_model_names=["default"]))
    llm.start()

    async def ask(path: str, body: dict):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c:
            return await c.post(path, json=body)

    try:
        streamed = asyncio.run(ask("/v1/completions", {"prompt": "hi", "max_tokens": 3, "stream": True}))
        whole = asyncio.run(ask("/v1/completions", {"prompt": "hi", "max_tokens": 3}))
    finally:
        llm.shutdown(2)
    events = [e for e in streamed.text.split("\n\n") if e]
    assert streamed.status_code == 200 and events[-1] == "data: [DONE]"
    err = json.loads(events[-2].removeprefix("data: "))["error"]
    assert err["code"] == 400 and "refused" in err["message"]
    assert whole.status_code == 400 and "refused" in whole.json()["error"]["message"]


def test_shutdown_ends_waiting_iterators(engine):
    from moe import SamplingParams
    from moe.serving.async_llm import AsyncLLM, RequestAborted

    llm = AsyncLLM(engine)
    llm.start()

    async def run():
        gen = llm.generate("Hello", SamplingParams(max_tokens=400, ignore_eos=True))
        first = await gen.__anext__()
        await asyncio.to_thread(llm.shutdown)
        with pytest.raises(RequestAborted):
            async for _ in gen:
                pass
        return first

    assert not asyncio.run(asyncio.wait_for(run(), 60)).finished
    assert not engine.has_unfinished_requests()  # its blocks went back with the abort


def _outputs_aborted_after_two(llm, params):
    """Start ``llm`` (an AsyncLLM), stream one request with ``params`` and abort it by its id after its
    second output; the outputs its iterator gave, the engine thread stopped."""
    llm.start()

    async def run():
        outs = []
        async for out in llm.generate("Hello", params, "to-abort"):
            outs.append(out)
            if len(outs) == 2:
                llm.abort("to-abort")
        return outs

    try:
        return asyncio.run(asyncio.wait_for(run(), 60))
    finally:
        llm.shutdown()


def test_abort_ends_the_iterator_with_a_final_abort_output(engine):
    """AsyncLLM.abort(request_id) as vLLM's: the request's iterator ends (no exception) with a last
    output, finished, finish_reason "abort"; its KV blocks are back in the free pool."""
    from moe import SamplingParams
    from moe.serving.async_llm import AsyncLLM

    llm = AsyncLLM(engine)
    outs = _outputs_aborted_after_two(llm, SamplingParams(max_tokens=400, ignore_eos=True))
    last = outs[-1]
    assert last.finished and not any(o.finished for o in outs[:-1])
    assert last.outputs[0].finish_reason == last.delta.finish_reason == "abort"
    assert 2 <= len(last.outputs[0].token_ids) < 400 and llm.num_requests == 0
    bm = engine.block_manager
    assert not engine.has_unfinished_requests() and bm.num_free_blocks == bm.num_blocks


def test_start_gives_the_engine_thread_the_cores(engine, monkeypatch):
    """AsyncLLM.start() releases the calling thread's OpenMP workers (the thread that built the
    engine) before the engine thread runs the steps: one team of workers on the cores, not two."""
    import moe.serving.async_llm as async_llm
    from moe.serving.async_llm import AsyncLLM

    calls = []
    monkeypatch.setattr(async_llm, "release_openmp_threads", lambda: calls.append(threading.current_thread()))
    llm = AsyncLLM(engine)
    llm.start()
    llm.shutdown()
    assert calls == [threading.current_thread()]


def test_abort_of_a_request_with_n_samples_ends_every_sample(engine):
    """A request with n = 3 samples (three sequences in the engine), aborted after its first
    outputs: its iterator ends with one final output, finished, whose three samples all say
    "abort"; no sequence is left in the engine and every KV block is free."""
    from moe import SamplingParams
    from moe.serving.async_llm import AsyncLLM

    llm = AsyncLLM(engine)
    params = SamplingParams(n=3, temperature=0.8, seed=3, max_tokens=400, ignore_eos=True)
    outs = _outputs_aborted_after_two(llm, params)
    last = outs[-1]
    assert last.finished and not any(o.finished for o in outs[:-1])
    assert len(last.outputs) == 3 and {o.index for o in last.outputs} == {0, 1, 2}
    assert all(o.finish_reason == "abort" and len(o.token_ids) < 400 for o in last.outputs)
    assert llm.num_requests == 0
    bm = engine.block_manager
    assert not engine.has_unfinished_requests() and bm.num_free_blocks == bm.num_blocks


def test_aborted_requests_are_answered_with_finish_reason_abort(engine):
    """What a client gets when the server aborts its request (``abort_all`` at the end of a
    shutdown's drain): a 200 with the text so far and finish_reason "abort", or a stream whose last
    chunk says "abort" before ``[DONE]``."""
    from moe.serving.api_server import ServerConfig, build_app
    from moe.serving.async_llm import AsyncLLM

    llm = AsyncLLM(engine)
    app = build_app(llm, ServerConfig(model_path="m", served_model_names=["default"]))
    llm.start()
    body = {"prompt": "hi", "max_tokens": 400, "ignore_eos": True}

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            whole = asyncio.ensure_future(c.post("/v1/completions", json=body))
            streamed = asyncio.ensure_future(c.post("/v1/completions", json={**body, "stream": True}))
            while llm.num_requests < 2 or llm.num_unstarted:  # both have produced tokens
                await asyncio.sleep(0.01)
            llm.abort_all()
            return await whole, await streamed

    try:
        whole, streamed = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        llm.shutdown(2)
    assert whole.status_code == 200, whole.text
    choice = whole.json()["choices"][0]
    assert choice["finish_reason"] == "abort" and 1 <= whole.json()["usage"]["completion_tokens"] < 400
    events = [e.removeprefix("data: ") for e in streamed.text.split("\n\n") if e]
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
    assert finishes == ["abort"]
    assert not engine.has_unfinished_requests()


def test_abort_while_the_grammar_compiles_ends_the_request_unrun(engine):
    """A structured request compiles its grammar before it is queued; aborted meanwhile, its
    iterator ends at once with the abort output and the engine never runs it."""
    from moe import SamplingParams
    from moe.serving.async_llm import AsyncLLM
    from moe.structured_output import StructuredOutputsParams

    llm = AsyncLLM(engine)
    llm.start()
    params = SamplingParams(max_tokens=20, structured_outputs=StructuredOutputsParams(regex="[a-z]{20}"))
    added: list[str] = []
    real_add = engine.add_request

    def add_request(prompt, p, request_id):
        added.append(request_id)
        return real_add(prompt, p, request_id)

    async def run():
        before = asyncio.all_tasks()
        gen = llm.generate("Hello", params, "compiling")
        (compiling,) = asyncio.all_tasks() - before
        llm.abort("compiling")  # (the first grammar takes seconds: xgrammar's vocabulary set-up)
        outs = [out async for out in gen]
        assert not compiling.done()
        await compiling  # it ends without queueing the request
        await asyncio.sleep(0.3)  # (the engine thread would have taken an add by now)
        return outs

    engine.add_request = add_request
    try:
        outs = asyncio.run(asyncio.wait_for(run(), 120))
    finally:
        del engine.add_request
        llm.shutdown()
    assert [(o.finished, o.outputs[0].finish_reason, o.outputs[0].token_ids) for o in outs] == [(True, "abort", [])]
    assert added == [] and not engine.has_unfinished_requests()
