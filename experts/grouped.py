"""Grouped-GEMM experts over expert-major rows: ``experts(x_RD, counts_e) -> y_RD``.

Rows arrive sorted by (local) expert, ``counts_e[i]`` of them for expert i. Every expert's
rows go through one fused gate/up GEMM, SwiGLU, and one down GEMM. Backends:
- ``torch``: the CPU fast path; a loop over experts (never over tokens), skipping empty ones.
- ``triton``: the GPU kernel in :mod:`experts.triton_moe` (block-aligned sorted ids).
- ``megablocks``: MegaBlocks' grouped GEMM where that package is installed (GPU only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layers import linear

from .reference import swiglu

Backend = Literal["auto", "torch", "triton", "megablocks"]


@dataclass(frozen=True)
class Activation:
    """SwiGLU, optionally gpt-oss's clamped variant (``alpha``, ``limit``)."""

    limit: float | None = None
    alpha: float | None = None


def grouped_swiglu_torch(x_RD: torch.Tensor, counts: list[int], w13_e2FD: torch.Tensor, w2_eDF: torch.Tensor,
                         b13_e2F: torch.Tensor | None, b2_eD: torch.Tensor | None, act: Activation) -> torch.Tensor:
    y_RD = torch.empty(x_RD.shape[0], w2_eDF.shape[1], dtype=x_RD.dtype, device=x_RD.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        h = linear(x_RD[rows], w13_e2FD[e], None if b13_e2F is None else b13_e2F[e])
        h = swiglu(h, act.limit, act.alpha)
        y_RD[rows] = linear(h, w2_eDF[e], None if b2_eD is None else b2_eD[e])
        start += n
    return y_RD


def _resolve_backend(backend: Backend, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" else "torch"


class GroupedExperts(nn.Module):
    """The local experts of one MoE layer, stacked: ``w13 [e, 2F, D]``, ``w2 [e, D, F]``.

    Global expert ``expert_start + i`` is local expert ``i``. Checkpoint tensors arrive per
    expert (``weight_loader(param, tensor, shard_id, expert_id)``); tensors of experts this
    process does not own are ignored by :meth:`owns`, so the loader can skip reading them.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, bias: bool = False,
                 activation: Activation = Activation(), dtype: torch.dtype = torch.float32,
                 expert_start: int = 0, num_local_experts: int | None = None, backend: Backend = "auto"):
        super().__init__()
        self.num_experts = num_experts
        self.expert_start = expert_start
        self.num_local = num_experts if num_local_experts is None else num_local_experts
        self.hidden, self.intermediate = hidden, intermediate
        self.activation = activation
        self.backend = backend
        e = self.num_local
        self.w13 = self._param(e, 2 * intermediate, hidden, dtype=dtype)
        self.w2 = self._param(e, hidden, intermediate, dtype=dtype)
        self.b13 = self._param(e, 2 * intermediate, dtype=dtype) if bias else None
        self.b2 = self._param(e, hidden, dtype=dtype) if bias else None

    def _param(self, *shape: int, dtype: torch.dtype) -> nn.Parameter:
        p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
        p.weight_loader = self.weight_loader
        return p

    def owns(self, expert_id: int) -> bool:
        return self.expert_start <= expert_id < self.expert_start + self.num_local

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int | None = None) -> None:
        """Place one checkpoint tensor. ``shard_id``: ``gate``/``up`` (rows of w13 or b13),
        ``down`` (w2 or b2), or ``gate_up`` (both halves at once, already ``[gate | up]``).
        With ``expert_id=None`` the tensor holds every expert stacked on dim 0."""
        if expert_id is None:
            local = loaded[self.expert_start:self.expert_start + self.num_local]
            for i in range(self.num_local):
                self.weight_loader(param, local[i], shard_id, self.expert_start + i)
            return
        if not self.owns(expert_id):
            return
        dst = param.data[expert_id - self.expert_start]
        F_ = self.intermediate
        if shard_id == "gate":
            dst = dst[:F_]
        elif shard_id == "up":
            dst = dst[F_:]
        elif shard_id not in ("down", "gate_up"):
            raise ValueError(f"unknown expert shard {shard_id!r}")
        if dst.shape != loaded.shape:
            raise ValueError(f"expert {expert_id} {shard_id}: parameter {tuple(dst.shape)} vs checkpoint {tuple(loaded.shape)}")
        dst.copy_(loaded)

    def forward(self, x_RD: torch.Tensor, counts_e: torch.Tensor) -> torch.Tensor:
        backend = _resolve_backend(self.backend, x_RD.device)
        if backend == "torch":
            return grouped_swiglu_torch(x_RD, counts_e.tolist(), self.w13, self.w2, self.b13, self.b2, self.activation)
        ids_R = torch.repeat_interleave(torch.arange(self.num_local, device=x_RD.device), counts_e)
        if backend == "triton":
            from .triton_moe import fused_moe_triton

            ones = torch.ones(x_RD.shape[0], 1, dtype=torch.float32, device=x_RD.device)
            return fused_moe_triton(x_RD, self.w13, self.w2, ones, ids_R.unsqueeze(1), b13_E2F=self.b13,
                                    b2_ED=self.b2, swiglu_limit=self.activation.limit,
                                    swiglu_alpha=self.activation.alpha)
        if backend == "megablocks":
            from .megablocks_backend import grouped_swiglu_megablocks

            return grouped_swiglu_megablocks(x_RD, counts_e, self.w13, self.w2, self.b13, self.b2, self.activation)
        raise ValueError(f"unknown experts backend {backend!r} (choose auto, torch, triton or megablocks)")
