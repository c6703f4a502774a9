"""The base ops: one function per op, the only place that chooses CUDA, C (:mod:`cpu_kernels`) or
torch for it. ``experts/``, ``kvcache/``, ``parallel/`` and ``moe/models/`` call these; the torch
path each falls back to is the reference its C kernel is tested against.

- :func:`linear`, :func:`padded_rows`, :func:`pad_rows` (``SMALL_M``, ``ROW_BUCKET``): projections
  by row-count tier; :func:`mm`, :func:`bmm`: GEMMs (bf16 in float32 where the CPU has no fast
  bf16); :func:`grouped_linear`: one GEMM per expert in one call (where native);
  :func:`lm_head_logits`: the LM head's logits (few rows: row-major float32);
  :class:`PackedLinearWeight`: an int4 / int8 weight either of them takes in place of a tensor.
- :func:`silu_mul`: SwiGLU's ``silu(gate) * up``.
- :func:`rms_norm`, :func:`add_rms_norm`: RMSNorm, and the residual add followed by it.
- :func:`rope_`: rotary embedding in place; :func:`rms_norm_rope_`: per-head RMSNorm then it, in one pass
  (both raise :class:`PositionPastTable`, nothing written, for a position past the tables).
- :func:`per_head`: one GEMM per head (MLA).
- :func:`write_rows`: new K/V rows into a paged cache.
- :func:`argmax_rows`: the greedy choice per row of logits; :func:`draw_rows`: a keyed draw per row
  (temperature, top-k, top-p, min-p).
"""
from .activation import silu_mul
from .heads import per_head
from .kv import write_rows
from .linear import (ROW_BUCKET, SMALL_M, PackedLinearWeight, bmm, grouped_linear, linear, lm_head_logits, mm, pad_rows,
                     padded_rows)
from .norm import add_rms_norm, rms_norm
from .rope import PositionPastTable, rms_norm_rope_, rope_
from .sample import argmax_rows, draw_rows, top_logprobs

__all__ = ["ROW_BUCKET", "SMALL_M", "PackedLinearWeight", "PositionPastTable", "add_rms_norm", "argmax_rows", "bmm",
           "draw_rows", "grouped_linear", "linear", "lm_head_logits", "mm", "pad_rows", "padded_rows", "per_head",
           "rms_norm", "rms_norm_rope_", "rope_", "silu_mul", "top_logprobs", "write_rows"]
