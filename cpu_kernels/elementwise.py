"""Binding of ``elementwise.c``: one pass each where torch runs a chain of ops.

:func:`rope_` (rotary embedding in place), :func:`silu_mul` (SwiGLU's ``silu(gate) * up``),
:func:`rms_norm` and :func:`add_rms_norm` (the residual add and the next norm) on bf16
activations, with the roundings of the torch code they replace (the ``*_reference`` functions
below, which are also the callers' torch path); :func:`write_rows` (new K/V rows into a paged
cache), :func:`transpose_to_float` (a GEMM's transposed logits to row-major float32) and
:func:`route_select` (the router's scoring and selection; :class:`RouteToken` for one token from
its gate projection on).
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from .build import DTYPES, address, c_struct, declare, kernel_dtype, load

_i64, _ptr, _int, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
declare({
    "moe_rope": [_ptr, _int, _i64, _i64, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _int, _int],
    "moe_rms_norm_rope": [_ptr, _ptr, _f32, _ptr, _f32, _int, *[_i64] * 6, _ptr, _i64, _ptr, _ptr, _int, _int],
    "moe_silu_mul": [_ptr, _ptr, _ptr, _int, *[_i64] * 9, _int],
    "moe_rms_norm_heads": [_ptr, _ptr, _ptr, _int, *[_i64] * 7, _f32, _int],
    "moe_add_rms_norm": [_ptr, _ptr, _ptr, _ptr, _ptr, _int, _i64, _i64, _f32, _int],
    "moe_write_rows": [_ptr, _ptr, _int, *[_i64] * 6, _ptr, _i64, _i64, _int],
    "moe_transpose_to_f32": [_ptr, _int, _i64, _i64, _i64, _ptr, _int],
    "moe_route_select": [_ptr, _int, _ptr, *[_i64] * 5, _int, _int, _f32, _f32, _ptr, _ptr, _ptr, _ptr, _int],
    "moe_route_token": [_ptr, _ptr, _i64, _int],  # (plan, x, T, threads)
    "moe_argmax_rows": [_ptr, _i64, _i64, _i64, _ptr],
    "moe_simd_lanes": [],
})
RoutePlanC = c_struct("RoutePlan", "D ldw scoring E K G topk_groups group_top2 renormalize: i64; "
                                   "gate gate_bias bias: ptr; eps scale: f32; s weights ids: ptr")


def simd_lanes() -> int | None:
    """Lanes of the kernels' vector bodies in this build: 16 (AVX-512), 8 (AVX2 + FMA), 1 (scalar C);
    None when the library is not built."""
    lib = load()
    return None if lib is None else int(lib.moe_simd_lanes())


class PositionPastTable(IndexError):
    """A rotary position that is not a row of the cos/sin tables (nothing was written: grow them and
    call again)."""


def _rotated(rc: int) -> bool:
    if rc == -2:
        raise PositionPastTable("a position is past the rotary tables' rows")
    return True


def rope_(x_THD: torch.Tensor, positions_T: torch.Tensor, cos_PH: torch.Tensor, sin_PH: torch.Tensor,
          interleaved: bool) -> bool:
    """Rotate ``x_THD`` in place (any strides over T and H, unit stride within a head) by the
    float32 tables ``cos/sin [max_pos, D/2]`` at ``positions_T``. Returns False, leaving ``x``
    untouched, when the kernel does not apply (then use the torch path); raises
    :class:`PositionPastTable`, leaving it untouched, for a position past the tables' rows."""
    dtype = kernel_dtype(x_THD)
    if dtype is None or x_THD.dim() != 3 or x_THD.shape[-1] % 2 or cos_PH.dtype != torch.float32:
        return False
    T, H, D = x_THD.shape
    pos = positions_T.to(torch.int64).contiguous()
    cos_PH, sin_PH = cos_PH.contiguous(), sin_PH.contiguous()
    return _rotated(load().moe_rope(x_THD.data_ptr(), dtype, T, H, D, x_THD.stride(0), x_THD.stride(1),
                                    pos.data_ptr(), cos_PH.shape[0], cos_PH.data_ptr(), sin_PH.data_ptr(),
                                    int(interleaved), torch.get_num_threads()))


def rms_norm_rope_(x_THD: torch.Tensor, w_q: torch.Tensor, eps_q: float, w_k: torch.Tensor, eps_k: float, hq: int,
                   positions_T: torch.Tensor, cos_PH: torch.Tensor, sin_PH: torch.Tensor, interleaved: bool) -> bool:
    """:func:`rms_norm` of each head of ``x_THD`` in place (heads ``h < hq`` by ``w_q`` and ``eps_q``, the
    others by ``w_k`` and ``eps_k``: a qkv row's q heads then its k heads), then :func:`rope_` of it,
    each row normalized and rotated while in cache; bit-identical to those two calls. bf16 ``x`` only
    (the norm's kernel dtype). Returns False, leaving ``x`` untouched, when the kernel does not apply;
    raises :class:`PositionPastTable` as :func:`rope_`."""
    if (x_THD.dtype != torch.bfloat16 or x_THD.dim() != 3 or x_THD.stride(-1) != 1 or x_THD.shape[-1] % 2
            or cos_PH.dtype != torch.float32 or not 0 <= hq <= x_THD.shape[1]):
        return False
    dtype = kernel_dtype(x_THD, w_q, w_k)
    if dtype is None or w_q.shape != w_k.shape or w_q.shape != x_THD.shape[-1:]:
        return False
    T, H, D = x_THD.shape
    pos = positions_T.to(torch.int64).contiguous()
    w_q, w_k, cos_PH, sin_PH = (t.contiguous() for t in (w_q, w_k, cos_PH, sin_PH))
    return _rotated(load().moe_rms_norm_rope(x_THD.data_ptr(), w_q.data_ptr(), eps_q, w_k.data_ptr(), eps_k, dtype,
                                             T, H, hq, D, x_THD.stride(0), x_THD.stride(1), pos.data_ptr(),
                                             cos_PH.shape[0], cos_PH.data_ptr(), sin_PH.data_ptr(), int(interleaved),
                                             torch.get_num_threads()))


def rope_reference(x_THD: torch.Tensor, positions_T: torch.Tensor, cos_PH: torch.Tensor, sin_PH: torch.Tensor,
                   interleaved: bool) -> torch.Tensor:
    """What :func:`rope_` computes, as a new tensor: the rotation in float32, rounded once to x's
    dtype; pairs ``(i, i + D/2)`` (GPT-NeoX) or, ``interleaved``, ``(2i, 2i + 1)`` (GPT-J)."""
    cos = cos_PH[positions_T].unsqueeze(1)  # [T, 1, D/2]
    sin = sin_PH[positions_T].unsqueeze(1)
    xf = x_THD.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf.chunk(2, dim=-1)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    out = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    return out.to(x_THD.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``F.silu(gate) * up`` for 2-D or 3-D tensors of one shape (unit stride over the last dim),
    as a new contiguous tensor; None when the kernel does not apply (then use the torch path)."""
    dtype = kernel_dtype(gate, up)
    if dtype is None or gate.shape != up.shape or gate.dim() not in (2, 3):
        return None
    g, u = (gate, up) if gate.dim() == 3 else (gate.unsqueeze(0), up.unsqueeze(0))
    out = torch.empty(g.shape, dtype=gate.dtype)
    o = out
    A, B, C = g.shape
    if g.stride(1) == u.stride(1) == C:  # [B, C] slabs contiguous: long rows (C may be tiny), 64 per slab
        rows = 64 if (B * C) % 64 == 0 and B * C >= 64 * 256 else 1  # (work for every thread)
        g, u, o = (t.view(A, rows, B * C // rows) for t in (g, u, out))
    load().moe_silu_mul(g.data_ptr(), u.data_ptr(), o.data_ptr(), dtype, *o.shape, g.stride(0), g.stride(1),
                        u.stride(0), u.stride(1), o.stride(0), o.stride(1), torch.get_num_threads())
    return out.view(gate.shape)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """What :func:`silu_mul` computes: torch's two roundings (silu, then the product)."""
    return F.silu(gate) * up


def _norm_rows(t: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``t [..., D]`` (unit stride within a row) as T x H rows: (T, H, stride over T, stride over
    H); None where its rows are not so laid out (more than three dims that do not merge)."""
    if t.stride(-1) != 1:
        return None
    if t.dim() == 3:
        return t.shape[0], t.shape[1], t.stride(0), t.stride(1)
    if t.dim() > 3:
        try:
            t = t.view(-1, t.shape[-1])
        except RuntimeError:
            return None
    return t.shape[0], 1, t.stride(0), 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor | None:
    """RMSNorm over the last dim of a bfloat16 ``x`` (rows of any stride, e.g. the heads of q in a
    wider qkv row as ``[T, H, D]``; unit stride within a row) the way the reference implementations
    treat low-precision activations: ``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)``,
    into ``out`` (x's shape, rows laid out likewise; ``x`` itself: in place) or a new tensor. None
    when the kernel does not apply (float32 keeps torch's fused ``rms_norm``)."""
    if x.dtype != torch.bfloat16 or x.dim() < 2:
        return None
    dtype = kernel_dtype(x, *([] if weight is None else [weight]))
    rows = _norm_rows(x)
    if dtype is None or rows is None:
        return None
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype)
    elif out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"rms_norm: out {tuple(out.shape)} {out.dtype} must be x's shape and dtype "
                         f"({tuple(x.shape)} {x.dtype})")
    orows = _norm_rows(out)
    if orows is None or orows[:2] != rows[:2]:
        return None
    T, H, sx_t, sx_h = rows
    w = weight.contiguous() if weight is not None else None
    load().moe_rms_norm_heads(x.data_ptr(), w.data_ptr() if w is not None else None, out.data_ptr(), dtype, T, H,
                              x.shape[-1], sx_t, sx_h, orows[2], orows[3], eps, torch.get_num_threads())
    return out


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """What :func:`rms_norm` computes (up to the order of the float32 sum of squares): statistics in
    float32, the normalized row rounded to x's dtype, then scaled in x's dtype."""
    y = F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return y if weight is None else weight * y


def rms_norm_lane_order_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """What :func:`rms_norm` computes, bit for bit, on every build (2-D bfloat16 ``x``): the sum of
    squares in the AVX-512 body's order (16 lane sums over the row's 16-element chunks, reduced
    halves, quarters, then pairs; the last ``D % 16`` squares added one by one), each float32 op
    rounded as C rounds it. Slow (a Python loop over chunks): for tests."""
    xf = x.float()
    R, D = xf.shape
    full = D - D % 16
    lanes = torch.zeros(R, 16)
    for c in range(0, full, 16):
        v = xf[:, c:c + 16]
        lanes = lanes + v * v
    s8 = lanes[:, 8:] + lanes[:, :8]
    s4 = s8[:, 4:] + s8[:, :4]
    ss = (s4[:, 0] + s4[:, 2]) + (s4[:, 1] + s4[:, 3])
    for i in range(full, D):
        ss = ss + xf[:, i] * xf[:, i]
    eps32 = torch.tensor(eps, dtype=torch.float32)
    inv = 1.0 / torch.sqrt(ss / float(D) + eps32)
    y = (xf * inv[:, None]).to(x.dtype)
    return y if weight is None else (y.float() * weight.float()).to(x.dtype)


def add_rms_norm(h: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``h + d`` (a residual add, rounded as torch's add) and :func:`rms_norm` of the sum, in one
    pass: ``(sum, normed)`` for contiguous bfloat16 ``[R, D]`` tensors, or None when the kernel does
    not apply (then add and norm with torch)."""
    if h.dtype != torch.bfloat16 or h.dim() != 2 or d.shape != h.shape or not (h.is_contiguous() and d.is_contiguous()):
        return None
    if kernel_dtype(h, d, weight) is None or not weight.is_contiguous() or weight.shape != (h.shape[1],):
        return None
    s, out = torch.empty_like(h), torch.empty_like(h)
    load().moe_add_rms_norm(h.data_ptr(), d.data_ptr(), weight.data_ptr(), s.data_ptr(), out.data_ptr(),
                            DTYPES[h.dtype], h.shape[0], h.shape[1], eps, torch.get_num_threads())
    return s, out


def write_rows(cache: torch.Tensor, x_THD: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """``cache.view(slots, H, D)[slot_mapping] = x_THD`` for a plain CPU cache ``[blocks,
    block_size, H, D]`` (unit stride within a head) and ``x`` of the cache's dtype with any
    strides. False, writing nothing, when the kernel does not apply (then use ``index_copy_``)."""
    if x_THD.dim() != 3 or x_THD.shape[1:] != cache.shape[2:] or cache.stride(0) != cache.shape[1] * cache.stride(1):
        return False
    dtype = kernel_dtype(cache, x_THD) if x_THD.stride(-1) == 1 else kernel_dtype(cache)
    if dtype is None or x_THD.dtype != cache.dtype:
        return False
    slots = slot_mapping.to(torch.int64).contiguous()
    T, H, D = x_THD.shape
    load().moe_write_rows(x_THD.data_ptr(), cache.data_ptr(), dtype, T, H, D, *x_THD.stride(), slots.data_ptr(),
                          cache.stride(1), cache.stride(2), torch.get_num_threads())
    return True


def write_rows_reference(cache: torch.Tensor, x_THD: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """What :func:`write_rows` does, for any cache dtype: ``index_copy_`` over the cache's slots."""
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, x_THD.to(cache.dtype))


def transpose_to_float(x_NM: torch.Tensor) -> torch.Tensor | None:
    """``x_NM.t().float().contiguous()`` in one pass for a 2-D CPU float32/bfloat16 tensor with unit
    stride over its columns (a GEMM's ``W @ h.T`` output); None when the kernel does not apply."""
    if x_NM.dim() != 2 or kernel_dtype(x_NM) is None:
        return None
    N, M = x_NM.shape
    out = torch.empty(M, N, dtype=torch.float32)
    load().moe_transpose_to_f32(x_NM.data_ptr(), DTYPES[x_NM.dtype], N, M, x_NM.stride(0), out.data_ptr(),
                                torch.get_num_threads())
    return out


_SCORING = {"softmax": 1, "sigmoid": 2, "topk_softmax": 3}  # (3: the top k of the logits, softmax over them)
RouteSelection = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]  # weights, ids, scores, tied


def _route_args(scoring: str, top_k: int, E: int, num_groups: int, topk_groups: int) -> bool:
    return (scoring in _SCORING and E % num_groups == 0 and 1 <= top_k <= E and 1 <= topk_groups <= num_groups
            and load() is not None)


def route_select(logits_TE: torch.Tensor, scoring: str, top_k: int, bias_E: torch.Tensor | None = None,
                 num_groups: int = 1, topk_groups: int = 1, group_top2: bool = True, renormalize: bool = False,
                 eps: float = 0.0, scale: float = 1.0) -> RouteSelection | None:
    """:func:`routing.route` from float32 ``logits [T, E]`` in one pass (``scoring`` "topk_softmax":
    the ``top_k`` best logits, then a softmax over them, scaled; ``scores`` the logits): scores =
    softmax or sigmoid (float32, libm's ``expf``; within an ulp or two of torch's), selection = scores (+ bias),
    group-limited when ``num_groups`` > 1, the ``top_k`` best in descending order, their unbiased
    scores renormalized (``w / (sum + eps)``) and scaled; of equal values the lower index first
    (:func:`routing.top_k_ids`' order). Returns ``(weights [T, K] float32, ids [T, K] int64,
    scores [T, E], tied)``: ``tied`` is None, or the indices of the tokens with a NaN selection,
    left for the caller to select with torch from ``scores``; None when the kernel does not apply."""
    if logits_TE.dtype != torch.float32 or logits_TE.dim() != 2 or logits_TE.is_cuda:
        return None
    T, E = logits_TE.shape
    if not _route_args(scoring, top_k, E, num_groups, topk_groups):
        return None
    lg = logits_TE.contiguous()
    b = bias_E.float().contiguous() if bias_E is not None else None
    s = torch.empty(T, E, dtype=torch.float32)
    w = torch.empty(T, top_k, dtype=torch.float32)
    ids = torch.empty(T, top_k, dtype=torch.int64)
    ties = torch.empty(T, dtype=torch.uint8)
    n = load().moe_route_select(lg.data_ptr(), _SCORING[scoring], b.data_ptr() if b is not None else None, T, E,
                                top_k, num_groups, topk_groups, int(group_top2), int(renormalize), eps, scale,
                                s.data_ptr(), w.data_ptr(), ids.data_ptr(), ties.data_ptr(), torch.get_num_threads())
    return w, ids, s, (ties.nonzero().flatten() if n else None)


class RouteToken:
    """A router's gate projection + :func:`route_select` for the rows of one sequence (a batch-1
    step: one row, or a verify step's few) in one C call, its weights and settings checked once
    (the captured step): ``plan(x_TD)`` returns ``(weights [T, K], ids [T, K])`` as
    ``route_select(gate(x).float(), ...)`` returns them row by row (the gate through :func:`gemv`,
    ops.linear's path at one row), or None when a row's selection has a NaN (the caller routes
    the rows the op way) or T > :attr:`MAX_ROWS`. The results live in the plan's own tensors: read
    them before the plan's next call. :meth:`make` gives None where the kernel does not apply (a
    gate that is not a bf16 CPU tensor with unit-stride rows, other scorings)."""

    MAX_ROWS = 24  # (a captured step's rows: moe.cpu_decode.CapturedDecode)

    def __init__(self, gate_ED: torch.Tensor, gate_bias_E: torch.Tensor | None, scoring: str, top_k: int,
                 bias_E: torch.Tensor | None, num_groups: int, topk_groups: int, group_top2: bool,
                 renormalize: bool, eps: float, scale: float):
        E, D = gate_ED.shape
        self.gate, self.gate_bias = gate_ED, gate_bias_E
        self.bias = bias_E.float().contiguous() if bias_E is not None else None
        n = self.MAX_ROWS
        self.scores, self.weights = torch.empty(n, E), torch.empty(n, top_k)
        self.ids = torch.empty(n, top_k, dtype=torch.int64)
        self.one = (self.weights[:1], self.ids[:1])  # a batch-1 step's results, as views made once
        self.D = D
        self.c = RoutePlanC(D, gate_ED.stride(0), _SCORING[scoring], E, top_k, num_groups, topk_groups, int(group_top2),
                            int(renormalize), address(gate_ED), address(gate_bias_E), address(self.bias), eps, scale,
                            address(self.scores), address(self.weights), address(self.ids))
        self.ref = address(self.c)  # what the C calls take (moe_decode_step too)

    @classmethod
    def make(cls, gate_ED: torch.Tensor, gate_bias_E: torch.Tensor | None, scoring: str, top_k: int,
             bias_E: torch.Tensor | None = None, num_groups: int = 1, topk_groups: int = 1, group_top2: bool = True,
             renormalize: bool = False, eps: float = 0.0, scale: float = 1.0) -> RouteToken | None:
        if not isinstance(gate_ED, torch.Tensor) or gate_ED.dtype != torch.bfloat16 or gate_ED.dim() != 2:
            return None
        if kernel_dtype(gate_ED, *([] if gate_bias_E is None else [gate_bias_E])) is None:
            return None
        if gate_bias_E is not None and (gate_bias_E.dtype != torch.bfloat16 or gate_bias_E.shape != gate_ED.shape[:1]):
            return None
        if not _route_args(scoring, top_k, gate_ED.shape[0], num_groups, topk_groups):
            return None
        return cls(gate_ED, gate_bias_E, scoring, top_k, bias_E, num_groups, topk_groups, group_top2, renormalize,
                   eps, scale)

    def __call__(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        T = x_TD.shape[0]
        if (x_TD.dtype != torch.bfloat16 or x_TD.shape[1:] != (self.D,) or not 0 < T <= self.MAX_ROWS
                or not x_TD.is_contiguous()):
            return None
        if load().moe_route_token(self.ref, x_TD.data_ptr(), T, torch.get_num_threads()):
            return None
        return self.one if T == 1 else (self.weights[:T], self.ids[:T])


def argmax_rows(x_RV: torch.Tensor) -> list[int] | None:
    """Per row of a float32 CPU ``x [R, V]`` (unit stride within rows): the index of its first NaN,
    else of its first largest value, as ``x.max(dim=-1).indices.tolist()`` gives them (the greedy
    choice), in one C pass; None when the kernel does not apply."""
    if x_RV.dtype != torch.float32 or x_RV.dim() != 2 or x_RV.is_cuda or x_RV.stride(-1) != 1 or load() is None:
        return None
    R, V = x_RV.shape
    if not R or not V:
        return None
    out = (ctypes.c_int64 * R)()
    load().moe_argmax_rows(x_RV.data_ptr(), R, V, x_RV.stride(0), out)
    return list(out)
