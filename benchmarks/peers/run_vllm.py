"""vLLM's CPU build on a bench_peers plan: ``python run_vllm.py PLAN.json RESULT.json``, run by vLLM's own
interpreter with its CPU environment (LD_PRELOAD of tcmalloc and libiomp5, VLLM_CPU_KVCACHE_SPACE,
VLLM_CPU_OMP_THREADS_BIND: bench_peers.py sets them). The checkpoint has no tokenizer: prompts go in
as token ids and nothing is detokenized. Its first start compiles the model graph (cached under
~/.cache/vllm); that is start-up time, never inside a workload."""
from __future__ import annotations

import sys
import time

from workloads import Batch, main


class VLLM:
    name = "vllm"
    returns_logprobs = True

    def __init__(self, plan: dict):
        import vllm
        from vllm import LLM, SamplingParams

        self.SamplingParams = SamplingParams
        self.settings = {"max_model_len": plan["max_model_len"], "max_num_seqs": plan["max_num_seqs"],
                         "version": vllm.__version__}
        self.llm = LLM(model=plan["model_dir"], dtype="bfloat16", skip_tokenizer_init=True, seed=plan["seed"],
                       max_model_len=plan["max_model_len"], max_num_seqs=plan["max_num_seqs"])
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        self.settings |= {"max_num_batched_tokens": sched.max_num_batched_tokens,
                          "chunked_prefill": getattr(sched, "enable_chunked_prefill", None)}

    def generate(self, prompts: list[list[int]], max_tokens: list[int], sampling: dict | None = None) -> Batch:
        s = dict(sampling or {"temperature": 0.0})
        if s.get("top_k") == 0:
            s["top_k"] = -1  # (its "off" before 0.7; 0 since: either way off)
        params = [self.SamplingParams(max_tokens=m, ignore_eos=True, detokenize=False, **s) for m in max_tokens]
        engine = self.llm.llm_engine
        t0 = time.perf_counter()
        # LLM.generate's own loop (enqueue, then step until done), with each request's finish time kept
        self.llm.enqueue([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        done: list[tuple[int, float, list[int]]] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done.append((int(out.request_id), time.perf_counter() - t0, list(out.outputs[0].token_ids)))
        wall = time.perf_counter() - t0
        if len(done) != len(prompts):
            raise RuntimeError(f"vllm: {len(done)} of {len(prompts)} requests finished")
        done.sort()  # its request ids count up in submission order (LLM.generate sorts its outputs the same way)
        return Batch(wall, [d[1] for d in done], [len(d[2]) for d in done], [d[2] for d in done])


if __name__ == "__main__":
    sys.exit(main(VLLM))
