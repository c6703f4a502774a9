"""Fused MoE on packed weights in Triton: :mod:`experts.triton_moe` with dequantization in the K loop.

Same pipeline as :func:`experts.triton_moe.fused_moe_triton` (sorted assignments in ``BLOCK_M``
tiles of one expert, a gate/up+SwiGLU kernel, a down kernel, a sum over top-k); the only change
is how a weight tile is read. Each ``[BLOCK_K, BLOCK_N]`` tile of ``w[e, n, k]`` is loaded from
the packed tensors of :mod:`experts.formats` and dequantized to fp32 by :func:`_dequant_tile`,
then cast to the activation dtype for ``tl.dot``. One kernel pair serves every format through
the ``FMT`` constexpr:

======  ============  ===============================================  ===================
FMT     format        weight element ``(n, k)`` read from               scale index
======  ============  ===============================================  ===================
0       int8          ``q[e, n, k]`` (int8, or uint8 - zero if ASYM)    ``[e, n, k // GK]``
1       int4          nibble ``k % 2`` of ``q[e, n, k // 2]``           ``[e, n, k // GK]``
2       fp8_block     ``q[e, n, k]`` float8_e4m3fn                      ``[e, n // GN, k // GK]``
3       mxfp4         nibble ``k % 2`` of ``blocks[e, n, k // 32,        ``[e, n, k // 32]``
                      (k % 32) // 2]``, FP4 e2m1                        (E8M0)
======  ============  ===============================================  ===================

``GK``/``GN`` (``GROUP_K``/``GROUP_N``) are the group or block sizes along K and N (``GN`` = 1 except
fp8). Scales and zero points are gathered per element: simple and layout-agnostic; a tuned GPU
version would hoist them per tile when ``BLOCK_K`` divides the group.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .formats import Fp8BlockWeights, Int4Weights, Int8Weights, Mxfp4Weights, WeightFormat
from .triton_moe import (
    _down_tile, _local_blocks, _store_down, _store_swiglu, _swiglu_args, _tile_rows, default_block_m,
)

FMT_INT8, FMT_INT4, FMT_FP8, FMT_MXFP4 = 0, 1, 2, 3


@triton.jit
def _dequant_tile(
    w_ptr, s_ptr, z_ptr, expert, offs_n, offs_k, mask,
    stride_we, stride_wn, stride_wk, stride_wj,
    stride_se, stride_sn, stride_sk,
    stride_ze, stride_zn, stride_zk,
    FMT: tl.constexpr, ASYM: tl.constexpr, GROUP_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """fp32 tile ``w[expert, offs_n, offs_k]`` laid out ``[BLOCK_K, BLOCK_N]`` (k rows, n columns).

    Strides: ``w`` is the packed weight (``stride_wj`` steps a byte inside an mxfp4 block, else 0),
    ``s`` the scales, ``z`` the zero points (read only for ASYM int formats). Masked-off elements
    come back as 0.
    """
    n = offs_n[None, :]
    k = offs_k[:, None]
    w_base = w_ptr + expert * stride_we + n * stride_wn
    s_ptrs = s_ptr + expert * stride_se + (n // GROUP_N) * stride_sn + (k // GROUP_K) * stride_sk
    if FMT == 0:  # int8
        w = tl.load(w_base + k * stride_wk, mask=mask, other=0).to(tl.float32)
    elif FMT == 1:  # int4: column k in nibble k % 2 (low first) of byte k // 2
        byte = tl.load(w_base + (k // 2) * stride_wk, mask=mask, other=0).to(tl.int32)
        w = ((byte >> ((k % 2) * 4)) & 0xF).to(tl.float32)
        if not ASYM:
            w = w - 8.0  # offset-binary symmetric codes
    elif FMT == 2:  # fp8 e4m3
        w = tl.load(w_base + k * stride_wk, mask=mask, other=0.0).to(tl.float32)
    else:  # mxfp4: e2m1 code = sign | exponent (2 bits) | mantissa (1 bit)
        byte = tl.load(w_base + (k // 32) * stride_wk + ((k % 32) // 2) * stride_wj, mask=mask, other=0)
        code = (byte.to(tl.int32) >> ((k % 2) * 4)) & 0xF
        ex = (code >> 1) & 3
        man = code & 1
        # twice the magnitude: subnormal (ex == 0) is the mantissa, else (2 + man) << (ex - 1)
        twice = tl.where(ex == 0, man, (2 + man) << tl.maximum(ex - 1, 0))
        w = tl.where((code & 8) != 0, -0.5, 0.5) * twice.to(tl.float32)

    if FMT == 3:
        # E8M0 byte b is 2^(b - 127): exactly the fp32 with exponent field b (b = 0 gives 0, not 2^-127).
        sb = tl.load(s_ptrs, mask=mask, other=0).to(tl.int32)
        scale = (sb << 23).to(tl.float32, bitcast=True)
    else:
        scale = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
    if ASYM:
        z_ptrs = z_ptr + expert * stride_ze + n * stride_zn + (k // GROUP_K) * stride_zk
        w = w - tl.load(z_ptrs, mask=mask, other=0).to(tl.float32)
    return w * scale


@triton.jit
def _quant_gate_up_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b13_ptr, h_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    num_valid_tokens, top_k, F, D,
    stride_xt, stride_xd,
    stride_we, stride_wn, stride_wk, stride_wj,
    stride_se, stride_sn, stride_sk,
    stride_ze, stride_zn, stride_zk,
    stride_be, stride_bf,
    stride_hn, stride_hf,
    swiglu_limit, swiglu_alpha,
    FMT: tl.constexpr, ASYM: tl.constexpr, GROUP_K: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``h[n, f] = act(x[n // top_k] @ w13[e].T + b13[e])`` with ``w13 [E, 2F, D]`` packed.

    As ``experts.triton_moe._gate_up_kernel`` (sorted ids, ``-1`` blocks skipped, SwiGLU forms);
    gate rows are ``f`` and up rows ``F + f`` of the packed weight, dequantized per tile.
    """
    pid_m = tl.program_id(0)
    if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert == -1:
        return
    rows, row_ok, offs_f, f_ok = _tile_rows(sorted_token_ids_ptr, num_valid_tokens, F, BLOCK_M, BLOCK_N)
    x_ptrs = x_ptr + (rows // top_k)[:, None] * stride_xt

    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(D, BLOCK_K)):
        offs_k = k0 * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        xa = tl.load(x_ptrs + offs_k[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & f_ok[None, :]
        wg = _dequant_tile(w_ptr, s_ptr, z_ptr, expert, offs_f, offs_k, w_mask,
                           stride_we, stride_wn, stride_wk, stride_wj, stride_se, stride_sn, stride_sk,
                           stride_ze, stride_zn, stride_zk, FMT, ASYM, GROUP_K, GROUP_N)
        wu = _dequant_tile(w_ptr, s_ptr, z_ptr, expert, offs_f + F, offs_k, w_mask,
                           stride_we, stride_wn, stride_wk, stride_wj, stride_se, stride_sn, stride_sk,
                           stride_ze, stride_zn, stride_zk, FMT, ASYM, GROUP_K, GROUP_N)
        acc_gate = tl.dot(xa, wg.to(xa.dtype), acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(xa, wu.to(xa.dtype), acc_up, input_precision=DOT_PRECISION)

    _store_swiglu(acc_gate, acc_up, b13_ptr, h_ptr, expert, rows, row_ok, offs_f, f_ok, F, stride_be, stride_bf,
                  stride_hn, stride_hf, swiglu_limit, swiglu_alpha, HAS_BIAS, CLAMPED)


@triton.jit
def _quant_down_kernel(
    h_ptr, w_ptr, s_ptr, z_ptr, b2_ptr, topk_weights_ptr, y_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    num_valid_tokens, D, F,
    stride_hn, stride_hf,
    stride_we, stride_wn, stride_wk, stride_wj,
    stride_se, stride_sn, stride_sk,
    stride_ze, stride_zn, stride_zk,
    stride_be, stride_bd,
    stride_yn, stride_yd,
    FMT: tl.constexpr, ASYM: tl.constexpr, GROUP_K: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``y[n, d] = (h[n] @ w2[e].T + b2[e]) * topk_weights[n]`` with ``w2 [E, D, F]`` packed.

    As ``experts.triton_moe._down_kernel``: foreign-expert blocks write zeros, so every
    assignment row of ``y`` is written exactly once.
    """
    pid_m = tl.program_id(0)
    if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    rows, row_ok, offs_d, d_ok, y_ptrs, y_mask = _down_tile(y_ptr, sorted_token_ids_ptr, expert, num_valid_tokens, D,
                                                            stride_yn, stride_yd, BLOCK_M, BLOCK_N)
    if expert == -1:
        return

    h_ptrs = h_ptr + rows[:, None] * stride_hn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(F, BLOCK_K)):
        offs_k = k0 * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < F
        ha = tl.load(h_ptrs + offs_k[None, :] * stride_hf, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = _dequant_tile(w_ptr, s_ptr, z_ptr, expert, offs_d, offs_k, k_ok[:, None] & d_ok[None, :],
                          stride_we, stride_wn, stride_wk, stride_wj, stride_se, stride_sn, stride_sk,
                          stride_ze, stride_zn, stride_zk, FMT, ASYM, GROUP_K, GROUP_N)
        acc = tl.dot(ha, w.to(ha.dtype), acc, input_precision=DOT_PRECISION)

    _store_down(acc, b2_ptr, topk_weights_ptr, y_ptrs, y_mask, expert, rows, row_ok, offs_d, d_ok, stride_be,
                stride_bd, HAS_BIAS)


@dataclass(frozen=True)
class _KernelWeight:
    """A packed stacked weight as the kernels read it: three pointers, ten strides, constexprs."""

    w: torch.Tensor
    s: torch.Tensor
    z: torch.Tensor
    strides: tuple[int, ...]  # (we, wn, wk, wj, se, sn, sk, ze, zn, zk)
    constexprs: dict
    shape: tuple[int, int, int]  # logical (E, N, K)


def _kernel_weight(fmt: WeightFormat, packed: Mapping[str, torch.Tensor]) -> _KernelWeight:
    shape = fmt.logical_shape(packed)
    if len(shape) != 3:
        raise ValueError(f"expected stacked expert weights [E, N, K], got logical shape {list(shape)}")
    if isinstance(fmt, (Int8Weights, Int4Weights)):
        w, s = packed["qweight"], packed["scales"]
        z = s if fmt.symmetric else packed["zeros"]  # dummy pointer when symmetric
        code = FMT_INT8 if isinstance(fmt, Int8Weights) else FMT_INT4
        consts = dict(FMT=code, ASYM=not fmt.symmetric, GROUP_K=fmt.group_size, GROUP_N=1)
        wj = 0
    elif isinstance(fmt, Fp8BlockWeights):
        w, s = packed["weight"], packed["weight_scale_inv"]
        z = s
        consts = dict(FMT=FMT_FP8, ASYM=False, GROUP_K=fmt.block_k, GROUP_N=fmt.block_n)
        wj = 0
    elif isinstance(fmt, Mxfp4Weights):
        w, s = packed["blocks"], packed["scales"]
        z = s
        consts = dict(FMT=FMT_MXFP4, ASYM=False, GROUP_K=32, GROUP_N=1)
        wj = w.stride(3)
    else:
        raise ValueError(f"no Triton kernel for weight format {fmt.name!r}")
    strides = (w.stride(0), w.stride(1), w.stride(2), wj, *s.stride(), *z.stride())
    return _KernelWeight(w, s, z, strides, consts, shape)


def fused_moe_quant_triton(
    x_TD: torch.Tensor,
    w13_packed: Mapping[str, torch.Tensor],
    w2_packed: Mapping[str, torch.Tensor],
    fmt: WeightFormat,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    *,
    b13_E2F: torch.Tensor | None = None,
    b2_ED: torch.Tensor | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float | None = None,
    expert_start: int = 0,
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int = 32,
) -> torch.Tensor:
    """:func:`experts.triton_moe.fused_moe_triton` on packed ``w13 [E, 2F, D]`` / ``w2 [E, D, F]``.

    Equals :func:`experts.reference.moe_reference` run on ``fmt.dequantize(w13_packed)`` and
    ``fmt.dequantize(w2_packed)`` (up to the activation dtype's rounding of the dequantized tile).
    Expert-parallel semantics, SwiGLU forms and block sizes as in ``fused_moe_triton``.
    """
    w13 = _kernel_weight(fmt, w13_packed)
    w2 = _kernel_weight(fmt, w2_packed)
    T, D = x_TD.shape
    E, F2, D13 = w13.shape
    F = F2 // 2
    if D13 != D or w2.shape != (E, D, F):
        raise ValueError(f"shapes disagree: x [T, {D}], w13 {list(w13.shape)}, w2 {list(w2.shape)}")
    K = topk_ids_TK.shape[1]
    N = T * K
    if N == 0:
        return torch.zeros_like(x_TD)
    block_m = block_m or default_block_m(N, E)

    sorted_ids, expert_ids, num_post_padded = _local_blocks(topk_ids_TK, expert_start, E, block_m)

    h_NF = torch.empty(N, F, dtype=x_TD.dtype, device=x_TD.device)  # tiles are cast to the activation dtype
    y_ND = torch.empty(N, D, dtype=x_TD.dtype, device=x_TD.device)
    weights_N = topk_weights_TK.reshape(-1).contiguous()
    precision = "ieee" if x_TD.dtype == torch.float32 else "tf32"
    limit, alpha, clamped = _swiglu_args(swiglu_limit, swiglu_alpha)
    b13 = b13_E2F if b13_E2F is not None else h_NF  # dummy pointer when HAS_BIAS is False
    b2 = b2_ED if b2_ED is not None else y_ND
    num_m_blocks = expert_ids.numel()

    _quant_gate_up_kernel[(num_m_blocks, triton.cdiv(F, block_n))](
        x_TD, w13.w, w13.s, w13.z, b13, h_NF,
        sorted_ids, expert_ids, num_post_padded,
        N, K, F, D,
        x_TD.stride(0), x_TD.stride(1),
        *w13.strides,
        b13.stride(0), b13.stride(1),
        h_NF.stride(0), h_NF.stride(1),
        limit, alpha,
        **w13.constexprs,
        HAS_BIAS=b13_E2F is not None, CLAMPED=clamped, DOT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    _quant_down_kernel[(num_m_blocks, triton.cdiv(D, block_n))](
        h_NF, w2.w, w2.s, w2.z, b2, weights_N, y_ND,
        sorted_ids, expert_ids, num_post_padded,
        N, D, F,
        h_NF.stride(0), h_NF.stride(1),
        *w2.strides,
        b2.stride(0), b2.stride(1),
        y_ND.stride(0), y_ND.stride(1),
        **w2.constexprs,
        HAS_BIAS=b2_ED is not None, DOT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y_ND.view(T, K, D).sum(1)
