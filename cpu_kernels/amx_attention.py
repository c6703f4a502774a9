"""Binding of ``amx_attention.c``: causal attention of a sequence's prompt rows over its paged
KV cache on AMX tiles (32 query rows of a head against 512 keys at a time, softmax in float32).

The torch path runs ``scaled_dot_product_attention`` per sequence on prompt chunks longer than the
decode kernel takes (after gathering the sequence's K/V out of the cache blocks). On an AMX Xeon
(2 threads) this kernel runs 1.6-2.3x torch's CPU flash attention on 64-2048-token prompts, and
~2x on a chunk after a cached prefix, where SDPA needs a mask; on AVX512-BF16 without AMX (Zen 4,
the products on vdpbf16ps) 3.0-3.6x, prompt throughput 1.16x (16 x 256 tokens) and 1.46x (4 x 2048)
on the Qwen3-MoE shape. fp8 caches (e4m3 rows) are widened to bf16 rows first, as the SDPA
path widens them. None where it does not apply (no tile kernels, not bf16, head dims not multiples
of 32): then SDPA.
:func:`prefill_attention_reference` is its float32 reference.
"""
from __future__ import annotations

import ctypes

import torch

from .amx import amx_available
from .build import address, declare, kernel_dtype, load
from .paged_decode import cache_rows

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
declare({"moe_amx_prefill_attention": [_ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _i64, _i64, _ptr,
                                       _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _ptr,
                                       _ptr, ctypes.c_float, _ptr, _ptr, ctypes.c_int]})


def supports_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether :func:`prefill_attention` takes these queries ``[Q, H, D]`` and caches ``[blocks,
    block_size, Hkv, D]`` / ``[..., Dv]``: bf16 (or fp8 caches, :class:`kvcache.Fp8Cache`) where the
    tile kernels run (AMX, or AVX512-BF16), D and Dv multiples of 32."""
    rows = cache_rows(k_cache, v_cache)
    if rows is None:
        return False
    k, v, fp8 = rows
    if q.dtype != torch.bfloat16 or q.dim() != 3 or k.dim() != 4 or v.dim() != 4:
        return False
    D, Dv = q.shape[-1], v.shape[-1]
    if k.shape[-1] != D or D % 32 or Dv % 32 or q.shape[1] % k.shape[2]:
        return False
    return amx_available() and kernel_dtype(*((q, k, v) if fp8 is None else (q,))) is not None


def prefill_attention(q_QHD: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      context_len: int, scale: float, out: torch.Tensor | None = None,
                      sliding_window: int | None = None, sinks_H: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of one sequence's ``Q`` newest rows ``q [Q, H, D]`` (row ``i`` at position
    ``context_len - Q + i``: a whole prompt, or a chunk after its cached prefix) over the
    ``context_len`` tokens cached in the blocks ``block_table`` lists (its rows' own included).
    ``v_cache`` may be a view of ``k_cache``'s leading dims (MLA's latent). A ``sliding_window`` keeps
    the last that many keys of each row; ``sinks_H`` (``[H]``) adds one logit per head to each row's
    softmax, with no value (gpt-oss). fp8 caches (:class:`kvcache.Fp8Cache`): their rows widened to
    bf16 as :func:`kvcache.fp8.dequantize_fp8` widens them. Writes into ``out``
    (``[Q, H, Dv]``, any row/head strides, unit last stride) or a new tensor, and returns it.
    Check :func:`supports_prefill` first."""
    Q, H, D = q_QHD.shape
    Hkv, Dv, bs = k_cache.shape[2], v_cache.shape[-1], k_cache.shape[1]
    L = int(context_len)
    if not 0 < Q <= L:
        raise ValueError(f"{Q} query rows need 1 <= rows <= context length, got {L}")
    bt = block_table.to(torch.int32).contiguous()
    if bt.numel() * bs < L:
        raise ValueError(f"{bt.numel()} blocks of {bs} slots cannot hold {L} tokens")
    q = q_QHD if q_QHD.stride(-1) == 1 else q_QHD.contiguous()
    if out is None:
        out = torch.empty(Q, H, Dv, dtype=torch.bfloat16)
    Lp = -(-L // 32) * 32
    kp = torch.empty(Hkv * Lp * D, dtype=torch.bfloat16)
    vp = torch.empty(Hkv * Lp * Dv, dtype=torch.bfloat16)
    sinks = sinks_H.float().contiguous() if sinks_H is not None else None
    if sinks is not None and sinks.shape != (H,):
        raise ValueError(f"sinks must hold one logit per query head ({H}), got shape {tuple(sinks_H.shape)}")
    k, v, fp8 = cache_rows(k_cache, v_cache)
    rc = load().moe_amx_prefill_attention(
        q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), *k.stride()[:3], v.data_ptr(), *v.stride()[:3], bs,
        bt.data_ptr(), out.data_ptr(), out.stride(0), out.stride(1), Q, L, H, Hkv, D, Dv, sliding_window or 0,
        sinks.data_ptr() if sinks is not None else None, address(fp8), scale, kp.data_ptr(), vp.data_ptr(),
        torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"moe_amx_prefill_attention failed ({rc}: -1 built without AMX, -3 out of memory)")
    return out


def prefill_attention_reference(q_QHD: torch.Tensor, k_LHD: torch.Tensor, v_LHD: torch.Tensor, scale: float,
                                sliding_window: int | None = None, sinks_H: torch.Tensor | None = None
                                ) -> torch.Tensor:
    """What :func:`prefill_attention` computes, in float32 over the sequence's gathered ``k [L, Hkv,
    D]`` and ``v [L, Hkv, Dv]``, with the probabilities rounded to bf16 before the product with V
    (the kernel's and torch's CPU flash attention's rounding); the sinks as one more column of scores
    whose probability is dropped. Returns ``[Q, H, Dv]`` float32."""
    Q, H, _ = q_QHD.shape
    L, Hkv, _ = k_LHD.shape
    k = k_LHD.float().repeat_interleave(H // Hkv, 1).transpose(0, 1)  # [H, L, D]
    v = v_LHD.float().repeat_interleave(H // Hkv, 1).transpose(0, 1)
    s = (q_QHD.float().transpose(0, 1) @ k.transpose(1, 2)) * scale  # [H, Q, L]
    kpos, qpos = torch.arange(L).unsqueeze(0), torch.arange(L - Q, L).unsqueeze(1)
    visible = kpos <= qpos
    if sliding_window:
        visible &= kpos > qpos - sliding_window
    s = s.masked_fill(~visible, float("-inf"))
    if sinks_H is not None:
        s = torch.cat([s, sinks_H.float().view(H, 1, 1).expand(H, Q, 1)], -1)
    p = (s - s.amax(-1, keepdim=True)).exp()
    o = p[..., :L].bfloat16().float() @ v
    return (o / p.sum(-1, keepdim=True)).transpose(0, 1)
