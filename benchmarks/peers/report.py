"""Ratios of our engine against vLLM and llama.cpp, the issue's targets met or not, and the printed table.

Every ratio reads "higher is better for ours": rates are ours / theirs, times are theirs / ours."""
from __future__ import annotations

from dataclasses import dataclass

from .workloads import probe_method


@dataclass(frozen=True)
class Metric:
    key: str  # name in the report
    workload: str  # plan workload it comes from
    field: str  # field of that workload's result
    label: str  # "{...}" filled from the workload's result
    lower_is_better: bool = False
    scale: float = 1.0  # for printing (seconds -> ms)
    fmt: str = "{:.1f}"
    vllm_target: float | None = None  # the target for ours / vLLM (None: reported only)


METRICS = (
    Metric("decode_tok_s", "batch1", "decode_tok_s", "batch 1 decode tok/s ({prompt_len}+{new_tokens})",
           vllm_target=1.2),
    Metric("ttft_ms", "batch1", "ttft_s", "batch 1 TTFT ms ({prompt_len}-token prompt)", lower_is_better=True,
           scale=1e3, vllm_target=1.0),
    Metric("gen_tok_s_32", "batched32", "gen_tok_s", "{requests} requests: generated tok/s", vllm_target=1.3),
    Metric("gen_tok_s_64", "batched64", "gen_tok_s", "{requests} requests: generated tok/s", vllm_target=1.3),
    Metric("prefill_tok_s", "burst", "prefill_tok_s", "{requests}x{prompt_len} burst: prefill tok/s",
           fmt="{:.0f}", vllm_target=1.0),
    Metric("burst_ttft_ms", "burst", "mean_ttft_s", "{requests}x{prompt_len} burst: mean TTFT ms",
           lower_is_better=True, scale=1e3, fmt="{:.0f}", vllm_target=1.0),
    Metric("long_decode_tok_s", "long", "decode_tok_s", "batch 1 after {prompt_len}: decode tok/s (+{new_tokens})"),
    Metric("long_ttft_ms", "long", "ttft_s", "batch 1 after {prompt_len}: TTFT ms", lower_is_better=True, scale=1e3,
           fmt="{:.0f}"),
    Metric("sampled_decode_tok_s", "sampled", "decode_tok_s", "batch 1 sampled: decode tok/s"),
    Metric("sampled_gen_tok_s_32", "sampled32", "gen_tok_s", "{requests} requests sampled: generated tok/s"),
    Metric("logprobs_decode_tok_s", "logprobs", "decode_tok_s", "batch 1 greedy + 5 log-probs: decode tok/s"),
    Metric("logprobs_gen_tok_s_32", "logprobs32", "gen_tok_s", "{requests} requests + 5 log-probs: generated tok/s"),
)
PROBE_TARGET = 0.90  # batch-1 decode reads weights at >= 90% of the probe's bandwidth
ENGINES = ("ours", "vllm", "llama.cpp")


def _value(res: dict | None, m: Metric) -> float | None:
    w = (res or {}).get("workloads", {}).get(m.workload)
    return None if w is None else w[m.field]


def ratio(ours: float | None, theirs: float | None, lower_is_better: bool) -> float | None:
    if ours is None or theirs is None:
        return None
    return theirs / ours if lower_is_better else ours / theirs


def agreement(engines: dict) -> dict:
    """How many leading batch-1 greedy tokens each peer shares with ours (same prompt, same weights): a
    check that they run the same model. Random weights give near-tied logits, so bf16 rounding
    differences part them after a while even when all are right; a first token apart means a real mismatch."""
    def tokens(e: str) -> list[int] | None:
        return (engines.get(e) or {}).get("workloads", {}).get("batch1", {}).get("greedy_tokens")

    ours, out = tokens("ours"), {}
    for e in ENGINES[1:]:
        theirs = tokens(e)
        if ours and theirs:
            n = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            out[e] = {"common_prefix": n, "of": len(ours)}
    return out


def summarize(model: dict, probe_GBps: float) -> dict:
    """Per metric: each engine's value, ours/vLLM and ours/llama.cpp, and the target's verdict."""
    eng = model["engines"]
    active = model["weights"]["active_bytes_per_token"]
    out: dict = {"metrics": {}, "probe_fraction": {}}
    for m in METRICS:
        vals = {e: _value(eng.get(e), m) for e in ENGINES}
        if all(v is None for v in vals.values()):
            continue
        row = {"values": vals, "vs_vllm": ratio(vals["ours"], vals["vllm"], m.lower_is_better),
               "vs_llama_cpp": ratio(vals["ours"], vals["llama.cpp"], m.lower_is_better), "target": m.vllm_target}
        row["met"] = None if row["vs_vllm"] is None or m.vllm_target is None else row["vs_vllm"] >= m.vllm_target
        out["metrics"][m.key] = row
    out["probe_fraction_beside"] = {}
    for e in ENGINES:
        v = _value(eng.get(e), METRICS[0])
        if v is not None:  # weight bytes streamed per second at batch 1, as a share of the run's probe
            out["probe_fraction"][e] = v * active / 1e9 / probe_GBps
            b1 = eng[e]["workloads"]["batch1"]
            if b1.get("probe_method", "torch") != probe_method():  # (only beside probes read as the run's did)
                continue
            if b1.get("run_probes_GBps"):  # and of the probes beside each decode run: the median run's share
                out["probe_fraction_beside"][e] = _median([r * active / 1e9 / p for r, p in
                                                           zip(b1["all_decode_tok_s"], b1["run_probes_GBps"])])
            elif b1.get("probe_GBps"):  # (results of before: one probe before and one after all the runs)
                out["probe_fraction_beside"][e] = v * active / 1e9 / b1["probe_GBps"]
    out["greedy_agreement"] = agreement(eng)
    out["probe_target_met"] = _probe_verdict(out)
    verdicts = [r["met"] for r in out["metrics"].values() if r["met"] is not None]
    if out["probe_target_met"] is not None:
        verdicts.append(out["probe_target_met"])
    out["targets_met"] = sum(verdicts)
    out["targets_checked"] = len(verdicts)
    return out


def _probe_verdict(summary: dict) -> bool | None:
    """The probe target, judged against the probe taken beside the batch-1 runs (the same process,
    seconds apart) where there is one, else against the run's."""
    f = summary["probe_fraction_beside"].get("ours", summary["probe_fraction"].get("ours"))
    return None if f is None else f >= PROBE_TARGET


def _median(xs: list) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def combine_rounds(summaries: list[dict]) -> dict:
    """One summary from the summaries of several rounds (every engine once per round, in turn): each
    engine's value and each ratio the median over the rounds (a ratio's rounds kept beside it as
    ``vs_vllm_rounds``), targets judged on the medians."""
    if len(summaries) == 1:
        return summaries[0]
    out: dict = {"metrics": {}, "probe_fraction": {}, "probe_fraction_beside": {}, "rounds": len(summaries),
                 "greedy_agreement": summaries[0]["greedy_agreement"]}
    for m in METRICS:
        rows = [s["metrics"][m.key] for s in summaries if m.key in s["metrics"]]
        if not rows:
            continue
        row = {"values": {e: _median([r["values"][e] for r in rows]) for e in ENGINES}, "target": m.vllm_target,
               "vs_vllm": _median([r["vs_vllm"] for r in rows]),
               "vs_llama_cpp": _median([r["vs_llama_cpp"] for r in rows]),
               "vs_vllm_rounds": [r["vs_vllm"] for r in rows]}
        row["met"] = None if row["vs_vllm"] is None or m.vllm_target is None else row["vs_vllm"] >= m.vllm_target
        out["metrics"][m.key] = row
    for key in ("probe_fraction", "probe_fraction_beside"):
        for e in ENGINES:
            f = _median([s.get(key, {}).get(e) for s in summaries])
            if f is not None:
                out[key][e] = f
    out["probe_target_met"] = _probe_verdict(out)
    verdicts = [r["met"] for r in out["metrics"].values() if r["met"] is not None]
    if out["probe_target_met"] is not None:
        verdicts.append(out["probe_target_met"])
    out["targets_met"], out["targets_checked"] = sum(verdicts), len(verdicts)
    return out


def _fmt(v: float | None, m: Metric) -> str:
    return "-" if v is None else m.fmt.format(v * m.scale)


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _verdict(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "NOT met")


def print_model(name: str, model: dict, probe_GBps: float) -> None:
    s = model["summary"]
    w = model["weights"]
    print(f"\n[{name}] {w['total_bytes'] / 1e6:.0f} MB of weights, {w['active_bytes_per_token'] / 1e6:.0f} MB read per "
          f"token (bf16, embedding excluded)")
    for e, res in model["engines"].items():
        for why in [res.get("unavailable"), res.get("error"), *sorted(set(res.get("skipped", {}).values()))]:
            if why:
                print(f"  {e}: {why}")
    rounds = s.get("rounds", 1)
    if rounds > 1:
        how = ("the engines alive side by side, each workload on each in turn" if model.get("interleaved")
               else "every engine once per round, in turn")
        print(f"  {rounds} rounds ({how}): values and ratios are medians; ours/vLLM of each round in the last column")
    head = (f"  {'metric':<42}{'ours':>10}{'vLLM':>10}{'llama.cpp':>11}{'ours/vLLM':>11}  {'target':<16}"
            f"{'ours/llama':>11}" + ("  ours/vLLM by round" if rounds > 1 else ""))
    print(head)
    print("  " + "-" * (len(head) - 2))
    for m in METRICS:
        row = s["metrics"].get(m.key)
        if row is None:
            continue
        some = next(model["engines"][e]["workloads"][m.workload] for e in ENGINES
                    if row["values"][e] is not None)
        v = row["values"]
        target = "" if row["target"] is None else f">={row['target']:.2f}x {_verdict(row['met'])}"
        print(f"  {m.label.format(**some):<42}{_fmt(v['ours'], m):>10}{_fmt(v['vllm'], m):>10}"
              f"{_fmt(v['llama.cpp'], m):>11}{_x(row['vs_vllm']):>11}  {target:<16}{_x(row['vs_llama_cpp']):>11}"
              + ("  " + " ".join(_x(r) for r in row["vs_vllm_rounds"]) if rounds > 1 else ""))
    verdict = "" if s["probe_target_met"] is None else f">={PROBE_TARGET:.0%} {_verdict(s['probe_target_met'])}"
    beside = s.get("probe_fraction_beside", {})
    for pf, label, judged in ((s["probe_fraction"], f"batch 1 weight GB/s as % of probe {probe_GBps:.1f}",
                               not beside),
                              (beside, "  ... % of the probes beside each run", bool(beside))):
        if pf:
            cells = "".join(f"{pf[e]:>{wd}.0%}" if e in pf else f"{'-':>{wd}}"
                            for e, wd in zip(ENGINES, (10, 10, 11)))
            print(f"  {label:<42}{cells}{'':>11}  {verdict if judged else '':<16}")
    if s["greedy_agreement"]:
        print("  batch 1 greedy tokens shared with ours from the start: " + ", ".join(
            f"{e} {a['common_prefix']} of {a['of']}" for e, a in s["greedy_agreement"].items()))
    print(f"  issue targets met: {s['targets_met']} of {s['targets_checked']}")


def print_report(report: dict) -> None:
    m, p = report["machine"], report["bandwidth_probe"]
    print("\n" + "=" * 112)
    print(f"machine: {m['cpu_model']} ({' '.join(m['isa']) or 'no AVX2'}) | {m['usable_cpus']} usable CPUs | "
          f"{m['mem_total_gib']} GiB | torch {m['torch']} "
          f"| threads per engine {report['args']['threads']} | load avg at start {m['loadavg_at_start']}")
    end = report.get("bandwidth_probe_end", {}).get("sum_read_GBps")
    print(f"read-bandwidth probe (1 GiB, the better of torch.sum and numpy): {p['sum_read_GBps']:.1f} GB/s at start"
          + (f", {end:.1f} GB/s at end" if end else ""))
    vers = {e: r.get("settings", {}).get("version") for mod in report["models"].values()
            for e, r in mod["engines"].items() if r.get("settings", {}).get("version")}
    if vers:
        print("peers: " + ", ".join(f"{e} {v}" for e, v in vers.items()))
    alone = ("each workload ran on one engine at a time, the others alive and idle" if report["args"].get("interleave")
             else "each engine ran alone, in turn")
    print(f"ratios: >1 means ours is better (rates ours/theirs, times theirs/ours); {alone}")
    for name, model in report["models"].items():
        print_model(name, model, p["sum_read_GBps"])
