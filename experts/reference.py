"""The ~10-line einsum reference every expert backend is tested against.

Shapes (used across experts/): T tokens, D model dim, F expert intermediate dim,
E experts, K top-k. Stacked weights: ``w13_E2FD`` holds gate (rows :F) and up (rows F:)
projections of every expert; ``w2_EDF`` the down projections.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate_up: torch.Tensor, limit: float | None = None, alpha: float | None = None) -> torch.Tensor:
    """SwiGLU on ``[..., 2F]`` laid out as ``[gate | up]``.

    With ``alpha``/``limit`` set it is gpt-oss's clamped form: ``(up + 1) * g * sigmoid(alpha * g)``
    with ``g`` clamped above at ``limit`` and ``up`` clamped to ``[-limit, limit]``.
    """
    gate, up = gate_up.chunk(2, dim=-1)
    if alpha is None:
        if limit is not None:
            raise ValueError("swiglu: a clamp limit needs alpha (gpt-oss form); plain SwiGLU takes neither")
        return F.silu(gate) * up
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(gate * alpha)


def moe_reference(
    x_TD: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    b13_E2F: torch.Tensor | None = None,
    b2_ED: torch.Tensor | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float | None = None,
) -> torch.Tensor:
    """Dense einsum over the selected experts (gpt-fast style); float32 accumulation."""
    x = x_TD.float()
    w13 = w13_E2FD[topk_ids_TK].float()  # [T, K, 2F, D]
    w2 = w2_EDF[topk_ids_TK].float()  # [T, K, D, F]
    h = torch.einsum("td,tkfd->tkf", x, w13)
    if b13_E2F is not None:
        h = h + b13_E2F[topk_ids_TK].float()
    h = swiglu(h, swiglu_limit, swiglu_alpha)
    y = torch.einsum("tkf,tkdf->tkd", h, w2)
    if b2_ED is not None:
        y = y + b2_ED[topk_ids_TK].float()
    return torch.einsum("tkd,tk->td", y, topk_weights_TK.float()).to(x_TD.dtype)
