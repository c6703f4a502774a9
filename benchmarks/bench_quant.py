#!/usr/bin/env python
"""Memory and speed of quantized experts, the fp8 KV cache and expert offloading.

For the Mixtral-shaped benchmark model (hidden 1024, 8 layers, 8 experts top-2; built once by
``bench_generate.py``'s recipe) and the embedded default model, in one process, bf16 activations,
the configured threads:

- **formats**: every routed-expert format ``moe quantize`` writes (int8 and int4 group-wise,
  fp8 block-scaled, MXFP4; int4 with ``--all-linear``, every linear layer packed) next to bf16:
  bytes of the loaded weights (packed tensors and their scales, as held in memory) and of the
  routed experts alone, decode tokens/s at batch 1 (64-token
  prompt, 128 new tokens, greedy, best of ``--runs``), and the achieved weight-streaming GB/s
  (bytes of active weights per token x tokens/s) next to a bandwidth probe taken in the same run;
- **fp8 KV cache**: the bf16 model with ``kv_cache_dtype="fp8"``, bytes per token and decode
  tokens/s after a ``--kv-prompt-len``-token prompt (where the KV cache is read every step);
- **offloading**: bf16 experts behind an expert cache of 100%, 50% and 25% of their bytes:
  decode tokens/s and the cache's hit rate over the timed runs;
- **llama.cpp** (with ``--llama-cpp DIR``, a llama.cpp tree with ``build/bin/llama-bench`` and
  ``llama-quantize`` built): the same checkpoint converted by its ``convert_hf_to_gguf.py`` to
  GGUF bf16, quantized to Q8_0 and Q4_K_M, measured with ``llama-bench`` (tg128 after a 64-token
  context, the same threads). The checkpoint's weights are random, and llama-bench feeds random
  tokens, so the vocabulary written to the GGUF is a placeholder of the right size.

Examples::

    python benchmarks/bench_quant.py --model default --runs 1            # smoke test
    python benchmarks/bench_quant.py --llama-cpp ~/llama.cpp             # the full run

The last line printed is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
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

from bench_generate import Prompts, bandwidth_probe, ensure_checkpoint, machine_info  # noqa: E402

FORMATS = {  # label -> moe quantize options (None: the bf16 checkpoint itself)
    "bf16": None,
    "int8-g128": dict(format="int8", group_size=128),
    "int4-g128": dict(format="int4", group_size=128),
    "int4-g32-asym": dict(format="int4", group_size=32, symmetric=False),
    "fp8_block": dict(format="fp8_block"),
    "mxfp4": dict(format="mxfp4"),
    # moe quantize --all-linear: attention, dense MLPs, shared experts and the LM head packed too (Q4_K_M's choice)
    "int4-g128-all": dict(format="int4", group_size=128, all_linear=True),
    "int4-g32-asym-all": dict(format="int4", group_size=32, symmetric=False, all_linear=True),
    # --activations int8: decode rounds x to 8 bits per 32 columns and multiplies in integers (as llama.cpp)
    "int4-g128-x8": dict(format="int4", group_size=128, activations="int8"),
    "int4-g128-all-x8": dict(format="int4", group_size=128, all_linear=True, activations="int8"),
    "int4-g32-asym-all-x8": dict(format="int4", group_size=32, symmetric=False, all_linear=True, activations="int8"),
}
OFFLOAD_FRACTIONS = (1.0, 0.5, 0.25)


# ---- checkpoints ---------------------------------------------------------------------------------
def base_checkpoint(name: str, cache_dir: Path, seed: int) -> Path:
    if name == "default":
        from moe.llm import default_model_path

        return Path(default_model_path())
    return ensure_checkpoint(name, cache_dir, seed)


def quantized_checkpoint(base: Path, label: str, cache_dir: Path) -> Path:
    opts = FORMATS[label]
    if opts is None:
        return base
    from experts.formats import get_format
    from moe.quantize import quantize_checkpoint

    out = cache_dir / f"{base.name}-{label}"
    stamp = out / "bench_quant_meta.json"
    meta = {"base": str(base), "mtime": max(f.stat().st_mtime for f in base.glob("*.safetensors")), **opts}
    if stamp.is_file() and json.loads(stamp.read_text()) == meta:
        return out
    opts = dict(opts)
    all_linear = opts.pop("all_linear", False)
    fmt = get_format(opts.pop("format"), **opts)
    t0 = time.perf_counter()
    quantize_checkpoint(base, out, fmt, all_linear=all_linear)
    stamp.write_text(json.dumps(meta))
    print(f"  [quantize] {label}: {time.perf_counter() - t0:.1f}s -> {out}", flush=True)
    return out


# ---- our engine ----------------------------------------------------------------------------------
def decode_rate(llm, prompts: Prompts, prompt_len: int, new_tokens: int, runs: int) -> dict:
    from moe import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    rates, ttfts = [], []
    for _ in range(runs):
        (out,) = llm.generate([{"prompt_token_ids": prompts(prompt_len)}], sp)
        if out.error:
            raise RuntimeError(out.error)
        m = out.metrics
        rates.append((new_tokens - 1) / (m.latency - m.ttft))
        ttfts.append(m.ttft)
    return {"decode_tok_s": max(rates), "all_decode_tok_s": rates, "ttft_s": min(ttfts)}


def load(path: Path, **kw):
    from moe import LLM

    t0 = time.perf_counter()
    llm = LLM(str(path), dtype="bfloat16", max_num_seqs=4, **kw)
    return llm, time.perf_counter() - t0


def run_formats(base: Path, cfg, args, prompts: Prompts, probe_GBps: float) -> dict:
    from moe.models import weight_bytes

    out: dict = {}
    top_k, n_exp = cfg.top_k, cfg.num_experts
    for label in args.formats:
        path = quantized_checkpoint(base, label, Path(args.cache_dir))
        llm, load_s = load(path)
        wb = weight_bytes(llm.engine.model)
        # per token: every non-expert weight except the embedding (one row), top_k / E of the experts
        active = wb["total"] - wb["routed_experts"] - wb["embedding"] + wb["routed_experts"] * top_k / n_exp
        decode_rate(llm, prompts, 16, 4, 1)  # warm-up
        r = decode_rate(llm, prompts, args.prompt_len, args.new_tokens, args.runs)
        r |= {"load_s": load_s, "weight_bytes": wb, "active_bytes_per_token": int(active),
              "decode_GBps": r["decode_tok_s"] * active / 1e9, "checkpoint_bytes": dir_bytes(path)}
        r["fraction_of_probe"] = r["decode_GBps"] / probe_GBps
        out[label] = r
        print(f"  {label:20s} weights {wb['total'] / 2**20:8.1f} MiB (experts {wb['routed_experts'] / 2**20:8.1f} MiB)"
              f"  decode {r['decode_tok_s']:7.2f} tok/s  {r['decode_GBps']:5.1f} GB/s", flush=True)
        del llm
        gc.collect()
    relative_to_bf16(out)
    return out


def relative_to_bf16(out: dict) -> None:
    if "bf16" in out:
        ref = out["bf16"]
        for r in out.values():
            r["expert_bytes_vs_bf16"] = r["weight_bytes"]["routed_experts"] / ref["weight_bytes"]["routed_experts"]
            r["weight_bytes_vs_bf16"] = r["weight_bytes"]["total"] / ref["weight_bytes"]["total"]
            r["decode_vs_bf16"] = r["decode_tok_s"] / ref["decode_tok_s"]


def best_of_rounds(rounds: list[dict]) -> dict:
    """Each entry's fastest round, with every round's decode tok/s beside it."""
    out = {}
    for label in rounds[0]:
        best = max((r[label] for r in rounds), key=lambda r: r["decode_tok_s"])
        out[label] = dict(best, rounds_decode_tok_s=[r[label]["decode_tok_s"] for r in rounds])
    return out


def run_kv(base: Path, args, prompts: Prompts) -> dict:
    out: dict = {}
    for kv in ("auto", "fp8"):
        llm, _ = load(base, kv_cache_dtype=kv, kv_cache_memory=64 << 20)
        plen = min(args.kv_prompt_len, llm.engine.max_model_len - args.new_tokens)  # the default model: 512
        decode_rate(llm, prompts, 16, 4, 1)
        r = decode_rate(llm, prompts, plen, args.new_tokens, args.runs)
        r["prompt_len"] = plen
        r["kv_bytes_per_token"] = llm.engine.kv_bytes_per_token()
        r["kv_cache_tokens_in_64MiB"] = llm.engine.kv_cache_tokens
        out["bf16" if kv == "auto" else "fp8"] = r
        print(f"  kv {kv:5s} {r['kv_bytes_per_token']:6d} B/token  decode {r['decode_tok_s']:7.2f} tok/s "
              f"(prompt {plen})", flush=True)
        del llm
        gc.collect()
    return out


def run_offload(base: Path, args, prompts: Prompts, expert_bytes: int) -> dict:
    from moe.models.quant_weights import expert_cache

    out: dict = {}
    for frac in args.offload:
        cache_bytes = int(expert_bytes * frac) + (1 << 16)  # a little slack over the exact fraction
        llm, load_s = load(base, offload_experts=True, expert_cache=cache_bytes)
        cache = expert_cache(llm.engine.model)
        decode_rate(llm, prompts, 16, 4, 1)
        before = cache.stats.as_dict()
        r = decode_rate(llm, prompts, args.prompt_len, args.new_tokens, args.runs)
        after = cache.stats.as_dict()
        d = {k: after[k] - before[k] for k in after}
        r |= {"cache_bytes": cache_bytes, "fraction": frac, "load_s": load_s, "stats": d,
              "hit_rate": d["hits"] / max(d["lookups"], 1)}
        out[f"{int(frac * 100)}%"] = r
        print(f"  offload {frac:4.0%} cache {cache_bytes / 2**20:7.1f} MiB  decode {r['decode_tok_s']:7.2f} tok/s  "
              f"hit rate {r['hit_rate']:.3f}  stall {d['stall_seconds']:.2f}s", flush=True)
        del llm, cache
        gc.collect()
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ---- llama.cpp -----------------------------------------------------------------------------------
# Runs convert_hf_to_gguf.py with a placeholder vocabulary of the model's size (random-weight
# checkpoints have no tokenizer, and llama-bench never tokenizes text).
CONVERT = r"""
import sys
llama_dir, model, out, outtype = sys.argv[1:5]
sys.path.insert(0, llama_dir)
sys.path.insert(1, llama_dir + "/gguf-py")
import gguf
import convert_hf_to_gguf as conv

def placeholder_vocab(self):
    n = self.hparams["vocab_size"]
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    tokens += [f"tok{i}" for i in range(len(tokens), n)]
    types += [T.NORMAL] * (n - len(types))
    w = self.gguf_writer
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens[:n])
    w.add_token_scores([0.0] * n)
    w.add_token_types(types[:n])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

orig = conv.get_model_class
def get_model_class(*a, **k):
    cls = orig(*a, **k)
    cls.set_vocab = placeholder_vocab
    return cls
conv.get_model_class = get_model_class
sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", outtype, "--outfile", out]
conv.main()
"""


def run_llama_cpp(base: Path, args) -> dict:
    root = Path(args.llama_cpp).expanduser()
    bench, quant = root / "build/bin/llama-bench", root / "build/bin/llama-quantize"
    for f in (bench, quant, root / "convert_hf_to_gguf.py"):
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: build llama.cpp (cmake -B build && cmake --build build "
                                    "--target llama-bench llama-quantize)")
    gdir = Path(args.cache_dir) / f"{base.name}-gguf"
    gdir.mkdir(parents=True, exist_ok=True)
    bf16 = gdir / "model-bf16.gguf"
    if not bf16.is_file() or bf16.stat().st_mtime < max(f.stat().st_mtime for f in base.glob("*.safetensors")):
        subprocess.run([sys.executable, "-c", CONVERT, str(root), str(base), str(bf16), "bf16"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    files = {"BF16": bf16}
    for q in ("Q8_0", "Q4_K_M"):
        f = gdir / f"model-{q}.gguf"
        if not f.is_file() or f.stat().st_mtime < bf16.stat().st_mtime:
            subprocess.run([str(quant), str(bf16), str(f), q, str(args.threads)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        files[q] = f
    out: dict = {}
    for q, f in files.items():
        cmd = [str(bench), "-m", str(f), "-p", "0", "-n", str(args.new_tokens), "-d", str(args.prompt_len),
               "-t", str(args.threads), "-r", str(max(args.runs, 2)), "-o", "json"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        repack = True
        if res.returncode != 0:  # seen here: Q8_0 weight repacking crashes on tiny models' prompt batches
            print(f"  llama.cpp {q}: llama-bench exited with {res.returncode}; retrying with --repack 0", flush=True)
            repack = False
            res = subprocess.run(cmd + ["--repack", "0"], capture_output=True, text=True, check=True)
        row = json.loads(res.stdout)[0]
        out[q] = {"decode_tok_s": row["avg_ts"], "stddev_tok_s": row["stddev_ts"], "file_bytes": f.stat().st_size,
                  "model_size": row.get("model_size"), "n_depth": row.get("n_depth"), "repack": repack}
        print(f"  llama.cpp {q:7s} {f.stat().st_size / 2**20:8.1f} MiB  decode {row['avg_ts']:7.2f} tok/s", flush=True)
    return out


# ---- main ----------------------------------------------------------------------------------------
def run_model(name: str, args, probe: dict) -> dict:
    from moe.config import read_config_json
    from moe.models import parse_config, weight_bytes

    base = base_checkpoint(name, Path(args.cache_dir), args.seed)
    cfg = parse_config(read_config_json(base))
    prompts = Prompts(cfg.vocab_size, args.seed)
    print(f"\n## {name}: {base}", flush=True)
    res: dict = {"checkpoint": str(base)}
    # with llama.cpp, --rounds alternates the two engines (this host's speed drifts within minutes):
    # each entry's best round is kept, and the ratios are medians of same-round ratios
    rounds = args.rounds if args.llama_cpp else 1
    ours_r, llama_r = [], []
    for i in range(rounds):
        if rounds > 1:
            print(f"  -- round {i + 1} of {rounds}", flush=True)
        ours_r.append(run_formats(base, cfg, args, prompts, probe["sum_read_GBps"]))
        if args.llama_cpp:
            llama_r.append(run_llama_cpp(base, args))
    res["formats"] = best_of_rounds(ours_r)
    relative_to_bf16(res["formats"])
    if args.kv_prompt_len:
        res["kv_cache"] = run_kv(base, args, prompts)
    if args.offload:
        expert_bytes = res["formats"].get("bf16", {}).get("weight_bytes", {}).get("routed_experts")
        if expert_bytes is None:
            llm, _ = load(base)
            expert_bytes = weight_bytes(llm.engine.model)["routed_experts"]
            del llm
        res["offload"] = run_offload(base, args, prompts, expert_bytes)
    if args.llama_cpp:
        res["llama_cpp"] = best_of_rounds(llama_r)
        pairs = [("bf16", "BF16"), ("int8-g128", "Q8_0"), ("int4-g128", "Q4_K_M"), ("int4-g32-asym", "Q4_K_M"),
                 ("int4-g128-all", "Q4_K_M"), ("int4-g32-asym-all", "Q4_K_M"), ("int4-g128-x8", "Q4_K_M"),
                 ("int4-g128-all-x8", "Q4_K_M"), ("int4-g32-asym-all-x8", "Q4_K_M")]
        same_round = {f"{a} vs {b}": [o[a]["decode_tok_s"] / ll[b]["decode_tok_s"] for o, ll in zip(ours_r, llama_r)]
                      for a, b in pairs if a in ours_r[0]}
        res["ours_vs_llama_cpp_rounds"] = same_round
        res["ours_vs_llama_cpp"] = {k: statistics.median(v) for k, v in same_round.items()}
    return res


def print_table(report: dict) -> None:
    m = report["machine"]
    print("\n" + "=" * 100)
    print(f"machine: {m['cpu_model']} | {m['usable_cpus']} usable CPUs | torch {m['torch']} | threads "
          f"{m['torch_threads']} | bandwidth probe {report['bandwidth_probe']['sum_read_GBps']:.1f} GB/s (read)")
    for name, r in report["models"].items():
        print(f"\n[{name}]  decode: batch 1, {report['args']['prompt_len']}-token prompt, "
              f"{report['args']['new_tokens']} new tokens")
        print(f"  {'format':<22}{'weights MiB':>12}{'experts MiB':>12}{'x bf16':>8}{'tok/s':>9}{'x bf16':>8}"
              f"{'GB/s':>7}{'of probe':>9}")
        for label, f in r["formats"].items():
            print(f"  {label:<22}{f['weight_bytes']['total'] / 2**20:12.1f}"
                  f"{f['weight_bytes']['routed_experts'] / 2**20:12.1f}{f.get('expert_bytes_vs_bf16', 1):8.3f}"
                  f"{f['decode_tok_s']:9.2f}{f.get('decode_vs_bf16', 1):8.2f}{f['decode_GBps']:7.1f}"
                  f"{f['fraction_of_probe']:9.0%}")
        for kv, k in r.get("kv_cache", {}).items():
            print(f"  KV {kv:<5} {k['kv_bytes_per_token']:7d} B/token, {k['kv_cache_tokens_in_64MiB']:7d} tokens in "
                  f"64 MiB, decode after {k['prompt_len']} tokens: {k['decode_tok_s']:.2f} tok/s")
        for lab, o in r.get("offload", {}).items():
            print(f"  offload, cache {lab:>4} of bf16 experts ({o['cache_bytes'] / 2**20:.1f} MiB): "
                  f"{o['decode_tok_s']:.2f} tok/s, hit rate {o['hit_rate']:.3f}, "
                  f"stall {o['stats']['stall_seconds']:.2f}s")
        for q, o in r.get("llama_cpp", {}).items():
            print(f"  llama.cpp {q:<7} {o['file_bytes'] / 2**20:9.1f} MiB  {o['decode_tok_s']:.2f} tok/s "
                  f"(+-{o['stddev_tok_s']:.2f})")
        for k, v in r.get("ours_vs_llama_cpp", {}).items():
            rounds = " ".join(f"{x:.2f}" for x in r["ours_vs_llama_cpp_rounds"][k])
            print(f"  ours {k}: {v:.2f}x (median of same-round ratios: {rounds})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all", choices=["mixtral", "default", "all"])
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, from: " + ", ".join(FORMATS))
    ap.add_argument("--offload", default=",".join(str(f) for f in OFFLOAD_FRACTIONS),
                    help="expert-cache sizes as fractions of the bf16 expert bytes ('' to skip)")
    ap.add_argument("--kv-prompt-len", type=int, default=1024, help="0 skips the KV-cache comparison")
    ap.add_argument("--llama-cpp", default=None, help="llama.cpp source tree with build/bin/llama-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="with --llama-cpp: ours and llama.cpp alternately, this "
                                                          "many times")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default="/tmp/moe-bench-models")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    unknown = set(args.formats) - set(FORMATS)
    if unknown:
        ap.error(f"unknown formats {sorted(unknown)}: choose from {', '.join(FORMATS)}")
    args.offload = [float(f) for f in args.offload.split(",") if f]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    report: dict = {"machine": machine_info(args.threads), "args": vars(args)}
    report["bandwidth_probe"] = bandwidth_probe()
    print(f"bandwidth probe: {report['bandwidth_probe']['sum_read_GBps']:.1f} GB/s read", flush=True)
    report["models"] = {}
    for name in (["mixtral", "default"] if args.model == "all" else [args.model]):
        report["models"][name] = run_model(name, args, report["bandwidth_probe"])
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, default=float))
    report["bandwidth_probe_end"] = bandwidth_probe()
    print_table(report)
    print(json.dumps(report, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
