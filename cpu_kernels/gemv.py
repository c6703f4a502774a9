"""Binding of ``gemv.c``: bf16 matrix-vector products (batch-1 decode): AVX512-BF16 dot products,
AVX2 + FMA or plain C, whichever the compiler targets.

:func:`gemv` (one row through a weight, streamed by both threads in contiguous halves),
:func:`expert_token` and :func:`moe_token` (one token through its routed experts, and a shared
expert, in one call; :class:`MoeToken` also several rows at once, each expert read once for the
rows that chose it, each row as its one-row call), :func:`heads_vec` (MLA's per-head GEMMs at one
row). The one-call kernels can end with the decoder's residual add and next norm (:data:`Residual`).
"""
from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

from .build import address, c_struct, declare, kernel_dtype, load

_i64, _ptr, _int, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
declare({
    "moe_gemv_bf16": [_ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr, _int],
    "moe_heads_vec": [_ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _int, _ptr, _i64, _int],
    "moe_expert_token": [_ptr, _i64, _i64, _int, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _int],
    # (plan, x, T, K, ids, weights, out, resid, norm weight, eps, h_out, threads)
    "moe_moe_token": [_ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _f32, _ptr, _int],
})
MoePlanC = c_struct("MoePlan", "D F E s13 s2 Fs rows: i64; w13 w2 sh13 sh2 shg sig h acc b13 b2: ptr; "
                               "sb13 sb2 act clamp: i64; alpha limit: f32")
PLAN_ROWS = 8  # the rows a one-call MoE plan's kernel takes at once (a verify step's: each expert read once)

def gemv_reference(w_NK: torch.Tensor, x_K: torch.Tensor, b_N: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`gemv` computes (up to the order of float32 sums): torch's ``mv`` (+ ``b``)."""
    y = torch.mv(w_NK, x_K)
    return y + b_N if b_N is not None else y


def gemv(w_NK: torch.Tensor, x_K: torch.Tensor, b_N: torch.Tensor | None = None) -> torch.Tensor | None:
    """``torch.mv(w, x) (+ b)`` for bfloat16 CPU tensors (rows of ``w`` with unit stride), summed
    in float32 and rounded once, as torch's mv; None when the kernel does not apply (other dtypes,
    shapes): then use ``torch.mv``."""
    if w_NK.dtype != torch.bfloat16 or w_NK.dim() != 2 or x_K.dim() != 1:
        return None
    if kernel_dtype(w_NK, x_K, *([] if b_N is None else [b_N])) is None or x_K.shape[0] != w_NK.shape[1]:
        return None
    N, K = w_NK.shape  # x and b have unit stride (checked): no copies
    y = torch.empty(N, dtype=torch.bfloat16)
    load().moe_gemv_bf16(w_NK.data_ptr(), N, K, w_NK.stride(0), x_K.data_ptr(),
                         b_N.data_ptr() if b_N is not None else None, y.data_ptr(), torch.get_num_threads())
    return y


def expert_token(x_D: torch.Tensor, w13s: list[torch.Tensor], w2s: list[torch.Tensor],
                 weights: list[float]) -> torch.Tensor | None:
    """``sum_i weights[i] * (w2s[i] @ (silu(g) * u))`` with ``[g | u] = w13s[i] @ x`` for one bf16
    token, rounded step by step as :meth:`experts.GroupedExperts.forward_token` does op by op
    (bit-identical to it with :func:`gemv`); None when the kernel does not apply."""
    if x_D.dtype != torch.bfloat16 or kernel_dtype(x_D, *w13s, *w2s) is None:
        return None
    if any(not w.is_contiguous() for w in (*w13s, *w2s)):
        return None
    n, D, F = len(w13s), x_D.shape[0], w2s[0].shape[1]
    out = torch.empty(D, dtype=torch.bfloat16)
    h = torch.empty(3 * F, dtype=torch.bfloat16)
    acc = torch.empty(D, dtype=torch.float32)
    ptrs = ctypes.c_void_p * n
    load().moe_expert_token(x_D.data_ptr(), D, F, n, ptrs(*[w.data_ptr() for w in w13s]),
                            ptrs(*[w.data_ptr() for w in w2s]), (ctypes.c_float * n)(*weights), out.data_ptr(),
                            h.data_ptr(), acc.data_ptr(), torch.get_num_threads())
    return out


class MoeToken:
    """:func:`moe_token` with its stacked experts (and shared expert) checked once, as a captured
    batch-1 step calls it every layer and token: ``plan(x_TD, ids, weights, residual, into)`` checks
    only what changes per call. ``plan.ok`` is False where the kernel does not apply to these
    weights (then every call returns None)."""

    def __init__(self, w13_e2FD: torch.Tensor, w2_eDF: torch.Tensor,
                 shared: tuple[torch.Tensor, ...] | None = None, b13_e2F: torch.Tensor | None = None,
                 b2_eD: torch.Tensor | None = None, alpha: float | None = None, limit: float | None = None):
        self.shared, self.ok = shared, False
        ws = [w13_e2FD, w2_eDF]
        if w13_e2FD.dim() != 3 or kernel_dtype(*ws) is None or w13_e2FD.dtype != torch.bfloat16:
            return
        if any(not w.is_contiguous() for w in ws):
            return
        E, F2, D = w13_e2FD.shape
        F = F2 // 2
        sa = shared_args(shared, D, alpha is not None)
        extras = expert_extras(b13_e2F, b2_eD, alpha, limit, E, F, D)
        if w2_eDF.shape != (E, D, F) or sa is None or extras is None:
            return
        self.D, (Fs, sh) = D, sa
        # the call's scratch (bf16 activations, float sums) for PLAN_ROWS rows, reused by every call
        R = PLAN_ROWS
        h, acc = torch.empty(R * (3 * max(F, Fs) + D), dtype=torch.bfloat16), torch.empty(R * D, dtype=torch.float32)
        # the pointers below stay valid while the plan lives
        self._keep = (w13_e2FD, w2_eDF, shared, h, acc, b13_e2F, b2_eD)
        self.c = MoePlanC(D, F, E, w13_e2FD.stride(0), w2_eDF.stride(0), Fs, R, address(w13_e2FD), address(w2_eDF),
                          *sh, address(h), address(acc), *extras)
        self.ref = address(self.c)  # what the C calls take (moe_decode_step too)
        self.ok = True

    def __call__(self, x_TD: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 residual: Residual | None = None, into: Outputs | None = None):
        T = x_TD.shape[0]
        if (not self.ok or x_TD.dtype != torch.bfloat16 or x_TD.shape[1:] != (self.D,) or not x_TD.is_contiguous()
                or x_TD.is_cuda):
            return None
        args = moe_token_args(ids, weights, self.D, residual, into, T)
        if args is None:
            return None
        ids, wts, tail = args
        out = output(into, self.D, T)
        rc = load().moe_moe_token(self.ref, x_TD.data_ptr(), T, ids.shape[-1], ids.data_ptr(), wts.data_ptr(),
                                  out.data_ptr(), *tail[0], torch.get_num_threads())
        if rc != 0:  # an id outside [0, E)
            return None
        return (tail[1], out) if residual is not None else out


def moe_token(x_1D: torch.Tensor, ids_K: torch.Tensor, weights_K: torch.Tensor, w13_e2FD: torch.Tensor,
              w2_eDF: torch.Tensor, shared: tuple[torch.Tensor, ...] | None = None,
              residual: Residual | None = None, into: Outputs | None = None):
    """One bf16 token through experts ``ids_K`` of the stacked weights, summed with ``weights_K`` as
    :meth:`experts.GroupedExperts.forward_token` does (ascending ids, weights rounded to bf16), plus
    the output of a ``shared`` SwiGLU expert ``(w13 [2Fs, D], w2 [D, Fs])`` added in bf16; one call
    (:func:`expert_token`'s kernel). ``[1, D]`` (with ``residual``: ``(h + y, norm(h + y))``, see
    :func:`residual_args`; written to ``into`` when given), or None when the kernel does not apply.
    ``x [T, D]`` with ``ids`` / ``weights [T, K]``: T rows (a verify step's), each as its one-row call
    computes it, each expert read once for the rows that chose it.
    (:class:`MoeToken` checks the weights once for repeated calls.)"""
    if x_1D.dtype != torch.bfloat16 or x_1D.dim() != 2:
        return None
    return MoeToken(w13_e2FD, w2_eDF, shared)(x_1D, ids_K, weights_K, residual, into)


def heads_vec(x_1HK: torch.Tensor, w_H: torch.Tensor, w_rows_n: bool) -> torch.Tensor | None:
    """:func:`amx_heads` for one row (batch-1 decode) as a GEMV per head: ``[1, H, N]``
    bf16, float32 sums rounded once (their order is not ``bmm``'s: results may differ by one bf16
    ulp). ``w_H [H, K, N]`` (not ``w_rows_n``) needs ``N % 16 == 0``. None when the kernel does not
    apply (then :func:`amx_heads` or ``einsum``)."""
    if x_1HK.dtype != torch.bfloat16 or x_1HK.dim() != 3 or x_1HK.shape[0] != 1 or w_H.dim() != 3:
        return None
    _, H, K = x_1HK.shape
    N = w_H.shape[1] if w_rows_n else w_H.shape[2]
    if w_H.shape[0] != H or w_H.shape[2 if w_rows_n else 1] != K or (not w_rows_n and N % 16):
        return None
    if kernel_dtype(x_1HK, w_H) is None:
        return None
    y = torch.empty(1, H, N, dtype=torch.bfloat16)
    load().moe_heads_vec(x_1HK.data_ptr(), x_1HK.stride(1), w_H.data_ptr(), w_H.stride(0), w_H.stride(1),
                         N, K, H, int(w_rows_n), y.data_ptr(), N, torch.get_num_threads())
    return y


Residual = tuple[torch.Tensor, torch.Tensor, float]  # (h [1, D], norm weight [D], eps): see residual_args


class Outputs(NamedTuple):
    """Where a one-call layer writes its results instead of new tensors: ``h`` (``h + y`` with a
    residual) and ``y``, both ``[1, D]`` bf16 contiguous. The captured batch-1 step gives each
    half-layer its own pair, made once (:meth:`DecodeStep.outputs`): after a weight stream every
    torch op runs with cold caches (~10 us for an empty tensor), so a step's allocations cost more
    than their arithmetic."""

    h: torch.Tensor
    y: torch.Tensor


def output(into: Outputs | None, D: int, T: int = 1) -> torch.Tensor:
    """The ``[T, D]`` bf16 result tensor of a one-call layer: ``into.y`` (one row), or a new one."""
    return into.y if into is not None and T == 1 else torch.empty(T, D, dtype=torch.bfloat16)


def residual_args(residual: Residual | None, D: int, into: Outputs | None = None,
                  T: int = 1) -> tuple[list, torch.Tensor | None] | None:
    """The C calls' residual tail: with ``(h, w, eps)`` (``h`` [T, D]) they also return ``h + out``
    (in ``into.h`` when given, at one row) and write ``rms_norm(h + out, w, eps)`` over ``out`` (the
    decoder's add and next norm, bit-identical). ``([resid, nw, eps, h_out], h_out)``, ``([None] *
    4, None)`` without one, or None when it does not fit (then the caller takes its op-by-op path)."""
    if residual is None:
        return [None, None, 0.0, None], None
    h, w, eps = residual
    if (h.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or h.shape != (T, D) or w.shape != (D,)
            or not h.is_contiguous() or not w.is_contiguous() or h.is_cuda or w.is_cuda):
        return None
    h_out = into.h if into is not None and T == 1 else torch.empty(T, D, dtype=torch.bfloat16)
    return [h.data_ptr(), w.data_ptr(), eps, h_out.data_ptr()], h_out


_SIGMOID: list[torch.Tensor] = []


def sigmoid_table() -> torch.Tensor:
    """``torch.sigmoid`` of every bf16 bit pattern (65536 bf16, indexed by the input's bits): the
    gated shared expert's sigmoid as the op path rounds it. (torch computes a lone element as it
    computes a vector's: the same for every finite input, checked in tests/test_cpu_kernels.py.) One
    zero follows the table in memory (the tile kernels' gathers load two bf16 at a time)."""
    if not _SIGMOID:
        bits = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
        table = torch.zeros((1 << 16) + 1, dtype=torch.bfloat16)
        table[:1 << 16] = torch.sigmoid(bits.view(torch.bfloat16))
        _SIGMOID.append(table[:1 << 16])
    return _SIGMOID[0]


def shared_args(shared: tuple[torch.Tensor, ...] | None, D: int, sigmoid: bool = False) -> tuple[int, list] | None:
    """A bf16 shared expert ``(w13 [2Fs, D], w2 [D, Fs])``, or a gated one ``(w13, w2, gate [1, D])``
    (its output times ``sigmoid(gate . x)``, Qwen2-MoE's), as the one-token MoE calls take it:
    ``(Fs, [w13, w2, gate, sigmoid table pointers])``, ``(0, [None] * 4)`` without one, None when it
    does not fit. The table (:func:`sigmoid_table`) is there for a gated one, or with ``sigmoid``
    (the routed experts' clamped SwiGLU reads it too)."""
    table = sigmoid_table().data_ptr() if sigmoid or (shared is not None and len(shared) > 2) else None
    if shared is None:
        return 0, [None, None, None, table]
    Fs = shared[1].shape[1]
    if (kernel_dtype(*shared) is None or any(not t.is_contiguous() for t in shared)
            or shared[0].shape != (2 * Fs, D) or shared[1].shape != (D, Fs)
            or (len(shared) > 2 and shared[2].shape != (1, D))):
        return None
    return Fs, [shared[0].data_ptr(), shared[1].data_ptr(), shared[2].data_ptr() if len(shared) > 2 else None, table]


def expert_extras(b13_e2F: torch.Tensor | None, b2_eD: torch.Tensor | None, alpha: float | None, limit: float | None,
                  E: int, F: int, D: int) -> list | None:
    """The one-call MoE plans' fields for experts with biases (bf16 ``[E, 2F]`` / ``[E, D]``) and
    gpt-oss's clamped SwiGLU (``alpha``, ``limit``): ``[b13, b2, their row strides, act, clamp,
    alpha, limit]`` (the C structs' ``ExpertExtras`` fields); None where they do not fit."""
    if limit is not None and alpha is None:
        return None
    for b, shape in ((b13_e2F, (E, 2 * F)), (b2_eD, (E, D))):
        if b is not None and (b.dtype != torch.bfloat16 or b.shape != shape or not b.is_contiguous() or b.is_cuda):
            return None
    return [address(b13_e2F), address(b2_eD), 0 if b13_e2F is None else b13_e2F.stride(0),
            0 if b2_eD is None else b2_eD.stride(0), int(alpha is not None), int(limit is not None),
            float(alpha or 0.0), float(limit or 0.0)]


def moe_token_args(ids_K: torch.Tensor, weights_K: torch.Tensor, D: int, residual: Residual | None,
                   into: Outputs | None = None, T: int = 1) -> tuple | None:
    """What both one-token MoE plans take per call besides x: ``(ids int64, weights float32, the
    residual tail)``, or None when one does not fit. ``ids`` / ``weights``: ``[K]`` for one row,
    ``[T, K]`` for T (K <= 64)."""
    if (ids_K.shape != weights_K.shape or not 0 < ids_K.shape[-1] <= 64
            or ids_K.shape[:-1] not in ((), (T,)) or (ids_K.dim() == 1 and T != 1)):
        return None
    tail = residual_args(residual, D, into, T)
    if tail is None:
        return None
    return int64_vector(ids_K), float32_vector(weights_K), tail


def int64_vector(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous int64 tensor (itself when it is one: no torch op)."""
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


def float32_vector(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous float32 tensor (itself when it is one: no torch op)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()
