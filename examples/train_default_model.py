#!/usr/bin/env python
"""Train the framework's embedded default model (``moe/default_model/``).

The default model is a tiny Mixture-of-Experts causal LM (Hugging Face
``Qwen3MoeForCausalLM``: 8 experts, top-2 routing) trained from scratch on the
English prose of the Python 3.11 documentation, as shipped by the Debian
package ``python3.11-doc``. It is what ``moe generate`` runs when no
``--model`` is given. It is a toy: it produces words and phrases in the style
of the corpus, not useful answers.

Corpus (this script installs nothing; install the package first, as root)::

    apt-get update && apt-get install -y --no-install-recommends python3.11-doc

Reproduce the shipped model (the defaults are the shipped settings). On one
idle core a step takes ~1.1 s, so the 1600 steps take ~30 min; the shipped run
took 50 min because the machine's other core was busy with other work::

    python examples/train_default_model.py --out /tmp/default_model
    cp /tmp/default_model/{config.json,generation_config.json,model.safetensors,\
tokenizer.json,tokenizer_config.json,special_tokens_map.json,training_report.json} \
moe/default_model/

What it does:

1. Reads the rendered Sphinx HTML (``/usr/share/doc/python3.11/html/**/*.html``,
   less the indexes, the changelog and the C API reference), keeps the
   paragraphs, titles and list items of each page's main content, drops
   code listings and interactive sessions (``<pre>``), tables, object
   signatures and navigation, normalises typographic punctuation to ASCII,
   and keeps paragraphs of at least 4 words that are mostly letters.
2. Splits the paragraphs deterministically: they are grouped in consecutive
   blocks of ~2000 characters and every 20th block is held out (~5%).
3. Trains a byte-level BPE tokenizer (``tokenizers``) on the training split,
   with ``<|endoftext|>`` as the only special token (bos = eos = pad).
4. Trains the model with AdamW + linear warm-up + cosine decay on random
   windows of the training token stream, with the Switch-style router
   load-balancing loss, printing the loss periodically.
5. Evaluates held-out perplexity (every held-out token scored once, in
   non-overlapping windows) with the float32 weights and with the weights
   rounded to bfloat16 as shipped.
6. Writes ``model.safetensors`` (bfloat16), ``config.json``,
   ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
   ``special_tokens_map.json`` and ``training_report.json`` to ``--out``.

The run is deterministic for a given ``--seed`` and ``--threads``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

# Single-threaded tokenizer training keeps the BPE merges reproducible and the
# machine's other core free.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS_PACKAGE = "python3.11-doc"
CORPUS_DIR = "/usr/share/doc/python3.11/html"
COPYRIGHT_FILE = "/usr/share/doc/python3.11-doc/copyright"
# Not prose: indexes, tables of contents, download page, the C API reference.
EXCLUDE_PREFIXES = ("_", "genindex", "c-api/")
EXCLUDE_FILES = {"index.html", "contents.html", "search.html", "py-modindex.html",
                 "download.html", "copyright.html", "license.html", "bugs.html",
                 "about.html", "whatsnew/changelog.html"}
EOT = "<|endoftext|>"
SAMPLE_PROMPTS = ["The", "In the", "This function returns", "The Python interpreter"]


# --------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------

_BLOCK_TAGS = {"p", "div", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6",
               "tr", "td", "th", "br", "table", "ul", "ol", "dl", "blockquote",
               "section", "caption"}
_VOID_TAGS = {"br", "img", "meta", "link", "hr", "input", "col", "area", "base", "wbr"}
# Subtrees dropped entirely: code listings and interactive sessions (<pre>),
# tables, object signatures, permalinks, local tables of contents, and the
# boilerplate "Raises an auditing event" / "Availability" notes.
_SKIP_TAGS = {"head", "script", "style", "pre", "table", "nav", "form"}
_SKIP_CLASSES = {"headerlink", "sig", "toctree-wrapper", "contents", "audit-hook",
                 "availability", "highlight", "doctest", "footer", "related",
                 "sphinxsidebar", "mobile-nav", "rubric", "seealso"}


class _ProseExtractor(HTMLParser):
    """Collects the text of block elements inside Sphinx's main content
    (``<div class="body" role="main">``) as paragraphs."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] = []
        # (tag, starts a skipped subtree, starts the main-content root)
        self._stack: list[tuple[str, bool, bool]] = []
        self._skip_depth = 0
        self._in_main = 0

    @property
    def _collecting(self) -> bool:
        return self._in_main > 0 and self._skip_depth == 0

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self._buf)).strip()
        self._buf = []
        if text:
            self.paragraphs.append(text)

    def handle_starttag(self, tag, attrs):
        if tag in _VOID_TAGS:
            if tag == "br" and self._collecting:
                self._buf.append(" ")
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        is_main = a.get("role") == "main"
        skip = tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES)
        self._stack.append((tag, skip, is_main))
        if is_main:
            self._in_main += 1
        if skip:
            self._skip_depth += 1
        if tag in _BLOCK_TAGS and self._collecting:
            self._flush()

    def handle_endtag(self, tag):
        if tag in _VOID_TAGS:
            return
        # Pop up to and including the matching tag (tolerates sloppy nesting).
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                for _, skip, is_main in self._stack[i:]:
                    self._skip_depth -= skip
                    self._in_main -= is_main
                del self._stack[i:]
                break
        if tag in _BLOCK_TAGS and self._collecting:
            self._flush()

    def handle_data(self, data):
        if self._collecting:
            self._buf.append(data)

    def close(self):
        super().close()
        self._flush()


_TYPO = str.maketrans({"\u00a0": " ", "\u200b": None, "\u2014": "-", "\u2013": "-",
                       "\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"',
                       "\u2026": "...", "\u00b6": None, "\u2192": "->"})


def _clean_paragraph(p: str) -> str | None:
    # Typographic punctuation -> ASCII, so the small vocabulary is not spent on it.
    p = re.sub(r"\s+", " ", p.translate(_TYPO)).strip()
    # Keep prose: at least a few words, mostly letters (drops stray code/values).
    if len(p) < 20 or len(p.split()) < 4:
        return None
    letters = sum(c.isalpha() or c == " " for c in p)
    if letters < 0.75 * len(p):
        return None
    return p


def corpus_files(corpus_dir: str) -> list[str]:
    files = []
    for f in sorted(glob.glob(os.path.join(corpus_dir, "**", "*.html"), recursive=True)):
        rel = os.path.relpath(f, corpus_dir)
        if rel.startswith(EXCLUDE_PREFIXES) or rel in EXCLUDE_FILES:
            continue
        files.append(f)
    return files


def read_corpus(corpus_dir: str) -> list[list[str]]:
    """Return the documentation as a list of documents (one per HTML page),
    each a list of plain-prose paragraphs, in sorted file-name order."""
    files = corpus_files(corpus_dir)
    if not files:
        sys.exit(f"no HTML files under {corpus_dir}: install the corpus first:\n"
                 f"  apt-get install -y --no-install-recommends {CORPUS_PACKAGE}")
    docs = []
    for f in files:
        parser = _ProseExtractor()
        parser.feed(Path(f).read_text(encoding="utf-8"))
        parser.close()
        paras = [c for c in (_clean_paragraph(p) for p in parser.paragraphs) if c]
        if paras:
            docs.append(paras)
    return docs


def split_corpus(docs: list[list[str]], block_chars: int = 2000, every: int = 20
                 ) -> tuple[list[str], list[str]]:
    """Deterministic ~1/every held-out split on consecutive blocks of paragraphs.

    Returns (train_docs, eval_docs) where each element is one contiguous run of
    text (paragraphs joined by newlines)."""
    train, held = [], []
    block_idx = 0
    for paras in docs:
        cur: list[str] = []
        cur_len = 0
        runs: list[tuple[int, list[str]]] = []
        for p in paras:
            cur.append(p)
            cur_len += len(p) + 1
            if cur_len >= block_chars:
                runs.append((block_idx, cur))
                block_idx += 1
                cur, cur_len = [], 0
        if cur:
            runs.append((block_idx, cur))
            block_idx += 1
        # Merge consecutive blocks on the same side into one run of text.
        side_prev, acc = None, []
        for bi, block in runs:
            side = "eval" if bi % every == every - 1 else "train"
            if side != side_prev and acc:
                (held if side_prev == "eval" else train).append("\n".join(acc))
                acc = []
            side_prev = side
            acc.extend(block)
        if acc:
            (held if side_prev == "eval" else train).append("\n".join(acc))
    return train, held


def package_version(pkg: str) -> str:
    try:
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg],
                              capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def package_license() -> str:
    """The licence as the package's copyright file states it.

    python3.11-doc's copyright file is not machine-readable (DEP-5); it
    carries the "Python License", whose terms for Python 3.x are the
    "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2"."""
    try:
        text = Path(COPYRIGHT_FILE).read_text(encoding="utf-8")
    except OSError:
        return "unknown (no " + COPYRIGHT_FILE + ")"
    m = re.search(r"^Files: \*\n(?:.+\n)*?License: (.+)$", text, re.M)  # DEP-5
    if m:
        return m.group(1).strip()
    if "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in text:
        return ("Python License: PSF License Agreement (PYTHON SOFTWARE FOUNDATION "
                "LICENSE VERSION 2), per " + COPYRIGHT_FILE)
    return "see " + COPYRIGHT_FILE


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

def train_tokenizer(train_texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer)
    return tok


def tokenizer_side_files(out: Path, max_len: int) -> None:
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": EOT,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    smap = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT, "unk_token": EOT}
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")


def encode_stream(tok, texts: list[str], eot_id: int):
    """Concatenate documents as <eot> doc <eot> doc ... into one id stream."""
    import torch

    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.append(eot_id)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------

def build_config(args, vocab_size: int, eot_id: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.moe_intermediate,  # unused: every layer is MoE
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=args.tie_embeddings,
        output_router_logits=False,
        router_aux_loss_coef=args.aux_loss_coef,
        initializer_range=0.02,
        attention_dropout=0.0,
        use_cache=True,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
    )


def count_params(model, config) -> dict:
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    embed = model.get_input_embeddings().weight.numel()
    head = 0 if config.tie_word_embeddings else model.get_output_embeddings().weight.numel()
    active_expert = expert * config.num_experts_per_tok // config.num_experts
    active = total - expert + active_expert
    return {
        "total": total,
        "experts": expert,
        "embedding": embed,
        "lm_head": head,
        "active_per_token": active,
        "non_embedding": total - embed - head,
    }


@__import__("torch").no_grad()
def evaluate(model, stream, seq_len: int, batch_size: int = 16) -> tuple[float, int]:
    """Mean NLL (nats/token) over every token of ``stream`` after the first,
    scored once in non-overlapping windows of ``seq_len`` tokens."""
    import torch

    model.eval()
    n = stream.numel()
    starts = list(range(0, n - 1, seq_len))
    total_nll, total_tok = 0.0, 0
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        # Last window may be short: evaluate those one by one.
        full = [s for s in chunk if s + seq_len + 1 <= n]
        rest = [s for s in chunk if s + seq_len + 1 > n]
        groups = ([torch.stack([stream[s:s + seq_len + 1] for s in full])] if full else [])
        groups += [stream[s:n].unsqueeze(0) for s in rest]
        for g in groups:
            if g.shape[1] < 2:
                continue
            logits = model(input_ids=g[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), g[:, 1:].reshape(-1), reduction="sum")
            total_nll += nll.item()
            total_tok += g[:, 1:].numel()
    model.train()
    return total_nll / total_tok, total_tok


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def sample_texts(model, tok, prompts: list[str], max_new_tokens: int = 40) -> list[dict]:
    import torch

    out = []
    model.eval()
    for p in prompts:
        ids = torch.tensor([tok.encode(p).ids])
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        out.append({"prompt": p, "greedy": tok.decode(g[0].tolist())})
    model.train()
    return out


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="/tmp/default_model", help="output directory")
    ap.add_argument("--steps", type=int, default=1600, help="optimizer steps")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--corpus-dir", default=CORPUS_DIR)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-loss-coef", type=float, default=0.01)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--moe-intermediate", type=int, default=256)
    ap.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--bf16-autocast", action=argparse.BooleanOptionalAction, default=True,
                    help="train under CPU bfloat16 autocast (fp32 master weights)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=400,
                    help="held-out eval every N steps (0: only at the end)")
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="benchmarking aid: stop early after this wall time (0: off)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.time()

    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(args.seed)

    from transformers import Qwen3MoeForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- corpus ----
    docs = read_corpus(args.corpus_dir)
    train_texts, eval_texts = split_corpus(docs)
    train_chars = sum(len(t) for t in train_texts)
    eval_chars = sum(len(t) for t in eval_texts)
    eval_bytes = sum(len(t.encode("utf-8")) for t in eval_texts)
    corpus_sha = hashlib.sha256("\n\n".join("\n".join(d) for d in docs).encode()).hexdigest()
    print(f"corpus: {len(docs)} pages, {sum(len(d) for d in docs)} paragraphs, "
          f"train {train_chars} chars / held-out {eval_chars} chars "
          f"({100 * eval_chars / (train_chars + eval_chars):.1f}%)", flush=True)

    # ---- tokenizer ----
    tok = train_tokenizer(train_texts, args.vocab_size)
    eot_id = tok.token_to_id(EOT)
    train_ids = encode_stream(tok, train_texts, eot_id)
    eval_ids = encode_stream(tok, eval_texts, eot_id)
    print(f"tokenizer: vocab {tok.get_vocab_size()}, eot id {eot_id}; "
          f"train {train_ids.numel()} tokens, held-out {eval_ids.numel()} tokens", flush=True)

    # ---- model ----
    config = build_config(args, tok.get_vocab_size(), eot_id)
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(config)
    model.train()
    params = count_params(model, config)
    print(f"model: {json.dumps(params)}", flush=True)

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.ndim >= 2 and "norm" not in n else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    gen = torch.Generator().manual_seed(args.seed)
    n_train = train_ids.numel()
    offsets = torch.arange(args.seq_len + 1)
    history = []
    ema = None
    t_train = time.time()
    step = 0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        starts = torch.randint(0, n_train - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = train_ids[starts[:, None] + offsets[None, :]]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast):
            res = model(input_ids=batch[:, :-1], output_router_logits=True)
        logits = res.logits.float()
        lm_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        aux = res.aux_loss.float() if res.aux_loss is not None else torch.zeros(())
        loss = lm_loss + args.aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lm = lm_loss.item()
        ema = lm if ema is None else 0.95 * ema + 0.05 * lm
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(f"step {step:5d}/{args.steps} loss {lm:.4f} (ema {ema:.4f}) "
                  f"aux {aux.item():.3f} gnorm {gnorm.item():.2f} lr {lr_at(step, args):.2e} "
                  f"{el / (step + 1):.2f}s/step elapsed {el / 60:.1f}min", flush=True)
            history.append({"step": step, "loss": round(lm, 4), "ema": round(ema, 4)})
        if args.eval_every and step and step % args.eval_every == 0:
            nll, _ = evaluate(model, eval_ids, args.seq_len)
            print(f"  held-out @ {step}: loss {nll:.4f} ppl {math.exp(nll):.2f}", flush=True)
        if args.max_minutes and time.time() - t_train > args.max_minutes * 60:
            print(f"stopping early after {args.max_minutes} min at step {step}", flush=True)
            break
    steps_done = step + 1
    train_seconds = time.time() - t_train

    # ---- evaluation ----
    eval_nll, eval_tokens = evaluate(model, eval_ids, args.seq_len)
    # Score the weights as shipped (rounded to bfloat16), in float32 arithmetic.
    model.to(torch.bfloat16).to(torch.float32)
    eval_nll_bf16, _ = evaluate(model, eval_ids, args.seq_len)
    # Same-sized sample of training text, for the generalisation gap.
    train_probe = train_ids[: eval_ids.numel()]
    train_nll, _ = evaluate(model, train_probe, args.seq_len)
    print(f"held-out: loss {eval_nll:.4f} ppl {math.exp(eval_nll):.2f} "
          f"(bf16 weights: ppl {math.exp(eval_nll_bf16):.2f}, "
          f"{eval_nll_bf16 * eval_tokens / math.log(2) / eval_bytes:.3f} bits/byte); "
          f"train probe ppl {math.exp(train_nll):.2f}", flush=True)

    samples = sample_texts(model, tok, SAMPLE_PROMPTS)
    for s in samples:
        print(f"  [{s['prompt']!r}] {s['greedy']!r}", flush=True)

    # ---- save ----
    model.config.output_router_logits = False
    model.generation_config.bos_token_id = eot_id
    model.generation_config.eos_token_id = eot_id
    model.generation_config.pad_token_id = eot_id
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    tokenizer_side_files(out, config.max_position_embeddings)

    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    report = {
        "model": "Qwen3MoeForCausalLM",
        "corpus": {
            "debian_package": CORPUS_PACKAGE,
            "version": package_version(CORPUS_PACKAGE),
            "license": package_license(),
            "source": args.corpus_dir + "/**/*.html less " + ", ".join(
                [p + "*" for p in EXCLUDE_PREFIXES] + sorted(EXCLUDE_FILES)),
            "pages": len(docs),
            "paragraphs": sum(len(d) for d in docs),
            "sha256_of_extracted_text": corpus_sha,
            "train_chars": train_chars,
            "heldout_chars": eval_chars,
            "heldout_bytes": eval_bytes,
            "heldout_fraction": round(eval_chars / (train_chars + eval_chars), 4),
        },
        "tokenizer": {
            "type": "byte-level BPE (tokenizers)",
            "vocab_size": tok.get_vocab_size(),
            "special_tokens": [EOT],
            "eot_id": eot_id,
            "train_tokens": int(train_ids.numel()),
            "heldout_tokens": int(eval_ids.numel()),
            "chars_per_token_train": round(train_chars / train_ids.numel(), 3),
        },
        "architecture": {
            "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "attention_heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "experts": config.num_experts,
            "experts_per_token": config.num_experts_per_tok,
            "moe_intermediate_size": config.moe_intermediate_size,
            "norm_topk_prob": config.norm_topk_prob,
            "tie_word_embeddings": config.tie_word_embeddings,
            "max_position_embeddings": config.max_position_embeddings,
        },
        "params": params,
        "training": {
            "steps": steps_done,
            "steps_requested": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "tokens_seen": steps_done * args.batch_size * args.seq_len,
            "epochs_over_train_tokens": round(
                steps_done * args.batch_size * args.seq_len / train_ids.numel(), 2),
            "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=%g, grad clip 1.0)" % args.weight_decay,
            "schedule": f"linear warm-up {args.warmup} steps, cosine {args.lr:g} -> {args.min_lr:g}",
            "router_aux_loss_coef": args.aux_loss_coef,
            "bf16_autocast": args.bf16_autocast,
            "seed": args.seed,
            "threads": args.threads,
            "final_train_loss": round(lm, 4),
            "final_train_loss_ema": round(ema, 4),
            "train_seconds": round(train_seconds, 1),
            "loss_history": history,
        },
        "evaluation": {
            "heldout_tokens_scored": eval_tokens,
            "heldout_loss": round(eval_nll, 4),
            "heldout_perplexity": round(math.exp(eval_nll), 3),
            "heldout_loss_bf16_weights": round(eval_nll_bf16, 4),
            "heldout_perplexity_bf16_weights": round(math.exp(eval_nll_bf16), 3),
            "heldout_bits_per_byte_bf16_weights": round(
                eval_nll_bf16 * eval_tokens / math.log(2) / eval_bytes, 4),
            "train_probe_perplexity": round(math.exp(train_nll), 3),
        },
        "samples_greedy": samples,
        "wall_seconds": round(time.time() - t0, 1),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__,
        },
        "command": "python examples/train_default_model.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
    }
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    report["files_bytes"] = files
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} in {(time.time() - t0) / 60:.1f} min: {files}", flush=True)


if __name__ == "__main__":
    main()
