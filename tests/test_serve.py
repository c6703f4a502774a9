"""The OpenAI-compatible server in a subprocess on a free loopback port, driven by the real
``openai`` client: completions and chat, streamed and not, equal to ``LLM.generate``; usage;
logprobs; stop strings across token boundaries; 64 concurrent streaming clients.

One server (the embedded default model, float32 so batch shapes cannot change a greedy token)
is shared by the module. ``start_server`` is imported by the other serving test files.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from launch.env import free_port

CHAT_TEMPLATE = ('{% for m in messages %}{{ m["role"] }}: {{ m["content"] }}\n{% endfor %}'
                 '{% if add_generation_prompt %}assistant:{% endif %}')
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory", "64MiB"]


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MOE_SHARDING")}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


class Server:
    """``moe serve`` (or any launcher command line) on a free port; stopped by PID, bounded waits."""

    def __init__(self, args: list[str], log: Path, launcher: list[str] | None = None, ready_timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [*(launcher or [sys.executable]), "-m", "moe", "serve", "--port", str(self.port), "--log-level",
               "warning", *args]
        self._out = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=server_env(),
                                     start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the server did not become healthy in {ready_timeout} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and its children
                self.proc.wait(10)
        self._out.close()
        return self.proc.returncode


def start_server(tmp: Path, *args: str, chat_template: bool = True, **kw) -> Server:
    """The embedded model as "default"; with ``chat_template`` the test's template overrides the checkpoint's."""
    (tmp / "chat.jinja").write_text(CHAT_TEMPLATE)
    template = ["--chat-template", str(tmp / "chat.jinja")] if chat_template else []
    return Server([*ENGINE_ARGS, "--served-model-name", "default", *template, *args], tmp / "server.log", **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("serve"))
    yield s
    assert s.stop() == 0, s.tail()


@pytest.fixture(scope="module")
def llm():
    from moe import LLM

    return LLM(dtype="float32", max_model_len=512, kv_cache_memory="64MiB")


PROMPT = "Once upon a time there was a"


def _stream_text(client, **kw) -> tuple[str, list]:
    chunks = list(client.completions.create(stream=True, **kw))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def test_models_version_tokenize(server, client):
    (m,) = client.models.list().data
    assert m.id == "default" and m.object == "model" and m.owned_by == "moe"
    extra = m.model_extra
    assert extra["max_model_len"] == 512 and extra["root"].endswith("default_model") and m.created > 0
    assert httpx.get(f"{server.url}/version").json()["version"]
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}).json()
    assert ids["count"] == len(ids["tokens"]) > 3 and ids["max_model_len"] == 512
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == PROMPT


def test_openapi_document_says_what_the_server_answers(server):
    """/openapi.json (what schema-driven clients and fuzzers read) documents the answers as they come:
    /health's empty 200, /metrics as text, generation as JSON or server-sent events, and errors in
    OpenAI's shape under 4XX / 5XX (no FastAPI 422: a malformed body is a 400 here), the error body
    valid against the documented schema."""
    import jsonschema

    spec = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    paths = spec["paths"]
    health = httpx.get(f"{server.url}/health", timeout=30)
    assert health.status_code == 200 and health.content == b""
    assert "content" not in paths["/health"]["get"]["responses"]["200"]
    metrics = httpx.get(f"{server.url}/metrics", timeout=30)
    assert metrics.headers["content-type"].startswith("text/plain")
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    for route in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        responses = paths[route]["post"]["responses"]
        assert "422" not in responses and {"4XX", "5XX"} <= responses.keys(), (route, list(responses))
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": "Hello", "max_tokens": 2, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "text/event-stream" in paths["/v1/completions"]["post"]["responses"]["200"]["content"]
    bad = httpx.post(f"{server.url}/v1/completions", json={"max_tokens": 2}, timeout=30)  # no prompt
    error_schema = paths["/v1/completions"]["post"]["responses"]["4XX"]["content"]["application/json"]["schema"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    jsonschema.validate(bad.json(), {**error_schema, "components": spec["components"]})


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=7)])
def test_completion_streamed_equals_unstreamed_equals_generate(client, llm, sampling):
    from moe import SamplingParams

    want = llm.generate([PROMPT], SamplingParams(max_tokens=24, **sampling))[0].outputs[0]
    full = client.completions.create(model="default", prompt=PROMPT, max_tokens=24, **sampling)
    assert full.choices[0].text == want.text
    assert full.choices[0].finish_reason == want.finish_reason
    assert full.usage.completion_tokens == len(want.token_ids)
    assert full.usage.prompt_tokens == len(llm.get_tokenizer().encode(PROMPT))
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    text, chunks = _stream_text(client, model="default", prompt=PROMPT, max_tokens=24, **sampling,
                                stream_options={"include_usage": True})
    assert text == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == want.finish_reason


def test_chat_streamed_equals_unstreamed(client, llm):
    from moe import SamplingParams

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    rendered = "system: Be brief.\nuser: Tell me a story.\nassistant:"  # CHAT_TEMPLATE, rendered
    want = llm.generate([rendered], SamplingParams(max_tokens=20, temperature=0.0))[0].outputs[0]
    full = client.chat.completions.create(model="default", messages=messages, max_completion_tokens=20,
                                          temperature=0.0)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content == want.text
    assert full.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.chat.completions.create(model="default", messages=messages, max_tokens=20, temperature=0.0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_logprobs(client, llm):
    from moe import SamplingParams

    want = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0, logprobs=3))[0].outputs[0]
    got = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0.0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    for tok_id, entry, value, top in zip(want.token_ids, want.logprobs, lp.token_logprobs, lp.top_logprobs):
        assert value == pytest.approx(entry[tok_id], abs=1e-5)
        assert len(top) == 3 and max(top.values()) == pytest.approx(max(entry.values()), abs=1e-5)
    assert "".join(lp.tokens) == got.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset)
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0.0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    streamed = [c for c in client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0.0, logprobs=True,
        top_logprobs=2, stream=True) if c.choices and c.choices[0].logprobs]
    assert [t.logprob for c in streamed for t in c.choices[0].logprobs.content] == [c.logprob for c in content]


def test_stop_string_across_token_boundary_never_leaks(client, llm):
    from moe import SamplingParams

    tok = llm.get_tokenizer()
    full = llm.generate([PROMPT], SamplingParams(max_tokens=40, temperature=0.0))[0].outputs[0]
    # a stop string made of the end of one token and the start of the next
    pieces = [tok.decode(full.token_ids[:i]) for i in range(len(full.token_ids) + 1)]
    k = next(i for i in range(4, len(pieces) - 1)
             if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i + 1]) - len(pieces[i]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][len(pieces[k]):len(pieces[k]) + 2]
    assert full.text.find(stop) >= 0
    want = full.text[:full.text.find(stop)]
    got = client.completions.create(model="default", prompt=PROMPT, max_tokens=40, temperature=0.0, stop=[stop])
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    assert got.choices[0].model_extra["stop_reason"] == stop
    text, chunks = _stream_text(client, model="default", prompt=PROMPT, max_tokens=40, temperature=0.0, stop=[stop])
    assert text == want  # anything sent before the stop was complete would make this longer
    assert chunks[-1].choices[0].finish_reason == "stop"
    text, _ = _stream_text(client, model="default", prompt=PROMPT, max_tokens=40, temperature=0.0, stop=[stop],
                           extra_body={"include_stop_str_in_output": True})
    assert text == want + stop


def test_prompt_forms_and_echo(client, llm):
    from moe import SamplingParams

    prompts = [PROMPT, "The capital of France"]
    want = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0))]
    got = client.completions.create(model="default", prompt=prompts, max_tokens=6, temperature=0.0)
    assert [c.index for c in got.choices] == [0, 1] and [c.text for c in got.choices] == want
    ids = llm.get_tokenizer().encode(prompts[1])
    by_ids = client.completions.create(model="default", prompt=ids, max_tokens=6, temperature=0.0)
    assert by_ids.choices[0].text == want[1]
    echo = client.completions.create(model="default", prompt=PROMPT, max_tokens=6, temperature=0.0, echo=True)
    assert echo.choices[0].text == PROMPT + want[0]
    _, chunks = _stream_text(client, model="default", prompt=prompts, max_tokens=6, temperature=0.0)
    per_index = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            per_index[ch.index] += ch.text
    assert per_index == {0: want[0], 1: want[1]}


def test_64_concurrent_streaming_clients(server, client):
    """Mixed lengths, all at once: each finishes exactly once with its text run alone (greedy)."""
    from openai import AsyncOpenAI

    prompts = [f"Story {i}: the {w}" for i, w in enumerate(["cat", "dog", "ship", "river", "king", "moon", "tree",
                                                             "city"] * 2)]
    cases = [(prompts[i % 16], 4 + (i * 7) % 29) for i in range(64)]
    alone = {}
    for p, n in sorted(set(cases), key=lambda c: (c[0], -c[1])):  # the longest run alone; others are its prefixes
        if p not in alone:
            alone[p] = (n, client.completions.create(model="default", prompt=p, max_tokens=n, temperature=0.0,
                                                     extra_body={"ignore_eos": True}).choices[0].text)
    aclient = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(i: int, p: str, n: int):
        text, finishes, usage = "", [], None
        async for c in await aclient.completions.create(model="default", prompt=p, max_tokens=n, temperature=0.0,
                                                        stream=True, stream_options={"include_usage": True},
                                                        extra_body={"ignore_eos": True}):
            for ch in c.choices:
                text += ch.text
                if ch.finish_reason:
                    finishes.append(ch.finish_reason)
            usage = c.usage or usage
        return i, text, finishes, usage

    async def all_of():
        return await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(cases)))

    results = asyncio.run(all_of())
    assert sorted(r[0] for r in results) == list(range(64))
    for i, text, finishes, usage in results:
        p, n = cases[i]
        assert finishes == ["length"], (i, finishes)
        assert usage.completion_tokens == n
        ref_n, ref = alone[p]
        # greedy: a shorter run is a prefix of the longest; the longest is equal
        assert (text == ref) if n == ref_n else (ref.startswith(text) and text), (i, text, ref)


def test_chat_without_template_names_the_fix(llm):
    """A checkpoint without a chat template answers chat with a 400 that says how to fix it (the app
    in-process over the test's engine; the refusal comes before the engine is involved)."""
    from moe.serving.api_server import ServerConfig, build_app
    from moe.serving.async_llm import AsyncLLM

    tok = llm.get_tokenizer()
    saved, tok.chat_template = tok.chat_template, None
    app = build_app(AsyncLLM(llm.engine), ServerConfig(model_path="m", served_model_names=["default"]))

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})

    try:
        r = asyncio.run(ask())
    finally:
        tok.chat_template = saved
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "chat template" in r.json()["error"]["message"] and "--chat-template" in r.json()["error"]["message"]


def _prefix_cache_hits(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("moe:prefix_cache_hits_total"))


def test_bench_client_measures_the_server(server, tmp_path):
    """``moe bench serve`` against the shared server: every request counted once, with the exact
    requested output lengths (ignore_eos), vLLM's result keys, and the latency plot. Each rate of
    the sweep and the warm-ups get prompts of their own (no prefix-cache hit from an earlier run's
    prompts), the same again for the same ``--seed``."""
    import json as json_

    from typer.testing import CliRunner

    from moe.cli import app

    out, png = tmp_path / "result.json", tmp_path / "plot.png"
    args = ["bench", "serve", "--base-url", server.url, "--num-prompts", "4", "--random-input-len", "24",
            "--random-output-len", "6", "--random-range-ratio", "0.5", "--ignore-eos", "--max-concurrency", "4",
            "--num-warmups", "1", "--quiet", "--seed", "7"]
    hits = _prefix_cache_hits(server)
    r = CliRunner().invoke(app, [*args, "--sweep-rates", "4,inf", "--slo", "ttft=60000,tpot=60000",
                                 "-o", str(out), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert _prefix_cache_hits(server) == hits  # random prompts share no block unless a prompt repeats
    runs = json_.loads(out.read_text())
    assert [run["request_rate"] for run in runs] == [4.0, float("inf")]
    assert runs[0]["generated_texts"] != runs[1]["generated_texts"]
    again = tmp_path / "again.json"
    r = CliRunner().invoke(app, [*args, "--request-rate", "4", "-o", str(again)])
    assert r.exit_code == 0, r.output
    repeat = json_.loads(again.read_text())
    assert (repeat["input_lens"], repeat["generated_texts"]) == (runs[0]["input_lens"], runs[0]["generated_texts"])
    for run in runs:
        assert run["completed"] == 4 and run["failed"] == 0 and run["errors"] == [""] * 4
        assert all(3 <= n <= 9 for n in run["output_lens"]) and run["total_output_tokens"] == sum(run["output_lens"])
        assert run["request_goodput"] == pytest.approx(run["request_throughput"])
        for key in ("mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "p90_e2el_ms", "output_throughput",
                    "total_token_throughput"):
            assert run[key] > 0, key
        assert run["median_ttft_ms"] <= run["p99_ttft_ms"]
    # each rate draws its own prompts (seed + rate index): the second must not replay the first's
    assert runs[0]["output_lens"] != runs[1]["output_lens"] or runs[0]["input_lens"] != runs[1]["input_lens"]
    assert png.stat().st_size > 10_000 and "Output token throughput" in r.output
