"""Optional backend: MegaBlocks' grouped GEMM (CUDA only; its package pins an old torch, so it
is not part of CI here). ``gmm(a_RK, b_eNK, batch_sizes_e, trans_b=True)`` multiplies each
expert's contiguous rows of ``a`` by that expert's weight in one launch."""
from __future__ import annotations

import torch

from .reference import swiglu


def _gmm():
    try:
        from megablocks import grouped_gemm_util as gg  # type: ignore[import-not-found]

        if getattr(gg, "grouped_gemm_is_available", lambda: True)():
            return gg.ops.gmm
    except ImportError:
        pass
    try:
        import grouped_gemm  # type: ignore[import-not-found]

        return grouped_gemm.ops.gmm
    except ImportError as e:
        raise RuntimeError("experts_backend='megablocks' needs the megablocks (or grouped_gemm) package "
                           "on a CUDA machine: pip install megablocks") from e


def megablocks_available() -> bool:
    try:
        _gmm()
    except RuntimeError:
        return False
    return torch.cuda.is_available()


def grouped_swiglu_megablocks(x_RD: torch.Tensor, counts_e: torch.Tensor, w13_e2FD: torch.Tensor,
                              w2_eDF: torch.Tensor, b13_e2F: torch.Tensor | None, b2_eD: torch.Tensor | None,
                              act) -> torch.Tensor:
    gmm = _gmm()
    if not x_RD.is_cuda:
        raise RuntimeError("the megablocks backend runs on CUDA tensors only; use experts_backend='torch' on CPU")
    batch_sizes = counts_e.to("cpu", torch.int64)  # the kernel reads group sizes on the host
    h = gmm(x_RD, w13_e2FD, batch_sizes, trans_b=True)  # [R, 2F]
    if b13_e2F is not None:
        h = h + torch.repeat_interleave(b13_e2F, counts_e, dim=0)
    h = swiglu(h, act.limit, act.alpha)
    y = gmm(h, w2_eDF, batch_sizes, trans_b=True)  # [R, D]
    if b2_eD is not None:
        y = y + torch.repeat_interleave(b2_eD, counts_e, dim=0)
    return y
