"""Data for ``moe distill`` and the quality numbers of ``moe prune``: text -> token windows, and the
teacher's top-k log-probs over those windows, computed by our engine and cached on disk.

Shapes: N windows, L = seq_len positions scored per window, k kept log-probs per position.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def read_documents(data: str | Path) -> list[str]:
    """The documents of ``data``: a text file, or every text file (``*.txt``, ``*.md``, ``*.rst``) under a
    directory in sorted order; within a file, documents are separated by blank lines."""
    p = Path(data)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"--data {p}: no {', '.join(TEXT_SUFFIXES)} files in the directory")
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"--data {p}: no such file or directory")
    docs = [d.strip() for f in files for d in f.read_text(encoding="utf-8").split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"--data {p} holds no text")
    return docs


def token_stream(docs: Iterable[str], tokenizer) -> torch.Tensor:
    """Documents encoded and joined as ``eos doc eos doc ...`` (how the default model was trained)."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for d in docs:
        if eos is not None:
            ids.append(eos)
        ids.extend(tokenizer.encode(d))
    return torch.tensor(ids, dtype=torch.long)


def data_stream(data: str | Path, teacher: str | Path) -> torch.Tensor:
    """The token stream of ``data``: a ``.jsonl`` file holds token ids already (one JSON list of ids
    per line, documents joined in order; e.g. a teacher's own generations, for a checkpoint without
    a tokenizer), anything else is text encoded by the teacher's tokenizer (:func:`token_stream`)."""
    p = Path(data)
    if p.suffix != ".jsonl":
        from .tokenizer import Tokenizer

        return token_stream(read_documents(p), Tokenizer(Path(teacher)))
    if not p.is_file():
        raise FileNotFoundError(f"--data {p}: no such file")
    ids: list[int] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        doc = json.loads(line)
        if not isinstance(doc, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in doc):
            raise ValueError(f"--data {p} line {n}: a .jsonl data file holds one JSON list of token ids per line "
                             "(e.g. [1, 523, 87]); give text in a .txt file instead")
        ids.extend(doc)
    if not ids:
        raise ValueError(f"--data {p} holds no token ids")
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len + 1`` tokens, ``[N, seq_len + 1]`` (inputs and targets)."""
    n = stream.numel() // (seq_len + 1)
    if n == 0:
        raise ValueError(f"the text has {stream.numel()} tokens: fewer than one window of --seq-len {seq_len} + 1; "
                         "give more text or a smaller --seq-len")
    return stream[: n * (seq_len + 1)].view(n, seq_len + 1)


def split_heldout(wins: torch.Tensor, every: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): every ``every``-th window is held out (deterministic, as the default model's split)."""
    held = torch.arange(len(wins)) % every == every - 1
    if not held.any():
        raise ValueError(f"only {len(wins)} windows: too few to hold any out; give --eval-data or more text")
    return wins[~held], wins[held]


@dataclass
class TeacherTopK:
    """The teacher's view of windows ``[N, L + 1]``: for each of the L next-token predictions, its k most
    likely tokens (``ids_NLk``, log-probs ``logprobs_NLk``, descending) and the log-prob it gave the actual
    next token (``target_logprob_NL``, for perplexity)."""

    ids_NLk: torch.Tensor
    logprobs_NLk: torch.Tensor
    target_logprob_NL: torch.Tensor

    @property
    def top1_NL(self) -> torch.Tensor:
        return self.ids_NLk[..., 0]

    def perplexity(self) -> float:
        return math.exp(-float(self.target_logprob_NL.double().mean()))

    def select(self, rows: torch.Tensor) -> TeacherTopK:
        return TeacherTopK(self.ids_NLk[rows], self.logprobs_NLk[rows], self.target_logprob_NL[rows])

    def to(self, device: torch.device) -> TeacherTopK:
        return TeacherTopK(self.ids_NLk.to(device), self.logprobs_NLk.to(device), self.target_logprob_NL.to(device))

    def skip(self, n: int) -> TeacherTopK:
        """The view without the first ``n`` positions of each window."""
        return TeacherTopK(self.ids_NLk[:, n:], self.logprobs_NLk[:, n:], self.target_logprob_NL[:, n:])


def _entry_topk(entry: dict[int, float], k: int) -> tuple[list[int], list[float]]:
    best = sorted(entry.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [i for i, _ in best], [v for _, v in best]


def engine_topk(llm, wins: torch.Tensor, k: int, progress: bool = False, chunk: int = 64) -> TeacherTopK:
    """Run ``wins`` through ``llm`` (a :class:`moe.LLM`) as prompts and keep its top-``k`` prompt log-probs."""
    from . import SamplingParams

    N, L1 = wins.shape
    L = L1 - 1
    ids = torch.zeros(N, L, k, dtype=torch.int32)
    lps = torch.zeros(N, L, k, dtype=torch.float32)
    target = torch.zeros(N, L, dtype=torch.float32)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k)
    bar = progress_bar(N, "teacher log-probs", enabled=progress)
    for start in range(0, N, chunk):
        rows = wins[start:start + chunk]
        outs = llm.generate([{"prompt_token_ids": r.tolist()} for r in rows], params)
        for i, out in enumerate(outs):
            if out.error:
                raise ValueError(f"the teacher rejected a window: {out.error}")
            for j, entry in enumerate(out.prompt_logprobs[1:]):  # entry j predicts token j + 1
                top_ids, top_lps = _entry_topk(entry, k)
                ids[start + i, j], lps[start + i, j] = torch.tensor(top_ids), torch.tensor(top_lps)
                target[start + i, j] = entry[int(rows[i, j + 1])]
        bar.update(len(rows))
    bar.close()
    return TeacherTopK(ids, lps, target)


def cached_engine_topk(model: str | Path, wins: torch.Tensor, k: int, cache_dir: Path, dtype: str = "auto",
                       progress: bool = False) -> TeacherTopK:
    """:func:`engine_topk` on checkpoint ``model``, kept in ``cache_dir`` under a key of everything it depends on
    (the checkpoint's config and weight files, dtype, k, the windows), so a resumed or repeated run reuses it."""
    key = hashlib.sha256()
    model = Path(model)
    for f in sorted(model.iterdir()):
        if f.suffix in (".json", ".safetensors") and f.is_file():
            key.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    key.update(json.dumps([dtype, k, list(wins.shape)]).encode())
    key.update(wins.to(torch.int64).numpy().tobytes())
    path = Path(cache_dir) / f"teacher_top{k}_{key.hexdigest()[:16]}.pt"
    if path.is_file():
        d = torch.load(path)
        return TeacherTopK(d["ids"], d["logprobs"].float(), d["target"])
    from . import LLM

    top = engine_topk(LLM(str(model), dtype=dtype, max_logprobs=-1), wins, k, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"ids": top.ids_NLk, "logprobs": top.logprobs_NLk.half(), "target": top.target_logprob_NL}, tmp)
    tmp.replace(path)
    return TeacherTopK(top.ids_NLk, top.logprobs_NLk.half().float(), top.target_logprob_NL)


def agreement(reference: TeacherTopK, candidate: TeacherTopK) -> dict[str, float]:
    """Top-1 agreement of ``candidate`` with ``reference`` over the same windows, and both perplexities."""
    return {"top1_agreement": float((reference.top1_NL == candidate.top1_NL).float().mean()),
            "perplexity": candidate.perplexity(), "reference_perplexity": reference.perplexity()}


class _PlainBar:
    """A progress line on stderr when tqdm is not installed."""

    def __init__(self, total: int, desc: str):
        import sys

        self.total, self.desc, self.n, self.out, self.shown = total, desc, 0, sys.stderr, -1
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        pct = 100 * self.n // max(self.total, 1)
        if pct // 5 != self.shown // 5 or self.n == self.total:
            self.shown = pct
            print(f"{self.desc}: {self.n}/{self.total} ({pct}%) {self.postfix}", file=self.out, flush=True)

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def close(self) -> None:
        pass


class _NoBar(_PlainBar):
    def update(self, n: int = 1) -> None:
        self.n += n


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0):
    """tqdm when installed (the ``progress`` extra), else a plain line every 5%."""
    if not enabled:
        return _NoBar(total, desc)
    try:
        from tqdm import tqdm
    except ImportError:
        bar = _PlainBar(total, desc)
        bar.n = initial
        return bar
    return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True)


def batches(n: int, size: int) -> Iterator[Sequence[int]]:
    for s in range(0, n, size):
        yield range(s, min(n, s + size))
