#!/usr/bin/env python
"""Speculative decoding against plain decoding (issue 15's benchmark), every engine in one process.

Targets:
1. ``default``: the embedded default model (bf16) with its shipped drafter and MTP head; prompts are windows of
   real text (tests/data/prose), so n-gram lookup finds what text repeats.
2. ``mixtral``: the Mixtral-shaped random bf16 checkpoint of the benchmarks (vocab 32000, hidden
   1024, 8 layers, 8 experts top-2; benchmarks/peers/models.py) with a one-layer drafter cut from
   it and distilled by ``moe distill`` on the target's own generations from random prompts
   (``--prepare``, cached under ``--cache-dir``); prompts are random token ids. The drafter before
   distillation (the cut teacher, ``draft_cut``) runs too at batch 1: acceptance before and after.

Methods: ``plain``; ``ngram`` (prompt lookup); ``draft`` (the drafter); ``combo`` (``ngram_first``:
n-gram lookup where the suffix recurred, the drafter elsewhere); ``mtp`` (the default model's shipped
MTP-style head, ``moe distill --student mtp``; default target only) and ``mtp_combo`` (with
``ngram_first``); all with the engine's cost control
(``--no-cost-control``: K fixed). For each target, concurrency (1, 8, 32 requests in one
``generate``) and method: output tokens/s (wall clock, the median of ``--repeats`` runs, methods
interleaved so a shared host's load falls on all alike; a warm-up run first, from which cost control
has learned its costs), the ratio to plain, acceptance rate, mean acceptance length, acceptance per
draft position, the share of sequence-steps that drafted, and the cost model's prediction: the
speed-up it expects at the K it would pick now and at K_max, from its measured acceptance per
position and step costs (``moe.spec_cost``).

    python benchmarks/bench_spec.py --prepare --threads 1                  # build + distill the drafter
    python benchmarks/bench_spec.py --target all --threads 1               # the benchmark
    python benchmarks/bench_spec.py --quick                                # smoke test

The last line printed is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

METHODS = ("plain", "ngram", "draft", "combo", "mtp", "mtp_combo")
K = 3  # draft tokens per step at most


# ---- the Mixtral-shaped target's drafter ---------------------------------------------------------
def spec_dir(args) -> Path:
    return Path(args.cache_dir).expanduser() / "mixtral-spec"


def prepare_mixtral(args) -> dict:
    """The target checkpoint, its generations (token ids), the cut drafter and the distilled one."""
    from peers.models import ensure_checkpoint

    ckpt = ensure_checkpoint("mixtral", False, Path(args.cache_dir).expanduser(), 0)
    out = spec_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "generations.jsonl"
    if not data.is_file():
        from moe import LLM, SamplingParams

        t0 = time.perf_counter()
        llm = LLM(str(ckpt), kv_cache_memory="2GiB")
        rng = random.Random(1)
        prompts = [{"prompt_token_ids": [rng.randrange(3, 32000) for _ in range(16)]} for _ in range(args.gen_prompts)]
        # half greedy (what the benchmark decodes), half sampled at temperature 1 (variety)
        params = [SamplingParams(temperature=0 if i % 2 == 0 else 1.0, seed=i, max_tokens=args.gen_tokens,
                                 ignore_eos=True) for i in range(len(prompts))]
        outs = llm.generate(prompts, params)
        with data.open("w") as f:
            for o in outs:
                f.write(json.dumps(o.prompt_token_ids + o.outputs[0].token_ids) + "\n")
        print(f"[prepare] {len(outs)} generations of {args.gen_tokens} tokens in {time.perf_counter() - t0:.0f}s",
              flush=True)
        del llm
    before = out / "drafter-cut"
    if not (before / "config.json").is_file():
        from moe.distill_student import build_draft_student, save_student

        save_student(build_draft_student(ckpt, 1)[0], before, torch.bfloat16, ckpt)
    after = out / "drafter"
    if not (after / "config.json").is_file():
        cmd = [sys.executable, "-m", "moe", "distill", "--teacher", str(ckpt), "--student", "draft",
               "--draft-layers", "1", "--data", str(data), "--out", str(after), "--steps", str(args.distill_steps),
               "--batch-size", "4", "--seq-len", "128", "--lr", "2e-3", "--eval-windows", "16",
               "--threads", str(args.threads), "--force"]
        print("[prepare]", " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO)
        print(f"[prepare] distilled in {time.perf_counter() - t0:.0f}s", flush=True)
    report = json.loads((after / "training_report.json").read_text())
    return {"checkpoint": str(ckpt), "drafter": str(after), "drafter_cut": str(before), "training": report}


# ---- measuring ---------------------------------------------------------------------------------
def spec_config(method: str, drafters: dict, cost_control: bool) -> dict | None:
    if method == "plain":
        return None
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": K, "cost_control": cost_control}
    mtp = method.startswith("mtp")
    return {"method": "mtp" if mtp else "draft_model", "model": drafters["mtp" if mtp else "draft"],
            "num_speculative_tokens": K, "cost_control": cost_control, "ngram_first": method.endswith("combo")}


def _stats_snapshot(llm) -> tuple[int, int, int, list[int], list[int]]:
    s = llm.engine.spec_stats()
    return s.num_verify_steps, s.num_draft_tokens, s.num_accepted_tokens, list(s.drafted_at), list(s.accepted_at)


def _acceptance(before, after, out_tokens: int, num_requests: int) -> dict:
    verify, drafted, accepted = (after[i] - before[i] for i in range(3))
    pad = lambda xs: xs + [0] * (K - len(xs))  # noqa: E731
    per = [(a - a0) / max(d - d0, 1) for a, a0, d, d0 in zip(pad(after[4]), pad(before[4]), pad(after[3]),
                                                             pad(before[3]))]
    plain_steps = max(out_tokens - num_requests - verify - accepted, 0)
    return {"acceptance_rate": accepted / max(drafted, 1), "mean_acceptance_length": 1 + accepted / max(verify, 1),
            "acceptance_by_position": per, "drafting_share": verify / max(verify + plain_steps, 1),
            "draft_tokens": drafted}


def _prediction(llm, concurrency: int, method: str) -> dict:
    cost = llm.engine.spec_cost
    if cost is None or method == "plain":
        return {}
    out = {}
    sources = ("lookup",) if method == "ngram" else ("model", "lookup") if method.endswith("combo") else ("model",)
    for source in sources:
        if cost.step_costs(concurrency, source) is None:
            continue
        k = cost.best_k(concurrency, source)
        out[source] = {"k": k, "speedup": cost.speedup(k, concurrency, source),
                       "speedup_k_max": cost.speedup(K, concurrency, source)}
    return out


def measure(target: str, llms: dict, prompt_sets: list[list], max_tokens: int, concurrency: int,
            repeats: int) -> dict:
    from moe import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for name, llm in llms.items():  # warm-up: kernel shapes, and cost control learns this batch size
        llm.generate(prompt_sets[0], sp)
    times = {n: [] for n in llms}
    cpu = {n: [] for n in llms}
    snaps = {n: _stats_snapshot(llm) for n, llm in llms.items()}
    tokens = concurrency * max_tokens
    for r in range(repeats):
        for name, llm in llms.items():
            t0, c0 = time.perf_counter(), time.process_time()
            outs = llm.generate(prompt_sets[1 + r], sp)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            assert sum(len(o.outputs[0].token_ids) for o in outs) == tokens
    res = {}
    for name, llm in llms.items():
        # wall clock, and the process's CPU time: with one thread on a shared host the latter leaves
        # out the time other processes held the core
        row = {"tok_s": tokens / statistics.median(times[name]), "tok_s_cpu": tokens / statistics.median(cpu[name]),
               "runs_s": times[name], "runs_cpu_s": cpu[name]}
        if name != "plain":
            row |= _acceptance(snaps[name], _stats_snapshot(llm), tokens * repeats, concurrency * repeats)
            row["predicted"] = _prediction(llm, concurrency, name.split(":")[0])
        res[name] = row
    return res


def with_ratios(res: dict) -> dict:
    """Ratios to plain decoding: of the medians, and per round (each method's run against plain's run
    of the same round, minutes apart at most): their range shows how far the host's swings move a ratio."""
    for row in res.values():
        row["vs_plain"] = row["tok_s"] / res["plain"]["tok_s"]
        row["vs_plain_cpu"] = row["tok_s_cpu"] / res["plain"]["tok_s_cpu"]
        row["vs_plain_rounds"] = [p / t for t, p in zip(row["runs_s"], res["plain"]["runs_s"])]
    return res


def prompts_default(n_sets: int, concurrency: int, prompt_len: int) -> list[list]:
    from moe import LLM

    tok = LLM().get_tokenizer()
    text = " ".join(p.read_text() for p in sorted((REPO / "tests" / "data" / "prose").rglob("*.md")))
    ids = tok.encode(text)
    step = max((len(ids) - prompt_len) // (n_sets * concurrency), 1)
    windows = [ids[i * step:i * step + prompt_len] for i in range(n_sets * concurrency)]
    return [[{"prompt_token_ids": w} for w in windows[s * concurrency:(s + 1) * concurrency]] for s in range(n_sets)]


def prompts_random(n_sets: int, concurrency: int, prompt_len: int, vocab: int, seed: int) -> list[list]:
    rng = random.Random(seed)
    return [[{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(prompt_len)]} for _ in range(concurrency)]
            for _ in range(n_sets)]


def run_target(target: str, args, prep: dict | None) -> dict:
    from moe import LLM

    if target == "default":
        from moe.spec_decode import default_drafter_path, default_mtp_path

        model, drafters = None, {"draft": str(default_drafter_path()), "mtp": str(default_mtp_path())}
    else:
        model, drafters = prep["checkpoint"], {"draft": prep["drafter"], "draft_cut": prep["drafter_cut"]}
    names = [m for m in args.methods if m != "plain" and (not m.startswith("mtp") or "mtp" in drafters)]
    configs = {"plain": None}
    for m in names:
        configs[m] = spec_config(m, drafters, args.cost_control)
    out = {}
    for c in args.concurrency:
        # every engine compiles its GEMM shapes at load (as `moe serve --warmup`): a verify step brings
        # row counts plain decoding never runs, whose first use would otherwise land in a timed run
        opts = dict(kv_cache_memory=args.kv_cache_memory, max_num_seqs=max(c, 8), warmup=True)
        todo = dict(configs)
        if target == "mixtral" and "draft" in names and c == 1:  # acceptance before distillation
            todo["draft_cut"] = spec_config("draft", {"draft": drafters["draft_cut"]}, args.cost_control)
        sets = (prompts_default(1 + args.repeats, c, args.prompt_len) if target == "default" else
                prompts_random(1 + args.repeats, c, args.prompt_len, 32000 if not args.quick else 4096, seed=c))
        t0 = time.perf_counter()
        if args.sequential:  # one engine in memory at a time (large targets), measured one after another
            res = {}
            for n, cfg in todo.items():
                llm = LLM(model, **opts, speculative_config=cfg)
                res |= measure(target, {n: llm}, sets, args.max_tokens, c, args.repeats)
                del llm
                gc.collect()
        else:
            res = measure(target, {n: LLM(model, **opts, speculative_config=cfg) for n, cfg in todo.items()}, sets,
                          args.max_tokens, c, args.repeats)
        out[c] = with_ratios(res)
        print_table(target, c, out[c], time.perf_counter() - t0)
        gc.collect()
    return out


def _fmt_pred(pred: dict) -> str:
    return " ".join(f"{src[0]}:K={p['k']} x{p['speedup']:.2f} (K{K} x{p['speedup_k_max']:.2f})"
                    for src, p in pred.items())


def print_table(target: str, c: int, res: dict, seconds: float) -> None:
    print(f"\n{target}, {c} concurrent ({seconds:.0f}s)")
    print(f"{'method':<10} {'tok/s':>8} {'x plain':>8} {'cpu tok/s':>9} {'x plain':>8} {'accept':>7} {'mean len':>8} "
          f"{'per position':>16} {'drafting':>8}  predicted (source:K chosen, speed-up)   per round x plain")
    for name, r in res.items():
        rounds = r["vs_plain_rounds"]
        head = f"{name:<10} {r['tok_s']:8.1f} {r['vs_plain']:8.2f} {r['tok_s_cpu']:9.1f} {r['vs_plain_cpu']:8.2f}"
        spread = f"   {min(rounds):.2f}-{max(rounds):.2f}"
        if name == "plain":
            print(head)
            continue
        per = " ".join(f"{x:.2f}" for x in r["acceptance_by_position"])
        print(f"{head} {r['acceptance_rate']:7.2f} "
              f"{r['mean_acceptance_length']:8.2f} {per:>16} {r['drafting_share']:8.2f}  {_fmt_pred(r['predicted'])}"
              f"{spread}")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="all", help="default, mixtral or all")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--no-cost-control", dest="cost_control", action="store_false")
    ap.add_argument("--sequential", action="store_true", help="one engine in memory at a time, measured in turn "
                                                              "(not interleaved): for targets too large for five")
    ap.add_argument("--prepare", action="store_true", help="only build the Mixtral-shaped target's drafters")
    ap.add_argument("--cache-dir", default="~/.cache/moe-bench")
    ap.add_argument("--gen-prompts", type=int, default=96, help="--prepare: target generations to distill on")
    ap.add_argument("--gen-tokens", type=int, default=240)
    ap.add_argument("--distill-steps", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="smoke test: the default model, batch 1 and 4, 16 tokens")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.methods = args.methods.split(",")
    if "plain" not in args.methods:
        args.methods.insert(0, "plain")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.quick:
        args.target, args.concurrency, args.max_tokens, args.repeats = "default", [1, 4], 16, 1
    targets = ["default", "mixtral"] if args.target == "all" else args.target.split(",")
    prep = prepare_mixtral(args) if "mixtral" in targets or args.prepare else None
    if args.prepare:
        print(json.dumps({"prepare": prep}))
        return
    results = {t: run_target(t, args, prep) for t in targets}
    meta = {"threads": args.threads, "max_tokens": args.max_tokens, "prompt_len": args.prompt_len,
            "sequential": args.sequential,
            "repeats": args.repeats, "k_max": K, "cost_control": args.cost_control, "cpu": platform.processor()
            or platform.machine(), "torch": torch.__version__}
    if prep is not None:
        tr = prep["training"]
        meta["mixtral_drafter"] = {k: tr.get(k) for k in ("command", "before", "after", "seconds") if k in tr}
    print(json.dumps({"meta": meta, "results": results}))


if __name__ == "__main__":
    main()
