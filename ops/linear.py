"""``x @ w.T (+ b)``: the one place that picks the GEMM for a projection, and the LM head's logits.

Decode-sized steps are memory-bound: what counts is streaming the weight once, and on CPU
oneDNN's per-shape kernel builds. The tiers of :func:`linear` on CPU, by row count ``m``:

- ``m == 1``: a matrix-vector product (bf16: :func:`cpu_kernels.gemv`, else ``torch.mv``);
- ``2 <= m <= 64``, bf16: :func:`cpu_kernels.amx_linear` where the CPU has AMX or AVX512-BF16;
- ``m >= 2``, bf16, a CPU without a fast bf16 GEMM (AVX2): :func:`cpu_kernels.grouped_gemm`;
- ``m <= SMALL_M``: ``w @ x.T`` (returned as a transposed view), rows padded to :func:`padded_rows`;
- more rows: ``F.linear`` on rows padded to :func:`padded_rows`.

Elsewhere (CUDA, other ranks of tensor) ``F.linear``. A :class:`PackedLinearWeight` (int4 codes)
(int4 / int8 codes) in place of ``w`` takes :func:`packed_linear`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import cpu_kernels
from cpu_kernels.build import DTYPES
from cpu_kernels.gemv import gemv_reference

SMALL_M = 128  # up to this many rows a CPU GEMM runs as ``w @ x.T`` (rows padded to a multiple of 8)
ROW_BUCKET = 64  # past SMALL_M, rows are padded to a multiple of this

# Without AVX512-BF16 oneDNN runs no bf16 GEMM and torch falls back to generic kernels, 3-6x slower
# than converting both operands to float32 on the fly (measured on a 2-core AVX2 EPYC, 5632 x 1024:
# 67 vs 26 ms at 64 rows, 550 vs 100 ms at 512). The float32 product is rounded to bf16 once, as a
# bf16 GEMM's float32 sums are.
BF16_GEMM_IN_FLOAT32 = not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` on CPU, bf16 operands in float32 where the CPU has no fast bf16 GEMM (see above)."""
    if BF16_GEMM_IN_FLOAT32 and a.dtype == torch.bfloat16 and a.device.type == "cpu":
        return torch.mm(a.float(), b.float()).to(torch.bfloat16)
    return torch.mm(a, b)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)``, bf16 operands on CPU in float32 where :func:`mm` does so."""
    if BF16_GEMM_IN_FLOAT32 and a.dtype == torch.bfloat16 and a.device.type == "cpu":
        return torch.bmm(a.float(), b.float()).to(torch.bfloat16)
    return torch.bmm(a, b)


def grouped_linear(x_RK: torch.Tensor, w_ENK: torch.Tensor, counts: list[int],
                   b_EN: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x[rows of e] @ w[e].T (+ b[e])`` over expert-major rows in one call, where the CPU has a
    native kernel for it and no fast bf16 GEMM (:func:`cpu_kernels.grouped_gemm`: bf16 on AVX2 +
    FMA); None elsewhere (the caller runs its per-expert GEMMs)."""
    if not (BF16_GEMM_IN_FLOAT32 and x_RK.dtype == torch.bfloat16 and x_RK.device.type == "cpu"):
        return None
    y = cpu_kernels.grouped_gemm(x_RK, w_ENK, counts)
    if y is not None and b_EN is not None:
        y += torch.repeat_interleave(b_EN, torch.as_tensor(counts), dim=0)
    return y


def padded_rows(m: int) -> int:
    """The row count a CPU GEMM of ``m`` rows runs with. oneDNN builds (JIT-compiles) a kernel for
    every new shape, ~5-14 ms each at these sizes, and its cache holds 1024 of them; prefill chunks
    and expert groups bring a new row count nearly every call. Rounding up to a multiple of 8
    (2-128 rows, memory-bound: the extra rows cost next to nothing) or of ``ROW_BUCKET`` (more
    rows, at most 63 extra) keeps the shapes few and their kernels cached."""
    if m <= 1:
        return m
    return -(-m // 8) * 8 if m <= SMALL_M else -(-m // ROW_BUCKET) * ROW_BUCKET


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x [m, ...]`` with zero rows appended up to ``rows``: always a new contiguous tensor."""
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


@dataclass(frozen=True)
class PackedLinearWeight:
    """An int4 or int8 weight ``w [N, K]`` as the C kernels read it: the checkpoint's row-major codes
    ``q`` (int4: two per byte, the low nibble the even column, ``[N, K/2]`` uint8; int8: ``[N, K]``
    int8) and float32 ``w[n, k] = s[n, g] * code + b[n, g]`` per group ``g = k // group_size``
    (int4: ``b = -zero * s``, the symmetric zero point 8; int8: asymmetric uint8 codes stored as
    ``code - 128`` with ``b = (128 - zero) * s``, symmetric ones with no ``b``). ``x8``: int4 with
    ``activations="int8"``, whose streamed rows meet the codes rounded to 8 bits
    (:func:`cpu_kernels.q4x8_gemm`)."""

    q: torch.Tensor
    s_NG: torch.Tensor
    b_NG: torch.Tensor | None
    group_size: int
    bits: int = 4
    x8: bool = False

    LUT = torch.arange(16, dtype=torch.float32)  # int4 codes are their own values
    # up to this many rows stream the codes (experts.quant_grouped.Q4RowWeights' / Q8RowWeights' crossover)
    STREAM_ROWS = {4: 8, 8: 12}

    @classmethod
    def from_packed(cls, fmt, packed) -> PackedLinearWeight:
        """From ``fmt.quantize``'s (or a checkpoint's) tensors of an ``Int4Weights`` / ``Int8Weights`` format."""
        if fmt.name not in ("int4", "int8"):
            raise ValueError(f"a packed linear weight is int4 or int8, not {fmt.name}")
        scales = packed["scales"].float().contiguous()
        if fmt.name == "int8":
            q = packed["qweight"]
            if fmt.symmetric:
                return cls(q.contiguous(), scales, None, fmt.group_size, 8)
            offsets = ((128 - packed["zeros"].float()) * scales).contiguous()
            return cls((q.to(torch.int16) - 128).to(torch.int8).contiguous(), scales, offsets, fmt.group_size, 8)
        zero = packed["zeros"].float() if not fmt.symmetric else torch.full_like(scales, 8.0)
        return cls(packed["qweight"].contiguous(), scales, (-zero * scales).contiguous(), fmt.group_size,
                   x8=fmt.activations == "int8")

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * 8 // self.bits

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.bits == 8:
            return cpu_kernels.q8_dequant(self.q, cpu_kernels.Q_INT8, self.s_NG, self.b_NG, self.group_size, 1, dtype)
        return cpu_kernels.q4_dequant(self.q, self.LUT, self.s_NG, self.b_NG, self.group_size, dtype)

    def kernel_args(self) -> tuple | None:
        """``(codes, lut or None (int8), scales, offsets or None, group size, x8)``: the arguments of
        the C kernels that :func:`packed_linear` streams one row through (``cpu_kernels.gqa_token``
        takes them), or None where it takes the torch reference instead."""
        if self.q.device.type != "cpu" or (self.bits == 4 and self.shape[1] % 32) or not cpu_kernels.q8_available():
            return None
        return self.q, self.LUT if self.bits == 4 else None, self.s_NG, self.b_NG, self.group_size, self.x8

    def codes(self) -> torch.Tensor:
        """The codes ``[N, K]`` as floats (the values ``s`` multiplies)."""
        if self.bits == 8:
            return self.q.float()
        return torch.stack([self.q & 0xF, self.q >> 4], dim=-1).flatten(-2).float()


def packed_linear_reference(x: torch.Tensor, w: PackedLinearWeight, b: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`packed_linear` computes, in torch: the float32 weight from the codes, ``F.linear``."""
    codes = w.codes()
    wf = codes * w.s_NG.repeat_interleave(w.group_size, dim=-1)[:, :codes.shape[1]]
    if w.b_NG is not None:
        wf = wf + w.b_NG.repeat_interleave(w.group_size, dim=-1)[:, :codes.shape[1]]
    y = F.linear(x.float(), wf, None if b is None else b.float())
    return y.to(x.dtype)


def packed_linear(x: torch.Tensor, w: PackedLinearWeight, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ b)`` for an int4 / int8 weight on CPU: up to ``STREAM_ROWS`` rows stream the
    codes through :func:`cpu_kernels.q4_gemm` / ``q8_gemm`` (the bytes read are the packed ones);
    more rows dequantize the weight once, in x's dtype, for :func:`linear`'s GEMM. Elsewhere (no C
    kernels, not CPU; int4 with K not a multiple of 32: the kernels read whole 16-byte rows of
    codes) the torch reference. Streamed rows of an ``x8`` weight are rounded to 8 bits first."""
    N, K = w.shape
    if (x.device.type != "cpu" or x.dim() != 2 or (w.bits == 4 and K % 32) or x.dtype not in DTYPES
            or not cpu_kernels.q8_available()):
        return packed_linear_reference(x, w, b)
    if x.shape[0] <= w.STREAM_ROWS[w.bits]:
        if w.bits == 8:
            y = cpu_kernels.q8_gemm(x, w.q, cpu_kernels.Q_INT8, w.s_NG, w.b_NG, w.group_size, 1)
        elif w.x8:
            y = cpu_kernels.q4x8_gemm(x, w.q, w.s_NG, w.b_NG, w.group_size)
        else:
            y = cpu_kernels.q4_gemm(x, w.q, w.LUT, w.s_NG, w.b_NG, w.group_size)
        return y + b if b is not None else y
    return linear(x, w.dequantize(x.dtype), b)


def linear(x: torch.Tensor, w: torch.Tensor | PackedLinearWeight, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with CPU shortcuts (see the module's tiers). All stream the weight once and, on
    the CPUs measured (oneDNN bf16), run 1.3-1.7x faster than ``F.linear`` at these shapes."""
    if isinstance(w, PackedLinearWeight):
        return packed_linear(x, w, b)
    if x.device.type == "cpu" and x.dim() == 2:
        m = x.shape[0]
        if 1 < m <= cpu_kernels.AMX_MAX_ROWS and x.dtype == torch.bfloat16:
            y = cpu_kernels.amx_linear(x if x.stride(-1) == 1 else x.contiguous(), w, b)  # AMX tiles, row-major
            if y is not None:
                return y
        if m > 1 and BF16_GEMM_IN_FLOAT32 and x.dtype == torch.bfloat16:
            y = cpu_kernels.grouped_gemm(x, w.unsqueeze(0), [m])  # weight widened in cache, read once
            if y is not None:
                return y + b if b is not None else y
        mp = padded_rows(m)
        if mp != m:  # padded in x's own layout (oneDNN builds a kernel per shape *and* layout)
            if x.stride(0) == 1 and m > 1:  # a transposed view (what the few-row GEMMs return)
                xp = x.new_zeros(x.shape[1], mp)
                xp[:, :m] = x.t()
                x = xp.t()
            else:
                x = pad_rows(x, mp)
        if m > SMALL_M:
            if BF16_GEMM_IN_FLOAT32 and x.dtype == torch.bfloat16:
                y = mm(x, w.t())
                y = y + b if b is not None else y
            else:
                y = F.linear(x, w, b)
            return y[:m] if mp != m else y
        if m == 1:
            y = cpu_kernels.gemv(w, x[0], b)  # bf16: the weight streamed with prefetch, ~10% over mv
            return (y if y is not None else gemv_reference(w, x[0], b)).unsqueeze(0)
        y = mm(w, x.t()).t()[:m]
        return y + b if b is not None else y
    return F.linear(x, w, b)


def lm_head_logits(h_TD: torch.Tensor, w_VD: torch.Tensor) -> torch.Tensor:
    """``h @ w.T``, the logits over a vocab (slice) ``w``. Several rows on CPU come back row-major
    float32 (what the sampler's row-wise ops want): on AMX tiles (2-64 bf16 rows), else ``W @ h.T``
    (the weight streamed once, as in :func:`linear`) and one C pass to row-major float32. Measured,
    32000 x 1024 bf16, cold weights: 4.0 vs 11.2 ms at 64 rows (a batched GEMM over vocab slices,
    then a transposing copy), 2.8 vs 4.5 at 16; 21 vs 22 ms at 320 rows (``F.linear``). One row,
    or where neither applies: :func:`linear` (in h's dtype)."""
    if isinstance(w_VD, PackedLinearWeight):  # float32 rows in, float32 logits out (sums rounded once)
        return packed_linear(h_TD.float(), w_VD)
    M = h_TD.shape[0]
    cpu_rows = h_TD.device.type == "cpu" and h_TD.dim() == 2
    logits = None
    if cpu_rows and 1 < M <= cpu_kernels.AMX_MAX_ROWS:
        logits = cpu_kernels.amx_linear(h_TD, w_VD, out_float=True)
    if logits is None and cpu_rows and M > 1 and BF16_GEMM_IN_FLOAT32 and h_TD.dtype == torch.bfloat16:
        logits = cpu_kernels.grouped_gemm(h_TD, w_VD.unsqueeze(0), [M])  # rounded once, as the bf16 GEMM below
        logits = logits.float() if logits is not None else None
    if logits is None and cpu_rows and M > 1:
        mp = padded_rows(M)
        hp = pad_rows(h_TD, mp) if mp != M else h_TD
        logits = cpu_kernels.transpose_to_float(mm(w_VD, hp.t())[:, :M])
    if logits is None:
        logits = linear(h_TD, w_VD)
    return logits
