"""The kernels' AVX2 paths (what an AVX2-only CPU runs: ``MOE_KERNEL_MARCH=x86-64-v3``) through the
whole engine, against this CPU's build: the embedded model in bf16, its prompt scored token by
token and a greedy continuation decoded (multi-step, the captured step), each in its own process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(2)
from moe import LLM, SamplingParams
llm = LLM(dtype="bfloat16", max_logprobs=-1)
tok = llm.get_tokenizer()
ids = tok.encode("The module defines the following functions, each of them documented below: "
                 "parse, format, and the helpers they share. import os\nimport sys\n")
V = llm.engine.model_config.vocab_size
out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                              prompt_logprobs=V, logprobs=0))[0]
lp = [[d.get(v, float("-inf")) for v in range(V)] for d in out.prompt_logprobs[1:]]
import cpu_kernels
print(json.dumps({"lp": lp, "tokens": out.outputs[0].token_ids, "captured": llm.engine.runner.captured is not None,
                  "built": cpu_kernels.load() is not None}))
"""


def _cpu_flags() -> set[str]:
    try:
        line = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


def _run(march: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MOE_SHARDING")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if march:
        env["MOE_KERNEL_MARCH"] = march
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(cpu_kernels.load() is None, reason="the C kernels are not built here (no compiler)")
def test_the_avx2_build_runs_the_engine_as_this_build_does():
    if not {"avx2", "fma", "bmi2"} <= _cpu_flags():
        pytest.skip("this CPU cannot run x86-64-v3 code")
    here, avx2 = _run(None), _run("x86-64-v3")
    assert here["built"] and avx2["built"] and here["captured"] and avx2["captured"]
    a, b = torch.tensor(here["lp"]), torch.tensor(avx2["lp"])
    # bf16 weights and activations: the two builds' sums round differently, the scores stay close (here
    # KL 7e-5, one near-tie of 30 positions ordered the other way)
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    kl = float((a.exp() * (a - b)).nan_to_num(0.0).sum(-1).mean())
    assert agree >= 0.9 and kl < 1e-3, (agree, kl)
    # greedy continuations: the same tokens up to the first near-tie of the two builds' logits
    same = next((i for i, (x, y) in enumerate(zip(here["tokens"], avx2["tokens"])) if x != y), len(here["tokens"]))
    assert same >= 8, (here["tokens"], avx2["tokens"])
