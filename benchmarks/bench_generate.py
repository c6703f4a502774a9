#!/usr/bin/env python
"""Benchmark our engine against transformers' ``generate`` on the same random-weight MoE checkpoints.

Both engines run in the same process, on the same bfloat16 checkpoint, with the same number of
threads, on the same prompts (random token ids, seeded). Three scenarios:

1. single stream: batch 1, 64-token prompt, 128 new tokens, greedy, EOS ignored. Decode tokens/s,
   TTFT, and the achieved weight-streaming bandwidth (active bf16 weight bytes per token x tokens/s)
   next to a memory-bandwidth probe measured in the same run.
2. throughput: N concurrent requests (default 64), prompt lengths uniform in [16, 512], output
   lengths uniform in [32, 256]. Ours: one ``llm.generate`` call; transformers: left-padded batches of
   ``--hf-batch-size`` requests, each generating up to its batch's longest output; only each request's
   own requested tokens count as useful tokens (the same count as ours).
3. TTFT for one 64-token prompt (median of ``--ttft-runs`` runs).

Every timed run uses a fresh prompt, so our prefix cache never turns a repeat into a cache hit.

Examples::

    python benchmarks/bench_generate.py --quick                      # smoke test
    python benchmarks/bench_generate.py --model all --scenario all   # the full run
    python benchmarks/bench_generate.py --model mixtral --scenario none --profile   # profile our engine

The last line printed is one JSON object with every number (for scripts and CI).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

MODELS = ("mixtral", "deepseek_v3")
SCENARIOS = ("1", "2", "3")
COMMON = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
              max_position_embeddings=4096, initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
PAD_ID = 0


# ---- checkpoints ---------------------------------------------------------------------------------
def model_spec(name: str) -> tuple[str, dict]:
    if name == "mixtral":
        return "MixtralConfig", dict(COMMON, intermediate_size=2816, num_key_value_heads=8, num_local_experts=8,
                                     num_experts_per_tok=2)
    if name == "deepseek_v3":
        return "DeepseekV3Config", dict(
            COMMON, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
            qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=704,
            n_shared_experts=1, first_k_dense_replace=1, intermediate_size=2816, n_group=4, topk_group=2,
            norm_topk_prob=True, routed_scaling_factor=2.5)
    raise ValueError(name)


def save_random_checkpoint(cls_name: str, kw: dict, out: Path, seed: int) -> None:
    """A random-init model of transformers' config class ``cls_name`` (``kw``), saved to ``out`` in bfloat16."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kw), dtype=torch.float32)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    del model
    gc.collect()


def ensure_checkpoint(name: str, cache_dir: Path, seed: int) -> Path:
    """Build (once) a random-init checkpoint with ``from_config`` and save it in bfloat16."""

    cls_name, kw = model_spec(name)
    meta = {"class": cls_name, "config": kw, "seed": seed, "dtype": "bfloat16"}
    out = cache_dir / name
    meta_path = out / "bench_meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta and list(out.glob("*.safetensors")):
        return out
    print(f"[build] {name}: random init (seed {seed}) -> {out}", flush=True)
    t0 = time.perf_counter()
    save_random_checkpoint(cls_name, kw, out, seed)
    meta_path.write_text(json.dumps(meta, indent=1))
    print(f"[build] {name}: done in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def count_params(hf_model, top_k: int, num_experts: int) -> dict:
    """Total and active (per token) parameters. Active: routed experts scaled by top_k/E; the input
    embedding is not counted (one row is read per token); the LM head is counted."""
    total = active = experts = embed = 0
    for name, p in hf_model.named_parameters():
        n = p.numel()
        total += n
        if "embed_tokens" in name:
            embed += n
            continue
        if ".experts." in name:  # routed experts (shared_experts don't match: "_experts.")
            experts += n
            active += n * top_k / num_experts
        else:
            active += n
    active = int(round(active))
    return {"total": total, "active": active, "routed_expert_params": experts, "embedding_params": embed,
            "active_bytes_per_token_bf16": 2 * active}


# ---- machine -------------------------------------------------------------------------------------
def machine_info(threads: int) -> dict:
    cpu = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import transformers

    try:
        mem = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        mem = None
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")),
        "mem_total_gib": round(mem / 1024**3, 1) if mem else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "requested_threads": threads,
        "loadavg_at_start": list(os.getloadavg()),
    }


def bandwidth_probe(gib: float = 1.0, repeats: int = 3) -> dict:
    """Best-of-N memory bandwidth with the configured threads: a read of a ``gib`` GiB float32 array
    (:func:`peers.workloads.read_probe`: on huge pages, the better of ``torch.sum`` and numpy's sum in slices), and a
    copy (read + write, counted as 2x bytes)."""
    from peers.workloads import read_probe

    read = read_probe(gib, repeats)
    x = torch.ones(int(gib * 1024**3) // 4, dtype=torch.float32)
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    y.copy_(x)
    t_copy = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        y.copy_(x)
        t_copy.append(time.perf_counter() - t0)
    del x, y
    gc.collect()
    return {"bytes": nbytes, "sum_read_GBps": read, "copy_GBps": 2 * nbytes / min(t_copy) / 1e9}


# ---- prompts -------------------------------------------------------------------------------------
class Prompts:
    """Seeded random token ids, avoiding the special ids 0-2; every call returns a new prompt."""

    def __init__(self, vocab: int, seed: int):
        self.vocab = vocab
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, length: int) -> list[int]:
        return torch.randint(3, self.vocab, (length,), generator=self.gen).tolist()


def throughput_requests(n: int, seed: int, vocab: int, prompt_range=(16, 512), out_range=(32, 256)):
    g = torch.Generator().manual_seed(seed + 1000)
    plens = torch.randint(prompt_range[0], prompt_range[1] + 1, (n,), generator=g).tolist()
    olens = torch.randint(out_range[0], out_range[1] + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (p,), generator=g).tolist() for p in plens]
    return prompts, olens


# ---- engines -------------------------------------------------------------------------------------
class Ours:
    name = "ours"

    def __init__(self, path: Path, kv_cache_memory: int, max_num_seqs: int, speculative_config: dict | None = None,
                 warmup: bool = True):
        from moe import LLM, SamplingParams

        self.SamplingParams = SamplingParams
        t0 = time.perf_counter()
        # warmup: every GEMM shape built at load (moe.warmup; its seconds are in load_s), as a server starts
        self.llm = LLM(str(path), dtype="bfloat16", kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs,
                       speculative_config=speculative_config, warmup=warmup)
        self.load_s = time.perf_counter() - t0
        self.warmup_s = self.llm.engine.warmup_s

    def params(self, max_tokens: int):
        return self.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def generate_one(self, prompt: list[int], max_tokens: int):
        """-> (wall seconds, ttft seconds, latency seconds, output token ids)"""
        t0 = time.perf_counter()
        (out,) = self.llm.generate([{"prompt_token_ids": prompt}], self.params(max_tokens))
        wall = time.perf_counter() - t0
        if out.error:
            raise RuntimeError(out.error)
        m = out.metrics
        return wall, m.ttft, m.latency, list(out.outputs[0].token_ids)

    def generate_many(self, prompts: list[list[int]], max_tokens: list[int]):
        t0 = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], [self.params(m) for m in max_tokens])
        wall = time.perf_counter() - t0
        errors = [o.error for o in outs if o.error]
        if errors:
            raise RuntimeError(f"{len(errors)} request(s) failed, first: {errors[0]}")
        return wall, outs


class HF:
    name = "transformers"

    def __init__(self, path: Path, experts_impl: str | None, attn_impl: str | None):
        import transformers

        transformers.logging.set_verbosity_error()
        kw = {}
        if experts_impl:
            kw["experts_implementation"] = experts_impl
        if attn_impl:
            kw["attn_implementation"] = attn_impl
        t0 = time.perf_counter()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, **kw).eval()
        self.load_s = time.perf_counter() - t0
        self.attn_impl = getattr(self.model.config, "_attn_implementation", None)
        self.experts_impl = getattr(self.model.config, "_experts_implementation", None)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int, **kw) -> torch.Tensor:
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID, **kw)

    def generate_one(self, prompt: list[int], new_tokens: int, **kw):
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        out = self.generate(ids, torch.ones_like(ids), new_tokens, **kw)
        wall = time.perf_counter() - t0
        return wall, out[0, len(prompt):].tolist()

    def generate_batch(self, prompts: list[list[int]], new_tokens: int) -> float:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        t0 = time.perf_counter()
        out = self.generate(ids, mask, new_tokens)
        wall = time.perf_counter() - t0
        assert out.shape[1] == width + new_tokens, out.shape
        return wall


# ---- scenarios -----------------------------------------------------------------------------------
def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def scenario1(ours: Ours, hf: HF, prompts: Prompts, args, active_bytes: int, probe: dict) -> dict:
    plen, new = args.s1_prompt_len, args.s1_new_tokens
    res: dict = {"prompt_len": plen, "new_tokens": new, "runs": args.s1_runs}
    # the same prompts for both engines (ours never sees a prompt twice, so no prefix-cache hits)
    ps = [prompts(plen) for _ in range(args.s1_runs)]
    # ours and transformers alternate per prompt, so a burst of load from other processes hits both
    runs, our_toks, hf_runs, hf_toks = [], [], [], []
    for p in ps:
        wall, ttft, lat, toks = ours.generate_one(p, new)
        assert len(toks) == new, len(toks)
        our_toks.append(toks)
        # ours: decode rate from the request's metrics
        runs.append({"wall_s": wall, "ttft_s": ttft, "latency_s": lat, "decode_tok_s": (new - 1) / (lat - ttft)})
        # transformers: TTFT from max_new_tokens=1 (median of 3), decode rate as (new-1)/(t_new - t_1)
        t1 = statistics.median(hf.generate_one(p, 1)[0] for _ in range(3))
        tn, toks = hf.generate_one(p, new)
        assert len(toks) == new
        hf_toks.append(toks)
        hf_runs.append({"t1_s": t1, "t_new_s": tn, "decode_tok_s": (new - 1) / (tn - t1)})
    # best run of each (least disturbed by other load)
    best = max(runs, key=lambda r: r["decode_tok_s"])
    res["ours"] = {"decode_tok_s": best["decode_tok_s"], "ttft_s": best["ttft_s"], "latency_s": best["latency_s"],
                   "decode_GBps": best["decode_tok_s"] * active_bytes / 1e9,
                   "all_decode_tok_s": [r["decode_tok_s"] for r in runs]}
    hb = max(hf_runs, key=lambda r: r["decode_tok_s"])
    res["transformers"] = {"decode_tok_s": hb["decode_tok_s"], "ttft_s": hb["t1_s"], "latency_s": hb["t_new_s"],
                           "decode_GBps": hb["decode_tok_s"] * active_bytes / 1e9,
                           "all_decode_tok_s": [r["decode_tok_s"] for r in hf_runs]}
    res["speedup_decode"] = res["ours"]["decode_tok_s"] / res["transformers"]["decode_tok_s"]
    res["speedup_ttft"] = res["transformers"]["ttft_s"] / res["ours"]["ttft_s"]
    res["bandwidth_probe_read_GBps"] = probe["sum_read_GBps"]
    res["ours_fraction_of_probe"] = res["ours"]["decode_GBps"] / probe["sum_read_GBps"]
    if args.ngram:  # the same prompts with n-gram speculative decoding (greedy: the same tokens)
        spec = Ours(args.ours_path, args.ours_kv_mem, args.max_num_seqs,
                    {"method": "ngram", "num_speculative_tokens": args.ngram}, warmup=not args.no_warmup)
        e = spec.llm.engine
        spec.generate_one(ps[0], 8)
        d0, a0 = e.spec_drafted, e.spec_accepted
        rates, same = [], []
        for p, toks in zip(ps, our_toks):
            _, ttft, lat, stoks = spec.generate_one(p, new)
            rates.append((new - 1) / (lat - ttft))
            same.append(common_prefix(stoks, toks))
        drafted, accepted = e.spec_drafted - d0, e.spec_accepted - a0
        res["ours_ngram"] = {"num_speculative_tokens": args.ngram, "decode_tok_s": max(rates),
                             "all_decode_tok_s": rates, "drafted": drafted, "accepted": accepted,
                             "acceptance": accepted / max(drafted, 1), "same_tokens_as_plain_prefix": same}
        res["speedup_decode_ngram"] = max(rates) / res["transformers"]["decode_tok_s"]
        del spec
        # transformers' own n-gram speculation ("prompt lookup decoding") on the same prompts
        hf_rates = []
        for p in ps:
            t1 = statistics.median(hf.generate_one(p, 1)[0] for _ in range(3))
            tn, _ = hf.generate_one(p, new, prompt_lookup_num_tokens=args.ngram)
            hf_rates.append((new - 1) / (tn - t1))
        res["transformers_ngram"] = {"decode_tok_s": max(hf_rates), "all_decode_tok_s": hf_rates}
        res["speedup_decode_ngram_vs_hf_ngram"] = max(rates) / max(hf_rates)
    res["transformers_fraction_of_probe"] = res["transformers"]["decode_GBps"] / probe["sum_read_GBps"]
    # bf16 numerics on random weights: an early divergence is not by itself a bug
    res["greedy_agreement_prefix_tokens"] = [common_prefix(a, b) for a, b in zip(our_toks, hf_toks)]
    return res


def scenario2(ours: Ours, hf: HF, args, vocab: int) -> dict:
    prompts, olens = throughput_requests(args.s2_requests, args.seed, vocab)
    useful = sum(olens)
    res: dict = {"requests": len(prompts), "prompt_tokens": sum(len(p) for p in prompts), "useful_tokens": useful,
                 "hf_batch_size": args.hf_batch_size}
    wall, outs = ours.generate_many(prompts, olens)
    got = sum(len(o.outputs[0].token_ids) for o in outs)
    assert got == useful, (got, useful)
    ttfts = [o.metrics.ttft for o in outs]
    res["ours"] = {"wall_s": wall, "tok_s": useful / wall, "mean_ttft_s": statistics.mean(ttfts),
                   "max_ttft_s": max(ttfts)}
    print(f"  [s2] ours: {useful} tokens in {wall:.1f}s", flush=True)
    hf_wall = 0.0
    computed = 0
    batch_walls = []
    bs = args.hf_batch_size
    for i in range(0, len(prompts), bs):
        ps, os_ = prompts[i:i + bs], olens[i:i + bs]
        w = hf.generate_batch(ps, max(os_))
        hf_wall += w
        batch_walls.append(w)
        computed += len(ps) * max(os_)
        print(f"  [s2] transformers batch {i // bs + 1}/{-(-len(prompts) // bs)}: {len(ps)} x "
              f"(<= {max(len(p) for p in ps)} prompt, {max(os_)} new) in {w:.1f}s", flush=True)
    res["transformers"] = {"wall_s": hf_wall, "tok_s": useful / hf_wall, "computed_tokens_incl_padding": computed,
                           "batch_wall_s": batch_walls}
    res["speedup"] = res["ours"]["tok_s"] / res["transformers"]["tok_s"]
    return res


def scenario3(ours: Ours, hf: HF, prompts: Prompts, args) -> dict:
    plen = args.s1_prompt_len
    o, h = [], []
    for _ in range(args.ttft_runs):
        p = prompts(plen)
        wall, ttft, _, _ = ours.generate_one(p, 1)
        o.append(ttft)
        h.append(hf.generate_one(p, 1)[0])
    res = {"prompt_len": plen, "runs": args.ttft_runs,
           "ours": {"median_ttft_s": statistics.median(o), "all_s": o},
           "transformers": {"median_ttft_s": statistics.median(h), "all_s": h}}
    res["speedup"] = res["transformers"]["median_ttft_s"] / res["ours"]["median_ttft_s"]
    return res


# ---- profiling -----------------------------------------------------------------------------------
def profile_ours(ours: Ours, prompts: Prompts, args, vocab: int, top: int) -> dict:
    """torch.profiler (op self time) and cProfile (Python self time) over our engine's
    scenario-1 decode and a short scenario-2 run."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    def torch_top(prof) -> list[dict]:
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        tot = sum(e.self_cpu_time_total for e in rows) or 1
        return [{"name": e.key, "self_ms": e.self_cpu_time_total / 1e3, "pct": 100 * e.self_cpu_time_total / tot,
                 "calls": e.count} for e in rows[:top]]

    def py_top(pr: cProfile.Profile) -> list[dict]:
        st = pstats.Stats(pr, stream=io.StringIO())
        rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
        out = []
        for (file, line, fn), (cc, nc, tt, ct, _) in rows:
            short = file if file.startswith("<") else str(Path(file).resolve()).replace(str(REPO) + "/", "")
            if "site-packages/" in short:
                short = short.split("site-packages/", 1)[1]
            out.append({"name": f"{short}:{line}({fn})", "tottime_ms": tt * 1e3, "cumtime_ms": ct * 1e3, "calls": nc})
        return out

    result = {}
    plen = args.s1_prompt_len
    n1 = args.profile_decode_tokens
    # "scenario1_decode" is one request of n1 tokens: one 64-token prefill step plus n1-1 decode steps
    for label, fn in (
        ("scenario1_decode", lambda: ours.generate_one(prompts(plen), n1)),
        ("scenario2_short", lambda: ours.generate_many(*throughput_requests(args.profile_s2_requests, args.seed + 7,
                                                                            vocab))),
    ):
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        wall_torch = time.perf_counter() - t0
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        fn()
        pr.disable()
        wall_cprof = time.perf_counter() - t0
        result[label] = {"torch_profiler_wall_s": wall_torch, "torch_top_self_cpu": torch_top(prof),
                         "cprofile_wall_s": wall_cprof, "cprofile_top_tottime": py_top(pr)}
    result["scenario1_decode"]["new_tokens"] = n1
    result["scenario2_short"]["requests"] = args.profile_s2_requests
    return result


def print_profile(name: str, prof: dict) -> None:
    for label, r in prof.items():
        print(f"\n=== profile {name} / {label}: torch.profiler (wall {r['torch_profiler_wall_s']:.2f}s), "
              "top by self CPU")
        print(f"{'self ms':>10} {'%':>6} {'calls':>8}  op")
        for e in r["torch_top_self_cpu"]:
            print(f"{e['self_ms']:10.1f} {e['pct']:6.1f} {e['calls']:8d}  {e['name']}")
        print(f"--- cProfile (wall {r['cprofile_wall_s']:.2f}s), top by tottime")
        print(f"{'tottime ms':>11} {'cumtime ms':>11} {'calls':>8}  function")
        for e in r["cprofile_top_tottime"]:
            print(f"{e['tottime_ms']:11.1f} {e['cumtime_ms']:11.1f} {e['calls']:8d}  {e['name']}")


# ---- main ----------------------------------------------------------------------------------------
def kv_bytes_per_token(name: str) -> int:
    _, kw = model_spec(name)
    L = kw["num_hidden_layers"]
    if "kv_lora_rank" in kw:
        return L * (kw["kv_lora_rank"] + kw["qk_rope_head_dim"]) * 2
    head_dim = kw["hidden_size"] // kw["num_attention_heads"]
    return L * 2 * kw["num_key_value_heads"] * head_dim * 2


def save_partial(args, report: dict) -> None:
    if args.json_out:
        tmp = Path(args.json_out + ".tmp")
        tmp.write_text(json.dumps(report, default=float))
        tmp.replace(args.json_out)


def run_model(name: str, args, probe: dict, report: dict) -> dict:
    path = ensure_checkpoint(name, Path(args.cache_dir), args.seed)
    cls_name, kw = model_spec(name)
    top_k = kw["num_experts_per_tok"]
    n_exp = kw.get("num_local_experts") or kw["n_routed_experts"]
    # KV cache: every scenario-2 request at its longest, plus a block of slack each, plus 25%
    need_tokens = args.max_num_seqs * (512 + 256 + 16)
    kv_mem = int(kv_bytes_per_token(name) * need_tokens * 1.25)

    hf = HF(path, args.hf_experts_impl, args.hf_attn_impl)
    params = count_params(hf.model, top_k, n_exp)
    ours = Ours(path, kv_mem, args.max_num_seqs, warmup=not args.no_warmup)
    args.ours_path, args.ours_kv_mem = path, kv_mem
    out: dict = report["models"].setdefault(name, {})
    out |= {"checkpoint": str(path), "hf_class": cls_name, "params": params, "kv_cache_memory": kv_mem,
                 "load_s": {"ours": ours.load_s, "transformers": hf.load_s}, "ours_warmup_s": ours.warmup_s,
                 "transformers_attn_impl": hf.attn_impl, "transformers_experts_impl": hf.experts_impl}
    print(f"\n## {name}: total params {params['total'] / 1e6:.1f}M, active/token {params['active'] / 1e6:.1f}M "
          f"({params['active_bytes_per_token_bf16'] / 1e6:.0f} MB bf16; embedding excluded, LM head included); "
          f"transformers attn={hf.attn_impl} experts={hf.experts_impl}", flush=True)
    prompts = Prompts(kw["vocab_size"], args.seed)
    # warm-up: one short generate each (two prompt shapes for ours: prefill and decode paths)
    t0 = time.perf_counter()
    ours.generate_one(prompts(16), 8)
    hf.generate_one(prompts(16), 8)
    print(f"  warm-up done in {time.perf_counter() - t0:.1f}s", flush=True)

    for sc in args.scenarios:
        # a snapshot of other load: the 1-minute load average and a small bandwidth probe, before and after
        before = {"loadavg_1m": os.getloadavg()[0], "probe_read_GBps": bandwidth_probe(0.25)["sum_read_GBps"]}
        print(f"  [s{sc}] start (load {before['loadavg_1m']:.2f}, probe {before['probe_read_GBps']:.1f} GB/s) ...",
              flush=True)
        t_sc = time.perf_counter()
        # called directly, not through closures over ours/hf, so the `del hf` below really frees the model
        if sc == "1":
            res = scenario1(ours, hf, prompts, args, params["active_bytes_per_token_bf16"], probe)
        elif sc == "2":
            res = scenario2(ours, hf, args, kw["vocab_size"])
        else:
            res = scenario3(ours, hf, prompts, args)
        after = {"loadavg_1m": os.getloadavg()[0], "probe_read_GBps": bandwidth_probe(0.25)["sum_read_GBps"]}
        res["wall_s_total"] = time.perf_counter() - t_sc
        res["contention"] = {"before": before, "after": after}
        out[f"scenario{sc}"] = res
        save_partial(args, report)
    del hf
    gc.collect()
    if args.profile:
        print("  [profile] ours ...", flush=True)
        out["profile_ours"] = profile_ours(ours, prompts, args, kw["vocab_size"], args.profile_top)
        save_partial(args, report)
    del ours
    gc.collect()
    return out


def print_table(report: dict) -> None:
    m = report["machine"]
    bp = report["bandwidth_probe"]
    print("\n" + "=" * 100)
    print(f"machine: {m['cpu_model']} | {m['usable_cpus']} usable CPUs | torch {m['torch']} | transformers "
          f"{m['transformers']} | threads {m['torch_threads']} | load avg at start {m['loadavg_at_start']}")
    print(f"bandwidth probe (1 GiB, best of 3): sum/read {bp['sum_read_GBps']:.1f} GB/s, copy {bp['copy_GBps']:.1f} "
          "GB/s (read+write)")
    print("NOTE: other processes may share this machine; numbers are noisy (best-of / median used where stated).")
    for name, r in report["models"].items():
        p = r["params"]
        print(f"\n[{name}] total {p['total'] / 1e6:.1f}M params, active {p['active'] / 1e6:.1f}M/token "
              f"({p['active_bytes_per_token_bf16'] / 1e6:.0f} MB bf16)")
        print(f"  {'metric':<44} {'ours':>12} {'transformers':>14} {'ours vs hf':>11}")
        if "scenario1" in r:
            s = r["scenario1"]
            o, h = s["ours"], s["transformers"]
            print(f"  {'S1 decode tok/s (bs1, best of %d)' % s['runs']:<44} {o['decode_tok_s']:12.2f} "
                  f"{h['decode_tok_s']:14.2f} {s['speedup_decode']:10.2f}x")
            print(f"  {'S1 TTFT s (64-tok prompt)':<44} {o['ttft_s']:12.3f} {h['ttft_s']:14.3f} "
                  f"{s['speedup_ttft']:10.2f}x")
            print(f"  {'S1 achieved weight GB/s (probe %.1f)' % bp['sum_read_GBps']:<44} {o['decode_GBps']:12.2f} "
                  f"{h['decode_GBps']:14.2f}")
            print(f"  {'S1 fraction of probe bandwidth':<44} {s['ours_fraction_of_probe']:12.1%} "
                  f"{s['transformers_fraction_of_probe']:14.1%}")
            print(f"  S1 greedy outputs agree on first {s['greedy_agreement_prefix_tokens']} of {s['new_tokens']} "
                  "tokens (per run; bf16, random weights)")
            if "ours_ngram" in s:
                g = s["ours_ngram"]
                hg = s["transformers_ngram"]["decode_tok_s"]
                print(f"  {'S1 n-gram speculation, both (%d tokens) tok/s' % g['num_speculative_tokens']:<44} "
                      f"{g['decode_tok_s']:12.2f} {hg:14.2f} {s['speedup_decode_ngram_vs_hf_ngram']:10.2f}x")
                print(f"  {'S1 ours with speculation vs plain transformers':<44} {g['decode_tok_s']:12.2f} "
                      f"{h['decode_tok_s']:14.2f} {s['speedup_decode_ngram']:10.2f}x")
                print(f"  S1 speculation: {g['accepted']} of {g['drafted']} drafts accepted ({g['acceptance']:.2f}); "
                      f"same tokens as plain decoding for the first {g['same_tokens_as_plain_prefix']}")
        if "scenario2" in r:
            s = r["scenario2"]
            print(f"  {'S2 tok/s (%d reqs, %d useful tok)' % (s['requests'], s['useful_tokens']):<44} "
                  f"{s['ours']['tok_s']:12.2f} {s['transformers']['tok_s']:14.2f} {s['speedup']:10.2f}x")
            print(f"  {'S2 wall s (hf batch %d)' % s['hf_batch_size']:<44} {s['ours']['wall_s']:12.1f} "
                  f"{s['transformers']['wall_s']:14.1f}")
        if "scenario3" in r:
            s = r["scenario3"]
            print(f"  {'S3 TTFT s (median of %d)' % s['runs']:<44} {s['ours']['median_ttft_s']:12.3f} "
                  f"{s['transformers']['median_ttft_s']:14.3f} {s['speedup']:10.2f}x")
        for sc in SCENARIOS:
            c = r.get(f"scenario{sc}", {}).get("contention")
            if c:
                print(f"  S{sc} contention: load avg {c['before']['loadavg_1m']:.2f} -> "
                      f"{c['after']['loadavg_1m']:.2f}, bandwidth probe {c['before']['probe_read_GBps']:.1f} -> "
                      f"{c['after']['probe_read_GBps']:.1f} GB/s")
    print("(ours vs hf: >1x means ours is faster)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all", choices=[*MODELS, "all"])
    ap.add_argument("--scenario", default="all", choices=[*SCENARIOS, "all", "none"])
    ap.add_argument("--quick", action="store_true", help="smaller runs for a smoke test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default="/tmp/moe-bench-models")
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--hf-experts-impl", default=None, help="transformers experts_implementation (default: its own)")
    ap.add_argument("--hf-attn-impl", default=None, help="transformers attn_implementation (default: its own)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--no-warmup", action="store_true",
                    help="build our engine without its start-up GEMM warm-up (first requests then pay kernel builds)")
    ap.add_argument("--s1-runs", type=int, default=2, help="scenario-1 repeats per engine (best reported)")
    ap.add_argument("--ttft-runs", type=int, default=5)
    ap.add_argument("--s2-requests", type=int, default=None, help="default 64 (16 with --quick)")
    ap.add_argument("--json-out", default=None,
                    help="also write the report JSON here, updated after every scenario (survives a killed run)")
    ap.add_argument("--profile", action="store_true", help="also profile our engine (torch.profiler + cProfile)")
    ap.add_argument("--profile-top", type=int, default=15)
    ap.add_argument("--profile-decode-tokens", type=int, default=32)
    ap.add_argument("--ngram", type=int, default=0,
                    help="also run scenario 1 with n-gram speculative decoding of this many draft tokens")
    ap.add_argument("--profile-s2-requests", type=int, default=8)
    args = ap.parse_args(argv)
    args.scenarios = () if args.scenario == "none" else (SCENARIOS if args.scenario == "all" else (args.scenario,))
    args.s1_prompt_len, args.s1_new_tokens = 64, 128
    if args.s2_requests is None:
        args.s2_requests = 16 if args.quick else 64
    if args.quick:
        args.s1_new_tokens = 32
        args.s1_runs = 1
        args.ttft_runs = 3
        args.profile_decode_tokens = min(args.profile_decode_tokens, 16)
        args.profile_s2_requests = min(args.profile_s2_requests, 4)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import logging

    logging.getLogger("moe").setLevel(logging.WARNING)
    report: dict = {"benchmark": "bench_generate", "args": {k: v for k, v in vars(args).items()
                                                            if isinstance(v, (int, float, str, bool, type(None)))}}
    report["args"]["scenarios"] = list(args.scenarios)
    report["machine"] = machine_info(args.threads)
    probe = bandwidth_probe()
    report["bandwidth_probe"] = probe
    print(f"bandwidth probe: sum/read {probe['sum_read_GBps']:.1f} GB/s, copy {probe['copy_GBps']:.1f} GB/s",
          flush=True)
    report["models"] = {}
    t0 = time.perf_counter()
    for name in (MODELS if args.model == "all" else (args.model,)):
        run_model(name, args, probe, report)
    report["bandwidth_probe_end"] = bandwidth_probe()
    report["machine"]["loadavg_at_end"] = list(os.getloadavg())
    report["total_wall_s"] = time.perf_counter() - t0
    print_table(report)
    for name, r in report["models"].items():
        if "profile_ours" in r:
            print_profile(name, r["profile_ours"])
    save_partial(args, report)
    print(json.dumps(report, default=float), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
