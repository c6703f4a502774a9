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

from cpu_kernels.sample import LogitProcessing
from ops.sample import argmax_rows, draw_rows, seed_key, top_logprobs
from ops.sample import filtered_probs as _filtered

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


def logit_processing(p: SamplingParams, seq: TokenHistory, vocab_size: int,
                     banned: Seq[int] = ()) -> LogitProcessing:
    """What a decode loop needs to process ``seq``'s logits as :func:`process_logits` does for ``p``, step
    after step (its biases; its output's token counts and the tokens seen, which the loop keeps up to
    date), then ban ``banned`` as the sampler does until ``p.min_tokens`` are out. Not a grammar's mask."""
    bias = p.logit_bias or {}
    out = token_counts([seq.output_token_ids], vocab_size)[0]
    seen = None
    if p.repetition_penalty != 1:
        seen = ((token_counts([seq.prompt_token_ids], vocab_size)[0] > 0) | (out > 0)).to(torch.uint8)
    counts = out.to(torch.int32) if p.presence_penalty or p.frequency_penalty else None
    return LogitProcessing(p.presence_penalty, p.frequency_penalty, p.repetition_penalty,
                           torch.tensor(list(bias), dtype=torch.int32) if bias else None,
                           torch.tensor(list(bias.values()), dtype=torch.float32) if bias else None, counts, seen,
                           torch.tensor(list(banned), dtype=torch.int64) if banned else None,
                           max(p.min_tokens - len(seq.output_token_ids), 0) if banned else 0)


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


def filtered_probs(logits_BV: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distributions sampling draws from: temperature, then top-k / top-p / min-p."""
    return _filtered(logits_BV, [p.temperature for p in params], [p.top_k for p in params],
                     [p.top_p for p in params], [p.min_p for p in params])


def sample_row(params: SamplingParams, key: int) -> tuple[float, int, float, float, int]:
    """What a draw of ``ops.sample.draw_rows`` (and the captured step's loop) takes for one row."""
    return params.temperature, max(params.top_k, 0), params.top_p, params.min_p, key


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
    """Tokens from a step's logits. A sampled row draws at its sequence's key and the token's position
    (``ops.sample.draw_rows``); rejection sampling of drafts (:meth:`verify_draft`) and a drafter's own
    draws take a ``torch.Generator`` (the request's, or this sampler's for requests without a seed)."""

    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def new_key(self, seed: int | None = None) -> int:
        """A sequence's key: from its request's seed, else drawn from this sampler's generator."""
        if seed is None:
            seed = int(torch.randint(-2 ** 63, 2 ** 63 - 1, (), generator=self.generator))
        return seed_key(seed)

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
        probs = filtered_probs(logits, [params] * logits.shape[0])
        tokens = rejection_sample(probs, draft, draft_probs, generator or self.generator)
        if params.logprobs is None:
            return [(t, None) for t in tokens]
        return list(zip(tokens, top_logprobs(logits[:len(tokens)], tokens, [params.logprobs] * len(tokens))))

    def __call__(self, logits_BV: torch.Tensor, params: list[SamplingParams], keys: list[int | None],
                 positions: list[int], banned: list[list[int]], seqs: Seq[TokenHistory] | None = None) -> SampleResult:
        """Row i's token, for the token at ``positions[i]`` of the sequence keyed ``keys[i]`` (None: a key
        drawn now, :meth:`new_key`). ``seqs``: each row's sequence (its tokens and grammar), needed when
        a request processes logits."""
        logits_BV = logits_BV.float()
        want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw = logits_BV[want_lp] if want_lp else None  # (a copy) log-probs are the raw logits', before any processing
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
        greedy = [i for i, p in enumerate(params) if p.greedy]
        rand = [i for i, p in enumerate(params) if not p.greedy]

        def rows_of(idx: list[int]) -> torch.Tensor:
            return logits_BV if len(idx) == len(params) else logits_BV[idx]

        token_list = [0] * len(params)
        if greedy:  # the first largest (first NaN), one C pass on CPU
            for i, t in zip(greedy, argmax_rows(rows_of(greedy))):
                token_list[i] = t
        if rand:
            draws = [sample_row(params[i], self.new_key() if keys[i] is None else keys[i]) for i in rand]
            for i, t in zip(rand, draw_rows(rows_of(rand), draws, [positions[i] for i in rand])):
                token_list[i] = t
        lps: list[dict[int, float] | None] = [None] * len(params)
        if want_lp:
            entries = top_logprobs(raw, [token_list[i] for i in want_lp], [params[i].logprobs for i in want_lp])
            for i, entry in zip(want_lp, entries):
                lps[i] = entry
        return SampleResult(token_list, lps)
