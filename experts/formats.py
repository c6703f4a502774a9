"""Quantized expert-weight formats: one class per checkpoint layout.

Every format stores a logical weight ``w [..., N, K]`` -- ``N`` output rows, ``K`` the input
(reduction) dim, leading dims free (experts: ``w13 [E, 2F, D]``, ``w2 [E, D, F]``) -- as a dict
of named tensors, the *packed* form, whose keys are the format's ``tensor_names``. Each class
gives its pack (:meth:`~WeightFormat.quantize`), the loader-facing layout
(:meth:`~WeightFormat.packed_specs`, :meth:`~WeightFormat.from_tensors`), and the reference
dequantization (:meth:`~WeightFormat.dequantize`) that every fast path is tested against.

=============  ==============================================================================
``int8``       ``qweight`` int8 ``[..., N, K]`` (symmetric, values in [-127, 127]) or uint8
               (asymmetric, [0, 255]); ``scales`` ``[..., N, G]`` bf16/fp32; asymmetric adds
               ``zeros`` uint8 ``[..., N, G]``. ``G = cdiv(K, group_size)``, group ``g`` covers
               columns ``g*group_size ...`` (the last may be short).
               ``w[n, k] = (q[n, k] - z[n, g]) * s[n, g]`` with ``g = k // group_size``, z = 0
               when symmetric. Packing: ``s = amax / 127`` (symmetric) or ``(max - min) / 255``
               over a range that includes 0 with ``z = round(-min / s)``; ``s`` rounded *up* to
               ``scale_dtype`` so nothing clips.
``int4``       as int8, but ``qweight`` uint8 ``[..., N, K/2]`` (K even) holds two 4-bit codes per
               byte: column ``k`` is byte ``k // 2``, low nibble for even ``k``. Codes are
               unsigned [0, 15]; symmetric uses the implicit zero point 8 (values [-7, 7] used),
               asymmetric stores ``zeros`` uint8 ``[..., N, G]`` in [0, 15], one per byte.
               Packing as int8 with 7 / 15 in place of 127 / 255.
``fp8_block``  DeepSeek-V3: ``weight`` float8_e4m3fn ``[..., N, K]`` and ``weight_scale_inv``
               fp32 ``[..., cdiv(N, 128), cdiv(K, 128)]``; ``w = fp8 * scale_inv`` of the
               128x128 block holding the element (edge blocks may be partial). Packing:
               ``scale_inv = amax / 448`` per block. Checkpoint names: ``<proj>.weight``,
               ``<proj>.weight_scale_inv``.
``mxfp4``      gpt-oss / OCP MX: ``blocks`` uint8 ``[..., N, K/32, 16]`` -- 32 FP4 (e2m1)
               codes per block, element ``2j`` in the low nibble of byte ``j``, ``2j+1`` in
               the high nibble -- and ``scales`` uint8 ``[..., N, K/32]``, E8M0 exponents with
               bias 127. Code ``c``: magnitude ``[0, .5, 1, 1.5, 2, 3, 4, 6][c & 7]``, negative
               if ``c & 8``; ``w = value * 2**(scale - 127)``. Checkpoint names end in
               ``_blocks`` / ``_scales`` (e.g. ``mlp.experts.gate_up_proj_blocks``). Packing:
               the smallest ``2^e >= amax / 6`` (nothing clips), values rounded half to even.
=============  ==============================================================================
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

Packed = dict[str, torch.Tensor]


class TensorSpec(NamedTuple):
    """Shape and dtype a loader allocates for one packed tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class WeightFormat(ABC):
    """One packed layout of a ``[..., N, K]`` weight. Instances are small frozen configs."""

    name: ClassVar[str]
    tensor_names: ClassVar[tuple[str, ...]]

    @abstractmethod
    def packed_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        """The packed tensors (name -> shape, dtype) that hold a weight of logical ``shape``."""

    @abstractmethod
    def logical_shape(self, packed: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        """``[..., N, K]`` of the weight ``packed`` holds (from its shapes, not validated)."""

    @abstractmethod
    def quantize(self, w: torch.Tensor) -> Packed:
        """Pack a float weight ``[..., N, K]`` (round to nearest)."""

    @abstractmethod
    def dequantize(self, packed: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference: the float ``[..., N, K]`` weight ``packed`` stands for (computed in fp32)."""

    def options(self) -> dict:
        """Constructor arguments, JSON-friendly: ``get_format(fmt.name, **fmt.options())`` rebuilds ``fmt``."""
        return {k: _dtype_name(v) if isinstance(v, torch.dtype) else v for k, v in asdict(self).items()}

    def to_config(self) -> dict:
        return {"format": self.name, **self.options()}

    def from_tensors(self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...] | None = None) -> Packed:
        """Check checkpoint tensors against this layout (and ``shape`` if given); return them as packed.

        Raises ``ValueError`` naming the tensor, its shape/dtype and the expected one.
        """
        missing = [n for n in self.tensor_names if n not in tensors]
        extra = [n for n in tensors if n not in self.tensor_names]
        if missing or extra:
            detail = (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else "")
            raise ValueError(f"{self.name}: expected tensors {list(self.tensor_names)}, got {sorted(tensors)}{detail}")
        got = self.logical_shape(tensors)
        if shape is not None and tuple(shape) != got:
            raise ValueError(f"{self.name}: tensors hold a weight of shape {list(got)}, expected {list(shape)}")
        for n, spec in self.packed_specs(got).items():
            t = tensors[n]
            if tuple(t.shape) != spec.shape:
                raise ValueError(f"{self.name}: '{n}' has shape {list(t.shape)} but a weight of shape {list(got)} "
                                 f"needs {list(spec.shape)}; check the checkpoint's group/block size")
            if t.dtype != spec.dtype:
                raise ValueError(f"{self.name}: '{n}' has dtype {_dtype_name(t.dtype)}, "
                                 f"expected {_dtype_name(spec.dtype)}")
        return {n: tensors[n] for n in self.tensor_names}

    @staticmethod
    def nbytes(packed: Mapping[str, torch.Tensor]) -> int:
        """Bytes held by the packed tensors, scales and zero points included."""
        return sum(t.numel() * t.element_size() for t in packed.values())


# ---------------------------------------------------------------------------------------------
# Integer weight-only, group-wise along K


def _pad_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[..., N, K] -> [..., N, G, group_size]``, the short last group padded with its last column
    (a repeated value leaves the group's min, max and amax unchanged)."""
    K = w.shape[-1]
    pad = _cdiv(K, group_size) * group_size - K
    if pad:
        w = torch.cat([w, w[..., -1:].expand(*w.shape[:-1], pad)], dim=-1)
    return w.unflatten(-1, (-1, group_size))


def _expand_groups(t_NG: torch.Tensor, group_size: int, K: int) -> torch.Tensor:
    """Per-group ``[..., N, G]`` -> per-column ``[..., N, K]``."""
    return t_NG.repeat_interleave(group_size, dim=-1)[..., :K]


def _round_up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, rounded up, not to nearest: a scale never shrinks, so ``|w| / scale``
    stays within the code range and every element rounds to its nearest code (error <= scale/2)."""
    y = x.to(dtype)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` codes in [0, 15] (K even) -> uint8 ``[..., K/2]``, column ``2j`` in the low nibble of byte ``j``."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., K/2]`` -> uint8 codes ``[..., K]``."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


@dataclass(frozen=True)
class _IntGroupWeights(WeightFormat):
    group_size: int = 128
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.bfloat16

    bits: ClassVar[int]

    def __post_init__(self):
        if isinstance(self.scale_dtype, str):  # from JSON metadata
            object.__setattr__(self, "scale_dtype", getattr(torch, self.scale_dtype, None))
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"{self.name}: group_size={self.group_size} is not supported; choose 32, 64 or 128")
        if self.scale_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"{self.name}: scale_dtype={self.scale_dtype} is not supported; "
                             "choose bfloat16 or float32")

    @property
    def tensor_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("qweight", "scales") if self.symmetric else ("qweight", "scales", "zeros")

    @property
    def qmax(self) -> int:
        """Largest code: symmetric codes lie in [-qmax, qmax] around zero, asymmetric ones in [0, qmax]."""
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @abstractmethod
    def _qweight_spec(self, lead: tuple[int, ...], N: int, K: int) -> TensorSpec:
        """The packed qweight for ``[..., N]`` rows of ``K`` columns."""

    @abstractmethod
    def _codes(self, qweight: torch.Tensor) -> torch.Tensor:
        """Integer values ``[..., N, K]`` before the zero point is subtracted."""

    @abstractmethod
    def _store(self, q: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., N, K]`` (already offset for symmetric int4) -> the stored qweight."""

    def packed_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        *lead, N, K = shape
        G = _cdiv(K, self.group_size)
        specs = {"qweight": self._qweight_spec(tuple(lead), N, K),
                 "scales": TensorSpec((*lead, N, G), self.scale_dtype)}
        if not self.symmetric:
            specs["zeros"] = TensorSpec((*lead, N, G), torch.uint8)
        return specs

    def logical_shape(self, packed: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        *lead, N, K = packed["qweight"].shape
        return (*lead, N, K * 8 // self.bits)

    def quantize(self, w: torch.Tensor, clip: torch.Tensor | None = None) -> Packed:
        """Round to nearest; ``clip [..., N, G]`` (calibrated methods) shrinks each group's range
        to that fraction of its min/max before the scale is taken (values outside then clamp)."""
        K = w.shape[-1]
        wg = _pad_groups(w.float(), self.group_size)  # [..., N, G, gs]
        scale, zero = self.group_grid(wg, clip)
        return self.pack(self.codes(wg, scale, zero).flatten(-2)[..., :K], scale, zero)

    def group_grid(self, wg: torch.Tensor,
                   clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale, zero)`` of each group of ``wg [..., G, gs]``: the scale in ``scale_dtype``,
        rounded up; the zero point a float code (None when symmetric)."""
        if self.symmetric:
            amax = wg.abs().amax(-1)
            scale = (amax if clip is None else amax * clip) / self.qmax
        else:
            # The range always includes 0 so that the zero point is an integer code in [0, qmax].
            lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
            if clip is not None:
                lo, hi = lo * clip, hi * clip
            scale = (hi - lo) / self.qmax
        scale = _round_up_to(torch.where(scale > 0, scale, 1.0), self.scale_dtype)
        if self.symmetric:
            return scale, None
        return scale, (-lo / scale.float()).round().clamp(0, self.qmax)

    def codes(self, wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """Nearest codes of ``wg [..., G, gs]`` on the grid ``(scale, zero) [..., G]`` (float:
        symmetric in [-qmax, qmax], asymmetric in [0, qmax] with the zero point added)."""
        s = scale.float()[..., None]  # quantize against the stored scale
        if zero is None:
            return (wg / s).round().clamp(-self.qmax, self.qmax)
        return ((wg / s).round() + zero[..., None]).clamp(0, self.qmax)

    def pack(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> Packed:
        """The packed tensors of codes ``q [..., N, K]`` (as :meth:`codes` gives) and their grid."""
        if zero is None:
            return {"qweight": self._store(q), "scales": scale}
        return {"qweight": self._store(q), "scales": scale, "zeros": zero.to(torch.uint8)}

    def dequantize(self, packed: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        K = self.logical_shape(packed)[-1]
        q = self._codes(packed["qweight"]).float()
        if not self.symmetric:
            q = q - _expand_groups(packed["zeros"].float(), self.group_size, K)
        return (q * _expand_groups(packed["scales"].float(), self.group_size, K)).to(dtype)


@dataclass(frozen=True)
class Int8Weights(_IntGroupWeights):
    """8-bit weight-only, group-wise along K (layout in the module docstring)."""

    name: ClassVar[str] = "int8"
    bits: ClassVar[int] = 8

    def _qweight_spec(self, lead: tuple[int, ...], N: int, K: int) -> TensorSpec:
        return TensorSpec((*lead, N, K), torch.int8 if self.symmetric else torch.uint8)

    def _codes(self, qweight: torch.Tensor) -> torch.Tensor:
        return qweight

    def _store(self, q: torch.Tensor) -> torch.Tensor:
        return q.to(torch.int8 if self.symmetric else torch.uint8)


@dataclass(frozen=True)
class Int4Weights(_IntGroupWeights):
    """4-bit weight-only, group-wise along K, two codes per byte (layout in the module docstring).

    ``activations``: what the codes meet where the CPU kernels stream them (decode-sized steps):
    ``"float"`` (x as computed) or ``"int8"`` (x rounded to 8 bits per 32 columns first and
    multiplied in integers, as llama.cpp's 4-bit formats do: ~2x faster there, at a cost in
    agreement measured in docs/quantization.md). Larger steps and other devices use float x."""

    activations: str = "float"

    name: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4

    def __post_init__(self):
        super().__post_init__()
        if self.activations not in ("float", "int8"):
            raise ValueError(f"int4: activations={self.activations!r} is not supported; choose float or int8")

    def _qweight_spec(self, lead: tuple[int, ...], N: int, K: int) -> TensorSpec:
        if K % 2:
            raise ValueError(f"int4: the input dim K={K} must be even (two columns per byte)")
        return TensorSpec((*lead, N, K // 2), torch.uint8)

    def _codes(self, qweight: torch.Tensor) -> torch.Tensor:
        codes = unpack_int4(qweight)
        # Symmetric codes are offset-binary: stored c stands for c - 8.
        return codes.to(torch.int16) - 8 if self.symmetric else codes

    def _store(self, q: torch.Tensor) -> torch.Tensor:
        return pack_int4(q + 8 if self.symmetric else q)


# ---------------------------------------------------------------------------------------------
# FP8 with 128x128 block scales (DeepSeek-V3)

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


@dataclass(frozen=True)
class Fp8BlockWeights(WeightFormat):
    """float8_e4m3fn weights, one fp32 ``weight_scale_inv`` per ``block_n x block_k`` block (module docstring)."""

    block_n: int = 128
    block_k: int = 128

    name: ClassVar[str] = "fp8_block"
    tensor_names: ClassVar[tuple[str, ...]] = ("weight", "weight_scale_inv")

    def packed_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        *lead, N, K = shape
        return {"weight": TensorSpec(tuple(shape), torch.float8_e4m3fn),
                "weight_scale_inv": TensorSpec((*lead, _cdiv(N, self.block_n), _cdiv(K, self.block_k)), torch.float32)}

    def logical_shape(self, packed: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        return tuple(packed["weight"].shape)

    def _expand(self, scale: torch.Tensor, N: int, K: int) -> torch.Tensor:
        return scale.repeat_interleave(self.block_n, -2)[..., :N, :].repeat_interleave(self.block_k, -1)[..., :K]

    def quantize(self, w: torch.Tensor) -> Packed:
        *lead, N, K = w.shape
        NB, KB = _cdiv(N, self.block_n), _cdiv(K, self.block_k)
        w = w.float()
        padded = F.pad(w, (0, KB * self.block_k - K, 0, NB * self.block_n - N))  # zeros leave amax alone
        amax = padded.unflatten(-1, (KB, self.block_k)).unflatten(-3, (NB, self.block_n)).abs().amax(dim=(-3, -1))
        scale_inv = torch.where(amax > 0, amax / FP8_MAX, 1.0)
        q = (w / self._expand(scale_inv, N, K)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {"weight": q, "weight_scale_inv": scale_inv}

    def dequantize(self, packed: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = packed["weight"]
        N, K = q.shape[-2:]
        return (q.float() * self._expand(packed["weight_scale_inv"].float(), N, K)).to(dtype)


# ---------------------------------------------------------------------------------------------
# MXFP4 (gpt-oss)

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # e2m1 magnitudes by code & 7
MX_BLOCK = 32
E8M0_BIAS = 127


def fp4_lut(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 FP4 values by code: magnitudes, then the same negated (sign bit 8)."""
    mags = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
    return torch.cat([mags, -mags])


@dataclass(frozen=True)
class Mxfp4Weights(WeightFormat):
    """OCP MXFP4 as gpt-oss checkpoints store it (module docstring); K must be a multiple of 32."""

    name: ClassVar[str] = "mxfp4"
    tensor_names: ClassVar[tuple[str, ...]] = ("blocks", "scales")

    def packed_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        *lead, N, K = shape
        if K % MX_BLOCK:
            raise ValueError(f"mxfp4: the input dim K={K} must be a multiple of {MX_BLOCK}")
        return {"blocks": TensorSpec((*lead, N, K // MX_BLOCK, MX_BLOCK // 2), torch.uint8),
                "scales": TensorSpec((*lead, N, K // MX_BLOCK), torch.uint8)}

    def logical_shape(self, packed: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        *lead, N, B, _ = packed["blocks"].shape
        return (*lead, N, B * MX_BLOCK)

    def quantize(self, w: torch.Tensor) -> Packed:
        self.packed_specs(tuple(w.shape))  # K check
        wb = w.float().unflatten(-1, (-1, MX_BLOCK))  # [..., N, B, 32]
        amax = wb.abs().amax(-1)
        # Smallest power of two 2^e with amax / 2^e <= 6 (the largest FP4 magnitude): nothing clips.
        mant, exp = torch.frexp(amax / FP4_VALUES[-1])  # amax/6 = mant * 2^exp, mant in [0.5, 1)
        e = torch.where(mant == 0.5, exp - 1, exp)
        e = torch.where(amax > 0, e, -E8M0_BIAS).clamp(-E8M0_BIAS, E8M0_BIAS)  # 255 would be E8M0 NaN
        v = torch.ldexp(wb, -e[..., None].float())
        mid = torch.tensor(FP4_VALUES, device=w.device)
        mid = (mid[1:] + mid[:-1]) / 2
        a = v.abs().contiguous()
        lo, hi = torch.bucketize(a, mid), torch.bucketize(a, mid, right=True)  # differ only on a tie
        mag = torch.where(lo % 2 == 0, lo, hi)  # ties to the even code (round-half-to-even)
        codes = mag | (torch.signbit(v).to(torch.long) << 3)
        blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)  # element 2j -> low nibble
        return {"blocks": blocks, "scales": (e + E8M0_BIAS).to(torch.uint8)}

    def dequantize(self, packed: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        blocks, scales = packed["blocks"], packed["scales"]
        codes = torch.stack([blocks & 0xF, blocks >> 4], dim=-1).flatten(-2).long()  # [..., N, B, 32]
        vals = fp4_lut(device=blocks.device)[codes]
        w = torch.ldexp(vals, (scales.to(torch.int32) - E8M0_BIAS)[..., None].float())
        return w.flatten(-2).to(dtype)


# ---------------------------------------------------------------------------------------------

FORMATS: dict[str, type[WeightFormat]] = {
    cls.name: cls for cls in (Int8Weights, Int4Weights, Fp8BlockWeights, Mxfp4Weights)
}


def get_format(name: str, **options) -> WeightFormat:
    """The format called ``name`` (as in config metadata), e.g. ``get_format("int4", group_size=64,
    symmetric=False)``; :func:`format_from_config` reads a whole :meth:`WeightFormat.to_config` dict."""
    cls = FORMATS.get(name)
    if cls is None:
        raise ValueError(f"unknown weight format {name!r}; valid formats: {', '.join(sorted(FORMATS))}")
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"{name}: bad options {options} ({e})") from e


def format_from_config(config: Mapping) -> WeightFormat:
    """Inverse of :meth:`WeightFormat.to_config`: ``{"format": "int8", "group_size": 64, ...}``."""
    options = dict(config)
    if "format" not in options:
        raise ValueError(f"weight format config {dict(config)} lacks 'format' (one of {', '.join(sorted(FORMATS))})")
    return get_format(options.pop("format"), **options)


def expected_nbytes(fmt: WeightFormat, shape: tuple[int, ...]) -> int:
    """Bytes ``fmt`` needs for a weight of ``shape`` (from the specs, nothing allocated)."""
    return sum(math.prod(s.shape) * torch.empty((), dtype=s.dtype).element_size()
               for s in fmt.packed_specs(shape).values())


def expert_nbytes(fmt: WeightFormat, hidden: int, intermediate: int) -> int:
    """Packed bytes of one SwiGLU expert: gate/up ``[2 * intermediate, hidden]`` and down
    ``[hidden, intermediate]`` (ValueError when ``fmt`` cannot pack those shapes)."""
    return expected_nbytes(fmt, (2 * intermediate, hidden)) + expected_nbytes(fmt, (hidden, intermediate))


# ``moe quantize``'s options when none are given, measured on the default model's held-out text
# (docs/quantization.md): int4 at 128-wide symmetric groups agreed with bf16 on 93.4% of top-1
# tokens, at 32-wide asymmetric ones on 96.0% (97.0% with --method gptq) for 1.3x the expert bytes;
# int8 is at 99%+ with 128-wide symmetric groups.
DEFAULT_OPTIONS: dict[str, dict] = {"int4": dict(group_size=32, symmetric=False),
                                    "int8": dict(group_size=128, symmetric=True)}

# the packed formats reports list, as ``moe quantize`` writes them by default
REPORT_FORMATS = ("int8", "int4", "fp8_block", "mxfp4")
