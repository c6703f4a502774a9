"""A checkpoint's generation_config.json sets the default sampling parameters (vLLM's
``--generation-config auto``): what ``LLM.generate`` without parameters, a server request that
leaves a field unset and ``moe generate`` without a flag use; ``generation_config="vllm"`` turns
them off, ``override_generation_config`` lays values over them."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from moe import LLM, SamplingParams
from moe.llm import default_model_path
from moe.sampling_params import generation_defaults

PROMPT = "The module defines"


def _with_generation_config(tmp: Path, config: dict) -> Path:
    """The default model with its generation_config.json replaced (the other files linked)."""
    d = tmp / "model"
    d.mkdir()
    for f in Path(default_model_path()).iterdir():
        if f.name != "generation_config.json":
            (d / f.name).symlink_to(f)
    (d / "generation_config.json").write_text(json.dumps(config))
    return d


def test_generation_defaults_reads_the_sampling_keys(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "eos_token_id": [1, 2], "temperature": 0.6, "top_p": 0.95, "top_k": 20,
        "repetition_penalty": 1.05, "max_new_tokens": 100, "min_p": None}))
    want = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 100}
    assert generation_defaults(d) == want
    assert generation_defaults(d, "vllm") == {}
    assert generation_defaults(tmp_path / "elsewhere", str(d)) == want  # a directory of its own
    assert generation_defaults(d, "auto", {"temperature": 0.0, "max_new_tokens": 8}) == {**want, "temperature": 0.0,
                                                                                         "max_tokens": 8}
    assert generation_defaults(d, "vllm", {"top_k": 5}) == {"top_k": 5}
    assert generation_defaults(tmp_path) == {}  # no file: SamplingParams' defaults hold


@pytest.mark.parametrize("config, source, override, message", [
    ({"temperature": -1}, "auto", None, "generation_config.json are invalid: SamplingParams.temperature"),
    ({"top_p": 0}, "auto", None, "SamplingParams.top_p"),
    ({}, "auto", {"temprature": 0.5}, "temprature: not a sampling default"),
    ({}, "auto", {"max_new_tokens": 0}, "override_generation_config are invalid: SamplingParams.max_tokens"),
    ({}, "/nonexistent/dir", None, "no generation_config.json there"),
])
def test_bad_generation_config_is_named(tmp_path, config, source, override, message):
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        generation_defaults(tmp_path, source, override)


def test_not_json_is_named(tmp_path):
    (tmp_path / "generation_config.json").write_text("{temperature: 0.6")
    with pytest.raises(ValueError, match="generation_config.json is not readable JSON"):
        generation_defaults(tmp_path)


def test_llm_generate_without_parameters_takes_the_models_defaults(tmp_path):
    d = _with_generation_config(tmp_path, {"temperature": 0, "max_new_tokens": 5, "do_sample": True,
                                           "eos_token_id": 0})
    llm = LLM(str(d), dtype="float32")
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0, max_tokens=5)
    out = llm.generate(PROMPT)[0].outputs[0]
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids == greedy.token_ids
    # no parameters through the engine too
    rid = llm.engine.add_request(PROMPT)
    while llm.engine.has_unfinished_requests():
        for o in llm.engine.step():
            if o.finished:
                assert o.request_id == rid and o.outputs[0].token_ids == greedy.token_ids
    # "vllm": SamplingParams' own defaults; an override over the file's
    assert LLM(str(d), dtype="float32", generation_config="vllm").get_default_sampling_params() == SamplingParams()
    over = LLM(str(d), dtype="float32", override_generation_config={"temperature": 0.5})
    assert over.get_default_sampling_params() == SamplingParams(temperature=0.5, max_tokens=5)


def test_a_bad_generation_config_fails_the_load_with_the_file_named(tmp_path):
    d = _with_generation_config(tmp_path, {"temperature": -0.5})
    with pytest.raises(ValueError, match=r"generation_config.json are invalid.*generation_config='vllm'"):
        LLM(str(d))
    assert LLM(str(d), generation_config="vllm").get_default_sampling_params() == SamplingParams()


def test_to_sampling_params_fills_what_the_request_leaves_unset():
    from moe.serving.protocol import ChatCompletionRequest, CompletionRequest, to_sampling_params

    defaults = {"temperature": 0.6, "top_k": 20, "repetition_penalty": 1.3, "presence_penalty": 0.5}
    req = CompletionRequest(prompt="x")
    p = to_sampling_params(req, 16, None, defaults)
    assert (p.temperature, p.top_k, p.repetition_penalty, p.presence_penalty, p.top_p) == (0.6, 20, 1.3, 0.5, 1.0)
    # a value the request sends wins, even the neutral one
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], temperature=1.0, repetition_penalty=1.0,
                                presence_penalty=0.0, top_k=-1)
    p = to_sampling_params(req, 16, None, defaults)
    assert (p.temperature, p.top_k, p.repetition_penalty, p.presence_penalty) == (1.0, -1, 1.0, 0.0)
    assert to_sampling_params(CompletionRequest(prompt="x"), 16, None) == SamplingParams(max_tokens=16)


def test_server_requests_take_the_models_defaults(tmp_path):
    import httpx

    from moe.serving.api_server import ServerConfig, build_app
    from moe.serving.async_llm import AsyncLLM

    d = _with_generation_config(tmp_path, {"temperature": 0, "max_new_tokens": 6})
    llm = LLM(str(d), dtype="float32", max_model_len=256, kv_cache_memory="16MiB")
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0]
    sampled = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=7, max_tokens=6))[0].outputs[0]
    server = AsyncLLM(llm.engine)
    app = build_app(server, ServerConfig(model_path=str(d), served_model_names=["default"]))
    server.start()

    async def post(path: str, body: dict) -> dict:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            r = await c.post(path, json=body)
            assert r.status_code == 200, r.text
            return r.json()

    try:
        # completions: max_tokens stays OpenAI's 16 unless sent; temperature unset -> the model's 0
        got = asyncio.run(post("/v1/completions", {"prompt": PROMPT, "max_tokens": 6}))
        assert got["choices"][0]["text"] == greedy.text
        got = asyncio.run(post("/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0,
                                                   "seed": 7}))
        assert got["choices"][0]["text"] == sampled.text
        # chat: max_tokens unset -> the model's max_new_tokens (not all the context's room)
        got = asyncio.run(post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}))
        assert got["usage"]["completion_tokens"] == 6 and got["choices"][0]["finish_reason"] == "length"
    finally:
        server.shutdown()
