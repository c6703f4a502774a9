"""One rank of a multi-process test: build ``LLM(model, sharding=...)`` for each case of a spec
and write this rank's outputs as JSON. Run it under torchrun (or with RANK/WORLD_SIZE/
MASTER_ADDR/MASTER_PORT set by hand), the same way on every rank:

    torchrun --standalone --nproc-per-node 2 generate.py spec.json out_dir

spec.json: {"cases": [{"name", "model", "sharding", "requests" (optional, else the spec's)}],
"requests": [{"prompt_token_ids", "params"}], "die": {"rank", "step", "stall"} (optional: before
that step, that rank calls os._exit(1), or with "stall" sleeps that many seconds and then exits)}.
Each case writes ``out_dir/<name>.rank<r>.json``: token ids, logprobs, prompt logprobs, finish
reasons, the number of steps where this rank's own sampling differed from rank 0's (its
data-parallel group's first rank), the tokens this rank ran through the model, and layout facts.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe import LLM, SamplingParams  # noqa: E402

torch.set_num_threads(1)


def main(spec_path: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    die = spec.get("die")
    for case in spec["cases"]:
        reqs = case.get("requests") or spec["requests"]
        requests = [{"prompt_token_ids": r["prompt_token_ids"]} for r in reqs]
        params = [SamplingParams(**r["params"]) for r in reqs]
        llm = LLM(case["model"], dtype="float32", block_size=4, sharding=case["sharding"], record_expert_counts=True,
                  **case.get("llm", {}))
        engine = llm.engine
        rank = engine.parallel.rank
        if die is not None and rank == die["rank"]:
            step, steps = engine.step, [0]

            def dying_step():
                steps[0] += 1
                if steps[0] == die["step"]:
                    time.sleep(die.get("stall", 0))
                    os._exit(1)
                return step()

            engine.step = dying_step
        outs = llm.generate(requests, params)
        counts = llm.expert_counts().tolist()  # every rank calls it (an all-reduce with data_parallel > 1)
        moe = engine.model.sparse_layers()[0]
        attn = engine.model.layers[0].self_attn
        dispatcher = moe.dispatcher
        wrappers = []
        while hasattr(dispatcher, "inner"):  # DataParallelDispatcher -> SplitTokensDispatcher -> EP dispatcher
            wrappers.append(type(dispatcher).__name__)
            dispatcher = dispatcher.inner
        result = {
            "rank": rank, "world_size": engine.parallel.world_size,
            "outputs": [{"token_ids": o.outputs[0].token_ids, "finish_reason": o.outputs[0].finish_reason,
                         "logprobs": [{str(k): v for k, v in d.items()} for d in o.outputs[0].logprobs or []],
                         "prompt_logprobs": [None if d is None else {str(k): v for k, v in d.items()}
                                             for d in o.prompt_logprobs or []]}
                        for o in outs],
            "sampling_mismatches": engine.sampling_mismatches,
            "slot_experts": list(moe.experts.slot_experts),
            "expert_intermediate": moe.experts.intermediate,
            "dispatcher": type(dispatcher).__name__,
            "dispatcher_wrappers": wrappers,
            "dp_rank": engine.parallel.dp_rank, "tp_rank": engine.parallel.tp_rank,
            "num_tokens_run": engine.runner.num_tokens_run,
            "heads": attn.num_heads,
            "kv_cache_shape": list(engine.kv_caches[0][0].shape),
            "spec_drafted": engine.spec_drafted, "spec_accepted": engine.spec_accepted,
            "expert_counts": counts,
        }
        (out / f"{case['name']}.rank{rank}.json").write_text(json.dumps(result))
        del llm, engine


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
