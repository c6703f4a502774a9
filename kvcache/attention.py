"""Attention over the paged KV cache: the torch path (CPU fast path) and the dispatch to Triton.

See :mod:`kvcache.reference` for the semantics. Sequences with few new rows (decode rows,
speculative decoding's verify rows, prompts of up to ``KERNEL_MAX_QUERY`` tokens) go to the C
kernel of :mod:`cpu_kernels` (fp8 caches too, read in place), all of them in one call; longer prefill
chunks go to its AMX prefill kernel where it applies (bf16 queries on a CPU with AMX or AVX512-BF16;
fp8 caches widened to bf16 rows first), else (float16, other CPUs) to
``scaled_dot_product_attention``, per sequence (a loop over sequences, never over tokens).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

import cpu_kernels
from ops import write_rows

from .fp8 import Fp8Cache, write_fp8
from .metadata import AttentionMetadata
from .reference import gather_kv

Cache = torch.Tensor | Fp8Cache


def seq_kv(cache: Cache, meta: AttentionMetadata, i: int, clen: int, dtype: torch.dtype) -> torch.Tensor:
    """``[clen, H_kv, D]`` of sequence ``i`` in ``dtype``: a view when its blocks are contiguous, else a
    gather; an fp8 cache is dequantized block by block."""
    start = meta.contiguous_starts[i] if meta.contiguous_starts else None
    bs = cache.shape[1]
    nblocks = -(-clen // bs)
    if isinstance(cache, Fp8Cache):
        blocks = slice(start, start + nblocks) if start is not None else meta.block_tables[i, :nblocks].long()
        return cache.dequantize(blocks, dtype).flatten(0, 1)[:clen]
    if start is None:
        return gather_kv(cache, meta.block_tables[i], clen)
    return cache[start:start + nblocks].flatten(0, 1)[:clen]


def write_kv(k_cache: Cache, v_cache: Cache | None, k: torch.Tensor, v: torch.Tensor | None,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K (and V) at their slots. ``v_cache=None`` for a K-only (latent) cache."""
    if k_cache.is_cuda:
        from .triton_attention import write_kv_triton

        write_kv_triton(k_cache, v_cache, k, v, slot_mapping)
        return
    if isinstance(k_cache, Fp8Cache):
        write_fp8(k_cache, k, slot_mapping)
        if v_cache is not None:
            write_fp8(v_cache, v, slot_mapping)
        return
    write_rows(k_cache, k, slot_mapping)  # one C pass on CPU (same dtype), else index_copy_
    if v_cache is not None:
        write_rows(v_cache, v, slot_mapping)


def _attend_with_sinks(q_HQD: torch.Tensor, k_LKD: torch.Tensor, v_LKD: torch.Tensor, mask_QL: torch.Tensor | None,
                       scale: float, sinks_H: torch.Tensor, group: int) -> torch.Tensor:
    """Attention with a sink per query head (gpt-oss: one more logit in each row's softmax, with no
    value) as SDPA over the keys plus one zero key and value per KV head, whose score is the sink
    through an additive mask column; the query heads of a KV head stacked as extra query rows (as
    :func:`_attend_grouped`). (Was the scores, mask and softmax op by op in float32: 3x slower at a
    2048-token prompt.) Returns ``[Q, H, Dv]``."""
    H, Q, D = q_HQD.shape
    L, Hkv = k_LKD.shape[:2]
    q = q_HQD.reshape(Hkv, group * Q, D)  # rows ordered (group member, query)
    k = torch.cat([k_LKD.transpose(0, 1), k_LKD.new_zeros(Hkv, 1, D)], 1)
    v = torch.cat([v_LKD.transpose(0, 1), v_LKD.new_zeros(Hkv, 1, v_LKD.shape[-1])], 1)
    bias = q.new_zeros(Hkv, group * Q, L + 1)
    if mask_QL is not None:
        bias[:, :, :L].masked_fill_(~mask_QL.repeat(group, 1), float("-inf"))
    bias[:, :, L] = sinks_H.to(q.dtype).view(Hkv, group, 1).expand(Hkv, group, Q).reshape(Hkv, group * Q)
    o = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=bias.unsqueeze(0),
                                       scale=scale)
    return o.view(H, Q, -1).transpose(0, 1)


def _attend_grouped(q_HQD: torch.Tensor, k_LKD: torch.Tensor, v_LKD: torch.Tensor, mask_QL: torch.Tensor | None,
                    scale: float, group: int) -> torch.Tensor:
    """SDPA with the query heads of each KV head stacked as extra query rows, so K/V are read
    as they are (no per-head expansion, which costs most for MLA's single latent head).
    Returns ``[Q, H, Dv]``."""
    H, Q, D = q_HQD.shape
    Hkv = k_LKD.shape[1]
    q = q_HQD.reshape(Hkv, group * Q, D)  # rows ordered (group member, query)
    if mask_QL is not None:
        mask_QL = mask_QL.repeat(group, 1)
    o = F.scaled_dot_product_attention(q.unsqueeze(0), k_LKD.transpose(0, 1).unsqueeze(0),
                                       v_LKD.transpose(0, 1).unsqueeze(0), attn_mask=mask_QL, scale=scale)
    return o.view(H, Q, -1).transpose(0, 1)


# Sequences with at most this many new rows (decode rows, speculative decoding's verify rows, short
# prompts) go through the C kernel, which reads each cached row once for all of a sequence's rows;
# longer queries through SDPA, which tiles them. The kernel keeps a row of scores per (query row,
# head) over the longest context: past _KERNEL_MAX_SCORES floats per thread, SDPA instead.
KERNEL_MAX_QUERY = 16
_KERNEL_MAX_SCORES = 1 << 24


def _kernel_seqs(meta: AttentionMetadata, num_heads: int) -> list[int]:
    few = [i for i, q in enumerate(meta.query_lens_list) if q <= KERNEL_MAX_QUERY]
    rows = max((meta.query_lens_list[i] for i in few), default=1)
    if rows > 1 and rows * num_heads * max(meta.context_lens_list[i] for i in few) > _KERNEL_MAX_SCORES:
        few = [i for i in few if meta.query_lens_list[i] == 1]
    return few


def _v_is_prefix_of_k(k_cache: Cache, v_cache: Cache) -> bool:
    """Whether V is a view of K's leading dims (MLA's latent cache), plain or fp8."""
    if isinstance(k_cache, Fp8Cache) or isinstance(v_cache, Fp8Cache):
        return isinstance(k_cache, Fp8Cache) and isinstance(v_cache, Fp8Cache) and v_cache.shares_rows_with(k_cache)
    return (v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride()
            and v_cache.shape[:-1] == k_cache.shape[:-1] and v_cache.shape[-1] <= k_cache.shape[-1])


def paged_attention_torch(q_THD: torch.Tensor, k_cache: Cache, v_cache: Cache,
                          meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                          sinks_H: torch.Tensor | None = None) -> torch.Tensor:
    T, H, _ = q_THD.shape
    out = torch.empty(T, H, v_cache.shape[-1], dtype=q_THD.dtype, device=q_THD.device)
    seqs = range(meta.num_seqs)
    if cpu_kernels.supports_decode(q_THD, k_cache, v_cache):
        few = _kernel_seqs(meta, H)
        if len(few) == meta.num_seqs:  # every sequence's rows in one call (a decode step: row i is sequence i)
            qs = None if T == meta.num_seqs else meta.query_start_loc
            return cpu_kernels.paged_decode_attention(q_THD, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                     scale, sliding_window, sinks_H, qs)
        if few:
            idx = torch.tensor(few)
            lens = [meta.query_lens_list[i] for i in few]
            rows = torch.cat([torch.arange(int(meta.query_start_loc[i]), int(meta.query_start_loc[i]) + n)
                              for i, n in zip(few, lens)])
            qs = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
            out[rows] = cpu_kernels.paged_decode_attention(q_THD[rows], k_cache, v_cache, meta.block_tables[idx],
                                                          meta.context_lens[idx], scale, sliding_window, sinks_H,
                                                          None if len(rows) == len(few) else qs)
            taken = set(few)
            seqs = [i for i in seqs if i not in taken]
    starts = meta.query_start_loc.tolist()
    if seqs and cpu_kernels.supports_prefill(q_THD, k_cache, v_cache):
        # prompt rows (whole prompts, chunks after a cached prefix) straight from the cache blocks
        for i in seqs:
            rows = slice(starts[i], starts[i] + meta.query_lens_list[i])
            cpu_kernels.prefill_attention(q_THD[rows], k_cache, v_cache, meta.block_tables[i],
                                          meta.context_lens_list[i], scale, out=out[rows],
                                          sliding_window=sliding_window, sinks_H=sinks_H)
        return out
    # MLA: V is the leading dims of the latent K. SDPA then runs with K as V (and keeps the leading
    # output dims): equal dims let it take its flash kernel (10x the math path at prompt lengths)
    v_is_k_prefix = _v_is_prefix_of_k(k_cache, v_cache)
    Dv = v_cache.shape[-1]
    for i in seqs:
        qlen, clen = meta.query_lens_list[i], meta.context_lens_list[i]
        lo = 0
        if sliding_window is not None:
            # keys older than the window of the first query row are never needed
            lo = max(0, clen - qlen - sliding_window + 1)
        k = seq_kv(k_cache, meta, i, clen, q_THD.dtype)[lo:]  # [L, Hkv, D]
        v = k if v_is_k_prefix else seq_kv(v_cache, meta, i, clen, q_THD.dtype)[lo:]
        q = q_THD[starts[i]:starts[i] + qlen].transpose(0, 1)  # [H, Q, D]
        group = H // k.shape[1]
        mask = None
        if (qlen > 1 and (qlen != k.shape[0] or sinks_H is not None)) or sliding_window is not None:
            qpos = torch.arange(clen - qlen, clen, device=q.device).unsqueeze(1)
            kpos = torch.arange(lo, clen, device=q.device).unsqueeze(0)
            mask = kpos <= qpos
            if sliding_window is not None:
                mask &= kpos > qpos - sliding_window
        if sinks_H is not None:
            o = _attend_with_sinks(q, k, v, mask, scale, sinks_H, group)
        elif qlen > KERNEL_MAX_QUERY or (qlen > 1 and mask is None):
            # long queries (a whole prompt: causal, the kernel skipping the masked half): the query
            # heads of a KV head found by SDPA itself (enable_gqa), no copies
            o = F.scaled_dot_product_attention(
                q.unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), attn_mask=mask,
                is_causal=mask is None, scale=scale, enable_gqa=group > 1).squeeze(0).transpose(0, 1)
        else:
            o = _attend_grouped(q, k, v, mask, scale, group)
        if v_is_k_prefix:
            o = o[..., :Dv]
        out[starts[i]:starts[i] + qlen] = o
    return out


def causal_attention(q_QHD: torch.Tensor, k_LHD: torch.Tensor, v_LHD: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of ``Q`` rows over ``L >= Q`` keys held as plain tensors (not in the cache
    blocks): row ``i`` at position ``L - Q + i`` sees keys ``0 .. L - Q + i``. ``q [Q, H, D]``, ``k [L,
    Hkv, D]``, ``v [L, Hkv, Dv]`` (GQA when ``H`` is a multiple of ``Hkv``). Returns ``[Q, H, Dv]``.
    MLA's decompressed prompt attention: the AMX prefill kernel where it applies (the keys as one
    cache block), else SDPA."""
    Q, L = q_QHD.shape[0], k_LHD.shape[0]
    k4, v4 = k_LHD.unsqueeze(0), v_LHD.unsqueeze(0)  # one block of L slots
    if not q_QHD.is_cuda and cpu_kernels.supports_prefill(q_QHD, k4, v4):
        return cpu_kernels.prefill_attention(q_QHD, k4, v4, torch.zeros(1, dtype=torch.int32), L, scale)
    D, Dv = q_QHD.shape[-1], v_LHD.shape[-1]
    d = max(D, Dv)  # equal head dims take SDPA's flash kernel (zeros change no dot product)
    q, k, v = (F.pad(t, (0, d - t.shape[-1])) if t.shape[-1] < d else t for t in (q_QHD, k_LHD, v_LHD))
    mask = None
    if Q != L:  # a later chunk (or after a prefix-cache hit): row j sees the first L - Q + j + 1 keys
        mask = torch.arange(L, device=q.device)[None] <= torch.arange(L - Q, L, device=q.device)[:, None]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask, is_causal=mask is None, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return o[0].transpose(0, 1)[..., :Dv]


def paged_attention(q_THD: torch.Tensor, k_cache: Cache, v_cache: Cache, meta: AttentionMetadata,
                    scale: float, sliding_window: int | None = None,
                    sinks_H: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the step's new rows over everything cached for their sequences."""
    if q_THD.is_cuda:
        from .triton_attention import paged_attention_triton

        return paged_attention_triton(q_THD, k_cache, v_cache, meta, scale, sliding_window, sinks_H)
    return paged_attention_torch(q_THD, k_cache, v_cache, meta, scale, sliding_window, sinks_H)
