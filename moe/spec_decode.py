"""Speculative decoding: its configuration, the n-gram proposer and the acceptance counters.

A proposer drafts up to K tokens after a decoding sequence's last one; the step then runs the
last token and the draft as one chunk, and row ``j``'s logits verify draft token ``j``
(:mod:`moe.model_runner`): greedy requests keep the draft up to the first disagreement plus one
token of the model's own (:func:`moe.model_runner.accept_greedy`), so outputs are unchanged (up
to float rounding of a multi-row step); sampled requests verify by rejection sampling
(:meth:`moe.sampler.Sampler.verify_draft`), so each token is distributed exactly as in plain
sampling (a seeded request draws other random numbers than without speculation). Rejected rows
leave K/V past the sequence's computed length, overwritten by later steps. Requests speculate
once past their ``min_tokens``; requests that process logits (penalties, bias, grammars) never.

Proposers (the scheduler's ``proposer``):

- ``ngram`` ("prompt lookup", :class:`NgramProposer`): the tokens that followed the most recent
  earlier occurrence of the sequence's last ``prompt_lookup_max`` .. ``prompt_lookup_min``
  tokens. The draft is deterministic: to the sampler it is a point mass (q = one-hot).
- ``draft_model`` / ``draft`` (:class:`moe.drafter.DraftModelProposer`): a small checkpoint with
  the target's vocabulary runs K cheap batched steps; sampled requests draw from its filtered
  distribution q, kept for verification. ``draft`` without a model is the drafter shipped
  beside the embedded default model.
- ``mtp`` (:class:`moe.drafter.MTPDrafter`): a DeepSeek-V3 checkpoint's multi-token-prediction
  layer drafts from the target's hidden states; with ``model``, an MTP-style head of its own directory
  (``moe distill --student mtp``; the embedded default model ships one).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence as Seq
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

from .sequence import Sequence

METHODS = ("ngram", "draft_model", "draft", "mtp")
DRAFTER_METHODS = ("draft_model", "draft", "mtp")  # a model drafts (cost control applies)
_INT_FIELDS = ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")


def default_drafter_path() -> Path:
    """Where the embedded default model's drafter ships (``moe distill`` writes it)."""
    return Path(str(resources.files("moe") / "default_model" / "drafter"))


def default_mtp_path() -> Path:
    """Where the embedded default model's MTP-style head ships (``moe distill --student mtp`` writes it)."""
    return Path(str(resources.files("moe") / "default_model" / "mtp"))


def shipped_mtp_head(model_dir: str | Path, cfg) -> Path | None:
    """The head method ``mtp`` uses when no ``model`` is given and the target holds no MTP layer of its own:
    the one shipped beside the embedded default model, when the target is that model; else None."""
    if int(cfg.raw.get("num_nextn_predict_layers") or 0) > 0:
        return None
    head = default_mtp_path()
    if Path(model_dir).resolve() == head.parent.resolve() and (head / "config.json").is_file():
        return head
    return None


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's ``speculative_config`` dict, validated: e.g. ``{"method": "ngram",
    "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}`` or
    ``{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}``."""

    method: str = "ngram"
    num_speculative_tokens: int = 4  # K: draft tokens per step at most
    prompt_lookup_max: int = 4  # ngram only
    prompt_lookup_min: int = 2  # ngram only
    model: str | None = None  # draft_model: the drafter's checkpoint directory; mtp: a head's (else the target's)
    # the engine picks K per step (0..num_speculative_tokens) from measured acceptance and step
    # costs (moe.spec_cost); False: always num_speculative_tokens
    cost_control: bool = True
    # draft_model / draft / mtp: draft by n-gram lookup where the sequence's suffix recurred (free drafts),
    # by the drafter elsewhere (each source's K chosen by cost control from its own acceptance)
    ngram_first: bool = False

    @property
    def uses_drafter(self) -> bool:
        """Does a model draft (draft model or MTP layer), rather than a lookup?"""
        return self.method in DRAFTER_METHODS

    @staticmethod
    def parse(spec: Mapping | None) -> "SpeculativeConfig | None":
        """The config of a ``speculative_config`` dict (drafter paths resolved); None: no speculation."""
        if spec is None:
            return None
        if not isinstance(spec, Mapping):
            raise ValueError(f"speculative_config must be a dict such as {{'method': 'ngram', "
                             f"'num_speculative_tokens': 4}}, not {type(spec).__name__}")
        d = dict(spec)
        method = d.pop("method", "ngram")
        if method not in METHODS:
            raise ValueError(f"speculative_config method {method!r} is not supported: "
                             f"choose one of {', '.join(METHODS)}")
        names = [f.name for f in fields(SpeculativeConfig) if f.name != "method"]
        unknown = set(d) - set(names)
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {sorted(unknown)}; "
                             f"valid: method, {', '.join(sorted(names))}")
        cfg = SpeculativeConfig(method=method, **d)
        for name in _INT_FIELDS:
            v = getattr(cfg, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"speculative_config {name}={v!r} must be a positive integer")
        if cfg.prompt_lookup_min > cfg.prompt_lookup_max:
            raise ValueError(f"speculative_config prompt_lookup_min ({cfg.prompt_lookup_min}) exceeds "
                             f"prompt_lookup_max ({cfg.prompt_lookup_max})")
        for name in ("cost_control", "ngram_first"):
            if not isinstance(getattr(cfg, name), bool):
                raise ValueError(f"speculative_config {name}={getattr(cfg, name)!r} must be true or false")
        if cfg.ngram_first and cfg.method not in DRAFTER_METHODS:
            raise ValueError(f"speculative_config ngram_first is for methods {', '.join(DRAFTER_METHODS)} (n-gram "
                             f"lookup first, the drafter elsewhere), not {cfg.method!r}: drop it")
        return cfg._with_drafter_path()

    def _with_drafter_path(self) -> "SpeculativeConfig":
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError(f"speculative_config model={self.model!r} is for methods 'draft_model' and 'mtp' "
                                 "('ngram' drafts from the request's own tokens): drop it or set method "
                                 "'draft_model'")
            return self
        if self.model is None:
            if self.method == "mtp":  # the target's own MTP layer(s) (or the default model's shipped head)
                return self
            if self.method == "draft_model":
                raise ValueError("speculative_config method 'draft_model' needs 'model': the drafter's "
                                 "checkpoint directory (same vocabulary as the target)")
            path = default_drafter_path()
            if not (path / "config.json").is_file():
                raise ValueError(f"speculative_config method 'draft' uses the drafter shipped beside the "
                                 f"default model, but {path} holds none: train one with `moe distill "
                                 "--student draft`, or give method 'draft_model' and a 'model' path")
            return SpeculativeConfig(**{**self.__dict__, "model": str(path)})
        if not isinstance(self.model, (str, Path)) or not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"speculative_config model={str(self.model)!r} is not a checkpoint directory "
                             "(no config.json there): give the drafter's Hugging Face checkpoint directory")
        return SpeculativeConfig(**{**self.__dict__, "model": str(self.model)})


NgramConfig = SpeculativeConfig  # the name this config had while n-gram lookup was the only method


class Draft(NamedTuple):
    tokens: tuple[int, ...]
    # [len(tokens), V] the drafter's (filtered) distribution each token was drawn from, for
    # sampled requests; None: a point mass on each token (greedy requests, n-gram drafts)
    probs: torch.Tensor | None = None
    source: str = "lookup"  # who drafted it: "lookup" (n-gram) or "model" (a drafter; see moe.spec_cost)


@dataclass
class DraftCounts:
    """What one step asked of a proposer: the sequences it was asked for while its K > 0, those it
    had a draft for (before a probe's slots limit them), the tokens of those drafts, and the
    seconds spent in a drafter's steps (cost control weighs those apart; a lookup is part of the
    step it drafts for)."""

    asked: int = 0
    drafting: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def ask(self, k: int, found: int) -> None:
        if k:
            self.asked += 1
            self.drafting += found > 0
            self.tokens += found


class Proposer(Protocol):
    """What the scheduler asks of a proposer. ``room`` is called while the batch is built (it
    reserves token budget and KV blocks), ``propose`` once for all chosen sequences after it."""

    k: int  # draft tokens per sequence at most, this step
    source: str  # "lookup" or "model": whose acceptance and costs cost control weighs for ``k``
    probe_left: int | None  # a cost-control probe step: how many more sequences may draft (None: all)
    probe_only: set[int] | None  # and which may (ids of sequences; None: the first to ask)
    counts: "DraftCounts"  # this step's, for cost control (the engine takes them after the step)

    def set_probe(self, size: int | None, running: list[Sequence]) -> None:
        """Make the next step a probe drafting for ``size`` of the ``running`` sequences (None: not a probe)."""
        ...

    def room(self, seq: Sequence, budget: int) -> int: ...

    def propose(self, seqs: list[Sequence], rooms: list[int]) -> list[Draft]: ...


def propose_ngram(tokens: Seq[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest suffix
    (``n_max`` down to ``n_min`` tokens) of ``tokens``; [] when none occurs."""
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = list(tokens[L - n:])
        last = suffix[-1]
        for i in range(L - n - 1, -1, -1):  # the occurrence must end before the suffix itself
            if tokens[i + n - 1] == last and list(tokens[i:i + n]) == suffix:
                return list(tokens[i + n:i + n + k])
    return []


def take_probe_slot(proposer: "Proposer", seq: Sequence, room: int) -> int:
    """``room``, unless this is a probe step and its sequences are taken or others were chosen
    (then 0). A request with its own seed drafts regardless (see :func:`draft_room`) and takes no slot."""
    if room and proposer.probe_left is not None and seq.generator is None:
        if proposer.probe_left == 0 or (proposer.probe_only is not None and id(seq) not in proposer.probe_only):
            return 0
        proposer.probe_left -= 1
    return room


def draft_room(seq: Sequence, k: int, max_model_len: int, k_max: int | None = None) -> int:
    """How many draft tokens ``seq`` may take: the draft and the model's own next token must fit
    max_tokens and the context; none before min_tokens (EOS and stop ids are banned until then).
    ``k`` is cost control's choice for this step; a request with its own seed drafts ``k_max``
    regardless, so that its output does not depend on step timings (it is reproducible)."""
    p = seq.params
    if seq.generator is not None and k_max is not None:
        k = k_max
    if seq.num_output_tokens < p.min_tokens:
        return 0
    room = min(k, max_model_len - seq.num_tokens - 1)
    if p.max_tokens is not None:
        room = min(room, p.max_tokens - seq.num_output_tokens - 1)
    return max(room, 0)


class NgramProposer:
    """Drafts by n-gram lookup in the sequence's own tokens."""

    source = "lookup"

    def __init__(self, cfg: SpeculativeConfig, max_model_len: int):
        self.cfg = cfg
        self.k = cfg.num_speculative_tokens
        self.max_model_len = max_model_len
        self.probe_left: int | None = None
        self.probe_only: set[int] | None = None  # (a lookup costs nothing: the first sequences with a draft probe)
        self.counts = DraftCounts()
        self._found: dict[int, list[int]] = {}  # id(sequence) -> this step's draft, from room to propose

    def _lookup(self, seq: Sequence, room: int) -> list[int]:
        if room < 1:
            return []
        return propose_ngram(seq.token_ids, room, self.cfg.prompt_lookup_min, self.cfg.prompt_lookup_max)

    def room(self, seq: Sequence, budget: int) -> int:
        if not self.k and seq.generator is None:
            return 0  # (asked of every decoding sequence at every step: the common K = 0 answer first)
        # the lookup's own length: a sequence whose suffix never occurred reserves nothing
        k_max = self.cfg.num_speculative_tokens
        found = self._lookup(seq, min(draft_room(seq, self.k, self.max_model_len, k_max), budget))
        self.counts.ask(self.k, len(found))
        room = take_probe_slot(self, seq, len(found))
        if room:
            self._found[id(seq)] = found  # propose's draft (the room reserved is its length)
        return room

    def set_probe(self, size: int | None, running: list[Sequence]) -> None:
        self.probe_left = size

    def take_found(self, seqs: list[Sequence]) -> list[list[int]]:
        """The drafts :meth:`room` found for ``seqs`` this step ([] where none); forgets the step's."""
        found = [self._found.get(id(seq), []) for seq in seqs]
        self._found.clear()
        return found

    def propose(self, seqs: list[Sequence], rooms: list[int]) -> list[Draft]:
        return [Draft(tuple(t)) for t in self.take_found(seqs)]

    def __call__(self, seq: Sequence) -> list[int]:
        return self._lookup(seq, draft_room(seq, self.k, self.max_model_len))


@dataclass
class SpecStats:
    """Acceptance counters since the engine started (``LLMEngine.spec_stats()``)."""

    num_verify_steps: int = 0  # sequence-steps that verified a draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    drafted_at: list[int] = field(default_factory=list)  # per draft position: tokens drafted there
    accepted_at: list[int] = field(default_factory=list)  # and accepted there

    def record(self, draft_len: int, accepted: int) -> None:
        if not draft_len:
            return
        grow = draft_len - len(self.drafted_at)
        if grow > 0:
            self.drafted_at += [0] * grow
            self.accepted_at += [0] * grow
        self.num_verify_steps += 1
        self.num_draft_tokens += draft_len
        self.num_accepted_tokens += accepted
        for j in range(draft_len):
            self.drafted_at[j] += 1
            self.accepted_at[j] += j < accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / max(self.num_draft_tokens, 1)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verify step yields on average: the accepted drafts plus the model's own one."""
        return 1 + self.num_accepted_tokens / max(self.num_verify_steps, 1)

    @property
    def acceptance_by_position(self) -> list[float]:
        """Of the drafts with a token at position j, the fraction whose token j was accepted."""
        return [a / max(d, 1) for a, d in zip(self.accepted_at, self.drafted_at)]

    def summary(self) -> str:
        per = " ".join(f"{r:.2f}" for r in self.acceptance_by_position)
        return (f"{self.num_accepted_tokens} of {self.num_draft_tokens} draft tokens accepted "
                f"(rate {self.acceptance_rate:.2f}), mean acceptance length {self.mean_acceptance_length:.2f}, "
                f"per position [{per}]")
