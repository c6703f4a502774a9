"""RMSNorm, and the residual add followed by RMSNorm, as the reference implementations compute them
(statistics in float32, the result scaled in the activations' dtype)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import cpu_kernels
from cpu_kernels.elementwise import rms_norm_reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim, into ``out`` (x's shape; ``x`` itself: in place) or a new tensor.
    float32: torch's fused ``rms_norm``; other dtypes upcast like the reference implementations, in
    one C pass on CPU (bf16) where the kernel takes ``x`` (rows of any stride: no copy first)."""
    if x.dtype == torch.float32:
        y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    else:
        y = None
        if x.device.type == "cpu":  # (a few-row GEMM's transposed view: copied to rows, still far cheaper than torch)
            y = cpu_kernels.rms_norm(x if x.stride(-1) == 1 or x.dtype != torch.bfloat16 else x.contiguous(), weight,
                                     eps, out)
            if y is not None:
                return y
        y = rms_norm_reference(x, weight, eps)
    return y if out is None else out.copy_(y)


def add_rms_norm(h_TD: torch.Tensor, d_TD: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual ``h + d`` and :func:`rms_norm` of it: ``(h + d, norm(h + d))``, in one C pass
    for bf16 on CPU (the same roundings)."""
    if h_TD.device.type == "cpu" and h_TD.dtype == torch.bfloat16:  # (``d`` often a few-row GEMM's transposed view)
        out = cpu_kernels.add_rms_norm(h_TD.contiguous(), d_TD.contiguous(), weight, eps)
        if out is not None:
            return out
    h_TD = h_TD + d_TD
    return h_TD, rms_norm(h_TD, weight, eps)
