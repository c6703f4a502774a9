"""Rotary position embedding applied in place, from precomputed float32 cos/sin tables."""
from __future__ import annotations

import torch

import cpu_kernels
from cpu_kernels.elementwise import PositionPastTable, rope_reference

from .norm import rms_norm


def rope_(x_THD: torch.Tensor, positions_T: torch.Tensor, cos_PH: torch.Tensor, sin_PH: torch.Tensor,
          interleaved: bool) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` in place by ``cos/sin [max_pos, D/2]`` at ``positions_T`` and return
    it; pairs ``(i, i + D/2)`` (GPT-NeoX) or, ``interleaved``, ``(2i, 2i + 1)`` (GPT-J). One C pass
    on CPU (any strides over T and H, e.g. heads of a wider qkv row), else the torch ops. Raises
    :class:`PositionPastTable`, ``x`` untouched, for a position past the tables' rows."""
    if cpu_kernels.rope_(x_THD, positions_T, cos_PH, sin_PH, interleaved):
        return x_THD
    _check_positions(positions_T, cos_PH)
    return x_THD.copy_(rope_reference(x_THD, positions_T, cos_PH, sin_PH, interleaved))


def _check_positions(positions_T: torch.Tensor, cos_PH: torch.Tensor) -> None:
    """The torch paths' check of what the C kernels check as they read the positions."""
    if positions_T.numel() and int(positions_T.max()) >= cos_PH.shape[0]:
        raise PositionPastTable("a position is past the rotary tables' rows")


def rms_norm_rope_(x_THD: torch.Tensor, w_q: torch.Tensor, eps_q: float, w_k: torch.Tensor, eps_k: float, hq: int,
                   positions_T: torch.Tensor, cos_PH: torch.Tensor, sin_PH: torch.Tensor,
                   interleaved: bool) -> torch.Tensor:
    """Per-head RMSNorm of ``x [T, H, D]`` in place (heads ``h < hq`` by ``w_q`` and ``eps_q``, the rest
    by ``w_k`` and ``eps_k``: the q then k heads of a qkv row), then the rotation of :func:`rope_`; returns ``x``.
    One C pass on CPU (bf16: each row normalized and rotated while in cache), else :func:`rms_norm`
    of each part and :func:`rope_` (the same roundings). Raises as :func:`rope_`, ``x`` untouched."""
    if x_THD.device.type == "cpu" and cpu_kernels.rms_norm_rope_(x_THD, w_q, eps_q, w_k, eps_k, hq, positions_T,
                                                                 cos_PH, sin_PH, interleaved):
        return x_THD
    _check_positions(positions_T, cos_PH)
    for part, w, eps in ((x_THD[:, :hq], w_q, eps_q), (x_THD[:, hq:], w_k, eps_k)):
        if part.shape[1]:
            rms_norm(part, w, eps, out=part)
    return rope_(x_THD, positions_T, cos_PH, sin_PH, interleaved)
