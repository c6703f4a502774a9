"""Start-up warm-up of the CPU GEMM shapes.

oneDNN JIT-compiles a kernel the first time it sees a GEMM shape (~1-15 ms each at these sizes),
and the engine's steps bring many: every row bucket of :func:`ops.padded_rows` (1, 8,
16, ..., 128, then multiples of 64 up to the step's token budget) for every weight shape, and the
batched decode experts' (experts, rows) pairs. Without a warm-up the first requests of a process
pay those builds (a 64-request burst: ~1.4 s of a 23 s run; a first 64-token prompt on the
DeepSeek-V3-shaped model: 0.17 instead of 0.10 s to its first token). :func:`warm_up` runs each
shape once through the same functions the model calls, on zeros, at load time -- as a GPU engine
captures its CUDA graphs. The compiled kernels stay in oneDNN's cache (1024 entries) for the
process's lifetime.
"""
from __future__ import annotations

import logging
import time

import torch

import cpu_kernels
from experts.grouped import BATCHED_MAX_ROWS, GroupedExperts, grouped_swiglu_torch
from ops import SMALL_M, PackedLinearWeight, linear, padded_rows
from parallel.layers import ColumnParallelLinear, ParallelLMHead, ReplicatedLinear, RowParallelLinear

from .models.mla import MLAttention

log = logging.getLogger("moe")


def row_buckets(max_rows: int) -> list[int]:
    """Every row count a CPU GEMM of 1..max_rows rows runs with (see :func:`padded_rows`)."""
    return sorted({padded_rows(m) for m in range(1, max_rows + 1)})


def warm_up(model: torch.nn.Module, max_tokens: int, max_seqs: int) -> tuple[int, float]:
    """Run every GEMM shape a CPU step of up to ``max_tokens`` tokens and ``max_seqs`` sequences
    makes once (results discarded; no collectives, so ranks may warm up independently).
    Returns (shapes run, seconds)."""
    t0 = time.perf_counter()
    buckets = row_buckets(max_tokens)
    seen: set = set()
    n = 0

    def once(key) -> bool:
        if key in seen:
            return False
        seen.add(key)
        return True

    # MLA reads kv_b_proj's weight through its per-head GEMMs (warmed below), and as a linear only
    # to decompress the latents of prompt chunks (mha_min_query rows or more, see MLAttention.decompresses)
    decompress_from = {id(m.kv_b_proj): m.mha_min_query for m in model.modules() if isinstance(m, MLAttention)}
    with torch.inference_mode():
        for mod in model.modules():
            if isinstance(getattr(mod, "weight", None), PackedLinearWeight):
                continue  # packed (--all-linear): not warmed (more than 8-12 rows build their GEMM on first use)
            if isinstance(mod, (ReplicatedLinear, ColumnParallelLinear, RowParallelLinear)):
                w = mod.weight
                # RowParallelLinear adds its bias after the all-reduce, outside the GEMM
                b = None if isinstance(mod, RowParallelLinear) else mod.bias
                if w.device.type != "cpu" or not once(("linear", tuple(w.shape), w.dtype, b is not None)):
                    continue
                for m in buckets:
                    if m < decompress_from.get(id(mod), 0):
                        continue
                    linear(w.new_zeros(m, w.shape[1]), w, b)
                    n += 1
                    if 1 < m <= SMALL_M:  # also as the transposed view a few-row GEMM returns (SwiGLU's output)
                        linear(w.new_zeros(w.shape[1], m).t(), w, b)
                        n += 1
            elif isinstance(mod, ParallelLMHead):
                w = mod.weight
                if w.device.type != "cpu" or not once(("head", tuple(w.shape), w.dtype)):
                    continue
                for m in row_buckets(max_seqs):
                    mod.local_logits(w.new_zeros(m, w.shape[1]))
                    n += 1
            elif isinstance(mod, GroupedExperts):
                n += _warm_experts(mod, buckets, once)
            elif isinstance(mod, MLAttention) and mod.kv_b_proj.weight.device.type == "cpu":  # per-head GEMMs
                w = mod.kv_b_proj.weight
                if once(("mla", tuple(w.shape), w.dtype, mod.num_heads)):
                    n += mod.warm_up(buckets)
    return n, time.perf_counter() - t0


def _warm_experts(mod: GroupedExperts, buckets: list[int], once) -> int:
    w13, w2 = mod.w13, mod.w2
    if w13.device.type != "cpu" or mod.resolved_backend != "torch":
        return 0
    if not once(("experts", tuple(w13.shape), tuple(w2.shape), w13.dtype, mod.b13 is not None, mod.activation)):
        return 0
    E, D = w13.shape[0], w13.shape[2]
    if cpu_kernels.amx_experts(w13.new_zeros(1, D), [1] + [0] * (E - 1), w13, w2, mod.tile_extras()) is not None:
        return 0  # the tile experts kernel takes every row count: oneDNN builds nothing for them
    n = 0

    def run(counts: list[int]) -> None:
        x = w13.new_zeros(sum(counts), D)
        grouped_swiglu_torch(x, counts, w13, w2, mod.b13, mod.b2, mod.activation)

    # one expert's rows beyond the batched size: the per-expert GEMMs at every bucket
    for m in buckets:
        if m > BATCHED_MAX_ROWS:
            run([m] + [0] * (E - 1))
            n += 2
    # decode-sized groups: batched pieces of 8/4/2 experts and lone experts at every row bucket
    for size in (8, 4, 2, 1):
        if size > E:
            continue
        for m in buckets:
            if m <= BATCHED_MAX_ROWS and (m > 1 or size == 1):
                run([m] * size + [0] * (E - size))
                n += 2
    return n
