"""Two-rank serving under torchrun (gloo, tensor parallel 2): rank 0 serves HTTP, both ranks step
in lock-step and the answers equal the single-process engine's; killing a rank ends the server
with an error within the sharding's timeout instead of hanging."""
from __future__ import annotations

import signal
import sys
import time

import httpx
import psutil
import pytest
from test_serve import PROMPT, start_server

TIMEOUT_S = 20
LAUNCHER = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


@pytest.fixture(scope="module")
def spmd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spmd")
    (tmp / "tp2.yaml").write_text(f"tensor_parallel: 2\nbackend: gloo\ntimeout_seconds: {TIMEOUT_S}\n")
    s = start_server(tmp, "--sharding", str(tmp / "tp2.yaml"), launcher=LAUNCHER)
    yield s
    s.stop()


def test_two_ranks_equal_single_process(spmd):
    from openai import OpenAI

    from moe import LLM, SamplingParams

    prompts = [PROMPT, "The capital of France", "Story 3: the moon"]
    llm = LLM(dtype="float32", max_model_len=512, kv_cache_memory="64MiB")
    want = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))]
    seeded = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.8, seed=5))[0].outputs[0].text
    client = OpenAI(base_url=f"{spmd.url}/v1", api_key="unused", max_retries=0, timeout=120)
    got = client.completions.create(model="default", prompt=prompts, max_tokens=12, temperature=0.0)
    assert [c.text for c in got.choices] == want
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="default", prompt=PROMPT, max_tokens=12, temperature=0.8, seed=5, stream=True) if c.choices)
    assert streamed == seeded


def test_killing_a_rank_ends_the_server_with_an_error(spmd):
    ranks = [p for p in psutil.Process(spmd.proc.pid).children(recursive=True)
             if p.environ().get("RANK") in ("0", "1") and "moe" in " ".join(p.cmdline())]
    victim = next(p for p in ranks if p.environ()["RANK"] == "1")
    # a request in flight when the rank dies gets an error or a closed stream, never a hang
    with httpx.Client(timeout=TIMEOUT_S * 3) as c:
        with c.stream("POST", f"{spmd.url}/v1/completions",
                      json={"model": "default", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True,
                            "stream": True}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            t0 = time.monotonic()
            victim.send_signal(signal.SIGKILL)
            tail = []
            try:
                for line in lines:
                    tail.append(line)
            except httpx.HTTPError:
                pass
    assert not any('"finish_reason":"length"' in line for line in tail)
    code = spmd.proc.wait(TIMEOUT_S * 3)
    assert code != 0
    assert time.monotonic() - t0 < TIMEOUT_S * 3
    assert "another rank has probably died" in spmd.tail(), spmd.tail()
