"""Server features that stand on the engine side of issue 13: ``n``, the penalties, ``logit_bias``,
structured output, ``cache_salt``, the embedded chat template and ``LLM.chat``, and the
``/metrics`` that read ``engine.stats()`` (KV blocks back in the free pool after a client leaves
mid-stream or mid-prefill)."""
from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from test_serve import PROMPT, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # no --chat-template: the embedded model's own; small steps so a long prompt's prefill takes many
    s = start_server(tmp_path_factory.mktemp("features"), "--max-num-batched-tokens", "32", chat_template=False)
    yield s
    assert s.stop() == 0, s.tail()


@pytest.fixture(scope="module")
def llm():
    from moe import LLM

    return LLM(dtype="float32", max_model_len=512, kv_cache_memory="64MiB", max_num_batched_tokens=32)


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric(values: dict[str, float], name: str) -> float:
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def wait_all_blocks_free(server, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if metric(m, "moe:kv_cache_free_blocks") == metric(m, "moe:kv_cache_total_blocks") or \
                time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_metrics_names(server, client):
    client.completions.create(model="default", prompt=PROMPT, max_tokens=5, temperature=0.0)
    m = metrics(server)
    for name in ("moe:num_requests_running", "moe:num_requests_waiting", "moe:kv_cache_usage_perc",
                 "moe:prefix_cache_queries_total", "moe:prefix_cache_hits_total", "moe:prompt_tokens_total",
                 "moe:generation_tokens_total", "moe:request_success_total"):
        assert any(k == name or k.startswith(name + "{") for k in m), name
    for h in ("time_to_first_token_seconds", "inter_token_latency_seconds", "request_time_per_output_token_seconds",
              "e2e_request_latency_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
              "request_decode_time_seconds"):
        assert metric(m, f"moe:{h}_count") >= 1, h
    assert metric(m, "moe:generation_tokens_total") >= 5
    assert m['moe:request_success_total{finished_reason="length",model_name="default"}'] >= 1


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": "default", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(line for line in lines if line.startswith("data:"))
            busy = metrics(server)
            assert metric(busy, "moe:kv_cache_free_blocks") < metric(busy, "moe:kv_cache_total_blocks")
    m = wait_all_blocks_free(server)
    assert metric(m, "moe:kv_cache_free_blocks") == metric(m, "moe:kv_cache_total_blocks")
    assert metric(m, "moe:num_requests_running") == 0
    assert m['moe:request_success_total{finished_reason="abort",model_name="default"}'] >= 1


def test_disconnect_mid_prefill_frees_blocks(server):
    """A 480-token prompt prefills 32 tokens a step; the client gives up before its first token:
    after a third of the time the same-length prompt took to its first token on this machine."""
    t0 = time.perf_counter()
    httpx.post(f"{server.url}/v1/completions", json={"model": "default", "prompt": list(range(100, 580)),
                                                     "max_tokens": 1}, timeout=60).raise_for_status()
    to_first_token = time.perf_counter() - t0
    prompt = list(range(200, 680))  # (no block shared with the prompt above: no prefix-cache hit)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={"model": "default", "prompt": prompt, "max_tokens": 8},
                   timeout=httpx.Timeout(60, read=to_first_token / 3))
    m = wait_all_blocks_free(server)
    assert metric(m, "moe:kv_cache_free_blocks") == metric(m, "moe:kv_cache_total_blocks")
    assert metric(m, "moe:num_requests_running") + metric(m, "moe:num_requests_waiting") == 0


def test_n3_streamed_equals_unstreamed(client):
    kw = dict(model="default", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3, n=3)
    full = client.completions.create(**kw)
    assert sorted(c.index for c in full.choices) == [0, 1, 2]
    assert 3 <= full.usage.completion_tokens <= 36
    streamed = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == {c.index: c.text for c in full.choices}
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], n=3,
                                          max_tokens=6, temperature=1.0, seed=1)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]


def test_penalties_and_logit_bias_equal_generate(client, llm):
    from moe import SamplingParams

    kw = dict(presence_penalty=0.8, frequency_penalty=0.5, repetition_penalty=1.3)
    want = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.0, **kw))[0].outputs[0].text
    got = client.completions.create(model="default", prompt=PROMPT, max_tokens=16, temperature=0.0,
                                    presence_penalty=0.8, frequency_penalty=0.5,
                                    extra_body={"repetition_penalty": 1.3})
    assert got.choices[0].text == want
    forced = client.completions.create(model="default", prompt=PROMPT, max_tokens=4, temperature=0.0,
                                       logit_bias={"777": 100}, logprobs=0)
    tok = llm.get_tokenizer()
    assert forced.choices[0].text == tok.decode([777] * 4)


@pytest.mark.parametrize("field,value", [("presence_penalty", 3.0), ("frequency_penalty", -2.5),
                                         ("repetition_penalty", 0.0), ("logit_bias", {"5": 500}),
                                         ("logprobs", 21), ("prompt_logprobs", 50)])
def test_invalid_new_fields_400(server, field, value):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "default", "prompt": "hi", field: value},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_structured_outputs(client):
    import jsonschema

    # bounded fields: a random model must not be able to run past max_tokens inside one of them
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                               "member": {"type": "boolean"}},
              "required": ["name", "age", "member"], "additionalProperties": False}
    out = client.completions.create(
        model="default", prompt="Once upon a time", max_tokens=200, temperature=0.0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].text), schema)
    chat = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "A person as JSON."}], max_tokens=200,
        temperature=0.0, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    kw = dict(model="default", prompt="Once upon a time", max_tokens=200, temperature=0.9, seed=1,
              extra_body={"response_format": {"type": "json_object"}})
    obj = client.completions.create(**kw)
    assert isinstance(json.loads(obj.choices[0].text), dict)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == obj.choices[0].text
    choice = client.completions.create(model="default", prompt="Pick:", max_tokens=10, temperature=0.7, seed=2,
                                       extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert choice.choices[0].text in ("red", "green", "blue")
    rx = client.completions.create(model="default", prompt="Code:", max_tokens=10, temperature=0.7, seed=2,
                                   extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"})
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", rx.choices[0].text)


def test_cache_salt_and_embedded_chat_template(client, llm):
    a = client.completions.create(model="default", prompt=PROMPT, max_tokens=6, temperature=0.0,
                                  extra_body={"cache_salt": "tenant-a"})
    b = client.completions.create(model="default", prompt=PROMPT, max_tokens=6, temperature=0.0,
                                  extra_body={"cache_salt": "tenant-b"})
    assert a.choices[0].text == b.choices[0].text
    from moe import SamplingParams

    messages = [{"role": "user", "content": "What is a mixture of experts?"}]
    want = llm.chat(messages, SamplingParams(max_tokens=10, temperature=0.0))[0].outputs[0].text
    got = client.chat.completions.create(model="default", messages=messages, max_tokens=10, temperature=0.0)
    assert got.choices[0].message.content == want


def test_logprobs_without_a_tokenizer_name_token_ids():
    """A checkpoint without tokenizer.json: logprobs name tokens ``token_id:N`` (vLLM's form), not a 500."""
    from moe.serving.streaming import chat_logprobs, completion_logprobs

    lp = completion_logprobs(None, [5, 7], [{5: -0.1, 9: -2.0}, {7: -0.5, 3: -1.0}], 2, 0)
    assert lp["tokens"] == ["token_id:5", "token_id:7"] and lp["token_logprobs"] == [-0.1, -0.5]
    assert lp["top_logprobs"][0] == {"token_id:5": -0.1, "token_id:9": -2.0}
    assert lp["text_offset"] == [0, len("token_id:5")]
    (item,) = chat_logprobs(None, [5], [{5: -0.1, 9: -2.0}], 1)["content"]
    assert item["token"] == "token_id:5" and item["bytes"] == list(b"token_id:5")
    assert item["top_logprobs"] == [{"token": "token_id:5", "logprob": -0.1, "bytes": list(b"token_id:5")}]


def test_speculative_decoding_metrics(tmp_path):
    """``moe serve --speculative-tokens 3`` (n-gram lookup): /metrics has vLLM's four
    speculative-decoding counters, equal to ``engine.spec_stats()`` of an in-process engine with
    the same config after the same greedy requests (one at a time, so the same steps)."""
    from moe import LLM, SamplingParams

    prompts = ["one two three four one two three four one two three four one two",
               "the cat sat on the mat and the cat sat on the mat and the cat"]
    s = start_server(tmp_path, "--speculative-tokens", "3")
    try:
        for p in prompts:
            r = httpx.post(f"{s.url}/v1/completions", timeout=120,
                           json={"model": "default", "prompt": p, "max_tokens": 24, "temperature": 0.0})
            assert r.status_code == 200, r.text
        m = metrics(s)
    finally:
        assert s.stop() == 0, s.tail()
    ref = LLM(dtype="float32", max_model_len=512, kv_cache_memory="64MiB",
              speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    for p in prompts:
        ref.generate(p, SamplingParams(max_tokens=24, temperature=0.0))
    want = ref.engine.spec_stats()
    assert want.num_accepted_tokens > 0, "no draft was accepted: pick more repetitive prompts"
    lab = 'model_name="default"'
    assert m[f"moe:spec_decode_num_drafts_total{{{lab}}}"] == want.num_verify_steps
    assert m[f"moe:spec_decode_num_draft_tokens_total{{{lab}}}"] == want.num_draft_tokens
    assert m[f"moe:spec_decode_num_accepted_tokens_total{{{lab}}}"] == want.num_accepted_tokens
    per_pos = [m[f'moe:spec_decode_num_accepted_tokens_per_pos_total{{{lab},position="{j}"}}'] for j in range(3)]
    assert per_pos == want.accepted_at + [0] * (3 - len(want.accepted_at))
    assert sum(per_pos) == want.num_accepted_tokens and per_pos[0] >= per_pos[1] >= per_pos[2]


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(server, llm):
    # lm-evaluation-harness's loglikelihood over /v1/completions: prompt = context + continuation,
    # echo, logprobs 1, max_tokens 1, temperature 0; it sums token_logprobs[ctxlen:-1] and checks each
    # against max(top_logprobs). The echoed prompt's tokens lead the log-probs (the first null), each
    # the engine's prompt log-prob; streamed, the first chunk carries them
    from moe import SamplingParams

    text = "The module defines the following functions"
    want = llm.generate(text, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))[0]
    ids = want.prompt_token_ids
    body = {"model": "default", "prompt": text, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    for stream in (False, True):
        r = httpx.post(f"{server.url}/v1/completions", json=body | {"stream": stream}, timeout=60)
        assert r.status_code == 200, r.text
        if stream:
            chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: {") and json.loads(line[6:])["choices"]]
            parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
            lp = {k: sum((p[k] for p in parts), []) for k in ("tokens", "token_logprobs", "top_logprobs",
                                                               "text_offset")}
            full_text = "".join(c["choices"][0]["text"] for c in chunks)
        else:
            choice = r.json()["choices"][0]
            lp, full_text = choice["logprobs"], choice["text"]
        assert full_text.startswith(text)
        assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for j in range(1, len(ids)):
            assert lp["token_logprobs"][j] == pytest.approx(want.prompt_logprobs[j][ids[j]], abs=1e-4), j
            assert max(lp["top_logprobs"][j].values()) >= lp["token_logprobs"][j] - 1e-6
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    # max_tokens 0 with echo: the prompt and its log-probs alone (vLLM's echo without generation)
    for stream in (False, True):
        r = httpx.post(f"{server.url}/v1/completions", json=body | {"max_tokens": 0, "stream": stream,
                                                                    "stream_options": {"include_usage": True}}
                       if stream else body | {"max_tokens": 0}, timeout=60)
        assert r.status_code == 200, r.text
        if stream:
            chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            text_ = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            tokens = sum((c["choices"][0]["logprobs"]["tokens"] for c in chunks
                          if c["choices"] and c["choices"][0]["logprobs"]), [])
            usage = chunks[-1]["usage"]
        else:
            choice = r.json()["choices"][0]
            text_, tokens, usage = choice["text"], choice["logprobs"]["tokens"], r.json()["usage"]
        assert text_ == text and len(tokens) == len(ids) and usage["completion_tokens"] == 0, (stream, text_)
    r = httpx.post(f"{server.url}/v1/completions", json=body | {"max_tokens": 0, "echo": False}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
