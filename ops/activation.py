"""SwiGLU's ``silu(gate) * up``: one C pass on CPU, torch's two ops elsewhere."""
from __future__ import annotations

import torch

import cpu_kernels
from cpu_kernels.elementwise import silu_mul_reference


def silu_mul(h: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``silu(gate) * up`` of ``h`` laid out ``[gate | up]`` along ``dim`` (-1, or 1 of a 3-D
    ``[n, 2F, m]``: the batched experts' layout). On CPU one C pass (:func:`cpu_kernels.silu_mul`,
    with torch's roundings), also on the transposed views the few-row GEMMs return (the result
    then a transposed view too); otherwise, or where the kernel declines, the torch ops."""
    if h.device.type == "cpu":
        out = _silu_mul_cpu(h, dim)
        if out is not None:
            return out
    if dim == 1 and h.dim() == 3:
        return silu_mul_reference(*h.transpose(1, 2).chunk(2, dim=-1)).transpose(1, 2)
    return silu_mul_reference(*h.chunk(2, dim=-1))


def _silu_mul_cpu(h: torch.Tensor, dim: int) -> torch.Tensor | None:
    F_ = h.shape[1] // 2 if h.dim() in (2, 3) else 0
    if h.dim() == 3 and dim == 1:
        return cpu_kernels.silu_mul(h[:, :F_], h[:, F_:])
    if h.dim() == 2 and dim in (-1, 1):
        if h.stride(1) == 1:
            return cpu_kernels.silu_mul(h[:, :F_], h[:, F_:])
        hT = h.t()  # a transposed view: gate and up are row blocks of its row-major transpose
        out = cpu_kernels.silu_mul(hT[:F_], hT[F_:])
        return out.t() if out is not None else None
    return None
