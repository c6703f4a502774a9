"""The measurement loop every engine runs, in its own process (standard library only: it is imported by
vLLM's interpreter too, whose environment has neither our package nor ours its).

An engine adapter offers one call, ``generate(prompts, max_tokens) -> Batch``: submit every request at
once, greedy, EOS ignored, and report for each request when its last token arrived (seconds since the
call began) and how many tokens it produced. Every number below is derived from that one call the
same way for every engine, so the engines differ only in what they do inside it:

- batch 1: TTFT is the wall time of a one-token request (median over fresh prompts); the decode rate
  is ``(new_tokens - 1) / (wall of a new_tokens request - TTFT)`` (best run);
- batched: generated tokens / wall of one call holding all the requests;
- prefill burst: prompt tokens / wall of one call of one-token requests, and their mean TTFT (a request
  with one output token finishes at its first token).

The plan (prompts as token ids, output lengths) comes from the parent as JSON, the result goes back as
JSON in a file: vLLM also logs to stdout, so stdout is never parsed.
"""
from __future__ import annotations

import json
import mmap
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass
class Batch:
    wall_s: float
    finish_s: list[float]  # per request, since the call began
    generated: list[int]  # tokens produced per request
    tokens: list[list[int]] | None = None  # the token ids, where the engine returns them


class Engine(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], max_tokens: list[int], sampling: dict | None = None) -> Batch:
        """``sampling``: None for greedy, else ``{"temperature", "top_p", "top_k"}`` (top_k 0: off), or
        ``{"temperature", "logprobs"}`` for an engine that sets ``returns_logprobs``."""
        ...


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def _checked(engine: Engine, prompts: list[list[int]], max_tokens: list[int], sampling: dict | None = None) -> Batch:
    b = engine.generate(prompts, max_tokens, sampling)
    if b.generated != list(max_tokens):  # ignore_eos: every request must produce exactly what it asked
        bad = next(i for i, (g, m) in enumerate(zip(b.generated, max_tokens)) if g != m)
        raise RuntimeError(f"{engine.name}: request {bad} produced {b.generated[bad]} tokens, asked {max_tokens[bad]}")
    return b


def read_probe(gib: float = 1.0, repeats: int = 3) -> float:
    """Read bandwidth in GB/s over a ``gib`` GiB float32 array on huge pages where Linux gives them
    (as the engines' weights are: 4 KiB pages read 6-35% slower in six pairs on a Zen 4 EPYC), best of
    ``repeats`` and of the reads :func:`probe_method` names: ``torch.sum`` with this process's threads,
    and numpy's sum over as many slices, one Python thread each (numpy's reductions release the GIL).
    Neither is always the faster: on a 2-vCPU Xeon numpy's read 31 GB/s where ``torch.sum`` read 25-26.
    Without torch (llama-cpp-python's own venv) numpy's alone, with a thread per CPU the process may use."""
    method = probe_method()
    region = _huge_page_region(int(gib * 1024**3) // 4 * 4)
    reads = []
    if "torch" in method:
        import torch

        x = torch.frombuffer(region, dtype=torch.float32)
        x.fill_(1.0)  # (faults the pages in: untouched ones would all read the one zero page)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t0)
        reads.append(x.numel() * 4 / best / 1e9)
        del x
    if "numpy" in method:
        threads = torch.get_num_threads() if "torch" in method else len(os.sched_getaffinity(0))
        reads.append(_numpy_read_probe(region, repeats, threads, fill="torch" not in method))
    return max(reads)


def probe_method() -> str:
    """Which reads :func:`read_probe` takes the best of here: ``"torch+numpy"`` (``"torch"`` without numpy),
    or ``"numpy"`` where torch is absent, with ``" huge"`` where its memory is advised onto huge pages
    (probes of different methods are not comparable)."""
    return _reads() + (" huge" if hasattr(mmap, "MADV_HUGEPAGE") else "")


def _reads() -> str:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "numpy"
    try:
        import numpy  # noqa: F401
    except ImportError:
        return "torch"
    return "torch+numpy"


def _huge_page_region(nbytes: int) -> mmap.mmap:
    """Fresh anonymous memory, advised onto transparent huge pages before it is written (Linux)."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    return region


def _numpy_read_probe(region: mmap.mmap, repeats: int, threads: int, fill: bool) -> float:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    x = np.frombuffer(region, dtype=np.float32)
    if fill:
        x[:] = 1.0
    parts = np.array_split(x, max(threads, 1))
    best = float("inf")
    with ThreadPoolExecutor(len(parts)) as pool:
        list(pool.map(np.sum, parts))  # touch
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return x.nbytes / best / 1e9


def _warm_sampling(engine: Engine, prompt: list[int], sampling: dict | None) -> None:
    """One untimed request with the workload's sampling (an engine may build its path for it on first
    use, as vLLM does for log-probs; the plan's warm-up is greedy)."""
    if sampling:
        _checked(engine, [prompt], [2], sampling)


def batch1(engine: Engine, w: dict) -> dict:
    sampling = w.get("sampling")
    _warm_sampling(engine, w["ttft_prompts"][0], sampling)
    ttfts = [_checked(engine, [p], [1], sampling).wall_s for p in w["ttft_prompts"]]
    ttft = statistics.median(ttfts)
    new = w["new_tokens"]
    # the host's memory bandwidth moves by up to 2x within seconds: a probe before and after each decode
    # run, in this process, is the reference for that run's weight read rate (the mean of the two)
    probes = [read_probe()]
    runs = []
    for p in w["decode_prompts"]:
        runs.append(_checked(engine, [p], [new], sampling))
        probes.append(read_probe())
    rates = [(new - 1) / (b.wall_s - ttft) for b in runs]
    # the first run's greedy tokens: the parent compares engines on them (same model, same prompt)
    return {"ttft_s": ttft, "all_ttft_s": ttfts, "decode_tok_s": max(rates), "all_decode_tok_s": rates,
            "prompt_len": len(w["decode_prompts"][0]), "new_tokens": new,
            "greedy_tokens": runs[0].tokens[0] if runs[0].tokens and sampling is None else None,
            "probe_GBps": statistics.fmean(probes), "probe_before_GBps": probes[0], "probe_after_GBps": probes[-1],
            "run_probes_GBps": [(a + b) / 2 for a, b in zip(probes, probes[1:])], "probe_method": probe_method()}


def batched(engine: Engine, w: dict) -> dict:
    _warm_sampling(engine, w["prompts"][0], w.get("sampling"))
    b = _checked(engine, w["prompts"], w["max_tokens"], w.get("sampling"))
    gen = sum(b.generated)
    return {"requests": len(w["prompts"]), "wall_s": b.wall_s, "generated_tokens": gen, "gen_tok_s": gen / b.wall_s,
            "prompt_tokens": sum(len(p) for p in w["prompts"])}


def burst(engine: Engine, w: dict) -> dict:
    b = _checked(engine, w["prompts"], [1] * len(w["prompts"]))
    tokens = sum(len(p) for p in w["prompts"])
    return {"requests": len(w["prompts"]), "prompt_len": len(w["prompts"][0]), "wall_s": b.wall_s,
            "prefill_tok_s": tokens / b.wall_s, "mean_ttft_s": statistics.fmean(b.finish_s),
            "max_ttft_s": max(b.finish_s)}


KINDS: dict[str, Callable[[Engine, dict], dict]] = {"batch1": batch1, "batched": batched, "burst": burst}


def _start(make_engine: Callable[[dict], Engine], plan: dict, save: Callable[[dict], None]) -> tuple[Engine, dict]:
    """Build the engine (its start-up and compile time reported, not timed in any workload) and warm it
    up on the plan's warm-up requests."""
    t0 = time.perf_counter()
    engine = make_engine(plan)
    out: dict = {"engine": engine.name, "start_s": time.perf_counter() - t0, "workloads": {}, "skipped": {},
                 "settings": getattr(engine, "settings", {}), "complete": False}
    t0 = time.perf_counter()
    for step in plan["warmup"]:
        _checked(engine, step["prompts"], step["max_tokens"])
    out["warmup_s"] = time.perf_counter() - t0
    log(f"{engine.name}: started in {out['start_s']:.1f}s, warmed up in {out['warmup_s']:.1f}s")
    save(out)
    return engine, out


def _run_workload(engine: Engine, w: dict, skip_kinds: tuple[str, ...]) -> dict | str:
    """One workload's result, or why this engine skips it."""
    if w["kind"] in skip_kinds:
        return f"{engine.name} serves one sequence at a time: no {w['kind']} workload"
    if "logprobs" in w.get("sampling", {}) and not getattr(engine, "returns_logprobs", False):
        return f"{engine.name}'s runner does not ask for log-probs"
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = KINDS[w["kind"]](engine, w)
    return r | {"kind": w["kind"], "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0],
                "total_s": time.perf_counter() - t0}


def run_plan(make_engine: Callable[[dict], Engine], plan: dict, skip_kinds: tuple[str, ...] = (),
             save: Callable[[dict], None] = lambda result: None) -> dict:
    """Start and warm up the engine, then run each workload once; ``save`` gets the result so far after
    each step (a run stopped by the parent's timeout keeps what it measured)."""
    engine, out = _start(make_engine, plan, save)
    for name, w in plan["workloads"].items():
        r = _run_workload(engine, w, skip_kinds)
        if isinstance(r, str):
            out["skipped"][name] = r
            continue
        out["workloads"][name] = r
        log(f"{engine.name}: {name} done in {r['total_s']:.1f}s")
        save(out)
    out["complete"] = True
    save(out)
    return out


def run_turns(make_engine: Callable[[dict], Engine], plan: dict, turns: str, skip_kinds: tuple[str, ...] = (),
              save: Callable[[dict], None] = lambda result: None) -> dict:
    """The engine kept alive between workloads, taking turns with the others (bench_peers --interleave):
    start and warm up as :func:`run_plan` does, write ``ready``, then run what the parent asks, one turn
    at a time. A turn is the file ``TURNS/turn`` holding ``SEQ ROUND WORKLOAD`` (``SEQ 0 exit`` ends);
    the engine answers in ``TURNS/done`` with the SEQ it finished, after saving the workload under
    ``rounds[ROUND]``; each round's requests are the plan's ``workloads_by_round[ROUND]`` (fresh
    prompts: the engine's prefix cache still holds the last round's). Every engine waits idle
    (sleeping, not spinning: a poll every 20 ms) while another runs, so each round compares the
    engines at one phase of the host."""
    engine, out = _start(make_engine, plan, save)
    out["rounds"] = []
    _write(os.path.join(turns, "done"), "ready")
    seen = None
    while True:
        try:
            with open(os.path.join(turns, "turn")) as f:
                turn = f.read().split()
        except FileNotFoundError:
            turn = []
        if len(turn) != 3 or turn[0] == seen:
            time.sleep(0.02)
            continue
        seen, rnd, name = turn[0], int(turn[1]), turn[2]
        if name == "exit":
            break
        while len(out["rounds"]) <= rnd:
            out["rounds"].append({"workloads": {}, "skipped": {}})
        w = plan["workloads_by_round"][rnd][name] if "workloads_by_round" in plan else plan["workloads"][name]
        # one untimed request first (the warm-up's short stream, rotated so no prefix is cached): the other
        # engine's turn left this one's threads asleep and its weights out of cache, and the first timed
        # request after it ran up to 2x slower than the next
        warm = plan["warmup"][0]
        k = int(seen) % len(warm["prompts"][0])
        _checked(engine, [warm["prompts"][0][k:] + warm["prompts"][0][:k]], warm["max_tokens"][:1])
        r = _run_workload(engine, w, skip_kinds)
        if isinstance(r, str):
            out["rounds"][rnd]["skipped"][name] = r
        else:
            out["rounds"][rnd]["workloads"][name] = r
            log(f"{engine.name}: {name} (round {rnd + 1}) done in {r['total_s']:.1f}s")
        save(out)
        _write(os.path.join(turns, "done"), seen)
    out["complete"] = True
    save(out)
    return out


def _write(path: str, text: str) -> None:
    """The whole file or nothing (the other side polls it)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(make_engine: Callable[[dict], Engine], skip_kinds: tuple[str, ...] = ()) -> int:
    """``python run_<engine>.py PLAN.json RESULT.json [TURNS_DIR]`` (with a turns directory: :func:`run_turns`)"""
    if len(sys.argv) not in (3, 4):
        print(f"usage: {sys.argv[0]} PLAN.json RESULT.json [TURNS_DIR]", file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        plan = json.load(f)

    def save(result: dict) -> None:  # whole file or nothing: the parent may read it after a timeout
        _write(sys.argv[2], json.dumps(result))

    if len(sys.argv) == 4:
        run_turns(make_engine, plan, sys.argv[3], skip_kinds, save)
    else:
        run_plan(make_engine, plan, skip_kinds, save)
    return 0
