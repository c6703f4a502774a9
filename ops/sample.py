"""Tokens from rows of logits: the greedy choice, and a draw at a keyed uniform (temperature, top-k,
top-p, min-p).

A draw's uniform is a function of the sequence's key and the token's position (:func:`keyed_uniform`:
SplitMix64's output ``pos + 1`` of stream ``key``), so a sequence's tokens do not depend on its
batch, on how many steps one call ran (the captured step's loop draws in C as :func:`draw_rows`
does) or on a preemption that recomputes it. The token is the filtered distribution's inverse CDF at
that uniform, tokens in vocabulary order.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

import cpu_kernels

_MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def keyed_uniform(key: int, pos: int) -> float:
    """The uniform in [0, 1) drawn for position ``pos`` of the sequence keyed ``key`` (0 <= key < 2**64):
    the top 53 bits of SplitMix64's output ``pos + 1`` of stream ``key``."""
    return (_mix64((key + (pos + 1) * GOLDEN) & _MASK) >> 11) * 2.0 ** -53


def seed_key(seed: int) -> int:
    """A sequence's key from a request's seed (any int)."""
    return _mix64((seed * GOLDEN + 0x632BE59BD9B4E019) & _MASK)


def argmax_rows(logits_RV: torch.Tensor) -> list[int]:
    """Per row, the index of its first NaN, else of its first largest value: ``max(dim=-1).indices``
    (torch's, the reference), in one C pass for float32 rows on CPU (a batch-1 step's cold torch op
    cost ~90 us after the weight stream)."""
    out = cpu_kernels.argmax_rows(logits_RV) if logits_RV.device.type == "cpu" else None
    return out if out is not None else logits_RV.max(dim=-1).indices.tolist()


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


def filtered_probs(logits_RV: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int],
                   top_p: Sequence[float], min_p: Sequence[float]) -> torch.Tensor:
    """The distributions a draw takes: softmax of the logits over the temperature, after top-k / top-p / min-p."""
    sub = logits_RV / torch.tensor(temperature, device=logits_RV.device).unsqueeze(1)
    if any(k > 0 for k in top_k) or any(p < 1 for p in top_p) or any(m > 0 for m in min_p):
        dev = logits_RV.device
        sub = apply_filters(sub, torch.tensor([max(k, 0) for k in top_k], device=dev),
                            torch.tensor(top_p, dtype=torch.float32, device=dev),
                            torch.tensor(min_p, dtype=torch.float32, device=dev))
    return torch.softmax(sub, dim=-1)


def draw_rows_torch(logits_RV: torch.Tensor, rows: Sequence[tuple[float, int, float, float, int]],
                    positions: Sequence[int]) -> list[int]:
    """:func:`draw_rows` in torch ops (the reference of the C kernel, and the path off CPU)."""
    t, k, p, m, keys = zip(*rows)
    logits_RV = logits_RV.float()
    probs = filtered_probs(logits_RV, t, k, p, m)
    cum = probs.double().cumsum(-1)
    u = torch.tensor([keyed_uniform(key, pos) for key, pos in zip(keys, positions)], dtype=torch.float64,
                     device=cum.device)
    tokens = torch.searchsorted(cum, (u * cum[:, -1]).unsqueeze(1), right=True).squeeze(1)
    tokens = tokens.clamp_(max=logits_RV.shape[-1] - 1)
    # a row with a NaN, or no finite largest: the greedy choice (the first NaN, else the first largest)
    top = logits_RV.max(dim=-1)
    odd = ~torch.isfinite(top.values) | torch.tensor([temp <= 0 for temp in t], device=cum.device)
    return torch.where(odd, top.indices, tokens).tolist()


def draw_rows(logits_RV: torch.Tensor, rows: Sequence[tuple[float, int, float, float, int]],
              positions: Sequence[int]) -> list[int]:
    """Row r's token, drawn from ``softmax(logits / temperature)`` filtered by top-k (0: off), top-p (1:
    off) and min-p, at the uniform of ``rows[r] = (temperature, top_k, top_p, min_p, key)`` and the
    token's position ``positions[r]`` in its sequence (temperature 0, a NaN or an infinite largest
    logit: the greedy choice); in one C call for float32 rows on CPU (the captured step's loop draws
    alike), else in torch ops."""
    out = cpu_kernels.sample_rows(logits_RV, rows, positions) if logits_RV.device.type == "cpu" else None
    return out if out is not None else draw_rows_torch(logits_RV, rows, positions)


def logprob_rows_torch(logits_RV: torch.Tensor, chosen: Sequence[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of :func:`logprob_rows`: ``log_softmax`` of each row at ``chosen[r]`` and at
    its ``n`` largest logits (a stable sort: largest first, ties in token order, NaN as the largest)."""
    lp = torch.log_softmax(logits_RV.float(), dim=-1)
    top = torch.sort(logits_RV.float(), dim=-1, descending=True, stable=True).indices[:, :n]
    ids = torch.cat([torch.tensor(list(chosen), dtype=torch.int64, device=lp.device)[:, None], top], dim=1)
    return ids.cpu(), lp.gather(1, ids).cpu()


def logprob_rows(logits_RV: torch.Tensor, chosen: Sequence[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's log-softmax at its chosen token and at its ``n`` largest logits: ids and values
    ``[R, n + 1]`` (CPU), the chosen token first, then the largest first (ties in token order); in
    one C call for float32 rows on CPU (``n`` <= 64, finite rows), else in torch ops."""
    out = cpu_kernels.logprob_rows(logits_RV, chosen, n) if logits_RV.device.type == "cpu" else None
    return out if out is not None else logprob_rows_torch(logits_RV, chosen, n)


def top_logprobs(logits_RV: torch.Tensor, chosen: Sequence[int], counts: Sequence[int]) -> list[dict[int, float]]:
    """What a request's ``logprobs`` (or ``prompt_logprobs``) returns for each row of raw logits: the
    chosen token's log-probability, then those of the row's ``counts[r]`` most likely tokens
    (``{token: logprob}``, the chosen one first, largest next)."""
    if not len(chosen):
        return []
    ids, vals = logprob_rows(logits_RV, chosen, max(counts))
    out = []
    for i_row, v_row, n in zip(ids.tolist(), vals.tolist(), counts):
        entry = {i_row[0]: v_row[0]}
        for i, v in zip(i_row[1:n + 1], v_row[1:n + 1]):
            if i >= 0:  # (a vocabulary smaller than n)
                entry.setdefault(i, v)
        out.append(entry)
    return out
