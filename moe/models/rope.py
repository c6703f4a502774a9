"""Rotary position embeddings: default, linear and YaRN scaling, neox or interleaved pairs."""
from __future__ import annotations

import math

import torch
from torch import nn

from ops import PositionPastTable, rms_norm_rope_, rope_


def _yarn_inv_freq(dim: int, base: float, p: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    factor = p.get("factor") or max_pos / p["original_max_position_embeddings"]
    orig_max = p["original_max_position_embeddings"]

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_inv_freq(dim: int, params: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin multiplier for ``params`` (HF ``rope_parameters``)."""
    base = float(params.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim), 1.0
    if kind == "linear":
        inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        return inv / float(params["factor"]), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(dim, base, params, max_pos)
    raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, yarn)")


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to ``[T, H, dim]`` tensors at integer ``positions_T``.

    ``interleaved`` pairs dims (0,1), (2,3), ... (GPT-J / DeepSeek checkpoints); otherwise
    (i, i + dim/2) as in GPT-NeoX / Llama.
    """

    def __init__(self, dim: int, max_pos: int, params: dict, interleaved: bool = False):
        super().__init__()
        inv_freq, attention_factor = rope_inv_freq(dim, params, max_pos)
        self.dim = dim
        self.interleaved = interleaved
        self.attention_factor = attention_factor
        self._inv_freq = inv_freq
        self.max_pos = 0
        self._grow(max(2048, min(max_pos, 8192)))

    def _grow(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32)
        freqs = torch.outer(t, self._inv_freq)
        self.register_buffer("cos", freqs.cos() * self.attention_factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * self.attention_factor, persistent=False)
        self.max_pos = n

    def forward(self, positions_T: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotated copies of each ``x [T, H, dim]``."""
        return tuple(self.rotate_(positions_T, x.clone(memory_format=torch.contiguous_format)) for x in xs)

    def rotate_(self, positions_T: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [T, H, dim]`` in place (:func:`ops.rope_`) and return it."""
        self._rotate_part(positions_T, x, 0, None)
        return x

    def rotate_pair_(self, positions_T: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     norms: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q [T, Hq, dim]`` and ``k [T, Hk, dim]`` in place and return them: in one pass
        where k's heads follow q's in memory (both views of one qkv row: each op is a fixed cost per
        decode step), else one each (never a concatenated copy). ``norms``: the per-head RMSNorms of
        q and k (``.weight``, ``.eps``), applied first, in the same pass (:func:`ops.rms_norm_rope_`)."""
        T, Hq, D = q.shape
        joint = (k.dtype == q.dtype and k.shape[0] == T and k.shape[2] == D and k.stride() == q.stride()
                 and q.stride(1) == D and q.stride(0) >= (Hq + k.shape[1]) * D
                 and k.data_ptr() == q.data_ptr() + Hq * D * q.element_size())
        parts = [(q.as_strided((T, Hq + k.shape[1], D), q.stride()), Hq)] if joint else [(q, Hq), (k, 0)]
        for x, hq in parts:
            self._rotate_part(positions_T, x, hq, norms)
        return q, k

    def _rotate_part(self, positions_T: torch.Tensor, x: torch.Tensor, hq: int, norms: tuple | None) -> None:
        """``x`` rotated in place (after the per-head ``norms``, heads ``< hq`` by q's); the tables grow
        only when a rotation meets a position past them (raised before anything is written)."""
        try:
            self._rotate_once(positions_T, x, hq, norms)
        except PositionPastTable:
            self.grow_for(positions_T)
            self._rotate_once(positions_T, x, hq, norms)

    def _rotate_once(self, positions_T: torch.Tensor, x: torch.Tensor, hq: int, norms: tuple | None) -> None:
        if norms is None:
            rope_(x, positions_T, self.cos, self.sin, self.interleaved)
        else:
            qn, kn = norms
            rms_norm_rope_(x, qn.weight, qn.eps, kn.weight, kn.eps, hq, positions_T, self.cos, self.sin,
                           self.interleaved)

    def grow_for(self, positions_T: torch.Tensor) -> None:
        """Extend the cos/sin tables past the largest of ``positions_T`` if needed."""
        if positions_T.numel():
            self.grow_to(int(positions_T.max()) + 1)

    def grow_to(self, n: int) -> None:
        """Extend the cos/sin tables to hold positions ``0 .. n - 1`` if needed (to twice that)."""
        if n > self.max_pos:
            self._grow(2 * n - 1)
