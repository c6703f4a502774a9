"""``moe bench serve``: measure any OpenAI-compatible server (ours, ``vllm serve``, ``llama-server``)
from its token stream, the way ``vllm bench serve`` does, with the same result keys.

Per request: TTFT (send -> first streamed text), ITL (gaps between later chunks), TPOT
((latency - TTFT) / (output tokens - 1)), E2E latency. Arrivals are a Poisson process at
``--request-rate`` (``--burstiness`` < 1 burstier, > 1 steadier: gamma-distributed gaps as vLLM
draws them), optionally capped at ``--max-concurrency`` requests in flight.
"""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import typer


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""
    error: str = ""


# ---- datasets --------------------------------------------------------------------------------
class _Tokenizer:
    """A local tokenizer.json, or the server's /tokenize and /detokenize."""

    def __init__(self, client, base_url: str, model: str, path: str | None):
        self.client, self.base_url, self.model = client, base_url, model
        self.local = None
        if path is not None:
            from tokenizers import Tokenizer

            p = Path(path)
            self.local = Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))

    async def encode(self, text: str) -> list[int]:
        if self.local is not None:
            return self.local.encode(text, add_special_tokens=False).ids
        r = await self.client.post(f"{self.base_url}/tokenize", json={"model": self.model, "prompt": text,
                                                                       "add_special_tokens": False})
        r.raise_for_status()
        return r.json()["tokens"]

    async def decode(self, ids: list[int]) -> str | list[int]:
        if self.local is not None:
            return self.local.decode(ids)
        try:
            r = await self.client.post(f"{self.base_url}/detokenize", json={"model": self.model, "tokens": ids})
            r.raise_for_status()
            return r.json()["prompt"]
        except Exception:  # noqa: BLE001 -- a server without /detokenize takes the token ids themselves
            return ids

    @property
    def vocab_size(self) -> int | None:
        return self.local.get_vocab_size() if self.local is not None else None


async def random_dataset(tok: _Tokenizer, n: int, input_len: int, output_len: int, range_ratio: float, seed: int,
                         vocab_size: int) -> list[BenchRequest]:
    """Prompts of random token ids (seeded), lengths uniform in [len * (1 - ratio), len * (1 + ratio)]."""
    rng = random.Random(seed)
    vocab = tok.vocab_size or vocab_size
    lo_in, hi_in = max(1, int(input_len * (1 - range_ratio))), int(input_len * (1 + range_ratio))
    lo_out, hi_out = max(1, int(output_len * (1 - range_ratio))), int(output_len * (1 + range_ratio))
    reqs = []
    for _ in range(n):
        plen = rng.randint(lo_in, hi_in)
        ids = [rng.randrange(min(100, vocab // 2), vocab) for _ in range(plen)]  # past the special tokens
        reqs.append(BenchRequest(await tok.decode(ids), plen, rng.randint(lo_out, hi_out)))
    return reqs


async def sharegpt_dataset(tok: _Tokenizer, path: str, n: int, seed: int, output_len: int | None) -> list[BenchRequest]:
    """The first human turn of ShareGPT conversations; the output length is the answer's length."""
    data = json.loads(Path(path).read_text())
    random.Random(seed).shuffle(data)
    reqs = []
    for conv in data:
        turns = conv.get("conversations") or conv.get("conversation") or []
        if len(turns) < 2:
            continue
        prompt, answer = turns[0].get("value", ""), turns[1].get("value", "")
        plen = len(await tok.encode(prompt))
        olen = output_len or len(await tok.encode(answer))
        if plen < 4 or olen < 4:
            continue
        reqs.append(BenchRequest(prompt, plen, olen))
        if len(reqs) == n:
            break
    if len(reqs) < n:
        raise ValueError(f"{path} has only {len(reqs)} usable conversations, {n} asked for")
    return reqs


# ---- one request -----------------------------------------------------------------------------
async def send_request(client, url: str, model: str, req: BenchRequest, ignore_eos: bool, api_key: str | None,
                       pbar=None) -> RequestResult:
    payload = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0,
               "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        payload["ignore_eos"] = True
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    res = RequestResult(prompt_len=req.prompt_len)
    t0 = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                body = json.loads(data)
                if "error" in body:
                    res.error = json.dumps(body["error"])[:200]
                    return res
                if body.get("usage"):
                    res.output_tokens = body["usage"].get("completion_tokens", res.output_tokens)
                    res.prompt_len = body["usage"].get("prompt_tokens", res.prompt_len)
                for c in body.get("choices") or []:
                    text = c.get("text") or ""
                    now = time.perf_counter()
                    if text or c.get("finish_reason") is None:
                        if chunks == 0:
                            res.ttft = now - t0
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
                        res.text += text
        res.latency = time.perf_counter() - t0
        res.output_tokens = res.output_tokens or chunks
        res.success = chunks > 0
        if not res.success:
            res.error = "no tokens streamed"
    except Exception as e:  # noqa: BLE001 -- a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    finally:
        if pbar is not None:
            pbar.update(1)
    return res


# ---- a run -----------------------------------------------------------------------------------
def _arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)  # gamma(shape=burstiness, scale=theta) has mean 1/rate
    return [rng.gammavariate(burstiness, theta) for _ in range(n)]


def _stats(name: str, values_s: list[float], out: dict) -> None:
    ms = [v * 1000 for v in values_s] or [0.0]
    out[f"mean_{name}_ms"] = statistics.fmean(ms)
    out[f"median_{name}_ms"] = statistics.median(ms)
    out[f"std_{name}_ms"] = statistics.pstdev(ms)
    cuts = statistics.quantiles(ms * 2 if len(ms) == 1 else ms, n=100, method="inclusive")  # 99 cut points
    for p in (50, 90, 99):
        out[f"p{p}_{name}_ms"] = cuts[p - 1]


def summarize(results: list[RequestResult], duration: float, slo: dict[str, float]) -> dict:
    ok = [r for r in results if r.success]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    good = 0
    for r in ok:
        tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        meets = {"ttft": r.ttft * 1000, "tpot": tpot * 1000, "e2el": r.latency * 1000}
        good += all(meets[k] <= v for k, v in slo.items())
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    s: dict = {"duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
               "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
               "request_throughput": len(ok) / duration, "request_goodput": good / duration if slo else None,
               "output_throughput": out_tokens / duration,
               "total_token_throughput": (in_tokens + out_tokens) / duration}
    _stats("ttft", [r.ttft for r in ok], s)
    _stats("tpot", tpots, s)
    _stats("itl", [g for r in ok for g in r.itl], s)
    _stats("e2el", [r.latency for r in ok], s)
    s.update(input_lens=[r.prompt_len for r in results], output_lens=[r.output_tokens for r in results],
             ttfts=[r.ttft for r in results], itls=[r.itl for r in results],
             generated_texts=[r.text for r in results], errors=[r.error for r in results])
    return s


async def run_benchmark(client, base_url: str, model: str, reqs: list[BenchRequest], rate: float, burstiness: float,
                        max_concurrency: int | None, ignore_eos: bool, api_key: str | None, seed: int,
                        warmups: list[BenchRequest], slo: dict[str, float], progress: bool = True) -> dict:
    from tqdm.asyncio import tqdm

    url = f"{base_url}/v1/completions"
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def limited(req: BenchRequest, pbar) -> RequestResult:
        if sem is None:
            return await send_request(client, url, model, req, ignore_eos, api_key, pbar)
        async with sem:
            return await send_request(client, url, model, req, ignore_eos, api_key, pbar)

    if warmups:
        warm = await asyncio.gather(*(limited(req, None) for req in warmups))
        failed = [w.error for w in warm if not w.success]
        if failed:
            raise RuntimeError(f"warm-up request failed: {failed[0]}")
    pbar = tqdm(total=len(reqs), disable=not progress, desc=f"{base_url} rate={rate}")
    tasks = []
    t0 = time.perf_counter()
    for req, gap in zip(reqs, _arrival_gaps(len(reqs), rate, burstiness, seed)):
        tasks.append(asyncio.create_task(limited(req, pbar)))
        if gap:
            await asyncio.sleep(gap)
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    pbar.close()
    s = summarize(results, duration, slo)
    s.update(base_url=base_url, model_id=model, num_prompts=len(reqs), request_rate=rate, burstiness=burstiness,
             max_concurrency=max_concurrency)
    return s


def parse_slo(text: str | None) -> dict[str, float]:
    """``ttft=500,tpot=50`` (milliseconds; also vLLM's ``ttft:500 tpot:50``)."""
    if not text:
        return {}
    out = {}
    for part in text.replace(",", " ").split():
        k, _, v = part.replace(":", "=").partition("=")
        if k not in ("ttft", "tpot", "e2el") or not v:
            raise ValueError(f"--slo {text!r}: each entry is ttft=MS, tpot=MS or e2el=MS")
        out[k] = float(v)
    return out


def plot(runs: dict[str, list[dict]], path: str) -> None:
    """p50/p99 TTFT and TPOT against output throughput, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("ttft", "tpot")):
        for url, rs in runs.items():
            x = [r["output_throughput"] for r in rs]
            for p, style in (("median", "-o"), ("p99", "--^")):
                ax.plot(x, [r[f"{p}_{metric}_ms"] for r in rs], style, label=f"{url} {p}")
            for r in rs:
                ax.annotate(str(r["request_rate"]), (r["output_throughput"], r[f"median_{metric}_ms"]), fontsize=7)
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("latency against throughput (labels: request rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


async def _main(base_urls: list[str], model: str | None, args: dict) -> dict[str, list[dict]]:
    import httpx

    timeout = httpx.Timeout(args["timeout"])
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    runs: dict[str, list[dict]] = {}
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        for base_url in base_urls:
            base_url = base_url.rstrip("/").removesuffix("/v1")
            headers = {"Authorization": f"Bearer {args['api_key']}"} if args["api_key"] else {}
            mid = model
            if mid is None:
                r = await client.get(f"{base_url}/v1/models", headers=headers)
                r.raise_for_status()
                mid = r.json()["data"][0]["id"]
            tok = _Tokenizer(client, base_url, mid, args["tokenizer"])
            runs[base_url] = []
            for k, rate in enumerate(args["rates"]):
                # each rate its own prompts (seed + k), or a later rate would hit the prefix cache with
                # an earlier rate's; every server gets the same ones at the same rate
                reqs, warmups = await _dataset(tok, args, args["seed"] + k)
                runs[base_url].append(await run_benchmark(
                    client, base_url, mid, reqs, rate, args["burstiness"], args["max_concurrency"],
                    args["ignore_eos"], args["api_key"], args["seed"] + k, warmups, args["slo"],
                    progress=not args["quiet"]))
    return runs


async def _dataset(tok: _Tokenizer, args: dict, seed: int) -> tuple[list[BenchRequest], list[BenchRequest]]:
    """``num_prompts`` measured requests and ``num_warmups`` others drawn after them: a warm-up
    request must not put a measured prompt into the server's prefix cache."""
    n = args["num_prompts"] + args["num_warmups"]
    if args["dataset_path"]:
        try:
            reqs = await sharegpt_dataset(tok, args["dataset_path"], n, seed, args["sharegpt_output_len"])
        except ValueError as e:
            raise ValueError(f"{e} ({args['num_prompts']} prompts + {args['num_warmups']} warm-ups): lower "
                             "--num-prompts or --num-warmups") from e
    else:
        reqs = await random_dataset(tok, n, args["random_input_len"], args["random_output_len"],
                                    args["random_range_ratio"], seed, args["random_vocab_size"])
    return reqs[:args["num_prompts"]], reqs[args["num_prompts"]:]


def _print_table(r: dict) -> None:
    rows = [("Successful requests", r["completed"]), ("Failed requests", r["failed"]),
            ("Benchmark duration (s)", r["duration"]), ("Total input tokens", r["total_input_tokens"]),
            ("Total generated tokens", r["total_output_tokens"]),
            ("Request throughput (req/s)", r["request_throughput"]),
            ("Output token throughput (tok/s)", r["output_throughput"]),
            ("Total token throughput (tok/s)", r["total_token_throughput"])]
    if r["request_goodput"] is not None:
        rows.append(("Request goodput (req/s)", r["request_goodput"]))
    for m, title in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        for k in ("mean", "median", "p90", "p99"):
            rows.append((f"{k.capitalize()} {title} (ms)", r[f"{k}_{m}_ms"]))
    print(f"=========== {r['base_url']}  rate={r['request_rate']}  concurrency={r['max_concurrency']} ===========")
    for name, v in rows:
        print(f"{name:<36} {v:>12.2f}" if isinstance(v, float) else f"{name:<36} {v:>12}")


def bench_serve(
    base_url: list[str] = typer.Option(["http://127.0.0.1:8000"], help="Server(s) to measure (repeatable: side "
                                                                          "by side, same prompts)."),
    model: Optional[str] = typer.Option(None, help="Model id (default: the server's first /v1/models entry)."),
    api_key: Optional[str] = typer.Option(None, envvar="OPENAI_API_KEY"),
    num_prompts: int = typer.Option(200),
    request_rate: float = typer.Option(float("inf"), help="Requests/s (Poisson arrivals); inf: all at once."),
    sweep_rates: Optional[str] = typer.Option(None, help="Comma-separated rates, e.g. 1,2,4,8,inf (overrides "
                                                         "--request-rate)."),
    burstiness: float = typer.Option(1.0, help="Gamma shape of the arrival gaps (1: Poisson)."),
    max_concurrency: Optional[int] = typer.Option(None, help="Requests in flight at most."),
    num_warmups: int = typer.Option(2, help="Requests sent (and not measured) before each run."),
    random_input_len: int = typer.Option(256),
    random_output_len: int = typer.Option(128),
    random_range_ratio: float = typer.Option(0.0, help="Lengths uniform in len * [1 - r, 1 + r]."),
    random_vocab_size: int = typer.Option(1000, help="Random token ids below this (without --tokenizer)."),
    dataset_path: Optional[str] = typer.Option(None, help="ShareGPT-format JSON (default: the random dataset)."),
    sharegpt_output_len: Optional[int] = typer.Option(None),
    tokenizer: Optional[str] = typer.Option(None, help="Local tokenizer.json (or its directory); default: the "
                                                       "server's /tokenize and /detokenize."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Generate exactly the requested lengths."),
    slo: Optional[str] = typer.Option(None, help="Goodput SLOs in ms, e.g. ttft=500,tpot=50."),
    seed: int = typer.Option(0),
    timeout: float = typer.Option(600.0, help="Seconds per request at most."),
    result_file: Optional[str] = typer.Option(None, "--result-file", "-o", help="Write the results as JSON."),
    plot_file: Optional[str] = typer.Option(None, "--plot", help="Draw latency against throughput (PNG)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Measure TTFT, TPOT, ITL, latency and throughput of OpenAI-compatible servers."""
    try:
        rates = [float(r) for r in sweep_rates.split(",")] if sweep_rates else [request_rate]
        slo_ms = parse_slo(slo)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    args = dict(api_key=api_key, num_prompts=num_prompts, rates=rates, burstiness=burstiness,
                max_concurrency=max_concurrency, num_warmups=num_warmups, random_input_len=random_input_len,
                random_output_len=random_output_len, random_range_ratio=random_range_ratio,
                random_vocab_size=random_vocab_size, dataset_path=dataset_path,
                sharegpt_output_len=sharegpt_output_len, tokenizer=tokenizer, ignore_eos=ignore_eos, slo=slo_ms,
                seed=seed, timeout=timeout, quiet=quiet)
    runs = asyncio.run(_main(base_url, model, args))
    for rs in runs.values():
        for r in rs:
            _print_table(r)
    if result_file:
        flat = [r for rs in runs.values() for r in rs]
        Path(result_file).write_text(json.dumps(flat[0] if len(flat) == 1 else flat, indent=1))
    if plot_file:
        plot(runs, plot_file)
    if any(r["failed"] for rs in runs.values() for r in rs):
        raise typer.Exit(1)
