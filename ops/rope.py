"""Rotary position embedding applied in place, from precomputed float32 cos/sin tables."""
from __future__ import annotations

import torch

import cpu_kernels
from cpu_kernels.elementwise import rope_reference


def rope_(x_THD: torch.Tensor, positions_T: torch.Tensor, cos_PH: torch.Tensor, sin_PH: torch.Tensor,
          interleaved: bool) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` in place by ``cos/sin [max_pos, D/2]`` at ``positions_T`` and return
    it; pairs ``(i, i + D/2)`` (GPT-NeoX) or, ``interleaved``, ``(2i, 2i + 1)`` (GPT-J). One C pass
    on CPU (any strides over T and H, e.g. heads of a wider qkv row), else the torch ops."""
    if cpu_kernels.rope_(x_THD, positions_T, cos_PH, sin_PH, interleaved):
        return x_THD
    return x_THD.copy_(rope_reference(x_THD, positions_T, cos_PH, sin_PH, interleaved))
