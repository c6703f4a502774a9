"""Binding of ``paged_decode.c``: attention of a few newest rows per sequence over its paged cache.

``scaled_dot_product_attention`` called once per sequence costs ~90 µs for a decode row over a few
hundred cached tokens — mostly per-call and tiny-GEMM overhead — and a 64-sequence decode step
makes 64 such calls per layer. This kernel runs every decode row of the step in one call: each
cached K/V row is read once, in place through the block table, with the GQA query heads of its KV
head (and, when there are enough sequences, all heads of one token as one contiguous read); fp8
caches (e4m3 rows, a scale per row) too, read in place rather than dequantized per step (batch-1
decode after a 2048-token prompt on the Mixtral shape 1.6-1.8x the dequantizing torch path).
Its reference is :func:`kvcache.reference.paged_attention_reference` (float32, the semantics every
attention backend is tested against), which stays with the cache it reads.
"""
from __future__ import annotations

import ctypes

import torch

from .build import DTYPES, address, c_struct, declare, kernel_dtype, load

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
declare({"moe_paged_decode": [_ptr, _ptr, _ptr, _ptr, ctypes.c_int, _ptr, *[_i64] * 12, _ptr, _i64, _ptr, _ptr, _i64,
                              _ptr, ctypes.c_float, ctypes.c_int],
         "moe_quantize_e4m3": [_ptr, _i64, _i64, _ptr, _i64, _ptr, _i64]})
Fp8ScalesC = c_struct("Fp8Scales", "k v: ptr; sblock sslot shead: i64")


def cache_rows(k_cache: object, v_cache: object) -> tuple | None:
    """What the kernels read of a layer's K and V caches: ``(k, v, None)`` for plain tensors, ``(k rows,
    v rows, their scales' C struct)`` for fp8 caches (:class:`kvcache.Fp8Cache`: e4m3 rows, a float32
    scale per (slot, head) row; CPU, rows of unit stride, the two scales laid out alike; the struct
    points into the caches' scales); None for anything else."""
    if isinstance(k_cache, torch.Tensor) and isinstance(v_cache, torch.Tensor):
        return k_cache, v_cache, None
    parts = []
    for c in (k_cache, v_cache):
        data, scale = getattr(c, "data", None), getattr(c, "scale", None)
        if (not isinstance(data, torch.Tensor) or not isinstance(scale, torch.Tensor)
                or data.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32 or data.is_cuda
                or data.dim() != 4 or scale.shape != data.shape[:3] or data.stride(-1) != 1):
            return None
        parts.append((data, scale))
    (kd, ks), (vd, vs) = parts
    if ks.stride() != vs.stride() or kd.shape[:3] != vd.shape[:3]:
        return None
    return kd, vd, Fp8ScalesC(ks.data_ptr(), vs.data_ptr(), *ks.stride())


def supports_decode(q: torch.Tensor, k_cache: object, v_cache: object) -> bool:
    """Whether the kernel handles these tensors: CPU, float32 or bfloat16 throughout, or fp8 caches
    (:class:`kvcache.Fp8Cache`) beside float32 / bfloat16 queries; rows with unit stride."""
    rows = cache_rows(k_cache, v_cache)
    return rows is not None and kernel_dtype(q, *(rows[:2] if rows[2] is None else ())) is not None


def paged_decode_attention(q_THD: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, sinks_H: torch.Tensor | None = None,
                           query_start: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a few newest rows per sequence over its cache. Sequence ``b`` attends with
    query rows ``query_start[b] .. query_start[b+1]-1`` (default: row ``b`` alone) to the
    ``context_lens[b]`` tokens cached in ``block_tables[b]`` (its rows' own included), causally:
    of ``Q`` rows, row ``i`` sees the first ``context_lens[b] - (Q - 1 - i)`` tokens. Returns
    ``[T, H, Dv]`` in q's dtype. fp8 caches: each score and each row's weight in the sum of V times
    that row's scale. Check :func:`supports_decode` first."""
    lib = load()
    assert lib is not None, "check cpu_kernels.supports_decode() first"
    T, H, Dk = q_THD.shape
    B = block_tables.shape[0]
    Hkv, Dv = k_cache.shape[2], v_cache.shape[-1]
    if H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} KV heads")
    qs = None
    if query_start is not None:
        qs = query_start.to(torch.int32).contiguous()
        if qs.shape[0] != B + 1 or int(qs[-1]) != T:
            raise ValueError(f"query_start must hold {B + 1} offsets ending at {T} rows, got {qs.tolist()}")
    elif T != B:
        raise ValueError(f"{T} query rows for {B} sequences: pass query_start")
    q = q_THD.contiguous()
    bt = block_tables.to(torch.int32).contiguous()
    cl = context_lens.to(torch.int32).contiguous()
    sinks = sinks_H.float().contiguous() if sinks_H is not None else None
    out = torch.empty(T, H, Dv, dtype=q.dtype)
    if B == 0:
        return out
    kd, vd, fp8 = cache_rows(k_cache, v_cache)
    lib.moe_paged_decode(q.data_ptr(), out.data_ptr(), kd.data_ptr(), vd.data_ptr(), DTYPES[q.dtype], address(fp8), B,
                         H, Hkv,
                         Dk, Dv, *kd.stride()[:3], *vd.stride()[:3], kd.shape[1], bt.data_ptr(), bt.shape[1],
                         cl.data_ptr(), qs.data_ptr() if qs is not None else None, sliding_window or 0,
                         sinks.data_ptr() if sinks is not None else None, scale, torch.get_num_threads())
    return out



def quantize_e4m3(x_RD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`kvcache.fp8.quantize_fp8` of bf16 CPU rows in one C pass, bit for bit: ``(float8_e4m3fn
    [R, D], float32 scale [R])``; None where it does not apply (other dtypes, no kernels)."""
    if kernel_dtype(x_RD) != DTYPES[torch.bfloat16] or x_RD.dim() != 2:
        return None
    x = x_RD.contiguous()
    R, D = x.shape
    q = torch.empty(R, D, dtype=torch.uint8)
    scale = torch.empty(R, dtype=torch.float32)
    load().moe_quantize_e4m3(x.data_ptr(), R, D, q.data_ptr(), D, scale.data_ptr(), 1)
    return q.view(torch.float8_e4m3fn), scale
