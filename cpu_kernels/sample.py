"""Binding of ``sample.c``: a token drawn from each row of logits (temperature, top-k, top-p, min-p) at
one keyed uniform, the draw the captured step's decode loop makes too. The reference is
``ops.sample.draw_rows_torch`` (the same kept tokens and the same uniform, in torch ops)."""
from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .build import address, c_struct, declare, load

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
declare({
    # (logits, R, V, row stride, SampleRow per row, positions, float scratch, int32 scratch, tokens, threads)
    "moe_sample_rows": [_ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _int],
    "moe_keyed_uniform": [_ptr, _ptr, _i64, _ptr],  # (keys, positions, n, uniforms)
    # (logits, R, V, row stride, chosen tokens, n, ids [R, n + 1], values [R, n + 1], threads)
    "moe_logprob_rows": [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _int],
})
SampleRowC = c_struct("SampleRow", "temperature top_p min_p: f32; top_k key: i64; presence frequency repetition: f32; "
                                   "n_bias: i64; bias_ids bias_vals counts seen: ptr; n_ban: i64; ban_ids: ptr; "
                                   "ban_left: i64; raw mask: ptr")


class LogitProcessing(NamedTuple):
    """What a decode loop applies to a row's logits before drawing (``moe_penalize_rows``), as the
    sampler's ``process_logits`` does: logit biases (``bias_ids`` int32, ``bias_vals`` float32), presence
    and frequency penalties over ``counts`` (int32 ``[V]``, each token's occurrences in the output), the
    repetition penalty over ``seen`` (uint8 ``[V]``: in the prompt or the output), and for the next
    ``ban_left`` tokens ``banned`` (int64: EOS and stop ids while min_tokens is pending) at -inf; with
    ``mask`` (int32 ``[ceil(V / 32)]``, a grammar's bitmask, written before each step's draw by the loop's
    ``on_step``) the tokens it disallows at -inf after the penalties. The loop adds each chosen token to
    ``counts`` and ``seen`` (they must stay alive and contiguous through the call)."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    bias_ids: torch.Tensor | None = None
    bias_vals: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    seen: torch.Tensor | None = None
    banned: torch.Tensor | None = None
    ban_left: int = 0
    mask: torch.Tensor | None = None


def signed64(key: int) -> int:
    """A 64-bit key (0 <= key < 2**64) as the int64 whose bits it is."""
    return key - (1 << 64) if key >= 1 << 63 else key


def sample_row_params(rows: Sequence[tuple[float, int, float, float, int]],
                      processing: Sequence[LogitProcessing | None] | None = None,
                      raw: Sequence[torch.Tensor | None] | None = None):
    """ctypes ``SampleRow[len(rows)]`` from ``(temperature, top_k, top_p, min_p, key)`` tuples
    (temperature 0: greedy; top_k 0 and top_p 1: off; key in [0, 2**64)), each row's logit
    processing (None: none) and where a decode loop copies its raw logits (float32 ``[steps, V]``,
    contiguous, alive through the call; None: nowhere)."""
    out = (SampleRowC * len(rows))()
    for i, (r, (temperature, top_k, top_p, min_p, key)) in enumerate(zip(out, rows)):
        r.temperature, r.top_k, r.top_p, r.min_p, r.key = temperature, top_k, top_p, min_p, signed64(key)
        r.repetition = 1.0
        proc = processing[i] if processing is not None else None
        if proc is not None:
            r.presence, r.frequency, r.repetition = proc.presence, proc.frequency, proc.repetition
            if proc.bias_ids is not None:
                r.n_bias = proc.bias_ids.numel()
                r.bias_ids, r.bias_vals = address(proc.bias_ids), address(proc.bias_vals)
            r.counts, r.seen = address(proc.counts), address(proc.seen)
            if proc.banned is not None and proc.ban_left > 0:
                r.n_ban, r.ban_ids, r.ban_left = proc.banned.numel(), address(proc.banned), proc.ban_left
            if proc.mask is not None:
                r.mask = address(proc.mask)
        if raw is not None and raw[i] is not None:
            r.raw = address(raw[i])
    return out


class SampleScratch:
    """What ``moe_sample_rows`` draws in: ``rows (2 V + 64)`` floats and ``rows (V + 64)`` int32, grown on demand."""

    def __init__(self):
        self.f = torch.empty(0, dtype=torch.float32)
        self.i = torch.empty(0, dtype=torch.int32)

    def take(self, rows: int, V: int) -> tuple[int, int]:
        if self.i.numel() < rows * (V + 64):
            self.f = torch.empty(rows * (2 * V + 64), dtype=torch.float32)
            self.i = torch.empty(rows * (V + 64), dtype=torch.int32)
        return self.f.data_ptr(), self.i.data_ptr()


_local = threading.local()  # (each thread's own scratch)


def _scratch() -> SampleScratch:
    if not hasattr(_local, "scratch"):
        _local.scratch = SampleScratch()
    return _local.scratch


def _logit_rows(x_RV: torch.Tensor) -> bool:
    """Whether the kernels here take ``x``: float32 CPU rows ``[R, V]`` of unit stride, none empty."""
    return (x_RV.dtype == torch.float32 and x_RV.dim() == 2 and x_RV.device.type == "cpu" and x_RV.stride(-1) == 1
            and load() is not None and x_RV.shape[0] > 0 and x_RV.shape[1] > 0)


def sample_rows(x_RV: torch.Tensor, rows: Sequence[tuple[float, int, float, float, int]],
                positions: Sequence[int]) -> list[int] | None:
    """Row r's token of float32 CPU logits ``x [R, V]`` (unit stride within rows), drawn as ``rows[r]``
    = ``(temperature, top_k, top_p, min_p, key)`` says at its sequence's position ``positions[r]``
    (``moe_sample_rows``); None when the kernel does not apply."""
    if not _logit_rows(x_RV):
        return None
    R, V = x_RV.shape
    out = (ctypes.c_int64 * R)()
    pos = (ctypes.c_int64 * R)(*positions)
    f, i = _scratch().take(R, V)
    load().moe_sample_rows(x_RV.data_ptr(), R, V, x_RV.stride(0), sample_row_params(rows), pos, f, i, out,
                           torch.get_num_threads())
    return list(out)


def logprob_rows(x_RV: torch.Tensor, chosen: Sequence[int], n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Row r's log-softmax over float32 CPU logits ``x [R, V]`` at ``chosen[r]`` and at its ``n`` largest
    logits (largest first, ties in token order): ids int64 and values float32, ``[R, n + 1]`` each, the
    chosen token first (``moe_logprob_rows``); None where the kernel does not apply (n > 64, a row whose
    largest logit is NaN or infinite)."""
    if not (_logit_rows(x_RV) and 0 <= n <= 64):
        return None
    R, V = x_RV.shape
    ids = torch.empty(R, n + 1, dtype=torch.int64)
    vals = torch.empty(R, n + 1, dtype=torch.float32)
    tokens = (ctypes.c_int64 * R)(*chosen)
    if load().moe_logprob_rows(x_RV.data_ptr(), R, V, x_RV.stride(0), tokens, n, ids.data_ptr(), vals.data_ptr(),
                               torch.get_num_threads()) != 0:
        return None
    return ids, vals


def keyed_uniforms(keys: Sequence[int], positions: Sequence[int]) -> list[float] | None:
    """The uniforms ``moe_sample_rows`` draws at ``(keys[i], positions[i])``; None without the library."""
    if load() is None:
        return None
    n = len(keys)
    out = (ctypes.c_double * n)()
    load().moe_keyed_uniform((ctypes.c_int64 * n)(*map(signed64, keys)), (ctypes.c_int64 * n)(*positions), n, out)
    return list(out)
