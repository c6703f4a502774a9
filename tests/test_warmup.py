"""The start-up warm-up (moe.warmup): after it, a burst of varied requests builds no new oneDNN
GEMM kernel, and outputs are unchanged. oneDNN reports each primitive creation with
ONEDNN_VERBOSE=profile_create (cache_miss: a new kernel was built), read here in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, random, sys
    import torch
    torch.set_num_threads(1)
    from moe import LLM, SamplingParams
    llm = LLM(sys.argv[1], dtype="bfloat16", warmup=sys.argv[2] == "1", max_num_batched_tokens=256, max_num_seqs=8)
    print("MARK", flush=True)
    r = random.Random(0)
    lens = (5, 40, 150, 200, 17, 90, 1, 33, 64, 129)  # prefill chunks, decode batches of 1-8 rows
    prompts = [{"prompt_token_ids": [r.randrange(3, 300) for _ in range(n)]} for n in lens]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    print("END", flush=True)
    print("TOKENS " + json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
""")


def _run(path, warm: bool) -> tuple[list[str], list]:
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(path), "1" if warm else "0"], capture_output=True,
                       text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT, "ONEDNN_VERBOSE": "profile_create"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    after = lines[lines.index("MARK"):lines.index("END")]
    misses = [ln.split(",")[-2] for ln in after if "create:cache_miss" in ln and ",matmul," in ln]
    tokens = json.loads(next(ln for ln in lines if ln.startswith("TOKENS "))[7:])
    return misses, tokens


# Where oneDNN has no bf16 GEMMs (CPUs without AVX512-BF16/AMX, e.g. AVX2-only ones) torch runs its
# own kernels, which build nothing: there is nothing to warm up and no cache miss to count.
needs_onednn_bf16 = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                       reason="oneDNN runs no bf16 GEMM on this CPU: no kernels are built to warm up")


@needs_onednn_bf16
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_requests_after_warm_up_build_no_gemm_kernel(family, checkpoint):
    # experts (per-expert and batched), attention and dense/shared MLP projections, router, LM head,
    # MLA's per-head GEMMs: every shape and layout a step makes was built at load
    misses, _ = _run(checkpoint(family), warm=True)
    assert misses == [], f"GEMM shapes built after the warm-up: {misses}"


def test_outputs_are_the_same_with_and_without_warm_up(checkpoint):
    path = checkpoint("mixtral")
    _, cold = _run(path, warm=False)
    _, warm = _run(path, warm=True)
    assert cold == warm


@needs_onednn_bf16
def test_without_warm_up_requests_build_kernels(checkpoint):
    # the check above can fail: the same requests without the warm-up build kernels (with AMX the
    # experts run in amx.c at every row count, so only the projections' and LM head's prompt-sized
    # GEMMs are left to oneDNN: a handful of shapes, not dozens)
    cold_misses, _ = _run(checkpoint("mixtral"), warm=False)
    assert cold_misses
