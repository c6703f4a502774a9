"""Turn one step's logits into tokens: greedy, temperature, top-k, top-p, min-p, seeded draws.

Log-probs are those of the model's raw distribution (before temperature and filtering), as
vLLM reports them by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams


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


def top_logprobs(logprobs_V: torch.Tensor, chosen: int, n: int) -> dict[int, float]:
    out = {chosen: float(logprobs_V[chosen])}
    if n > 0:
        values, ids = logprobs_V.topk(n)
        for v, i in zip(values.tolist(), ids.tolist()):
            out.setdefault(i, v)
    return out


def _filtered_probs(logits_BV: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distributions sampling draws from: temperature, then top-k / top-p / min-p."""
    sub = logits_BV / torch.tensor([p.temperature for p in params]).unsqueeze(1)
    if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params):
        sub = apply_filters(sub, torch.tensor([max(p.top_k, 0) for p in params]),
                            torch.tensor([p.top_p for p in params], dtype=torch.float32),
                            torch.tensor([p.min_p for p in params], dtype=torch.float32))
    return torch.softmax(sub, dim=-1)


def _draw(probs_V: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from ``probs_V``: argmax(p / Exp(1)) (the race the batched path runs)."""
    noise = torch.empty_like(probs_V).exponential_(generator=generator)
    return int((probs_V / noise).max(dim=-1).indices)


class Sampler:
    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def verify_draft(self, logits_RV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                     draft: tuple[int, ...]) -> list[tuple[int, dict[int, float] | None]]:
        """Speculative sampling for a deterministic (n-gram) draft: row ``j`` is the distribution
        after draft token ``j``. Draft token ``d`` is kept with probability ``P_j(d)``; on rejection
        the token is drawn from ``P_j`` with ``d`` removed (the residual ``max(P_j - onehot(d), 0)``,
        renormalized), and the rest of the draft is dropped; if all are kept one more token is drawn
        from the last row. Every emitted token is thus distributed exactly as plain sampling."""
        logits = logits_RV.float()
        raw_lp = torch.log_softmax(logits, dim=-1) if params.logprobs is not None else None
        probs = _filtered_probs(logits, [params] * logits.shape[0])
        g = generator or self.generator
        out: list[int] = []
        for j in range(len(draft) + 1):
            if j == len(draft):
                out.append(_draw(probs[j], g))
                break
            d = draft[j]
            if float(torch.rand((), generator=g)) < float(probs[j, d]):
                out.append(d)
                continue
            residual = probs[j].clone()
            residual[d] = 0.0
            out.append(_draw(residual, g))
            break
        return [(t, top_logprobs(raw_lp[j], t, params.logprobs) if raw_lp is not None else None)
                for j, t in enumerate(out)]

    def __call__(self, logits_BV: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None], banned: list[list[int]]) -> SampleResult:
        logits_BV = logits_BV.float()
        want_lp = [p.logprobs is not None for p in params]
        raw_lp = torch.log_softmax(logits_BV, dim=-1) if any(want_lp) else None  # before any ban or filter
        if any(banned):
            logits_BV = logits_BV.clone()
            for i, ban in enumerate(banned):
                if ban:
                    logits_BV[i, ban] = float("-inf")
        tokens = logits_BV.max(dim=-1).indices  # (faster than argmax on CPU; same first-index ties)
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if rand:
            idx = torch.tensor(rand)
            probs = _filtered_probs(logits_BV[idx], [params[i] for i in rand])
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
