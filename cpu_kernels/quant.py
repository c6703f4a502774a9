"""Binding of ``quant.c``: GEMMs and dequantization straight from packed 8- and 4-bit weight codes.

:func:`q8_gemm` / :func:`q4_gemm` stream the codes for up to :data:`Q8_GEMM_MAX_ROWS` rows,
converting them in registers; :func:`q8_dequant` / :func:`q4_dequant` give the weight in bf16 or
float32 for larger GEMMs (and are the GEMMs' references: ``x @ dequant(w).T`` up to the order of
float32 sums); :func:`quant_moe_token` runs one token through its packed experts in one call.
"""
from __future__ import annotations

import ctypes

import torch

from .build import DTYPES, address, c_struct, declare, load
from .gemv import PLAN_ROWS, Outputs, Residual, expert_extras, moe_token_args, output, shared_args

_i64, _ptr, _int, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
declare({
    "moe_q8_gemm": [_ptr, _i64, _i64, _ptr, _i64, _int, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _int, _int],
    "moe_q8_dequant": [_ptr, _i64, _int, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _int, _int],
    "moe_q4_gemm": [_ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _int, _int],
    "moe_q4x8_gemm": [_ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _ptr, _int, _int],
    "moe_q4_dequant": [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _int, _int],
    # (plan, x, T, K, ids, weights, out, resid, norm weight, eps, h_out, threads)
    "moe_qx_moe_token": [_ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _f32, _ptr, _int],
})
QxMoePlanC = c_struct("QxMoePlan", "D F E fmt gs bn eq13 es13 G13 eq2 es2 G2 Fs rows: i64; "
                                   "lut q13 s13 b13 q2 s2 b2 sh13 sh2 shg sig fscratch hscratch eb13 eb2: ptr; "
                                   "sb13 sb2 act clamp: i64; alpha limit: f32")

Q_INT8, Q_FP8 = 0, 1  # 8-bit weight codes: int8, or fp8 e4m3 bits (value * 2^-8; see quant.c)
Q_INT4_X8 = 2  # 4-bit int codes with x rounded to 8 bits per 32 columns (q4x8_gemm; quant_moe_token's fmt)
Q8_GEMM_MAX_ROWS = 64  # rows q8_gemm / q4_gemm take (eight at a time against each weight row)


def q8_available() -> bool:
    """Whether :func:`q8_gemm` and :func:`q8_dequant` run here (the library is built)."""
    return load() is not None


def _q8_args(q_NK: torch.Tensor, s_BG: torch.Tensor, b_BG: torch.Tensor | None, gs: int, bn: int) -> tuple:
    N, K = q_NK.shape
    G = s_BG.shape[-1]
    if (q_NK.dtype != torch.int8 or q_NK.stride(-1) != 1 or s_BG.dtype != torch.float32 or not s_BG.is_contiguous()
            or s_BG.shape != (-(-N // bn), G) or G != -(-K // gs) or (b_BG is not None and (
                b_BG.shape != s_BG.shape or b_BG.dtype != torch.float32 or not b_BG.is_contiguous()))):
        raise ValueError(f"8-bit weight layout: codes {tuple(q_NK.shape)} {q_NK.dtype}, scales {tuple(s_BG.shape)} "
                         f"{s_BG.dtype}, group {gs}, row block {bn}")
    return (q_NK.data_ptr(), q_NK.stride(0), s_BG.data_ptr(), b_BG.data_ptr() if b_BG is not None else None, G, gs, bn)


def q8_gemm(x_MK: torch.Tensor, q_NK: torch.Tensor, fmt: int, s_BG: torch.Tensor, b_BG: torch.Tensor | None,
            gs: int, bn: int) -> torch.Tensor:
    """``x @ w.T`` for up to :data:`Q8_GEMM_MAX_ROWS` rows and 8-bit codes ``q`` (``fmt``:
    :data:`Q_INT8` / :data:`Q_FP8`) with ``w[n, k] = s[n // bn, k // gs] * q[n, k] (+ b[...])``,
    float32 sums, ``[M, N]`` in x's dtype (float32 or bfloat16). Check :func:`q8_available` first."""
    _check_rows("q8_gemm", x_MK, q_NK.shape[1])
    args = _q8_args(q_NK, s_BG, b_BG, gs, bn)
    return _gemm("moe_q8_gemm", x_MK, q_NK.shape[0], (*args[:2], fmt, *args[2:]))


def q8_dequant(q_NK: torch.Tensor, fmt: int, s_BG: torch.Tensor, b_BG: torch.Tensor | None, gs: int, bn: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The weight ``w [N, K]`` of :func:`q8_gemm` in ``dtype`` (float32 or bfloat16), rounded once."""
    args = _q8_args(q_NK, s_BG, b_BG, gs, bn)
    N, K = q_NK.shape
    w = torch.empty(N, K, dtype=dtype)
    load().moe_q8_dequant(args[0], args[1], fmt, *args[2:], N, K, w.data_ptr(), DTYPES[dtype], torch.get_num_threads())
    return w


def _q4_args(q_NK2: torch.Tensor, lut: torch.Tensor, s_NG: torch.Tensor, b_NG: torch.Tensor | None, gs: int) -> tuple:
    N, K2 = q_NK2.shape
    G = s_NG.shape[-1]
    if (q_NK2.dtype != torch.uint8 or q_NK2.stride(-1) != 1 or lut.shape != (16,) or lut.dtype != torch.float32
            or not lut.is_contiguous() or s_NG.dtype != torch.float32 or not s_NG.is_contiguous()
            or s_NG.shape != (N, G) or G != -(-2 * K2 // gs) or (b_NG is not None and (
                b_NG.shape != s_NG.shape or b_NG.dtype != torch.float32 or not b_NG.is_contiguous()))):
        raise ValueError(f"4-bit weight layout: codes {tuple(q_NK2.shape)} {q_NK2.dtype}, scales {tuple(s_NG.shape)} "
                         f"{s_NG.dtype}, group {gs}")
    return q_NK2.data_ptr(), q_NK2.stride(0), lut.data_ptr(), s_NG.data_ptr(), \
        b_NG.data_ptr() if b_NG is not None else None, G, gs


def q4_gemm(x_MK: torch.Tensor, q_NK2: torch.Tensor, lut: torch.Tensor, s_NG: torch.Tensor, b_NG: torch.Tensor | None,
            gs: int) -> torch.Tensor:
    """:func:`q8_gemm` for 4-bit codes, two per byte (``q [N, K/2]`` uint8, the low nibble the even
    column): ``w[n, k] = s[n, k // gs] * lut[code] (+ b[n, k // gs])``, ``lut`` the 16 code values
    (int4: 0..15 with offsets ``-zero * scale``; MXFP4: the FP4 e2m1 values)."""
    _check_rows("q4_gemm", x_MK, q_NK2.shape[1] * 2)
    return _gemm("moe_q4_gemm", x_MK, q_NK2.shape[0], _q4_args(q_NK2, lut, s_NG, b_NG, gs))


def q4x8_gemm(x_MK: torch.Tensor, q_NK2: torch.Tensor, s_NG: torch.Tensor, b_NG: torch.Tensor | None,
              gs: int) -> torch.Tensor:
    """:func:`q4_gemm` for int4 codes (values 0..15, offsets ``-zero * scale``) with x rounded to 8
    bits first: per row and block of 32 columns ``xq = round(x * 127 / a)``, ``a = max |x|`` over the
    block, and ``y = (xq * a / 127) @ w.T`` -- integer products of codes and ``xq``, as llama.cpp's
    4-bit formats compute (:func:`round_x8` is the rounding in torch). K a multiple of 32, ``gs``
    32, 64 or 128."""
    K = q_NK2.shape[1] * 2
    _check_rows("q4x8_gemm", x_MK, K)
    if K % 32 or gs not in (32, 64, 128):
        raise ValueError(f"q4x8_gemm takes K a multiple of 32 and groups of 32, 64 or 128 columns, got K={K}, "
                         f"group {gs}")
    q, ldq, _, s, b, G, gs = _q4_args(q_NK2, _INT4_LUT, s_NG, b_NG, gs)
    return _gemm("moe_q4x8_gemm", x_MK, q_NK2.shape[0], (q, ldq, s, b, G, gs))


_INT4_LUT = torch.arange(16, dtype=torch.float32)


def round_x8(x_MK: torch.Tensor) -> torch.Tensor:
    """x as :func:`q4x8_gemm` rounds it (float32): per block of 32 columns ``round(x * 127 / a) * a / 127``."""
    xb = x_MK.float().unflatten(-1, (-1, 32))
    a = xb.abs().amax(-1, keepdim=True)
    xq = torch.round(xb * torch.where(a > 0, 127 / a, torch.zeros_like(a)))
    return (xq * (a / 127)).flatten(-2)


def _check_rows(kernel: str, x_MK: torch.Tensor, K: int) -> None:
    M, K_x = x_MK.shape
    if not 0 < M <= Q8_GEMM_MAX_ROWS or K_x != K or x_MK.dtype not in DTYPES:
        raise ValueError(f"{kernel} takes 1-{Q8_GEMM_MAX_ROWS} float32/bfloat16 rows of {K}, "
                         f"got {tuple(x_MK.shape)} {x_MK.dtype}")


def _gemm(fn: str, x_MK: torch.Tensor, N: int, weight_args: tuple) -> torch.Tensor:
    """Run the packed GEMM ``fn`` on x (as float32) into ``[M, N]`` of x's dtype."""
    x = x_MK.float().contiguous()
    y = torch.empty(x.shape[0], N, dtype=x_MK.dtype)
    if getattr(load(), fn)(x.data_ptr(), *x.shape, *weight_args, N, y.data_ptr(), DTYPES[x_MK.dtype],
                           torch.get_num_threads()) != 0:
        raise MemoryError(f"{fn[4:]}: no memory for its scratch")
    return y


def q4_dequant(q_NK2: torch.Tensor, lut: torch.Tensor, s_NG: torch.Tensor, b_NG: torch.Tensor | None, gs: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The weight ``w [N, K]`` of :func:`q4_gemm` in ``dtype`` (float32 or bfloat16)."""
    args = _q4_args(q_NK2, lut, s_NG, b_NG, gs)
    N, K = q_NK2.shape[0], q_NK2.shape[1] * 2
    w = torch.empty(N, K, dtype=dtype)
    load().moe_q4_dequant(*args, N, K, w.data_ptr(), DTYPES[dtype], torch.get_num_threads())
    return w


def packed_dims(w13: tuple, w2: tuple, lut: torch.Tensor | None, gs: int, bn: int) -> tuple[int, int, int] | None:
    """``(E, D, F)`` of packed experts ``w13``/``w2`` (``(codes, scales, offsets)`` each, stacked
    over experts) when both are contiguous and each expert's slice is the 8-bit (``lut`` None) or
    4-bit kernels' layout (that check raises on a malformed layout), else None."""
    pack = 2 if lut is not None else 1
    E, F2, D = w13[0].shape[0], w13[0].shape[1], w13[0].shape[2] * pack
    F = F2 // 2
    if w2[0].shape != (E, D, F // pack):
        return None
    for q, sc, off in (w13, w2):
        if not q.is_contiguous() or not sc.is_contiguous() or (off is not None and not off.is_contiguous()):
            return None
        if lut is None:
            _q8_args(q[0], sc[0], None if off is None else off[0], gs, bn)
        else:
            _q4_args(q[0], lut, sc[0], None if off is None else off[0], gs)
    return E, D, F


class QuantMoeToken:
    """:func:`quant_moe_token` with its experts (and shared expert) checked once, as a captured
    batch-1 step calls it every layer and token: ``plan(x_1D, ids_K, weights_K, residual, into)``
    checks only what changes per call (``into``: :class:`Outputs` to write to; ``x [T, D]`` with
    ``ids`` / ``weights [T, K]``: T rows, each as one, each expert's rows back to back so that its
    codes come from memory once). ``plan.ok`` is False where the kernel does not apply to these
    weights (then every call returns None)."""

    def __init__(self, fmt: int, lut: torch.Tensor | None, gs: int, bn: int,
                 w13: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                 w2: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                 shared: tuple[torch.Tensor, ...] | None = None, b13_e2F: torch.Tensor | None = None,
                 b2_eD: torch.Tensor | None = None, alpha: float | None = None, limit: float | None = None):
        self.shared, self.ok = shared, False
        self.D = self.F = self.Fs = 0
        dims = packed_dims(w13, w2, lut, gs, bn) if load() is not None else None
        if dims is None:
            return
        E, self.D, self.F = dims
        sa = shared_args(shared, self.D, alpha is not None)
        extras = expert_extras(b13_e2F, b2_eD, alpha, limit, E, self.F, self.D)  # (gpt-oss's biases, activation)
        if sa is None or extras is None:
            return
        self.Fs, sh = sa
        (q13, s13, b13), (q2, s2, b2) = w13, w2
        # the call's scratch (float sums of PLAN_ROWS rows, bf16 activations), reused by every call
        fs = torch.empty(2 * max(self.D, self.F) + PLAN_ROWS * self.D, dtype=torch.float32)
        hs = torch.empty(3 * max(self.F, self.Fs) + 2 * self.D, dtype=torch.bfloat16)
        # the pointers below stay valid while the plan lives
        self._keep = (w13, w2, shared, lut, fs, hs, b13_e2F, b2_eD)
        self.c = QxMoePlanC(self.D, self.F, E, fmt, gs, bn, q13.stride(0), s13.stride(0), s13.shape[-1], q2.stride(0),
                            s2.stride(0), s2.shape[-1], self.Fs, PLAN_ROWS, address(lut), address(q13), address(s13),
                            address(b13), address(q2), address(s2), address(b2), *sh, address(fs), address(hs),
                            *extras)
        self.ref = address(self.c)  # what the C calls take (moe_decode_step too)
        self.ok = True

    def __call__(self, x_1D: torch.Tensor, ids_K: torch.Tensor, weights_K: torch.Tensor,
                 residual: Residual | None = None, into: Outputs | None = None):
        D, T = self.D, x_1D.shape[0]
        if not self.ok or x_1D.dtype != torch.bfloat16 or x_1D.shape[1:] != (D,) or not x_1D.is_contiguous():
            return None
        args = moe_token_args(ids_K, weights_K, D, residual, into, T)
        if args is None:
            return None
        ids, wts, tail = args
        out = output(into, D, T)
        rc = load().moe_qx_moe_token(self.ref, x_1D.data_ptr(), T, ids.shape[-1], ids.data_ptr(), wts.data_ptr(),
                                     out.data_ptr(), *tail[0], torch.get_num_threads())
        if rc != 0:
            return None
        return (tail[1], out) if residual is not None else out


def quant_moe_token(x_1D: torch.Tensor, ids_K: torch.Tensor, weights_K: torch.Tensor, fmt: int,
                    lut: torch.Tensor | None, gs: int, bn: int,
                    w13: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                    w2: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                    shared: tuple[torch.Tensor, ...] | None = None, residual: Residual | None = None):
    """:func:`moe_token` on packed experts: ``w13``/``w2`` are ``(codes, scales, offsets or None)``
    stacked over experts, as :func:`q8_gemm` (``lut`` None; codes ``[E, N, K]`` int8) or
    :func:`q4_gemm` (codes ``[E, N, K/2]`` uint8) take them per expert. One C call with the
    roundings of dispatch -> experts (the GEMV, ``silu_mul``) -> combine. ``[1, D]`` bf16 (with
    ``residual``: ``(h + y, norm(h + y))``), or None when the kernel does not apply.
    (:class:`QuantMoeToken` checks the weights once for repeated calls.)"""
    if x_1D.dtype != torch.bfloat16 or x_1D.dim() != 2 or x_1D.shape[0] != 1 or not x_1D.is_contiguous():
        return None
    return QuantMoeToken(fmt, lut, gs, bn, w13, w2, shared)(x_1D, ids_K, weights_K, residual)
