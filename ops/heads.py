"""One GEMM per head (MLA's absorbed attention: the query through W_UK, the latent output through W_UV)."""
from __future__ import annotations

import torch

import cpu_kernels

from .linear import pad_rows, padded_rows

# whether the per-head weight's rows run along the output (W_UV [H, v, C]) or the input (W_UK [H, nope, C])
_W_ROWS_N = {"thc,hvc->thv": True, "thn,hnc->thc": False}


def per_head(x_THa: torch.Tensor, w_Hba: torch.Tensor, eq: str) -> torch.Tensor:
    """``einsum(eq, x, w)``: one GEMM per head, ``eq`` ``"thn,hnc->thc"`` (``w [H, K, N]``) or
    ``"thc,hvc->thv"`` (``w [H, N, K]``). On CPU, one bf16 row runs as a GEMV per head
    (:func:`cpu_kernels.heads_vec`) and 1-64 bf16 rows on AMX tiles (or AVX512-BF16) where the CPU
    has them (:func:`cpu_kernels.amx_heads`); otherwise the rows run padded to :func:`ops.padded_rows` and
    always from a contiguous copy, so the batched GEMM comes in few shapes and one layout (oneDNN
    builds a kernel for each new one)."""
    if eq not in _W_ROWS_N:
        raise ValueError(f"per_head takes the equations {list(_W_ROWS_N)}, not {eq!r}")
    if x_THa.device.type != "cpu":
        return torch.einsum(eq, x_THa, w_Hba)
    y = cpu_kernels.heads_vec(x_THa, w_Hba, w_rows_n=_W_ROWS_N[eq]) if x_THa.shape[0] == 1 else None
    if y is None:
        y = cpu_kernels.amx_heads(x_THa, w_Hba, w_rows_n=_W_ROWS_N[eq])
    if y is not None:
        return y
    T = x_THa.shape[0]
    return torch.einsum(eq, pad_rows(x_THa, padded_rows(T)), w_Hba)[:T]
