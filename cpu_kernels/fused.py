"""Binding of ``fused.c``: a whole attention sub-layer of one decode token in one call.

:func:`mla_token` (DeepSeek's MLA) and :func:`gqa_token` (grouped-query attention): projections,
norms, rotary, the cache write, attention over the sequence's cached tokens and ``o_proj``, with
the decoder's residual add and next norm (:data:`cpu_kernels.gemv.Residual`); bit-identical to the
layers' op-by-op paths at one token, which are their references. They use ``gemv.c``'s dot
products.
"""
from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

from .build import address, c_struct, declare, load
from .gemv import PLAN_ROWS, Outputs, Residual, output, residual_args
from .paged_decode import cache_rows

_i64, _ptr, _int, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
# (plan, x, T, pos, cos, sin, interleaved, block table, context length, row offsets, row lengths, slots, out,
# resid, norm weight, eps, h_out, threads)
declare({
    "moe_mla_token": [_ptr, _ptr, _i64, _ptr, _ptr, _ptr, _int, _ptr, ctypes.c_int32, _ptr, _ptr, _ptr, _ptr, _ptr,
                      _ptr, _f32, _ptr, _int],
    "moe_gqa_token": [_ptr, _ptr, _i64, _ptr, _ptr, _ptr, _int, _ptr, ctypes.c_int32, _ptr, _ptr, _ptr, _ptr, _ptr,
                      _ptr, _f32, _ptr, _int],
})


class SeqRows(NamedTuple):
    """The rows of several sequences in one step (their decode tokens, and drafts): row t's blocks at
    ``block_table.view(-1)[offsets[t]:]`` (int64 ``[T]``: its sequence's row of the step's block
    table), attending over the first ``lens[t]`` cached tokens (int32 ``[T]``)."""

    offsets: torch.Tensor
    lens: torch.Tensor

    @classmethod
    def of(cls, query_lens: tuple[int, ...], context_lens: tuple[int, ...], table_stride: int) -> SeqRows:
        """Sequence b's ``query_lens[b]`` rows end its ``context_lens[b]`` tokens (block table rows
        ``table_stride`` apart)."""
        offsets, lens = [], []
        for b, (q, c) in enumerate(zip(query_lens, context_lens)):
            offsets.extend([b * table_stride] * q)
            lens.extend(range(c - q + 1, c + 1))
        return cls(torch.tensor(offsets, dtype=torch.int64), torch.tensor(lens, dtype=torch.int32))

    def fits(self, T: int, block_table: torch.Tensor) -> bool:
        """Whether these are T rows' of ``block_table`` (int32, contiguous), as the kernels take them."""
        return (self.offsets.dtype == torch.int64 and self.lens.dtype == torch.int32 and self.offsets.shape == (T,)
                and self.lens.shape == (T,) and self.offsets.is_contiguous() and self.lens.is_contiguous()
                and block_table.dtype == torch.int32 and block_table.is_contiguous())


GqaPlanC = c_struct("GqaPlan",
                    "D H Hkv hd qk_norm rows: i64; w_qkv b_qkv q_norm k_norm w_o b_o: ptr; eps scale: f32; "
                    "k_cache v_cache: ptr; k_sblock k_sslot k_shead v_sblock v_sslot v_shead block_size window: i64; "
                    "sinks scratch p_qkv p_o fp8: ptr; clip: f32")
MlaPlanC = c_struct("MlaPlan",
                    "D q_lora H nope rope C v rows: i64; w_qa qa_norm w_qb w_kva kva_norm w_kvb w_o: ptr; "
                    "q_eps kv_eps scale: f32; cache: ptr; c_sblock c_sslot block_size: i64; "
                    "scratch p_qa p_qb p_kva p_o fp8: ptr")

# a packed projection's kernel arguments: (codes, lut or None (int8), float32 scales, offsets or None, group size,
# x8: int4 codes meet x rounded to 8 bits)
PackedArgs = tuple
_PackedProj = c_struct("PackedProj", "q lut s b: ptr; gs x8: i64")


def projection(w: torch.Tensor | PackedArgs, N: int, K: int) -> tuple[int | None, _PackedProj | None] | None:
    """``(bf16 weight pointer, None)`` for a bf16 ``[N, K]`` weight, ``(None, PackedProj)`` for a packed
    one (int4 codes ``[N, K/2]`` uint8 with K a multiple of 32, or int8 ``[N, K]``: what
    ``ops.packed_linear`` streams at one row); None when neither fits."""
    if isinstance(w, torch.Tensor):
        if w.dtype != torch.bfloat16 or w.is_cuda or not w.is_contiguous() or w.shape != (N, K):
            return None
        return w.data_ptr(), None
    q, lut, s, b, gs, x8 = w
    G = -(-K // gs)
    codes = (torch.uint8, (N, K // 2)) if lut is not None else (torch.int8, (N, K))
    if ((q.dtype, tuple(q.shape)) != codes or not q.is_contiguous() or (lut is not None and K % 32)
            or s.dtype != torch.float32 or s.shape != (N, G) or not s.is_contiguous()
            or (b is not None and (b.dtype != torch.float32 or b.shape != (N, G) or not b.is_contiguous()))):
        return None
    return None, _PackedProj(q.data_ptr(), lut.data_ptr() if lut is not None else None, s.data_ptr(),
                             b.data_ptr() if b is not None else None, gs, int(bool(x8) and lut is not None))


class _TokenPlan:
    """What :class:`MlaToken` and :class:`GqaToken` share: the per-call checks and the C call
    (``KERNEL``) on the plan built at capture."""

    KERNEL: str
    D: int
    ok: bool

    def _rotary_fits(self, cos_PH: torch.Tensor) -> bool:
        return True

    def __call__(self, x_1D: torch.Tensor, positions_1: torch.Tensor, cos_PH: torch.Tensor, sin_PH: torch.Tensor,
                 interleaved: bool, block_table: torch.Tensor, context_len: int, slot_mapping_1: torch.Tensor,
                 residual: Residual | None = None, into: Outputs | None = None, rows: SeqRows | None = None):
        T = x_1D.shape[0]
        if (not self.ok or x_1D.dtype != torch.bfloat16 or x_1D.shape[1:] != (self.D,) or not x_1D.is_contiguous()
                or T < 1 or (T > context_len if rows is None else not rows.fits(T, block_table))
                or block_table.dtype != torch.int32 or not block_table.is_contiguous()
                or slot_mapping_1.dtype != torch.int64 or positions_1.dtype != torch.int64
                or slot_mapping_1.shape != (T,) or positions_1.shape != (T,) or not positions_1.is_contiguous()
                or not slot_mapping_1.is_contiguous() or cos_PH.dtype != torch.float32
                or not cos_PH.is_contiguous() or not sin_PH.is_contiguous() or not self._rotary_fits(cos_PH)):
            return None
        tail = residual_args(residual, self.D, into, T)
        if tail is None:
            return None
        out = output(into, self.D, T)
        seqs = (None, None) if rows is None else (rows.offsets.data_ptr(), rows.lens.data_ptr())
        rc = getattr(load(), self.KERNEL)(self.ref, x_1D.data_ptr(), T, positions_1.data_ptr(), cos_PH.data_ptr(),
                                          sin_PH.data_ptr(), int(interleaved), block_table.data_ptr(), context_len,
                                          *seqs, slot_mapping_1.data_ptr(), out.data_ptr(), *tail[0],
                                          torch.get_num_threads())
        if rc != 0:
            return None
        return (tail[1], out) if residual is not None else out


class MlaToken(_TokenPlan):
    """:func:`mla_token` with its weights, norms and cache checked once, as a captured batch-1 step
    calls it every layer and token: ``plan(x_1D, positions_1, cos_PH, sin_PH, interleaved,
    block_table, context_len, slot_mapping_1, residual, into, rows)`` checks only what changes per
    call; T rows as :class:`GqaToken` takes them (one sequence's, or with ``rows`` several
    sequences'), each as a one-row call computes it, the projections (not the absorbed kv_b_proj)
    read once for all rows. ``plan.ok`` is False where the kernel does not apply (then every call
    returns None)."""

    KERNEL = "moe_mla_token"

    def __init__(self, w_qa: torch.Tensor | PackedArgs | None, qa_norm: torch.Tensor | None, q_eps: float,
                 w_qb: torch.Tensor | PackedArgs, w_kva: torch.Tensor | PackedArgs, kva_norm: torch.Tensor,
                 kv_eps: float, w_kvb: torch.Tensor, w_o: torch.Tensor | PackedArgs, heads: int, nope: int, rope: int,
                 v: int, cache: torch.Tensor, scale: float):
        self.ok = False
        ws = [w for w in (qa_norm, kva_norm, w_kvb) if w is not None]
        if any(w.dtype != torch.bfloat16 or w.is_cuda or not w.is_contiguous() for w in ws) or load() is None:
            return
        C = kva_norm.shape[0]
        L = C + rope
        rows = cache_rows(cache, cache)  # (fp8: its e4m3 rows and scales; the row built in C x heads room)
        if rows is None:
            return
        cache, _, scales = rows
        fp8 = scales is not None
        if (cache.dtype != (torch.float8_e4m3fn if fp8 else torch.bfloat16) or cache.dim() != 4
                or cache.shape[2:] != (1, L) or cache.stride(-1) != 1 or cache.stride(1) != L
                or cache.stride(0) != cache.shape[1] * L or rope % 2 or (fp8 and heads * C < L)):
            return
        D = w_o.shape[0] if isinstance(w_o, torch.Tensor) else w_o[0].shape[0]
        if w_qa is not None and (qa_norm is None or qa_norm.dim() != 1):
            return
        q_lora = qa_norm.shape[0] if w_qa is not None else 0
        qa = projection(w_qa, q_lora, D) if w_qa is not None else (None, None)
        projs = [qa, projection(w_qb, heads * (nope + rope), q_lora or D), projection(w_kva, L, D),
                 projection(w_o, D, heads * v)]
        if any(p is None for p in projs) or C % 16 or w_kvb.shape != (heads * (nope + v), C):
            return
        (qa_w, p_qa), (qb_w, p_qb), (kva_w, p_kva), (o_w, p_o) = projs
        self.D = D
        # (for PLAN_ROWS rows: a verify step's or several sequences', projections read once for them)
        scratch = torch.empty(PLAN_ROWS * (q_lora + heads * (nope + rope) + L + heads * L + heads * C + heads * v),
                              dtype=torch.bfloat16)
        self._keep = (w_qa, qa_norm, w_qb, w_kva, kva_norm, w_kvb, w_o, cache, projs, scratch, rows)
        self.c = MlaPlanC(D, q_lora, heads, nope, rope, C, v, PLAN_ROWS, qa_w, address(qa_norm), qb_w, kva_w,
                          address(kva_norm), address(w_kvb), o_w, q_eps, kv_eps, scale, address(cache),
                          cache.stride(0), cache.stride(1), cache.shape[1], address(scratch), address(p_qa),
                          address(p_qb), address(p_kva), address(p_o), address(scales))
        self.ref = address(self.c)  # what the C calls take (moe_decode_step too)
        self.ok = True


def mla_token(x_1D: torch.Tensor, w_qa: torch.Tensor | PackedArgs | None, qa_norm: torch.Tensor | None, q_eps: float,
              w_qb: torch.Tensor | PackedArgs, w_kva: torch.Tensor | PackedArgs, kva_norm: torch.Tensor, kv_eps: float,
              w_kvb: torch.Tensor, w_o: torch.Tensor | PackedArgs, heads: int, nope: int, rope: int, v: int,
              positions_1: torch.Tensor, cos_PH: torch.Tensor, sin_PH: torch.Tensor, interleaved: bool,
              cache: torch.Tensor, block_table: torch.Tensor, context_len: int, slot_mapping_1: torch.Tensor,
              scale: float, residual: Residual | None = None, into: Outputs | None = None):
    """DeepSeek's MLA for one decode token in one call (``fused.c``): projections, norms, rotary,
    the latent row written to ``cache`` ``[blocks, block_size, 1, C + rope]`` at the slot, the
    absorbed attention over the sequence's ``context_len`` cached tokens (``block_table``: its
    blocks, int32) and ``o_proj``; bit-identical to :class:`moe.models.mla.MLAttention`'s op-by-op
    path at one token. ``w_qa=None``: ``w_qb`` is ``q_proj``. The projections but ``w_kvb`` (read per
    head) may be packed (:data:`PackedArgs`, as in :func:`gqa_token`). Returns ``[1, D]`` bf16 (with
    ``residual``: ``(h + y, norm(h + y))``, see :func:`residual_args`; in ``into`` when given), or
    None when the kernel does not apply (then nothing was written). (:class:`MlaToken` checks the
    weights once for repeated calls.)"""
    if x_1D.dtype != torch.bfloat16 or x_1D.shape[0] != 1 or not x_1D.is_contiguous():
        return None
    plan = MlaToken(w_qa, qa_norm, q_eps, w_qb, w_kva, kva_norm, kv_eps, w_kvb, w_o, heads, nope, rope, v, cache, scale)
    return plan(x_1D, positions_1, cos_PH, sin_PH, interleaved, block_table, context_len, slot_mapping_1, residual,
                into)


_QK_NORMS = {None: 0, "head": 1, "full": 2}


class GqaToken(_TokenPlan):
    """:func:`gqa_token` with its weights, norms and caches checked once, as a captured batch-1 step
    calls it every layer and token: ``plan(x_1D, positions_1, cos_PH, sin_PH, interleaved,
    block_table, context_len, slot_mapping_1, residual, into)`` checks only what changes per call
    (``into``: :class:`Outputs` to write to instead of new tensors). ``x [T, D]`` (``positions``,
    ``slot_mapping [T]``): T rows of the sequence (a verify step's), row t attending over the first
    ``context_len - (T - 1 - t)`` tokens, or (``rows``: :class:`SeqRows`) rows of several sequences:
    each as a one-row call computes it, bf16 projections reading their weights once for all rows.
    ``clip_qkv``: q, k and v clamped to it (OLMoE's, after a norm over all dims, before a per-head one).
    ``plan.ok`` is False where the kernel does not apply (then every call returns None)."""

    KERNEL = "moe_gqa_token"

    def _rotary_fits(self, cos_PH: torch.Tensor) -> bool:  # the rotary covers whole heads
        return cos_PH.shape[-1] * 2 == self.hd

    def __init__(self, w_qkv: torch.Tensor | PackedArgs, b_qkv: torch.Tensor | None, heads: int, kv_heads: int,
                 qk_norm: str | None, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, sliding_window: int | None,
                 sinks_H: torch.Tensor | None, scale: float, w_o: torch.Tensor | PackedArgs, b_o: torch.Tensor | None,
                 clip_qkv: float | None = None):
        self.ok = False
        ws = [w for w in (b_qkv, q_norm, k_norm, b_o) if w is not None]
        if any(w.dtype != torch.bfloat16 or w.is_cuda or not w.is_contiguous() for w in ws) or load() is None:
            return
        rows = cache_rows(k_cache, v_cache)  # (fp8: their e4m3 rows and scales)
        if qk_norm not in _QK_NORMS or rows is None:
            return
        k_cache, v_cache, scales = rows
        if k_cache.dim() != 4:
            return
        hd = k_cache.shape[-1]
        D = w_o.shape[0] if isinstance(w_o, torch.Tensor) else w_o[0].shape[0]
        qkv, o = projection(w_qkv, (heads + 2 * kv_heads) * hd, D), projection(w_o, D, heads * hd)
        if qkv is None or o is None or hd % 2:
            return
        for c in (k_cache, v_cache):
            if (c.dtype != (torch.bfloat16 if scales is None else torch.float8_e4m3fn) or c.dim() != 4 or c.is_cuda
                    or c.shape[2:] != (kv_heads, hd) or c.stride(-1) != 1 or c.stride(0) != c.shape[1] * c.stride(1)):
                return
        sinks = sinks_H.float().contiguous() if sinks_H is not None else None
        self.D, self.hd = D, hd
        # q, k, v, the heads' outputs for PLAN_ROWS rows (a verify step's: each weight read once for them)
        scratch = torch.empty(PLAN_ROWS * (2 * heads + 2 * kv_heads) * hd, dtype=torch.bfloat16)
        self._keep = (w_qkv, b_qkv, q_norm, k_norm, k_cache, v_cache, sinks, w_o, b_o, qkv, o, scratch, rows)
        self.c = GqaPlanC(D, heads, kv_heads, hd, _QK_NORMS[qk_norm], PLAN_ROWS, qkv[0], address(b_qkv),
                          address(q_norm), address(k_norm), o[0], address(b_o), eps, scale, address(k_cache),
                          address(v_cache), *k_cache.stride()[:3], *v_cache.stride()[:3], k_cache.shape[1],
                          sliding_window or 0, address(sinks), address(scratch), address(qkv[1]), address(o[1]),
                          address(scales), float(clip_qkv or 0.0))
        self.ref = address(self.c)  # what the C calls take (moe_decode_step too)
        self.ok = True


def gqa_token(x_1D: torch.Tensor, w_qkv: torch.Tensor | PackedArgs, b_qkv: torch.Tensor | None, heads: int,
              kv_heads: int, qk_norm: str | None, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
              positions_1: torch.Tensor, cos_PH: torch.Tensor, sin_PH: torch.Tensor, interleaved: bool,
              k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, context_len: int,
              slot_mapping_1: torch.Tensor, sliding_window: int | None, sinks_H: torch.Tensor | None, scale: float,
              w_o: torch.Tensor | PackedArgs, b_o: torch.Tensor | None, residual: Residual | None = None):
    """Grouped-query attention for one decode token in one call (``fused.c``): qkv projection, q/k
    norms (``qk_norm`` None, "head" or "full"), rotary over whole heads, K/V written at the slot,
    attention over the sequence's ``context_len`` cached tokens (window, sinks) and ``o_proj``;
    bit-identical to :class:`moe.models.layers.Attention`'s op-by-op path at one token. Returns
    ``[1, D]`` bf16 (with ``residual``: ``(h + y, norm(h + y))``, see :func:`residual_args`), or
    None when the kernel does not apply (then nothing was written). ``w_qkv`` / ``w_o`` bf16, or a
    packed weight's :data:`PackedArgs` (``ops.PackedLinearWeight.kernel_args``), streamed as
    ``ops.packed_linear`` streams it. (:class:`GqaToken` checks the weights once for repeated calls.)"""
    if x_1D.dtype != torch.bfloat16 or x_1D.shape[0] != 1 or not x_1D.is_contiguous():
        return None
    plan = GqaToken(w_qkv, b_qkv, heads, kv_heads, qk_norm, q_norm, k_norm, eps, k_cache, v_cache, sliding_window,
                    sinks_H, scale, w_o, b_o)
    return plan(x_1D, positions_1, cos_PH, sin_PH, interleaved, block_table, context_len, slot_mapping_1, residual)
