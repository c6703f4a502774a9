#!/usr/bin/env python
"""Quality of packed experts on the embedded default model: top-1 agreement with the bf16 model
and perplexity, on the default model's own held-out text.

The held-out text is the split ``examples/train_default_model.py`` trained without (Debian
package python3.11-doc, every 20th ~2000-character block; ``apt-get install -y python3.11-doc``),
tokenized as it was (``<eot> doc <eot> doc ...``), its first ``--tokens`` tokens scored in
windows of ``--window``. Calibration (``--calibration``: awq / gptq) reads the *training* split,
so it never sees the text it is scored on.

Every model runs through the engine (``LLM``) with float32 activations (no bf16 logit ties),
teacher-forced: at each position the bf16 checkpoint's top-1 next token (the reference) is
compared with the quantized model's, and the quantized model's log-probability of the actual next
token gives the perplexity. One JSON line per configuration, then a markdown table.

    python benchmarks/quant_quality.py                       # the RTN sweep (group 32/64/128 x sym/asym)
    python benchmarks/quant_quality.py --methods rtn awq gptq --configs g128-sym g32-asym
    python benchmarks/quant_quality.py --configs g128-sym --activations float int8 --step-tokens 8

``--activations int8`` (``moe quantize --activations int8``) rounds x to 8 bits where the kernels
stream the codes, which is at decode-sized steps only: ``--step-tokens 8`` scores every model in
steps of 8 tokens (``max_num_batched_tokens``), the rows decode and verify steps run with.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

CONFIGS = {f"g{g}-{'sym' if s else 'asym'}": (g, s) for g in (32, 64, 128) for s in (True, False)}


def _trainer():
    """examples/train_default_model.py as a module (its corpus reader and split)."""
    spec = importlib.util.spec_from_file_location("train_default_model", REPO / "examples/train_default_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def corpus_splits() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of the default model's corpus."""
    t = _trainer()
    return t.split_corpus(t.read_corpus(t.CORPUS_DIR))


def token_windows(tok, texts: list[str], tokens: int, window: int) -> list[list[int]]:
    """The first ``tokens`` tokens of ``<eot> doc <eot> doc ...`` in windows of ``window`` (+1 overlap)."""
    ids: list[int] = []
    eot = tok.eos_token_id
    for text in texts:
        ids += [eot] + tok.encode(text, add_special_tokens=False)
        if len(ids) > tokens:
            break
    ids = ids[:tokens + 1]
    return [ids[s:s + window + 1] for s in range(0, len(ids) - 1, window) if len(ids[s:s + window + 1]) > 1]


def score(model_dir: str | None, windows: list[list[int]], step_tokens: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top-1 token, log-prob of the actual next token)`` at every scored position; ``step_tokens``:
    the engine's tokens per step (None: its default, whole windows)."""
    from moe import LLM, SamplingParams

    kw = {"max_num_batched_tokens": step_tokens} if step_tokens else {}
    llm = LLM(model_dir, dtype="float32", kv_cache_memory=1 << 24, **kw)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows],
                        SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    top, lp = [], []
    for w, o in zip(windows, outs):
        for pos, d in enumerate(o.prompt_logprobs[1:], start=1):
            top.append(max(d, key=d.get))
            lp.append(d[w[pos]])
    del llm
    return torch.tensor(top), torch.tensor(lp, dtype=torch.float64)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=20000, help="held-out tokens scored")
    ap.add_argument("--window", type=int, default=256, help="tokens per teacher-forced window")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--methods", nargs="+", default=["rtn"], choices=["rtn", "awq", "gptq"])
    ap.add_argument("--calibration-tokens", type=int, default=16384, help="training-split tokens for awq/gptq")
    ap.add_argument("--all-linear", action="store_true",
                    help="also pack attention, dense MLPs, shared experts and the LM head in the same int4 format "
                         "(moe quantize --all-linear; they are rounded to nearest, calibration chooses expert codes)")
    ap.add_argument("--activations", nargs="+", default=["float"], choices=["float", "int8"],
                    help="what the int4 codes meet where the kernels stream them (moe quantize --activations)")
    ap.add_argument("--step-tokens", type=int, default=None,
                    help="score in engine steps of this many tokens (8: the rows decode steps stream)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the many small ops of calibration "
                    "and of this 9M-parameter model run best on one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from experts.formats import get_format
    from moe.llm import default_model_path
    from moe.quantize import quantize_checkpoint
    from moe.tokenizer import Tokenizer

    src = default_model_path()
    tok = Tokenizer(src)
    train, held = corpus_splits()
    windows = token_windows(tok, held, args.tokens, args.window)
    ref_top, ref_lp = score(None, windows, args.step_tokens)
    n = len(ref_top)
    rows = [dict(config="bf16", method="-", agreement=1.0, ppl=math.exp(-ref_lp.mean().item()), positions=n)]
    print(json.dumps(rows[0]), flush=True)
    calib = None
    if any(m != "rtn" for m in args.methods):
        calib_text = "\n\n".join(train[:200])
        calib = token_windows(tok, [calib_text], args.calibration_tokens, args.window)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            g, sym = CONFIGS[name]
            for method, act in itertools.product(args.methods, args.activations):
                fmt = get_format("int4", group_size=g, symmetric=sym, activations=act)
                out = Path(tmp) / f"{name}-{method}-{act}"
                t0 = time.perf_counter()
                quantize_checkpoint(src, out, fmt, method=method, calibration=calib if method != "rtn" else None,
                                    all_linear=args.all_linear)
                secs = time.perf_counter() - t0
                top, lp = score(str(out), windows, args.step_tokens)
                row = dict(config=name, method=method, activations=act, all_linear=args.all_linear,
                           agreement=round(float((top == ref_top).float().mean()), 4),
                           ppl=round(math.exp(-lp.mean().item()), 3), positions=n, quantize_s=round(secs, 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| int4 config | method | activations | top-1 agreement | perplexity |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        act = r.get("activations", "-")
        print(f"| {r['config']} | {r['method']} | {act} | {r['agreement']:.4f} | {r['ppl']:.3f} |")


if __name__ == "__main__":
    main()
