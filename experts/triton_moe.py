"""Fused MoE as two grouped GEMMs in Triton (CUDA GPUs; tested on CPU with ``TRITON_INTERPRET=1``).

T tokens each routed to K experts give ``N = T*K`` *assignments*; assignment ``n = t*K + k`` is
token ``t`` going to expert ``topk_ids_TK[t, k]``. The pipeline:

1. :func:`moe_align_block_size` sorts the assignments by expert and pads every expert's run to a
   multiple of ``BLOCK_M``, so each ``BLOCK_M``-row tile of the sorted list needs ONE expert's weights.
2. ``_gate_up_kernel``: ``h_NF[n] = act(x_TD[n // K] @ w13[e].T + b13[e])`` (gate and up tiles together).
3. ``_down_kernel``:    ``y_ND[n] = (h_NF[n] @ w2[e].T + b2[e]) * topk_weights[n]``.
4. ``out_TD = y_ND.view(T, K, D).sum(1)``.

Expert parallelism: the weights may hold only this rank's experts ``[expert_start, expert_start + E)``;
assignments to any other expert land in blocks tagged ``-1`` whose output rows are written as zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def moe_align_block_size(
    topk_ids_TK: torch.Tensor,
    block_size: int,
    num_experts: int,
    *,
    expert_start: int = 0,
    num_local_experts: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the ``N = T*K`` assignments by expert into blocks of ``block_size`` rows.

    Returns, all int32 and sized from shapes only (no device->host sync, CUDA-graph friendly):

    - ``sorted_token_ids`` ``[N + num_experts * (block_size - 1)]``: assignment indices ``t*K + k``
      grouped by expert (ascending within an expert), each expert's run padded up to a multiple of
      ``block_size`` with the sentinel ``N``; unused tail entries are ``N`` too.
    - ``expert_ids`` ``[cdiv(len(sorted_token_ids), block_size)]``: for block ``b`` (rows
      ``b*block_size ...``) the *local* expert ``e - expert_start``; ``-1`` if ``e`` is outside
      ``[expert_start, expert_start + num_local_experts)`` (another rank owns it) or the block is unused.
    - ``num_tokens_post_padded`` ``[1]``: used length of ``sorted_token_ids`` (multiple of block_size).

    Experts without assignments get no block at all.

    Example, ``T=3, K=2, num_experts=4, block_size=4``::

        topk_ids_TK = [[2, 0], [0, 2], [3, 2]]  # assignments n=0..5 -> experts [2, 0, 0, 2, 3, 2]
        # expert 0: n=1,2 | expert 1: none | expert 2: n=0,3,5 | expert 3: n=4   (sentinel N=6)
        sorted_token_ids       = [1, 2, 6, 6,  0, 3, 5, 6,  4, 6, 6, 6,  6, 6, 6, 6, 6, 6]  # 6 + 4*3 = 18
        expert_ids             = [0, 2, 3, -1, -1]                                          # cdiv(18, 4)
        num_tokens_post_padded = [12]
        # with expert_start=2, num_local_experts=2 (this rank holds experts 2 and 3):
        expert_ids             = [-1, 0, 1, -1, -1]
    """
    device = topk_ids_TK.device
    n_local = num_experts - expert_start if num_local_experts is None else num_local_experts
    ids_N = topk_ids_TK.reshape(-1).long()
    N = ids_N.numel()

    # scatter_add rather than bincount: bincount syncs with the host on CUDA.
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts_E.scatter_add_(0, ids_N, torch.ones_like(ids_N))
    padded_E = (counts_E + block_size - 1) // block_size * block_size
    pad_end_E = padded_E.cumsum(0)
    pad_start_E = pad_end_E - padded_E

    order_N = torch.argsort(ids_N, stable=True)  # assignment indices grouped by expert
    expert_of_sorted_N = ids_N[order_N]
    # Position of each sorted assignment inside its expert's run.
    rank_N = torch.arange(N, device=device) - (counts_E.cumsum(0) - counts_E)[expert_of_sorted_N]

    max_len = N + num_experts * (block_size - 1)
    sorted_token_ids = torch.full((max_len,), N, dtype=torch.int32, device=device)
    sorted_token_ids[pad_start_E[expert_of_sorted_N] + rank_N] = order_N.to(torch.int32)
    num_post_padded = pad_end_E[-1:] if num_experts > 0 else torch.zeros(1, dtype=torch.long, device=device)

    block_start_B = torch.arange(triton.cdiv(max_len, block_size), device=device) * block_size
    # Block b belongs to the first expert whose padded run ends after the block's first row
    # (right=True skips empty experts, whose run ends where the previous one does).
    local_B = torch.searchsorted(pad_end_E, block_start_B, right=True) - expert_start
    owned_B = (block_start_B < num_post_padded) & (local_B >= 0) & (local_B < n_local)
    expert_ids = torch.where(owned_B, local_B, -1).to(torch.int32)
    return sorted_token_ids, expert_ids, num_post_padded.to(torch.int32)


@triton.jit
def _tile_rows(sorted_token_ids_ptr, num_valid_tokens, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile, shared by the float and packed kernels: its ``BLOCK_M`` sorted assignment
    rows (padding rows masked off by ``row_ok``) and its ``BLOCK_N`` output columns of ``N``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_token_ids_ptr + offs_m).to(tl.int64)  # assignment n
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < num_valid_tokens, offs_n, offs_n < N


@triton.jit
def _down_tile(y_ptr, sorted_token_ids_ptr, expert, num_valid_tokens, D, stride_yn, stride_yd,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The down kernels' tile and its output pointers. A foreign expert's tile (``expert == -1``) is
    stored as zeros here, so every assignment row of ``y`` is written exactly once; the caller returns."""
    rows, row_ok, offs_d, d_ok = _tile_rows(sorted_token_ids_ptr, num_valid_tokens, D, BLOCK_M, BLOCK_N)
    y_ptrs = y_ptr + rows[:, None] * stride_yn + offs_d[None, :] * stride_yd
    y_mask = row_ok[:, None] & d_ok[None, :]
    if expert == -1:
        tl.store(y_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty), mask=y_mask)
    return rows, row_ok, offs_d, d_ok, y_ptrs, y_mask


@triton.jit
def _store_swiglu(acc_gate, acc_up, b13_ptr, h_ptr, expert, rows, row_ok, offs_f, f_ok, F, stride_be, stride_bf,
                  stride_hn, stride_hf, swiglu_limit, swiglu_alpha, HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr):
    """Gate/up epilogue shared by the float and packed kernels: bias, SwiGLU (or gpt-oss's clamped
    form), store ``h``."""
    if HAS_BIAS:
        b_ptrs = b13_ptr + expert * stride_be + offs_f * stride_bf
        acc_gate += tl.load(b_ptrs, mask=f_ok, other=0.0).to(tl.float32)[None, :]
        acc_up += tl.load(b_ptrs + F * stride_bf, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    if CLAMPED:
        gate = tl.minimum(acc_gate, swiglu_limit)
        up = tl.minimum(tl.maximum(acc_up, -swiglu_limit), swiglu_limit)
        h = (up + 1.0) * gate * tl.sigmoid(swiglu_alpha * gate)
    else:
        h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    h_ptrs = h_ptr + rows[:, None] * stride_hn + offs_f[None, :] * stride_hf
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & f_ok[None, :])


@triton.jit
def _store_down(acc, b2_ptr, topk_weights_ptr, y_ptrs, y_mask, expert, rows, row_ok, offs_d, d_ok, stride_be,
                stride_bd, HAS_BIAS: tl.constexpr):
    """Down epilogue shared by the float and packed kernels: bias, router weight, store ``y``."""
    if HAS_BIAS:
        acc += tl.load(b2_ptr + expert * stride_be + offs_d * stride_bd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    acc *= tl.load(topk_weights_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=y_mask)


@triton.jit
def _gate_up_kernel(
    x_ptr, w13_ptr, b13_ptr, h_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    num_valid_tokens, top_k, F, D,
    stride_xt, stride_xd,
    stride_we, stride_wf, stride_wd,
    stride_be, stride_bf,
    stride_hn, stride_hf,
    swiglu_limit, swiglu_alpha,
    HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``h[n, f] = act(x[n // top_k] @ w13[e].T + b13[e])`` for one (BLOCK_M sorted rows, BLOCK_N of F) tile.

    - ``x`` ``[T, D]``, ``w13`` ``[E_local, 2F, D]`` (gate rows ``:F``, up rows ``F:``),
      ``b13`` ``[E_local, 2F]`` (read only if HAS_BIAS), ``h`` ``[N, F]`` indexed by assignment ``n``.
    - ``sorted_token_ids`` / ``expert_ids`` / ``num_tokens_post_padded``: from
      :func:`moe_align_block_size` with ``block_size == BLOCK_M``; padding rows hold ``num_valid_tokens``
      (= N) and are masked; blocks with ``expert_ids == -1`` are skipped (the down kernel zeroes them).
    - ``stride_<tensor><dim>``: elements to step one index along that dim, e.g. ``stride_wf`` moves
      one output row of w13, ``stride_xt`` one token of x.
    - ``CLAMPED``: gpt-oss SwiGLU ``(clamp(up) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``;
      otherwise ``silu(gate) * up``.
    """
    pid_m = tl.program_id(0)
    if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert == -1:
        return
    rows, row_ok, offs_f, f_ok = _tile_rows(sorted_token_ids_ptr, num_valid_tokens, F, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + (rows // top_k)[:, None] * stride_xt + offs_k[None, :] * stride_xd
    # w13 tiles are read transposed ([BLOCK_K, BLOCK_N]) so that x_tile @ w_tile gives [BLOCK_M, BLOCK_N].
    wg_ptrs = w13_ptr + expert * stride_we + offs_f[None, :] * stride_wf + offs_k[:, None] * stride_wd
    wu_ptrs = wg_ptrs + F * stride_wf

    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(D, BLOCK_K)):
        k_ok = offs_k < D - k0 * BLOCK_K
        w_mask = k_ok[:, None] & f_ok[None, :]
        wg = tl.load(wg_ptrs, mask=w_mask, other=0.0)
        wu = tl.load(wu_ptrs, mask=w_mask, other=0.0)
        xa = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(wg.dtype)
        acc_gate = tl.dot(xa, wg, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(xa, wu, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        wg_ptrs += BLOCK_K * stride_wd
        wu_ptrs += BLOCK_K * stride_wd

    _store_swiglu(acc_gate, acc_up, b13_ptr, h_ptr, expert, rows, row_ok, offs_f, f_ok, F, stride_be, stride_bf,
                  stride_hn, stride_hf, swiglu_limit, swiglu_alpha, HAS_BIAS, CLAMPED)


@triton.jit
def _down_kernel(
    h_ptr, w2_ptr, b2_ptr, topk_weights_ptr, y_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    num_valid_tokens, D, F,
    stride_hn, stride_hf,
    stride_we, stride_wd, stride_wf,
    stride_be, stride_bd,
    stride_yn, stride_yd,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``y[n, d] = (h[n] @ w2[e].T + b2[e]) * topk_weights[n]`` for one (BLOCK_M sorted rows, BLOCK_N of D) tile.

    - ``h`` ``[N, F]``, ``w2`` ``[E_local, D, F]``, ``b2`` ``[E_local, D]``, ``topk_weights`` ``[N]``
      (contiguous), ``y`` ``[N, D]``; all rows indexed by assignment ``n``, so no ``// top_k`` here.
    - Blocks of foreign experts (``expert_ids == -1``) write zeros: every assignment row of ``y`` is
      written exactly once, so the later sum over K needs no zero-initialised buffer.
    - Strides as in ``_gate_up_kernel``; the reduction dim here is F (stepped by BLOCK_K).
    """
    pid_m = tl.program_id(0)
    if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    rows, row_ok, offs_d, d_ok, y_ptrs, y_mask = _down_tile(y_ptr, sorted_token_ids_ptr, expert, num_valid_tokens, D,
                                                            stride_yn, stride_yd, BLOCK_M, BLOCK_N)
    if expert == -1:
        return

    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_hn + offs_k[None, :] * stride_hf
    w_ptrs = w2_ptr + expert * stride_we + offs_d[None, :] * stride_wd + offs_k[:, None] * stride_wf
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(F, BLOCK_K)):
        k_ok = offs_k < F - k0 * BLOCK_K
        w = tl.load(w_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        ha = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(w.dtype)
        acc = tl.dot(ha, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hf
        w_ptrs += BLOCK_K * stride_wf

    _store_down(acc, b2_ptr, topk_weights_ptr, y_ptrs, y_mask, expert, rows, row_ok, offs_d, d_ok, stride_be,
                stride_bd, HAS_BIAS)


def _local_blocks(topk_ids_TK: torch.Tensor, expert_start: int, num_local: int, block_m: int):
    """:func:`moe_align_block_size` over this rank's experts ``[expert_start, expert_start + num_local)``.

    Global ids become local ones; every foreign expert shares the extra bucket ``num_local``, which
    ``moe_align_block_size`` tags ``-1`` (one run of padding instead of one per foreign expert).
    """
    local_ids_TK = topk_ids_TK.long() - expert_start
    local_ids_TK = torch.where((local_ids_TK >= 0) & (local_ids_TK < num_local), local_ids_TK, num_local)
    return moe_align_block_size(local_ids_TK, block_m, num_local + 1, num_local_experts=num_local)


def _swiglu_args(swiglu_limit: float | None, swiglu_alpha: float | None) -> tuple[float, float, bool]:
    """The gate/up kernels' ``swiglu_limit``, ``swiglu_alpha`` and ``CLAMPED`` (gpt-oss's form when alpha is set)."""
    limit = float("inf") if swiglu_limit is None else float(swiglu_limit)
    alpha = 1.0 if swiglu_alpha is None else float(swiglu_alpha)
    return limit, alpha, swiglu_alpha is not None


def default_block_m(num_assignments: int, num_experts: int) -> int:
    """Small tiles when experts see few rows (decode: less padding), large ones for prefill."""
    return 16 if num_assignments <= 32 * max(num_experts, 1) else 64


def fused_moe_triton(
    x_TD: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
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
    """MoE forward equal to :func:`experts.reference.moe_reference` for the locally held experts.

    ``w13_E2FD`` / ``w2_EDF`` / biases hold ``E`` local experts: local ``e`` is global ``expert_start + e``.
    ``topk_ids_TK`` are global ids; assignments to experts outside ``[expert_start, expert_start + E)``
    contribute zero (another rank adds them). ``swiglu_alpha`` selects gpt-oss's clamped SwiGLU
    (``swiglu_limit=None`` then means no clamping). Block sizes are tl.dot tiles (each >= 16).
    """
    T, D = x_TD.shape
    E, F2, _ = w13_E2FD.shape
    F = F2 // 2
    K = topk_ids_TK.shape[1]
    N = T * K
    if N == 0:
        return torch.zeros_like(x_TD)
    block_m = block_m or default_block_m(N, E)

    sorted_ids, expert_ids, num_post_padded = _local_blocks(topk_ids_TK, expert_start, E, block_m)

    h_NF = torch.empty(N, F, dtype=w2_EDF.dtype, device=x_TD.device)  # feeds tl.dot against w2
    y_ND = torch.empty(N, D, dtype=x_TD.dtype, device=x_TD.device)
    weights_N = topk_weights_TK.reshape(-1).contiguous()
    # fp32 weights: ask for true fp32 products (tl.dot would use TF32 on Ampere+ otherwise).
    precision = "ieee" if w13_E2FD.dtype == torch.float32 else "tf32"
    limit, alpha, clamped = _swiglu_args(swiglu_limit, swiglu_alpha)
    b13 = b13_E2F if b13_E2F is not None else w13_E2FD  # dummy pointer when HAS_BIAS is False
    b2 = b2_ED if b2_ED is not None else w2_EDF
    num_m_blocks = expert_ids.numel()

    _gate_up_kernel[(num_m_blocks, triton.cdiv(F, block_n))](
        x_TD, w13_E2FD, b13, h_NF,
        sorted_ids, expert_ids, num_post_padded,
        N, K, F, D,
        x_TD.stride(0), x_TD.stride(1),
        w13_E2FD.stride(0), w13_E2FD.stride(1), w13_E2FD.stride(2),
        b13.stride(0), b13.stride(1),
        h_NF.stride(0), h_NF.stride(1),
        limit, alpha,
        HAS_BIAS=b13_E2F is not None, CLAMPED=clamped, DOT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    _down_kernel[(num_m_blocks, triton.cdiv(D, block_n))](
        h_NF, w2_EDF, b2, weights_N, y_ND,
        sorted_ids, expert_ids, num_post_padded,
        N, D, F,
        h_NF.stride(0), h_NF.stride(1),
        w2_EDF.stride(0), w2_EDF.stride(1), w2_EDF.stride(2),
        b2.stride(0), b2.stride(1),
        y_ND.stride(0), y_ND.stride(1),
        HAS_BIAS=b2_ED is not None, DOT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y_ND.view(T, K, D).sum(1)
