"""Plain reference for attention over a paged KV cache (float32, a loop over sequences).

Caches are ``[num_blocks, block_size, H_kv, D]`` (K and V may differ in D, and V may be a
strided view of K, as for MLA's latent cache). Queries ``q_THD`` are the flattened new rows of
every sequence, see :class:`kvcache.metadata.AttentionMetadata`. Query row ``j`` of sequence
``i`` sits at position ``context_len - query_len + j`` and attends causally to positions
``<=`` its own; with ``sliding_window=W`` only to the last ``W`` of them (itself included).
``sinks_H`` (gpt-oss) adds one learned logit per head to the softmax denominator.
"""
from __future__ import annotations

import torch

from .fp8 import Fp8Cache, quantize_fp8
from .metadata import AttentionMetadata


def write_kv_reference(k_cache: torch.Tensor | Fp8Cache, v_cache: torch.Tensor | Fp8Cache, k: torch.Tensor,
                       v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    for cache, x in ((k_cache, k), (v_cache, v)):
        nb, bs = cache.shape[:2]
        if isinstance(cache, Fp8Cache):  # value = data * scale, one scale per (token, head) row
            q, scale = quantize_fp8(x)
            cache.data.view(torch.uint8).view(nb * bs, *cache.shape[2:])[slot_mapping] = q.view(torch.uint8)
            cache.scale.view(nb * bs, cache.shape[2])[slot_mapping] = scale
        else:
            cache.view(nb * bs, *cache.shape[2:])[slot_mapping] = x.to(cache.dtype)


def gather_kv(cache: torch.Tensor | Fp8Cache, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """The first ``context_len`` cached tokens of one sequence: ``[L, H_kv, D]`` (fp8: dequantized, float32)."""
    bs = cache.shape[1]
    nblocks = (context_len + bs - 1) // bs
    if isinstance(cache, Fp8Cache):
        return cache.dequantize(block_table[:nblocks].long(), torch.float32).flatten(0, 1)[:context_len]
    return cache[block_table[:nblocks].long()].flatten(0, 1)[:context_len]


def paged_attention_reference(
    q_THD: torch.Tensor,
    k_cache: torch.Tensor | Fp8Cache,
    v_cache: torch.Tensor | Fp8Cache,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    sinks_H: torch.Tensor | None = None,
) -> torch.Tensor:
    T, H, _ = q_THD.shape
    Dv = v_cache.shape[-1]
    out = torch.empty(T, H, Dv, dtype=q_THD.dtype, device=q_THD.device)
    for i, (qlen, clen) in enumerate(zip(meta.query_lens_list, meta.context_lens_list)):
        start = int(meta.query_start_loc[i])
        q = q_THD[start:start + qlen].float()  # [Q, H, D]
        k = gather_kv(k_cache, meta.block_tables[i], clen).float()  # [L, Hkv, D]
        v = gather_kv(v_cache, meta.block_tables[i], clen).float()
        group = H // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        qpos = torch.arange(clen - qlen, clen).unsqueeze(1)
        kpos = torch.arange(clen).unsqueeze(0)
        allowed = kpos <= qpos
        if sliding_window is not None:
            allowed &= kpos > qpos - sliding_window
        s = s.masked_fill(~allowed, float("-inf"))
        if sinks_H is not None:
            sink = sinks_H.float().view(H, 1, 1).expand(H, qlen, 1)
            p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
        else:
            p = torch.softmax(s, dim=-1)
        out[start:start + qlen] = torch.einsum("hqk,khd->qhd", p, v).to(out.dtype)
    return out
