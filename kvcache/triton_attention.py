"""Triton kernels for the paged KV cache (CUDA GPUs; tested on CPU with ``TRITON_INTERPRET=1``).

- :func:`write_kv_triton`: scatter the step's new K/V rows into their cache slots (reshape_and_cache).
- :func:`paged_attention_triton`: one kernel for a mixed batch (prefill chunks and decode rows),
  FlashAttention-style online softmax over K/V read through ``meta.block_tables``.

Layouts and semantics are those of :mod:`kvcache.reference` / :mod:`kvcache.metadata`. Every tensor
is addressed through its strides, so V may be a strided view of the K cache (MLA latent cache).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import Fp8Cache
from .metadata import AttentionMetadata

_LOG2E = 1.4426950408889634


@triton.jit
def _round_to_e4m3(x):
    """Round float32 values (|x| <= 448) to the nearest e4m3 value, ties to even, in float32
    arithmetic. The cast that follows is then exact, so the stored bytes do not depend on how a
    backend rounds its fp32->fp8 conversion (Triton's CPU interpreter rounds it wrongly)."""
    ax = tl.abs(x)
    exp = (ax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    exp = tl.maximum(exp, 127 - 6)  # below e4m3's smallest normal (2^-6) the step stays 2^-9
    ulp = ((exp - 3) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    y = ax / ulp  # exact (power of two), < 16
    r = (y + 8388608.0) - 8388608.0  # 2^23: float32 addition rounds y to an integer, ties to even
    return tl.where(x < 0, -r * ulp, r * ulp)


@triton.jit
def _store_row(x, dst_ptrs, scale_ptrs, mask, h_ok, FP8: tl.constexpr):
    if FP8:
        xf = x.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(xf), 1) / 448.0, 1.1754943508222875e-38)
        q = _round_to_e4m3(tl.minimum(tl.maximum(xf / scale[:, None], -448.0), 448.0))
        tl.store(dst_ptrs, q.to(dst_ptrs.dtype.element_ty), mask=mask)
        tl.store(scale_ptrs, scale, mask=h_ok)
    else:
        tl.store(dst_ptrs, x.to(dst_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_mapping_ptr,
    block_size, H, Dk, Dv,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_ksb, stride_kss, stride_ksh,
    stride_vsb, stride_vss, stride_vsh,
    H_P: tl.constexpr, DK_P: tl.constexpr, DV_P: tl.constexpr, FP8: tl.constexpr, WRITE_V: tl.constexpr,
):
    """One program per new token: copy its ``[H_kv, Dk]`` K and ``[H_kv, Dv]`` V rows into slot
    ``slot_mapping[t]`` (= block * block_size + offset). Negative slots (padding rows) are skipped.
    ``FP8``: store each (token, head) row as e4m3 with its scale ``amax / 448`` (see :mod:`kvcache.fp8`)."""
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size
    offs_h = tl.arange(0, H_P)
    offs_dk = tl.arange(0, DK_P)
    offs_dv = tl.arange(0, DV_P)
    h_ok = offs_h < H

    k_mask = h_ok[:, None] & (offs_dk < Dk)[None, :]
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_dk[None, :] * stride_kd, mask=k_mask)
    k_dst = (k_cache_ptr + block * stride_kcb + offset * stride_kcs + offs_h[:, None] * stride_kch
             + offs_dk[None, :] * stride_kcd)
    _store_row(k, k_dst, k_scale_ptr + block * stride_ksb + offset * stride_kss + offs_h * stride_ksh, k_mask, h_ok,
               FP8)

    if WRITE_V:
        v_mask = h_ok[:, None] & (offs_dv < Dv)[None, :]
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_dv[None, :] * stride_vd, mask=v_mask)
        v_dst = (v_cache_ptr + block * stride_vcb + offset * stride_vcs + offs_h[:, None] * stride_vch
                 + offs_dv[None, :] * stride_vcd)
        _store_row(v, v_dst, v_scale_ptr + block * stride_vsb + offset * stride_vss + offs_h * stride_vsh, v_mask, h_ok,
                   FP8)


def _parts(cache: torch.Tensor | Fp8Cache) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (cache.data, cache.scale) if isinstance(cache, Fp8Cache) else (cache, None)


def write_kv_triton(k_cache: torch.Tensor | Fp8Cache, v_cache: torch.Tensor | Fp8Cache | None, k: torch.Tensor,
                    v: torch.Tensor | None, slot_mapping: torch.Tensor) -> None:
    """Same result as :func:`kvcache.reference.write_kv_reference` (k ``[T, H_kv, Dk]``, v ``[T, H_kv, Dv]``);
    ``v_cache=None``: a K-only (latent) cache."""
    T, H, Dk = k.shape
    if T == 0:
        return
    write_v = v_cache is not None
    if not write_v:
        v_cache, v = k_cache, k
    Dv = v.shape[-1]
    kc, ks = _parts(k_cache)
    vc, vs = _parts(v_cache)
    fp8 = ks is not None
    if not fp8:
        ks = vs = torch.empty(1, 1, 1, device=k.device)  # unused
    _write_kv_kernel[(T,)](
        k, v, kc, vc, ks, vs, slot_mapping,
        kc.shape[1], H, Dk, Dv,
        *k.stride(), *v.stride(), *kc.stride(), *vc.stride(), *ks.stride(), *vs.stride(),
        H_P=triton.next_power_of_2(H), DK_P=triton.next_power_of_2(Dk), DV_P=triton.next_power_of_2(Dv),
        FP8=fp8, WRITE_V=write_v,
    )


@triton.jit
def _find_seq(query_start_loc_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr):
    """Sequence owning program ``q_block``: the last ``i`` with ``query_start_loc[i] // BLOCK_Q + i <= q_block``.

    Sequence i's programs start at ``query_start_loc[i] // BLOCK_Q + i``: at least ``cdiv(q_len, BLOCK_Q)``
    of them per sequence, computable without a host sync (a few extra ones exit early).
    """
    lo: tl.int32 = 0
    hi = num_seqs
    while hi - lo > 1:  # invariant: answer in [lo, hi)
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid
        else:
            hi = mid
    return lo


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, out_ptr, sinks_ptr,
    block_tables_ptr, query_start_loc_ptr, context_lens_ptr,
    num_seqs, scale_log2, block_size, sliding_window, Dk, Dv,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ksb, stride_kss, stride_ksh,
    stride_vsb, stride_vss, stride_vsh,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DK_P: tl.constexpr, DV_P: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
):
    """Program (q_block, kv_head): ``BLOCK_Q`` query rows of one sequence x the ``GROUP`` query heads
    sharing ``kv_head`` (GQA), packed as ``BLOCK_M >= BLOCK_Q * GROUP`` rows ``r -> (row r // GROUP,
    head kv_head * GROUP + r % GROUP)`` so every K/V tile loaded serves all heads of the group.

    - ``q`` ``[T, H, Dk]``, caches ``[num_blocks, block_size, H_kv, D]``, ``out`` ``[T, H, Dv]``,
      ``block_tables`` ``[B, max_blocks]`` (``stride_bt`` per sequence), ``sinks`` ``[H]``.
    - ``FP8``: caches hold e4m3 with float32 scales ``[num_blocks, block_size, H_kv]``; each K/V
      tile is dequantized in registers into the query dtype before its dot.
    - ``DK_P`` / ``DV_P``: head dims rounded up to a power of two (>= 16 for tl.dot), masked.
    - Scores are kept in log2 units (``scale_log2 = scale * log2(e)``) so exp2 can be used.
    """
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, num_seqs, q_block, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block_in_seq = q_block - (q_start // BLOCK_Q + seq)
    if q_block_in_seq * BLOCK_Q >= q_len:
        return
    ctx_len = tl.load(context_lens_ptr + seq)

    offs_m = tl.arange(0, BLOCK_M)
    q_row = q_block_in_seq * BLOCK_Q + offs_m // GROUP  # row within the sequence's queries
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (q_row < q_len)
    q_pos = ctx_len - q_len + q_row  # absolute position: the new tokens are the last q_len
    offs_dk = tl.arange(0, DK_P)
    offs_dv = tl.arange(0, DV_P)
    dk_ok = offs_dk < Dk
    dv_ok = offs_dv < Dv

    q_ptrs = (q_ptr + (q_start + q_row)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh
              + offs_dk[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dk_ok[None, :], other=0.0)

    if HAS_SINKS:
        # The sink is one extra logit with no value: start the running max at it with sum exp2(0) = 1.
        m_i = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        l_i = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, DV_P), dtype=tl.float32)

    # Causal: rows of this program see positions < kv_end; the window cuts everything before kv_start.
    kv_end = tl.minimum(ctx_len, ctx_len - q_len + (q_block_in_seq + 1) * BLOCK_Q)
    kv_start = 0
    if HAS_WINDOW:
        kv_start = tl.maximum(ctx_len - q_len + q_block_in_seq * BLOCK_Q - sliding_window + 1, 0)
    block_table = block_tables_ptr + seq * stride_bt
    for tile_start in range(kv_start // BLOCK_N * BLOCK_N, kv_end, BLOCK_N):
        offs_n = tile_start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_end
        # Token position -> (physical block, offset); works for any block_size vs BLOCK_N.
        phys = tl.load(block_table + offs_n // block_size, mask=n_ok, other=0).to(tl.int64)
        in_block = offs_n % block_size

        k_ptrs = (k_cache_ptr + kv_head * stride_kh + phys[None, :] * stride_kb + in_block[None, :] * stride_ks
                  + offs_dk[:, None] * stride_kd)
        k = tl.load(k_ptrs, mask=dk_ok[:, None] & n_ok[None, :], other=0.0)  # [DK_P, BLOCK_N]
        if FP8:
            k_scale = tl.load(k_scale_ptr + phys * stride_ksb + in_block * stride_kss + kv_head * stride_ksh,
                              mask=n_ok, other=0.0)
            k = (k.to(tl.float32) * k_scale[None, :]).to(q.dtype)
        s = tl.dot(q.to(k.dtype), k, input_precision=DOT_PRECISION) * scale_log2
        allowed = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (offs_n[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(allowed, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may have seen nothing yet (window starts later): keep exp2 away from (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        rescale = tl.math.exp2(m_i - m_safe)
        l_i = l_i * rescale + tl.sum(p, 1)

        v_ptrs = (v_cache_ptr + kv_head * stride_vh + phys[:, None] * stride_vb + in_block[:, None] * stride_vs
                  + offs_dv[None, :] * stride_vd)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_N, DV_P]
        if FP8:
            v_scale = tl.load(v_scale_ptr + phys * stride_vsb + in_block * stride_vss + kv_head * stride_vsh,
                              mask=n_ok, other=0.0)
            v = (v.to(tl.float32) * v_scale[:, None]).to(q.dtype)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = (out_ptr + (q_start + q_row)[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh
              + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


def paged_attention_triton(
    q_THD: torch.Tensor,
    k_cache: torch.Tensor | Fp8Cache,
    v_cache: torch.Tensor | Fp8Cache,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    sinks_H: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int = 32,
) -> torch.Tensor:
    """Same result as :func:`kvcache.reference.paged_attention_reference`; returns ``[T, H, Dv]``.

    ``block_m``: packed (query row, head) tile rows, default 16 for decode-only batches, 64 otherwise
    (raised to the GQA group size); ``block_n``: K/V positions per inner-loop tile (>= 16).
    """
    T, H, Dk = q_THD.shape
    H_kv, Dv = k_cache.shape[2], v_cache.shape[-1]
    out = torch.empty(T, H, Dv, dtype=q_THD.dtype, device=q_THD.device)
    if T == 0 or meta.num_seqs == 0:
        return out
    group = H // H_kv
    block_m = max(block_m or (16 if meta.is_decode_only else 64), triton.next_power_of_2(group))
    block_q = block_m // group
    sinks = sinks_H if sinks_H is not None else q_THD  # dummy pointer when HAS_SINKS is False
    kc, ks = _parts(k_cache)
    vc, vs = _parts(v_cache)
    fp8 = ks is not None
    if not fp8:
        ks = vs = torch.empty(1, 1, 1, device=q_THD.device)  # unused
    precision = "ieee" if q_THD.dtype == torch.float32 else "tf32"

    grid = (T // block_q + meta.num_seqs, H_kv)  # upper bound on query blocks, see _find_seq
    _paged_attention_kernel[grid](
        q_THD, kc, vc, ks, vs, out, sinks,
        meta.block_tables, meta.query_start_loc, meta.context_lens,
        meta.num_seqs, scale * _LOG2E, meta.block_size, sliding_window or 0, Dk, Dv,
        *q_THD.stride(), *kc.stride(), *vc.stride(), *ks.stride(), *vs.stride(), *out.stride(),
        meta.block_tables.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        DK_P=max(16, triton.next_power_of_2(Dk)), DV_P=max(16, triton.next_power_of_2(Dv)),
        HAS_WINDOW=sliding_window is not None, HAS_SINKS=sinks_H is not None, DOT_PRECISION=precision,
        FP8=fp8,
    )
    return out
