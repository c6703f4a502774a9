"""Grouped experts on packed (quantized) weights, for CPU: ``experts(x_RD, counts) -> y_RD``.

Weights stay packed; for each expert that has rows, its matmuls run on a *CPU compute layout*
built once from the checkpoint layout by :func:`prepare_cpu` (exact repacks, no extra rounding
of the weights). Eager elementwise dequantization costs ~10x a bf16 GEMV on CPU, so every
format is mapped onto a fused kernel where one exists:

- ``int8`` and ``fp8_block`` with the C kernels built: :class:`Q8RowWeights` (the codes
  converted in registers as they stream for up to 12 rows; dequantized once per GEMM for more);
  ``int4`` and ``mxfp4`` likewise: :class:`Q4RowWeights` (values from a 16-entry table).
  The items below are the layouts where the library is not built.
- ``int8`` otherwise: ``torch._weight_int8pack_mm`` (int8 x per-channel scale) once per K group;
  asymmetric zero points become one small ``[M, G] @ [G, N]`` correction.
- ``int4``: ``torch._weight_int4pack_mm_for_cpu`` (tinygemm: ``w = (c - 8) * scale + zero`` per
  group), our codes/scales/zero points map onto it directly.
- ``mxfp4``: FP4 values times 2 are {0, 1, 2, 3, 4, 6, 8, 12} = ``a + 4b`` with ``a, b`` in
  [-3, 3], so the weight is the sum of two int4 tinygemm weights with power-of-two group-32
  scales ``2^(e-1)`` and ``2^(e+1)`` -- exact, at 1 byte per weight (the checkpoint's 0.5).
- ``fp8_block`` otherwise: no fast fp8 op in torch on CPU (``.to()`` from fp8 is scalar); the e4m3 bits are moved
  into fp16 bits (exact, = value * 2^-8) a few 128-row blocks at a time and the block scales
  are folded into the activations, then an fp32 batched matmul.
- anything else (odd shapes): :meth:`WeightFormat.dequantize` per expert, then ``F.linear``.

Measured on one Xeon (Sapphire Rapids) thread, one expert with D=1024, F=2816 and 1 / 8 rows,
time relative to bf16 ``F.linear``: int4 g128 0.55x / 1.8x, int8 g128 1.1x / 3.4x,
mxfp4 1.4x / 4.2x, fp8_block ~10x (the int kernels' cost grows with rows; bf16 GEMM's does not).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
import torch.nn.functional as F

import cpu_kernels
from ops import linear

from .formats import (E8M0_BIAS, MX_BLOCK, Fp8BlockWeights, Int4Weights, Int8Weights, Mxfp4Weights, Packed,
                      WeightFormat, fp4_lut, unpack_int4)
from .grouped import Activation, fused_swiglu


class CpuExpertWeights(ABC):
    """A stacked weight ``[e, N, K]`` in a CPU compute layout; ``matmul(x_MK, e) = x @ w[e].T``."""

    def __init__(self, num_experts: int, N: int, K: int):
        self.num_experts, self.N, self.K = num_experts, N, K

    @abstractmethod
    def matmul(self, x_MK: torch.Tensor, e: int) -> torch.Tensor:
        """``[M, N]`` in ``x_MK.dtype``."""

    def nbytes(self) -> int:
        """Bytes of the tensors this layout holds (what packing saves is measured here)."""
        seen: dict[int, int] = {}
        stack = list(vars(self).values())
        while stack:
            v = stack.pop()
            if isinstance(v, torch.Tensor):
                seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
            elif isinstance(v, dict):
                stack.extend(v.values())
        return sum(seen.values())


def _pad_k(x_MK: torch.Tensor, K_padded: int) -> torch.Tensor:
    return x_MK if x_MK.shape[1] == K_padded else F.pad(x_MK, (0, K_padded - x_MK.shape[1]))


class DequantWeights(CpuExpertWeights):
    """Fallback: the format's reference dequantization, one expert at a time."""

    def __init__(self, fmt: WeightFormat, packed: Mapping[str, torch.Tensor]):
        super().__init__(*fmt.logical_shape(packed))
        self.fmt, self.packed = fmt, dict(packed)

    def matmul(self, x_MK: torch.Tensor, e: int) -> torch.Tensor:
        w_NK = self.fmt.dequantize({k: v[e] for k, v in self.packed.items()}, dtype=x_MK.dtype)
        return F.linear(x_MK, w_NK)


class Int8PackWeights(CpuExpertWeights):
    """int8 group-wise: ``y = sum_g s_g * (x_g @ q_g.T)`` with one ``_weight_int8pack_mm`` per group.

    Layout: ``q_eGNg [e, G, N, group]`` int8 (groups major so each is a contiguous ``[N, group]``
    matrix; the short last group zero-padded), ``s_eGN`` fp32. Asymmetric uint8 codes are stored
    as ``q - 128`` and ``zfix_eGN = (128 - z) * s`` adds ``x_g.sum() * zfix`` back.
    """

    def __init__(self, fmt: Int8Weights, packed: Mapping[str, torch.Tensor]):
        e, N, K = fmt.logical_shape(packed)
        super().__init__(e, N, K)
        gs = self.group = fmt.group_size
        G = packed["scales"].shape[-1]
        q = packed["qweight"]
        if not fmt.symmetric:
            q = (q.to(torch.int16) - 128).to(torch.int8)
        q = F.pad(q, (0, G * gs - K))
        self.q_eGNg = q.view(e, N, G, gs).permute(0, 2, 1, 3).contiguous()
        self.s_eGN = packed["scales"].float().transpose(1, 2).contiguous()
        self.zfix_eGN = None
        if not fmt.symmetric:
            self.zfix_eGN = (128 - packed["zeros"].float()).transpose(1, 2) * self.s_eGN

    def matmul(self, x_MK: torch.Tensor, e: int) -> torch.Tensor:
        M, G, gs = x_MK.shape[0], self.q_eGNg.shape[1], self.group
        x_GMg = _pad_k(x_MK, G * gs).view(M, G, gs).transpose(0, 1).contiguous()
        s_GN = self.s_eGN[e].to(x_MK.dtype)  # the kernel wants scales in the activation dtype
        y = torch.zeros(M, self.N, dtype=torch.float32, device=x_MK.device)
        for g in range(G):
            y += torch._weight_int8pack_mm(x_GMg[g], self.q_eGNg[e, g], s_GN[g])
        if self.zfix_eGN is not None:
            y += x_GMg.float().sum(-1).T @ self.zfix_eGN[e]
        return y.to(x_MK.dtype)


def _tinygemm_pack(codes_NK: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] ``[N, K]`` -> tinygemm's packed uint8 ``[N, K/2]``."""
    return torch._convert_weight_to_int4pack_for_cpu(codes_NK.to(torch.int32).contiguous(), 1)


class Int4TinyGemmWeights(CpuExpertWeights):
    """A sum of tinygemm int4 weights: ``w = sum_i ((c_i - 8) * scale_i + zero_i)`` per K group.

    Each part is ``(packed_i [e, N, K'/2], sz_i [e, G, N, 2])``: tinygemm's packing of the codes
    ``[e, N, K']`` (K padded to whole groups) and fp32 (scale, zero) pairs. int4 has one part,
    mxfp4 two.
    """

    def __init__(self, num_experts: int, N: int, K: int, group: int, parts: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(num_experts, N, K)
        self.group, self.parts = group, parts

    @staticmethod
    def supports(N: int) -> bool:
        return N % 16 == 0  # tinygemm packs 16 output rows together

    def matmul(self, x_MK: torch.Tensor, e: int) -> torch.Tensor:
        x = _pad_k(x_MK, self.parts[0][1].shape[1] * self.group)
        y = None
        for packed, sz in self.parts:
            part = torch._weight_int4pack_mm_for_cpu(x, packed[e], self.group, sz[e].to(x.dtype)).float()
            y = part if y is None else y + part
        return y.to(x_MK.dtype)


def _int4_tinygemm(fmt: Int4Weights, packed: Mapping[str, torch.Tensor]) -> Int4TinyGemmWeights:
    e, N, K = fmt.logical_shape(packed)
    G = packed["scales"].shape[-1]
    pad = G * fmt.group_size - K  # padded columns meet zero activations: any code will do
    codes = torch.stack([_tinygemm_pack(F.pad(unpack_int4(q), (0, pad), value=8)) for q in packed["qweight"]])
    s = packed["scales"].float()
    # ours: (c - z) * s = (c - 8) * s + (8 - z) * s; symmetric means z = 8, a zero term of 0.
    zero = torch.zeros_like(s) if fmt.symmetric else (8 - packed["zeros"].float()) * s
    sz = torch.stack([s, zero], -1).transpose(1, 2).contiguous()  # [e, G, N, 2]
    return Int4TinyGemmWeights(e, N, K, fmt.group_size, [(codes, sz)])


# Twice the FP4 magnitude of code & 7 is _MX_A + 4 * _MX_B, both in [0, 3].
_MX_A = torch.tensor([0, 1, 2, 3, 0, 2, 0, 0], dtype=torch.int32)
_MX_B = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3], dtype=torch.int32)


def _mxfp4_tinygemm(packed: Mapping[str, torch.Tensor]) -> Int4TinyGemmWeights:
    blocks, scales = packed["blocks"], packed["scales"]
    e, N, B, _ = blocks.shape
    exp = scales.to(torch.int32) - E8M0_BIAS  # [e, N, B]
    parts = []
    # fp4 * 2^exp = A * 2^(exp - 1) + B * 2^(exp + 1)
    for table, shift in ((_MX_A, -1), (_MX_B, 1)):
        packed_e = []
        for blk in blocks:  # one expert at a time keeps the int32 codes small
            codes = torch.stack([blk & 0xF, blk >> 4], -1).flatten(-3).to(torch.int32)  # [N, K]
            sign = 1 - 2 * (codes >> 3)
            packed_e.append(_tinygemm_pack(8 + sign * table[codes & 7]))
        s = torch.ldexp(torch.ones(exp.shape), exp + shift)
        sz = torch.stack([s, torch.zeros_like(s)], -1).transpose(1, 2).contiguous()
        parts.append((torch.stack(packed_e), sz))
    return Int4TinyGemmWeights(e, N, B * MX_BLOCK, MX_BLOCK, parts)


class Fp8BitsWeights(CpuExpertWeights):
    """fp8 e4m3 block-scaled: reinterpret the bits as fp16, a few row blocks at a time.

    ``(b & 0x7F) << 7 | (b & 0x80) << 8`` is the fp16 with the same sign, exponent and mantissa
    bits, i.e. the e4m3 value times 2^-8 (subnormals included; e4m3's NaN becomes a finite value). The block scale
    ``scale_inv[nb, kb] * 2^8`` multiplies the activations of K block ``kb`` once per row block
    ``nb``, so the weights are never rescaled: ``y[:, nb] = (x * s[nb]) @ w_fp16[nb].T``.
    """

    def __init__(self, fmt: Fp8BlockWeights, packed: Mapping[str, torch.Tensor], rows_per_step: int = 512):
        e, N, K = fmt.logical_shape(packed)
        super().__init__(e, N, K)
        self.bn, self.bk = fmt.block_n, fmt.block_k
        self.q_eNK = packed["weight"].view(torch.int8)
        self.s_eNbKb = packed["weight_scale_inv"].float() * 256.0
        self.step = max(self.bn, rows_per_step // self.bn * self.bn)

    def matmul(self, x_MK: torch.Tensor, e: int) -> torch.Tensor:
        M, N, K, bn, bk = x_MK.shape[0], self.N, self.K, self.bn, self.bk
        KB = self.s_eNbKb.shape[-1]
        x_1MKb = _pad_k(x_MK.float(), KB * bk).view(1, M, KB, bk)
        y = torch.empty(M, N, dtype=torch.float32, device=x_MK.device)
        bits = torch.empty(self.step, K, dtype=torch.int16, device=x_MK.device)
        w = torch.zeros(self.step, K, dtype=torch.float32, device=x_MK.device)  # rows past N stay finite
        for r0 in range(0, N, self.step):  # r0 is a multiple of bn
            rows = min(self.step, N - r0)
            nb0, nbs = r0 // bn, -(-rows // bn)
            b = bits[:rows]
            b.copy_(self.q_eNK[e, r0:r0 + rows])  # int8 -> int16 sign-extends: bit 7 fills bits 7..15
            b.bitwise_left_shift_(7).bitwise_and_(~0x4000)  # sign on bit 15, bit 14 (exponent MSB) clear
            w[:rows].copy_(b.view(torch.float16))
            xs = (x_1MKb * self.s_eNbKb[e, nb0:nb0 + nbs, None, :, None]).flatten(2)[..., :K]  # [nbs, M, K]
            y_bMn = torch.bmm(xs, w[:nbs * bn].view(nbs, bn, K).transpose(1, 2))
            y[:, r0:r0 + rows] = y_bMn.transpose(0, 1).reshape(M, nbs * bn)[:, :rows]
        return y.to(x_MK.dtype)


class Q8RowWeights(CpuExpertWeights):
    """8-bit codes in their row-major checkpoint layout for the C kernels of ``cpu_kernels/quant.c``:
    ``w[n, k] = s[n // bn, k // gs] * q[n, k] (+ b[n // bn, k // gs])``. Up to
    :attr:`stream_rows` rows stream the codes once, converted in registers
    (:func:`cpu_kernels.q8_gemm`: decode reads half the bytes of bf16); more rows dequantize the
    expert to x's dtype once for a GEMM (:func:`cpu_kernels.q8_dequant`).

    int8: ``q`` the codes (asymmetric uint8 codes stored as ``q - 128``, their offset
    ``(128 - z) * s`` as ``b``), one scale row per weight row. fp8_block: ``q`` the e4m3 bits, read
    as value * 2^-8, so ``s`` is ``weight_scale_inv * 2^8`` per (row block, K block).
    """

    # streamed up to this many rows (codes converted once per 8 rows, FMAs per row), dequantized
    # for a GEMM beyond. One Mixtral-shaped w13 (5632 x 1024, int8 g128), ms: 8 rows 0.54 streamed
    # vs 0.96 dequantized, 12 rows 0.83 vs 0.95, 16 rows 1.19 vs 0.94, 32 rows 2.81 vs 1.08
    stream_rows = 12

    def __init__(self, fmt: WeightFormat, packed: Mapping[str, torch.Tensor]):
        e, N, K = fmt.logical_shape(packed)
        super().__init__(e, N, K)
        if isinstance(fmt, Int8Weights):
            q = packed["qweight"]
            if not fmt.symmetric:
                q = (q.to(torch.int16) - 128).to(torch.int8)
            self.code, self.gs, self.bn = cpu_kernels.Q_INT8, fmt.group_size, 1
            self.q_eNK = q.contiguous()
            self.s_eBG = packed["scales"].float().contiguous()
            self.b_eBG = None if fmt.symmetric else ((128 - packed["zeros"].float()) * self.s_eBG).contiguous()
        else:
            assert isinstance(fmt, Fp8BlockWeights)
            self.code, self.gs, self.bn = cpu_kernels.Q_FP8, fmt.block_k, fmt.block_n
            self.q_eNK = packed["weight"].view(torch.int8)
            self.s_eBG = (packed["weight_scale_inv"].float() * 256.0).contiguous()
            self.b_eBG = None

    @property
    def kernel(self) -> tuple[int, torch.Tensor | None, int, int]:
        """``(fmt, lut, gs, bn)`` and :meth:`token_args` (the codes, scales and offsets stacked over
        experts): what :func:`cpu_kernels.quant_moe_token` takes."""
        return self.code, None, self.gs, self.bn

    def token_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.q_eNK, self.s_eBG, self.b_eBG

    def matmul(self, x_MK: torch.Tensor, e: int) -> torch.Tensor:
        b = None if self.b_eBG is None else self.b_eBG[e]
        if x_MK.shape[0] <= self.stream_rows and x_MK.dtype in (torch.float32, torch.bfloat16):
            return cpu_kernels.q8_gemm(x_MK, self.q_eNK[e], self.code, self.s_eBG[e], b, self.gs, self.bn)
        dtype = x_MK.dtype if x_MK.dtype in (torch.float32, torch.bfloat16) else torch.float32
        w = cpu_kernels.q8_dequant(self.q_eNK[e], self.code, self.s_eBG[e], b, self.gs, self.bn, dtype)
        return linear(x_MK, w.to(x_MK.dtype))


class Q4RowWeights(CpuExpertWeights):
    """4-bit codes in their row-major checkpoint layout (two per byte, the low nibble the even
    column) for the C kernels: ``w[n, k] = s[n, g] * lut[code] (+ b[n, g])``, ``g = k // gs``. As
    :class:`Q8RowWeights`, a few rows stream the codes (:func:`cpu_kernels.q4_gemm`: each byte's
    nibbles meet the even and odd columns of x, values from a 16-entry table in a register); more
    rows dequantize the expert once for a GEMM.

    int4: the table is the codes 0..15, the zero point (8 when symmetric) an offset ``-z * s``.
    mxfp4: the FP4 e2m1 values, ``s = 2^(e - 127)`` per 32 (E8M0), no offset; the blocks
    ``[N, K/32, 16]`` are the same bytes as ``[N, K/2]``.
    """

    lut_int4 = torch.arange(16, dtype=torch.float32)
    # as Q8RowWeights.stream_rows; the 4-bit conversion costs more per row block (int4 g128, ms:
    # 8 rows 0.77 streamed vs 0.81 dequantized, 16 rows 2.15 vs 0.81)
    stream_rows = 8

    def __init__(self, fmt: WeightFormat, packed: Mapping[str, torch.Tensor]):
        e, N, K = fmt.logical_shape(packed)
        super().__init__(e, N, K)
        self.x8 = isinstance(fmt, Int4Weights) and fmt.activations == "int8"  # q4x8_gemm where codes stream
        if isinstance(fmt, Int4Weights):
            self.gs, self.lut = fmt.group_size, self.lut_int4
            self.q_eNK2 = packed["qweight"].contiguous()
            self.s_eBG = packed["scales"].float().contiguous()
            zero = packed["zeros"].float() if not fmt.symmetric else torch.full_like(self.s_eBG, 8.0)
            self.b_eBG = (-zero * self.s_eBG).contiguous()
        else:
            assert isinstance(fmt, Mxfp4Weights)
            self.gs, self.lut = MX_BLOCK, fp4_lut(dtype=torch.float32)
            self.q_eNK2 = packed["blocks"].reshape(e, N, K // 2)
            self.s_eBG = torch.ldexp(torch.ones(packed["scales"].shape), packed["scales"].to(torch.int32) - E8M0_BIAS)
            self.b_eBG = None

    @staticmethod
    def supports(K: int) -> bool:
        return K % 32 == 0  # whole 16-byte loads per row (the kernels' vector path)

    @property
    def kernel(self) -> tuple[int, torch.Tensor | None, int, int]:
        """``(fmt, lut, gs, bn)`` and :meth:`token_args`: what :func:`cpu_kernels.quant_moe_token` takes."""
        return cpu_kernels.Q_INT4_X8 if self.x8 else cpu_kernels.Q_INT8, self.lut, self.gs, 1

    def token_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.q_eNK2, self.s_eBG, self.b_eBG

    def matmul(self, x_MK: torch.Tensor, e: int) -> torch.Tensor:
        b = None if self.b_eBG is None else self.b_eBG[e]
        if x_MK.shape[0] <= self.stream_rows and x_MK.dtype in (torch.float32, torch.bfloat16):
            if self.x8:
                return cpu_kernels.q4x8_gemm(x_MK, self.q_eNK2[e], self.s_eBG[e], b, self.gs)
            return cpu_kernels.q4_gemm(x_MK, self.q_eNK2[e], self.lut, self.s_eBG[e], b, self.gs)
        dtype = x_MK.dtype if x_MK.dtype in (torch.float32, torch.bfloat16) else torch.float32
        w = cpu_kernels.q4_dequant(self.q_eNK2[e], self.lut, self.s_eBG[e], b, self.gs, dtype)
        return linear(x_MK, w.to(x_MK.dtype))


def prepare_cpu(fmt: WeightFormat, packed: Mapping[str, torch.Tensor]) -> CpuExpertWeights:
    """The fastest exact CPU compute layout for stacked ``[e, N, K]`` packed weights (see module doc)."""
    N = fmt.logical_shape(packed)[-2]
    if isinstance(fmt, (Int8Weights, Fp8BlockWeights)) and cpu_kernels.q8_available():
        return Q8RowWeights(fmt, packed)
    if (isinstance(fmt, (Int4Weights, Mxfp4Weights)) and cpu_kernels.q8_available()
            and Q4RowWeights.supports(fmt.logical_shape(packed)[-1])):
        return Q4RowWeights(fmt, packed)
    # Private torch ops: fall back to dequantization if a torch build lacks them.
    has_int8mm = hasattr(torch, "_weight_int8pack_mm")
    has_tinygemm = hasattr(torch, "_weight_int4pack_mm_for_cpu") and Int4TinyGemmWeights.supports(N)
    if isinstance(fmt, Int8Weights) and has_int8mm:
        return Int8PackWeights(fmt, packed)
    if isinstance(fmt, Int4Weights) and has_tinygemm:
        return _int4_tinygemm(fmt, packed)
    # The mxfp4 part scale 2^(exp + 1) must stay finite in bf16: E8M0 bytes up to 253.
    if isinstance(fmt, Mxfp4Weights) and has_tinygemm and int(packed["scales"].max()) < 254:
        return _mxfp4_tinygemm(packed)
    if isinstance(fmt, Fp8BlockWeights):
        return Fp8BitsWeights(fmt, packed)
    return DequantWeights(fmt, packed)


def grouped_swiglu_quant_torch(
    x_RD: torch.Tensor,
    counts: list[int],
    w13_packed: Packed | CpuExpertWeights,
    w2_packed: Packed | CpuExpertWeights,
    fmt: WeightFormat,
    b13_e2F: torch.Tensor | None = None,
    b2_eD: torch.Tensor | None = None,
    act: Activation = Activation(),
) -> torch.Tensor:
    """:func:`experts.grouped.grouped_swiglu_torch` on packed weights ``w13 [e, 2F, D]``, ``w2 [e, D, F]``.

    Rows of ``x_RD`` are expert-major, ``counts[i]`` for local expert ``i``; experts without rows
    are skipped. Pass :func:`prepare_cpu` results to reuse the compute layout across calls; raw
    packed dicts are prepared here on every call.
    """
    w13 = w13_packed if isinstance(w13_packed, CpuExpertWeights) else prepare_cpu(fmt, w13_packed)
    w2 = w2_packed if isinstance(w2_packed, CpuExpertWeights) else prepare_cpu(fmt, w2_packed)
    y_RD = torch.empty(x_RD.shape[0], w2.N, dtype=x_RD.dtype, device=x_RD.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        h = w13.matmul(x_RD[rows], e)
        if b13_e2F is not None:
            h = h + b13_e2F[e].to(h.dtype)
        h = fused_swiglu(h, act)
        y = w2.matmul(h, e)
        y_RD[rows] = y if b2_eD is None else y + b2_eD[e].to(y.dtype)
        start += n
    return y_RD
