"""Token dispatchers: route (token, expert) assignments to expert-major rows and back.

Shapes: T tokens, D model dim, K top-k, R routed rows, e local experts.
``dispatch(x_TD, ids_TK, weights_TK) -> (x_RD, counts_e, meta)`` orders the T*K assignments by
expert so each expert's rows are contiguous; ``combine(y_RD, meta) -> y_TD`` scatters the
expert outputs back, weighted by the router.

Worked example (T=3, K=2, 4 experts): ids_TK = [[2, 0], [1, 2], [0, 3]] flattens to
assignments a = [2, 0, 1, 2, 0, 3]. A stable sort by expert gives order_R = [1, 4, 2, 0, 3, 5]
(experts 0, 0, 1, 2, 2, 3), counts_e = [2, 1, 2, 1], and source tokens token_R = order_R // K
= [0, 2, 1, 0, 1, 2]: x_RD = x_TD[token_R].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DispatchMeta:
    token_R: torch.Tensor  # source token of each routed row
    weights_R: torch.Tensor  # router weight of each row (float32)
    num_tokens: int


class LocalDispatcher:
    """All experts on this process: a permutation, no communication."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, ids_TK: torch.Tensor,
                 weights_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta]:
        K = ids_TK.shape[1]
        flat = ids_TK.flatten()
        order_R = torch.argsort(flat, stable=True)
        counts_e = torch.bincount(flat, minlength=self.num_experts)
        token_R = order_R // K
        meta = DispatchMeta(token_R=token_R, weights_R=weights_TK.flatten()[order_R].float(), num_tokens=x_TD.shape[0])
        return x_TD[token_R], counts_e, meta

    def combine(self, y_RD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        y_TD = torch.zeros(meta.num_tokens, y_RD.shape[1], dtype=torch.float32, device=y_RD.device)
        y_TD.index_add_(0, meta.token_R, y_RD.float() * meta.weights_R.unsqueeze(1))
        return y_TD.to(y_RD.dtype)
