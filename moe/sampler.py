"""Turn one step's logits into tokens: greedy, temperature, top-k, top-p, min-p, seeded draws.

Requests with logit processing (``SamplingParams.processes_logits``) have their rows changed
first, in this order: logit bias, repetition / frequency / presence penalties, the grammar's
token mask; greedy requests take the argmax of the processed row. Rows of other requests are
not touched (their arithmetic is unchanged).

Log-probs are those of the model's raw distribution (before processing, temperature and
filtering), as vLLM reports them by default.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

import torch

from ops import argmax_rows

from .sampling_params import SamplingParams
from .structured_output import GrammarState, apply_grammar_masks


class TokenHistory(Protocol):
    """What logit processing reads of a sequence (moe.sequence.Sequence is one)."""

    prompt_token_ids: list[int]
    grammar: GrammarState | None

    @property
    def output_token_ids(self) -> list[int]: ...


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # chosen token + top-n, per row, when requested


def apply_filters(logits_BV: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k / top-p / min-p exclude. ``top_k`` 0 = off, ``top_p`` 1 = off."""
    V = logits_BV.shape[-1]
    sorted_logits, order = logits_BV.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=logits_BV.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).unsqueeze(1)
    drop = ranks >= k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # top-p: drop a token when the mass before it already reaches top_p (the first token always stays)
    mass_before = probs.cumsum(-1) - probs
    drop |= (mass_before >= top_p.unsqueeze(1)) & (top_p.unsqueeze(1) < 1)  # top_p = 1 is off, even at fp32 rounding
    drop |= probs < (min_p.unsqueeze(1) * probs[:, :1])
    drop[:, 0] = False
    mask = torch.zeros_like(drop).scatter_(1, order, drop)
    return logits_BV.masked_fill(mask, float("-inf"))


def token_counts(rows: Seq[Seq[int]], vocab_size: int) -> torch.Tensor:
    """``[R, V]`` int64: how often each token occurs in each row's list (one scatter-add)."""
    lists = [torch.tensor(r, dtype=torch.long) for r in rows]
    padded = torch.nn.utils.rnn.pad_sequence(lists, batch_first=True, padding_value=vocab_size)  # pad: a spare column
    counts = torch.zeros(len(rows), vocab_size + 1, dtype=torch.long)
    counts.scatter_add_(1, padded, torch.ones_like(padded))
    return counts[:, :vocab_size]


def apply_logit_bias(logits_RV: torch.Tensor, biases: Seq[dict[int, float] | None]) -> None:
    """Add each row's ``{token: bias}`` to its logits, in place."""
    rows = [r for r, b in enumerate(biases) if b for _ in b]
    cols = [t for b in biases if b for t in b]
    if rows:
        vals = torch.tensor([v for b in biases if b for v in b.values()], dtype=logits_RV.dtype)
        logits_RV.index_put_((torch.tensor(rows), torch.tensor(cols)), vals, accumulate=True)


def apply_penalties(logits_RV: torch.Tensor, prompt_ids: Seq[Seq[int]], output_ids: Seq[Seq[int]],
                    presence: Seq[float], frequency: Seq[float], repetition: Seq[float]) -> torch.Tensor:
    """Repetition penalty (HF/vLLM: over prompt and output tokens, a positive logit divided by it, a
    negative one multiplied), then OpenAI's frequency and presence penalties over output tokens:
    ``logit - count * frequency - (count > 0) * presence``."""
    V = logits_RV.shape[1]
    out_counts = token_counts(output_ids, V)
    if any(r != 1 for r in repetition):
        seen = (token_counts(prompt_ids, V) > 0) | (out_counts > 0)
        rp = torch.tensor(repetition, dtype=logits_RV.dtype).unsqueeze(1)
        logits_RV = torch.where(seen, torch.where(logits_RV > 0, logits_RV / rp, logits_RV * rp), logits_RV)
    if any(f != 0 for f in frequency) or any(p != 0 for p in presence):
        freq = torch.tensor(frequency, dtype=logits_RV.dtype).unsqueeze(1)
        pres = torch.tensor(presence, dtype=logits_RV.dtype).unsqueeze(1)
        logits_RV = logits_RV - out_counts * freq - (out_counts > 0) * pres
    return logits_RV


def process_logits(logits_BV: torch.Tensor, params: list[SamplingParams], seqs: Seq[TokenHistory]) -> torch.Tensor:
    """The batch's logits with the rows of requests that process logits changed (a new tensor)."""
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    logits_BV = logits_BV.clone()
    sub = logits_BV[rows]
    ps = [params[i] for i in rows]
    apply_logit_bias(sub, [p.logit_bias for p in ps])
    if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1 for p in ps):
        sub = apply_penalties(sub, [seqs[i].prompt_token_ids for i in rows], [seqs[i].output_token_ids for i in rows],
                              [p.presence_penalty for p in ps], [p.frequency_penalty for p in ps],
                              [p.repetition_penalty for p in ps])
    logits_BV[rows] = sub
    grammar_rows = [i for i in rows if seqs[i].grammar is not None]
    if grammar_rows:
        apply_grammar_masks(logits_BV, grammar_rows, [seqs[i].grammar for i in grammar_rows])
    return logits_BV


def top_logprobs(logprobs_V: torch.Tensor, chosen: int, n: int) -> dict[int, float]:
    out = {chosen: float(logprobs_V[chosen])}
    if n > 0:
        values, ids = logprobs_V.topk(n)
        for v, i in zip(values.tolist(), ids.tolist()):
            out.setdefault(i, v)
    return out


def filtered_probs(logits_BV: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distributions sampling draws from: temperature, then top-k / top-p / min-p."""
    sub = logits_BV / torch.tensor([p.temperature for p in params]).unsqueeze(1)
    if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params):
        sub = apply_filters(sub, torch.tensor([max(p.top_k, 0) for p in params]),
                            torch.tensor([p.top_p for p in params], dtype=torch.float32),
                            torch.tensor([p.min_p for p in params], dtype=torch.float32))
    return torch.softmax(sub, dim=-1)


def draw_token(probs_V: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from ``probs_V``: argmax(p / Exp(1)) (the race the batched path runs)."""
    noise = torch.empty_like(probs_V).exponential_(generator=generator)
    return int((probs_V / noise).max(dim=-1).indices)


def rejection_sample(p_RV: torch.Tensor, draft: tuple[int, ...], q_KV: torch.Tensor | None,
                     generator: torch.Generator) -> list[int]:
    """The tokens a draft yields under rejection sampling (see :meth:`Sampler.verify_draft`):
    ``p_RV`` the target's ``len(draft) + 1`` rows, ``q_KV`` the drafter's rows (None: one-hot on
    each draft token). Accepting ``d`` when ``u * q(d) < p(d)`` (u uniform) is accepting with
    probability min(1, p(d) / q(d)) without dividing by a q(d) of 0."""
    out: list[int] = []
    for j, d in enumerate(draft):
        p_V = p_RV[j]
        q_d = 1.0 if q_KV is None else float(q_KV[j, d])
        if float(torch.rand((), generator=generator)) * q_d < float(p_V[d]):
            out.append(d)
            continue
        if q_KV is None:
            residual = p_V.clone()
            residual[d] = 0.0  # max(p - onehot(d), 0)
        else:
            residual = (p_V - q_KV[j].to(p_V.dtype)).clamp_(min=0.0)
        if not bool((residual > 0).any()):
            residual = p_V  # (p == q up to rounding: nothing is left to correct)
        out.append(draw_token(residual, generator))  # the race needs no normalization
        return out
    out.append(draw_token(p_RV[len(draft)], generator))  # every draft passed: the bonus token
    return out


_filtered_probs = filtered_probs  # (its former name)


class Sampler:
    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def verify_draft(self, logits_RV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                     draft: tuple[int, ...], draft_probs: torch.Tensor | None = None
                     ) -> list[tuple[int, dict[int, float] | None]]:
        """Rejection sampling of a draft: row ``j`` of ``logits_RV`` is the target after draft token
        ``j`` (row 0: after the last real token), ``draft_probs`` row ``j`` the distribution q the
        drafter drew token ``j`` from (None: a point mass, as for n-gram drafts).

        With p the target's row after the request's temperature / top-k / top-p / min-p, draft
        token ``d`` is kept with probability ``min(1, p(d) / q(d))``; on rejection the token is
        drawn from ``max(p - q, 0)`` (renormalized) and the rest of the draft is dropped; if all
        are kept one more token is drawn from the last row. Every emitted token is thus distributed
        exactly as in plain sampling (Leviathan et al. 2023; Chen et al. 2023)."""
        logits = logits_RV.float()
        raw_lp = torch.log_softmax(logits, dim=-1) if params.logprobs is not None else None
        probs = filtered_probs(logits, [params] * logits.shape[0])
        return [(t, top_logprobs(raw_lp[j], t, params.logprobs) if raw_lp is not None else None)
                for j, t in enumerate(rejection_sample(probs, draft, draft_probs, generator or self.generator))]

    def __call__(self, logits_BV: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None], banned: list[list[int]],
                 seqs: Seq[TokenHistory] | None = None) -> SampleResult:
        """``seqs``: each row's sequence (its tokens and grammar), needed when a request processes logits."""
        logits_BV = logits_BV.float()
        want_lp = [p.logprobs is not None for p in params]
        raw_lp = torch.log_softmax(logits_BV, dim=-1) if any(want_lp) else None  # before any ban or filter
        if any(p.processes_logits for p in params):
            if seqs is None:
                raise ValueError("penalties, logit_bias and structured output need each row's sequence: pass seqs")
            logits_BV = process_logits(logits_BV, params, seqs)
        if any(banned):
            logits_BV = logits_BV.clone()
            for i, ban in enumerate(banned):
                if ban:
                    kept = logits_BV[i].clone() if seqs is not None and seqs[i].grammar is not None else None
                    logits_BV[i, ban] = float("-inf")
                    if kept is not None and bool(torch.isneginf(logits_BV[i]).all()):
                        logits_BV[i] = kept  # the grammar allows only banned (stop) tokens: it wins over min_tokens
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if not rand:  # every row greedy: first largest (first NaN), one C pass on CPU
            token_list = argmax_rows(logits_BV)
        else:
            tokens = logits_BV.max(dim=-1).indices  # (faster than argmax on CPU; same first-index ties)
            idx = torch.tensor(rand)
            probs = filtered_probs(logits_BV[idx], [params[i] for i in rand])
            # Gumbel-style race: argmax(p / Exp(1)) draws from p; each request uses its own generator
            noise = torch.empty_like(probs)
            for row, i in enumerate(rand):
                noise[row].exponential_(generator=generators[i] or self.generator)
            tokens[idx] = (probs / noise).max(dim=-1).indices
            token_list = tokens.tolist()
        lps: list[dict[int, float] | None] = [
            top_logprobs(raw_lp[i], token_list[i], params[i].logprobs) if want_lp[i] else None
            for i in range(len(params))
        ]
        return SampleResult(token_list, lps)
