#!/usr/bin/env python
"""Expert parallelism on CPU: bytes moved by each collective per engine step, and time spent in
communication versus compute, at EP=2 and EP=4 (gloo, one process per rank).

    python benchmarks/bench_parallel.py                 # EP=2 and EP=4, both dispatchers
    python benchmarks/bench_parallel.py --ranks 2 --dispatcher all_to_all

The parent builds a random Mixtral-shaped bf16 checkpoint (cached), then runs this file under
``torchrun`` once per layout. Every rank wraps the torch.distributed collectives the engine uses
(counting bytes and wall time) and generates the same batch; rank 0 prints a table, and the
parent prints one JSON line last. On 2 CPU cores, 4 ranks oversubscribe: compare ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLLECTIVES = ("all_to_all_single", "all_gather", "all_gather_into_tensor", "all_reduce", "reduce_scatter_tensor",
               "broadcast", "broadcast_object_list")


def build_checkpoint(path: Path) -> Path:
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=1024)
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def instrument() -> dict:
    """Wrap the collectives: bytes sent (input tensor size) and wall time per name."""
    import torch
    import torch.distributed as dist

    stats: dict = defaultdict(lambda: {"calls": 0, "bytes": 0, "seconds": 0.0})

    def size(args) -> int:
        return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor)) + sum(
            t.numel() * t.element_size() for a in args if isinstance(a, (list, tuple)) for t in a
            if isinstance(t, torch.Tensor))

    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, _name=name, **kw):
            t0 = time.perf_counter()
            out = _fn(*args, **kw)
            s = stats[_name]
            s["calls"] += 1
            s["bytes"] += size(args)
            s["seconds"] += time.perf_counter() - t0
            return out

        setattr(dist, name, wrapped)
    return stats


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    stats = instrument()
    from moe import LLM, SamplingParams

    world = int(os.environ["WORLD_SIZE"])
    llm = LLM(args.model, dtype="bfloat16", kv_cache_memory="256MiB",
              sharding=dict(tensor_parallel=world, expert_parallel=world, dispatcher=args.dispatcher))
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(0, 8000, (int(n),), generator=g).tolist()}
               for n in torch.randint(16, 129, (args.requests,), generator=g)]
    sp = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2))  # warm-up
    for s in stats.values():
        s.update(calls=0, bytes=0, seconds=0.0)
    steps = 0
    original_step = llm.engine.step

    def counted_step():
        nonlocal steps
        steps += 1
        return original_step()

    llm.engine.step = counted_step
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    wall = time.perf_counter() - t0
    if int(os.environ["RANK"]) == 0:
        comm = sum(s["seconds"] for s in stats.values())
        report = {"ranks": world, "dispatcher": args.dispatcher, "steps": steps, "wall_s": wall,
                  "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                  "comm_s": comm, "compute_s": wall - comm, "comm_fraction": comm / wall,
                  "per_step_bytes": {k: v["bytes"] / steps for k, v in stats.items() if v["calls"]},
                  "per_step_calls": {k: v["calls"] / steps for k, v in stats.items() if v["calls"]},
                  "seconds": {k: v["seconds"] for k, v in stats.items() if v["calls"]}}
        Path(args.out).write_text(json.dumps(report))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--dispatcher", nargs="*", default=["all_to_all", "all_gather"])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--cache-dir", default="/tmp/moe-bench-models")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.dispatcher = args.dispatcher[0]
        worker(args)
        return 0
    model = build_checkpoint(Path(args.cache_dir) / "mixtral-small")
    results = []
    for ranks in args.ranks:
        for disp in args.dispatcher:
            out = Path(args.cache_dir) / f"parallel-{ranks}-{disp}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   __file__, "--worker", "--model", str(model), "--out", str(out), "--dispatcher", disp,
                   "--requests", str(args.requests), "--tokens", str(args.tokens)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            r = json.loads(out.read_text())
            results.append(r)
            moved = {k: f"{v / 2**10:.0f} KiB" for k, v in r["per_step_bytes"].items()}
            print(f"EP={ranks} TP={ranks} {disp:10s} {r['tokens']} tok in {r['wall_s']:.1f}s over {r['steps']} steps; "
                  f"communication {r['comm_fraction']:.0%} of wall time; per step per rank: {moved}", flush=True)
    print(json.dumps({"benchmark": "bench_parallel", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
