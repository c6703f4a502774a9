"""Binding of ``gemm.c``: bf16 GEMMs, one projection or one per expert over expert-major rows, for
CPUs without a fast bf16 GEMM (AVX2 + FMA; oneDNN has none without AVX512-BF16).

:func:`grouped_gemm` computes ``y[r] = w[e(r)] @ x[r]`` for rows grouped by expert in one call:
the weight read once per call, widened to float32 a block at a time in cache, float32 sums
rounded once. :func:`grouped_gemm_reference` is what it computes, in torch.
"""
from __future__ import annotations

import ctypes

import torch

from .build import declare, load

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
declare({"moe_grouped_gemm_bf16": [_ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64, _int, _int]})


def grouped_gemm_reference(x_RK: torch.Tensor, w_ENK: torch.Tensor, counts: list[int],
                           out_float: bool = False) -> torch.Tensor:
    """``x[rows of e] @ w[e].T`` for each expert ``e`` in float32, rounded to x's dtype (or kept
    float32 with ``out_float``)."""
    y = torch.empty(x_RK.shape[0], w_ENK.shape[1], dtype=torch.float32)
    start = 0
    for e, n in enumerate(counts):
        y[start:start + n] = x_RK[start:start + n].float() @ w_ENK[e].float().t()
        start += n
    return y if out_float else y.to(x_RK.dtype)


def grouped_gemm(x_RK: torch.Tensor, w_ENK: torch.Tensor, counts: list[int] | torch.Tensor,
                 out_float: bool = False) -> torch.Tensor | None:
    """:func:`grouped_gemm_reference` for bf16 CPU tensors (``w`` rows of unit stride; ``counts``
    rows per expert, summing to ``x``'s rows); None where the kernel does not apply (other dtypes,
    not built, a CPU without AVX2 + FMA): then use the reference."""
    if x_RK.dtype != torch.bfloat16 or w_ENK.dtype != torch.bfloat16 or x_RK.dim() != 2 or w_ENK.dim() != 3:
        return None
    if x_RK.is_cuda or w_ENK.is_cuda or w_ENK.stride(-1) != 1 or w_ENK.stride(1) < w_ENK.shape[2]:
        return None
    lib = load()
    if lib is None:
        return None
    E, N, K = w_ENK.shape
    if x_RK.shape[1] != K:
        raise ValueError(f"grouped_gemm: x has {x_RK.shape[1]} columns, the weight {K}")
    if x_RK.stride(-1) != 1:
        x_RK = x_RK.contiguous()
    offsets = torch.zeros(E + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.as_tensor(counts, dtype=torch.int64), 0)
    if int(offsets[-1]) != x_RK.shape[0]:
        raise ValueError(f"grouped_gemm: counts sum to {int(offsets[-1])}, x has {x_RK.shape[0]} rows")
    y = torch.empty(x_RK.shape[0], N, dtype=torch.float32 if out_float else torch.bfloat16)
    rc = lib.moe_grouped_gemm_bf16(w_ENK.data_ptr(), E, N, K, w_ENK.stride(1), w_ENK.stride(0), x_RK.data_ptr(),
                                   x_RK.stride(0), offsets.data_ptr(), y.data_ptr(), N, int(out_float),
                                   torch.get_num_threads())
    if rc == -1:
        return None
    if rc != 0:
        raise MemoryError("grouped_gemm: out of memory for its float32 buffers")
    return y
