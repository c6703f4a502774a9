"""CPU kernels in C, built on first use: where torch's op-by-op path leaves most of the time on the table.

One binding module per C file, each kernel's torch reference beside its binding:

- :mod:`.paged_decode`: decode attention of every sequence of a step in one call.
- :mod:`.elementwise`: rotary embedding, SwiGLU's ``silu(gate) * up``, RMSNorm and add+RMSNorm,
  cache row writes, transposed logits to float32, the router's selection, rows' argmax.
- :mod:`.gemv`: bf16 matrix-vector products for one-row decode; one token through its experts.
- :mod:`.gemm`: bf16 GEMMs (one projection, or one per expert over expert-major rows) for CPUs
  without a fast bf16 GEMM (AVX2 + FMA).
- :mod:`.amx`: the GEMMs of 2-64-row steps on AMX tiles, or on AVX512-BF16 doing the same tile
  products where the CPU has no AMX (projections, experts, a whole local MoE layer, MLA's per-head
  GEMMs).
- :mod:`.amx_attention`: prompt rows' causal attention over the paged cache on AMX tiles.
- :mod:`.fused`: a whole attention sub-layer (MLA, GQA) of one decode token.
- :mod:`.quant`: GEMMs and dequantization from packed 8- and 4-bit codes.
- :mod:`.step`: a captured batch-1 step's one-call half-layers in one C loop.
- :mod:`.sample`: a token drawn from each row of logits (temperature, top-k, top-p, min-p) at a keyed uniform.

:mod:`.build` compiles and loads the library (:func:`load`; None without a compiler or with
``MOE_CPU_KERNELS=0``). Every kernel returns None (or False) where it does not apply; which path
runs is chosen by the callers (:mod:`ops` for the base ops), whose torch path is the reference.
"""
from .amx import (AMX_MAX_ROWS, StackedExtras, amx_available, amx_experts, amx_heads, amx_linear, amx_moe,
                  amx_moe_packed, amx_tiles)
from .amx_attention import prefill_attention, supports_prefill
from .build import advise_huge_pages, gather_small_storages, last_level_cache_bytes, load, set_malloc_thresholds
from .elementwise import (RouteToken, add_rms_norm, argmax_rows, rms_norm, rms_norm_rope_, rope_, route_select,
                          silu_mul, transpose_to_float, write_rows)
from .fused import GqaToken, MlaToken, SeqRows, gqa_token, mla_token
from .gemm import grouped_gemm
from .gemv import MoeToken, Outputs, Residual, expert_token, gemv, heads_vec, moe_token
from .paged_decode import cache_rows, paged_decode_attention, quantize_e4m3, supports_decode
from .quant import (Q8_GEMM_MAX_ROWS, Q_FP8, Q_INT4_X8, Q_INT8, q4_dequant, q4_gemm, q4x8_gemm, q8_available,
                    q8_dequant, q8_gemm, quant_moe_token, QuantMoeToken, round_x8)
from .sample import keyed_uniforms, logprob_rows, sample_rows
from .step import DecodeStep, LogitsRows, StepHalf

__all__ = [
    "load", "set_malloc_thresholds", "last_level_cache_bytes", "advise_huge_pages",
    "gather_small_storages",
    "supports_decode", "paged_decode_attention", "cache_rows", "quantize_e4m3", "supports_prefill",
    "prefill_attention",
    "rope_", "silu_mul", "rms_norm", "rms_norm_rope_", "add_rms_norm", "write_rows", "transpose_to_float",
    "route_select", "RouteToken",
    "argmax_rows", "sample_rows", "keyed_uniforms", "logprob_rows",
    "grouped_gemm", "gemv", "expert_token", "moe_token", "MoeToken", "heads_vec", "Residual", "Outputs",
    "AMX_MAX_ROWS", "amx_available", "amx_tiles", "amx_experts", "amx_moe", "amx_moe_packed", "amx_linear", "amx_heads",
    "StackedExtras",
    "mla_token", "MlaToken", "gqa_token", "GqaToken", "SeqRows",
    "Q_INT8", "Q_FP8", "Q_INT4_X8", "Q8_GEMM_MAX_ROWS", "q8_available", "q8_gemm", "q8_dequant", "q4_gemm",
    "q4_dequant", "q4x8_gemm", "round_x8", "quant_moe_token", "QuantMoeToken", "DecodeStep", "StepHalf", "LogitsRows",
]
