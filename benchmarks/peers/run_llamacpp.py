"""llama.cpp (through llama-cpp-python) on a bench_peers plan: ``python run_llamacpp.py PLAN.json
RESULT.json``, on the plan's GGUF conversion of the same checkpoint. llama-cpp-python's ``Llama`` holds
one sequence, so requests of a call run one after another (a burst's TTFTs then add up, as they would
for a user of it) and the batched workloads are skipped. Batch sizes as llama.cpp's own tools default:
logical batch 2048, micro-batch 512."""
from __future__ import annotations

import sys
import time

from workloads import Batch, main


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, plan: dict):
        import llama_cpp

        t = plan["threads"]
        self.settings = {"n_ctx": plan["max_model_len"], "n_batch": 2048, "n_ubatch": 512, "n_threads": t,
                         "n_threads_batch": t, "gguf": plan["gguf"], "version": llama_cpp.__version__}
        self.llm = llama_cpp.Llama(model_path=plan["gguf"], seed=plan["seed"], verbose=False,
                                   **{k: v for k, v in self.settings.items() if k.startswith("n_")})

    def generate(self, prompts: list[list[int]], max_tokens: list[int], sampling: dict | None = None) -> Batch:
        s = sampling or {"temperature": 0.0, "top_k": 1}
        kw = {"temp": s["temperature"], "top_k": s.get("top_k", 0), "top_p": s.get("top_p", 1.0), "min_p": 0.0}
        finish, tokens = [], []
        t0 = time.perf_counter()
        for prompt, m in zip(prompts, max_tokens):
            out: list[int] = []
            # Llama.generate never stops at EOS by itself (create_completion does): EOS is ignored
            for tok in self.llm.generate(prompt, reset=True, **kw):
                out.append(tok)
                if len(out) == m:
                    break
            finish.append(time.perf_counter() - t0)
            tokens.append(out)
        return Batch(time.perf_counter() - t0, finish, [len(t) for t in tokens], tokens)


if __name__ == "__main__":
    sys.exit(main(LlamaCpp, skip_kinds=("batched",)))
