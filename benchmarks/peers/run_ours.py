"""Our engine on a bench_peers plan: ``python run_ours.py PLAN.json RESULT.json`` (our venv, the repo on
PYTHONPATH). Settings as a server would start: bf16, start-up GEMM warm-up, the KV cache as large as
vLLM's (``VLLM_CPU_KVCACHE_SPACE``), the same sequence limit."""
from __future__ import annotations

import sys
import time

from workloads import Batch, main


class Ours:
    name = "ours"
    returns_logprobs = True

    def __init__(self, plan: dict):
        import torch

        from moe import LLM, SamplingParams

        torch.set_num_threads(plan["threads"])
        self.SamplingParams = SamplingParams
        self.settings = {"kv_cache_memory": f"{plan['kv_cache_gib']}GiB", "max_num_seqs": plan["max_num_seqs"],
                         "max_model_len": plan["max_model_len"], "warmup": True}
        self.llm = LLM(plan["model_dir"], dtype="bfloat16", seed=plan["seed"], **self.settings)
        eng = self.llm.engine
        self.settings |= {"max_num_batched_tokens": eng.config.max_num_batched_tokens, "warmup_s": eng.warmup_s,
                          "torch_threads": torch.get_num_threads()}

    def generate(self, prompts: list[list[int]], max_tokens: list[int], sampling: dict | None = None) -> Batch:
        s = sampling or {"temperature": 0.0}
        params = [self.SamplingParams(max_tokens=m, ignore_eos=True, **s) for m in max_tokens]
        t0 = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        wall = time.perf_counter() - t0
        errors = [o.error for o in outs if o.error]
        if errors:
            raise RuntimeError(f"ours: {len(errors)} request(s) failed, first: {errors[0]}")
        # the engine stamps finish times with the same perf_counter clock
        toks = [list(o.outputs[0].token_ids) for o in outs]
        return Batch(wall, [o.metrics.finished_time - t0 for o in outs], [len(t) for t in toks], toks)


if __name__ == "__main__":
    sys.exit(main(Ours))
