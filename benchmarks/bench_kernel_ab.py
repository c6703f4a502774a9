"""Two builds of the CPU kernels side by side: a kernel change measured old/new in one process.

On a shared host whose speed drifts minute to minute, separate runs of "before" and "after" compare
the host's phases more than the kernels. This loads the library built from two source directories
(``--a``: this checkout's ``cpu_kernels/`` unless given; ``--b``: a copy with the edit, or the
other way round), checks that both give the same result, then times them in alternating rounds
(the order flipped every round) and prints each build's median rate and every round's ratio.

    cp -r cpu_kernels /tmp/kernels_old        # before editing amx.c
    python benchmarks/bench_kernel_ab.py --b /tmp/kernels_old --rows 2048 --rounds 12
    python benchmarks/bench_kernel_ab.py --b /tmp/kernels_old --shape 32,1024,512,4   # Qwen3/DeepSeek experts

Operation: the local MoE layer after the router (``cpu_kernels.amx_moe``: dispatch, SwiGLU experts,
combine), bf16, random weights and routing; rate in GMAC/s of the experts' GEMMs. Needs AMX.
With ``--decode CKPT``: the engine's batch-1 decode of that checkpoint instead (bf16, a 64-token
prompt (``--decode-prompt``), 128 new tokens, greedy; rate in tokens/s), one engine whose every kernel call goes to the
build of the round -- a change to any kernel of the captured step measured whole; ``--seqs N``: N
sequences decoding together (steps of N rows: batched decode), tokens/s of all of them:

    python benchmarks/bench_kernel_ab.py --b /tmp/kernels_old --decode ~/.cache/moe-bench/mixtral --rounds 8
    python benchmarks/bench_kernel_ab.py --b /tmp/kernels_old --decode ~/.cache/moe-bench/deepseek_v3 \
        --decode-prompt 2048        # attention over 2048-2176 cached tokens
    python benchmarks/bench_kernel_ab.py --b /tmp/kernels_old --decode ~/.cache/moe-bench/qwen3 --seqs 16

With ``--prefill CKPT``: a burst of ``--prompts`` random prompts of ``--prompt-len`` tokens, one
generated token each (bench_peers' burst workload), new prompts every run, the prefix cache off;
rate in prompt tokens/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cpu_kernels  # noqa: E402
from cpu_kernels import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", default=str(REPO / "cpu_kernels"), help="kernel sources of build A (default: this checkout)")
    ap.add_argument("--b", required=True, help="kernel sources of build B")
    ap.add_argument("--shape", default="8,1024,2816,2", help="experts E, hidden D, intermediate F, top-k K")
    ap.add_argument("--rows", type=int, default=2048, help="tokens in the step")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--reps", type=int, default=3, help="calls per build per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode", metavar="CKPT", help="time the engine's batch-1 decode of this checkpoint instead")
    ap.add_argument("--prefill", metavar="CKPT", help="time the engine's prompt burst of this checkpoint instead")
    ap.add_argument("--prompts", type=int, default=16, help="--prefill: prompts in the burst")
    ap.add_argument("--prompt-len", type=int, default=2048, help="--prefill: tokens per prompt")
    ap.add_argument("--seqs", type=int, default=1,
                    help="--decode: sequences decoding together (each step's rows; tokens/s of all of them)")
    ap.add_argument("--decode-prompt", type=int, default=64,
                    help="--decode: prompt tokens before the 128 decoded (the context attention reads)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="--decode / --prefill: the KV cache's (auto, fp8)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    libs = {"A": build.build_library(args.a), "B": build.build_library(args.b)}
    build.use_library(libs["A"])
    if args.decode:
        return decode(args, libs)
    if args.prefill:
        return prefill(args, libs)
    if not cpu_kernels.amx_available():
        sys.exit("the AMX kernels do not run on this machine (no AMX-BF16, or Linux refused the tile state)")
    E, D, F, K = (int(v) for v in args.shape.split(","))
    g = torch.Generator().manual_seed(args.seed)
    w13 = (torch.randn(E, 2 * F, D, generator=g) * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(E, D, F, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(args.rows, D, generator=g).to(torch.bfloat16)
    weights, ids = torch.topk(torch.softmax(torch.randn(args.rows, E, generator=g), -1), K)

    def call(name: str) -> torch.Tensor:
        build.use_library(libs[name])
        return cpu_kernels.amx_moe(x, ids, weights, w13, w2)

    ya, yb = call("A"), call("B")
    diff = (ya.float() - yb.float()).abs().max().item()
    macs = args.rows * K * 3 * D * F

    def run(name: str) -> float:  # GMAC/s of the experts' GEMMs, a warm call first
        call(name)
        t = time.perf_counter()
        for _ in range(args.reps):
            call(name)
        return macs * args.reps / (time.perf_counter() - t) / 1e9

    print(f"amx_moe, {args.rows} rows, E={E} D={D} F={F} top-{K}, {args.threads} threads; "
          f"outputs {'bit-identical' if diff == 0 else f'differ by up to {diff:.3g}'}")
    rates, ratios = alternate(args, run, "{:.0f}", "GMAC/s")
    rate = {n: statistics.median(v) for n, v in rates.items()}
    print(json.dumps({"benchmark": "bench_kernel_ab", "op": "amx_moe", "rows": args.rows, "shape": [E, D, F, K],
                      "threads": args.threads, "a": args.a, "b": args.b, "max_abs_diff": diff,
                      "gmac_s": rate, "b_over_a_by_round": ratios}))


def alternate(args: argparse.Namespace, run, fmt: str, unit: str = "tok/s") -> tuple[dict, list[float]]:
    """``run(build)`` (a rate) for builds A and B in turn, the order flipped every round; prints each
    build's median and rounds and the B / A ratio by round (> 1: B faster)."""
    rates: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            rates[name].append(run(name))
    ratios = [b / a for a, b in zip(rates["A"], rates["B"])]
    for n, src in (("A", args.a), ("B", args.b)):
        print(f"  {n} {src}: median {fmt.format(statistics.median(rates[n]))} {unit}  "
              + " ".join(fmt.format(v) for v in rates[n]))
    print(f"  B / A speed by round: {' '.join(f'{q:.2f}' for q in ratios)}; mean {statistics.mean(ratios):.3f}, "
          f"B faster in {sum(q > 1 for q in ratios)} of {len(ratios)}")
    return rates, ratios


def decode(args: argparse.Namespace, libs: dict) -> None:
    """Decode tokens/s of one engine (``--seqs`` sequences together, batch 1 by default), the builds
    alternating by round (order flipped)."""
    from moe import LLM, SamplingParams

    llm = LLM(args.decode, dtype="bfloat16", kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=max(args.seqs, 8))
    sp = SamplingParams(temperature=0, max_tokens=129, ignore_eos=True)
    prompts = [{"prompt_token_ids": [100 + (i + 7919 * s) % 30000 for i in range(args.decode_prompt)]}
               for s in range(args.seqs)]

    def run(name: str) -> tuple[float, list[list[int]]]:
        build.use_library(libs[name])
        outs = llm.generate(prompts, sp)
        # the decode phase: from the last first token to the last token (all start in one step)
        seconds = max(o.metrics.latency for o in outs) - max(o.metrics.ttft for o in outs)
        return 128 * len(outs) / seconds, [o.outputs[0].token_ids for o in outs]

    run("A")  # (the first run computes the prompts; later ones find them in the prefix cache)
    same = run("A")[1] == run("B")[1]
    print(f"decode of {args.seqs} sequence(s) of {args.decode} after {args.decode_prompt} prompt tokens, "
          f"{args.threads} threads; greedy tokens {'identical' if same else 'DIFFER'}")
    rates, ratios = alternate(args, lambda name: run(name)[0], "{:.1f}")
    print(json.dumps({"benchmark": "bench_kernel_ab", "op": "decode", "model": args.decode,
                      "prompt": args.decode_prompt, "seqs": args.seqs, "threads": args.threads,
                      "a": args.a, "b": args.b, "same_tokens": same,
                      "tok_s": {n: statistics.median(v) for n, v in rates.items()}, "b_over_a_by_round": ratios}))


def prefill(args: argparse.Namespace, libs: dict) -> None:
    """Prompt tokens/s of a burst through one engine, the builds alternating by round (order flipped)."""
    import random

    from moe import LLM, SamplingParams

    # no prefix cache: every run computes its whole prompts, and both builds' tokens can be compared
    llm = LLM(args.prefill, dtype="bfloat16", kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=max(args.prompts, 8),
              warmup=True, enable_prefix_caching=False)
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(args.seed)
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def tokens(name: str, prompts: list[dict]) -> list[list[int]]:
        build.use_library(libs[name])
        return [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]

    def fresh(n: int) -> list[dict]:
        return [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(args.prompt_len)]} for _ in range(n)]

    def run(name: str) -> float:
        prompts = fresh(args.prompts)
        t = time.perf_counter()
        tokens(name, prompts)
        return args.prompts * args.prompt_len / (time.perf_counter() - t)

    run("A")  # (first calls: buffers, shapes)
    run("B")
    prompts = fresh(2)
    same = tokens("A", prompts) == tokens("B", prompts)  # (no prefix cache: B computes every row again)
    print(f"prompt burst of {args.prefill}: {args.prompts} x {args.prompt_len} tokens, {args.threads} threads; "
          f"first tokens {'identical' if same else 'DIFFER'}")
    rates, ratios = alternate(args, run, "{:.0f}")
    print(json.dumps({"benchmark": "bench_kernel_ab", "op": "prefill", "model": args.prefill, "threads": args.threads,
                      "prompts": args.prompts, "prompt_len": args.prompt_len, "a": args.a, "b": args.b,
                      "same_tokens": same,
                      "tok_s": {n: statistics.median(v) for n, v in rates.items()}, "b_over_a_by_round": ratios}))


if __name__ == "__main__":
    main()
