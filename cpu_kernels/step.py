"""Binding of ``step.c``: a captured batch-1 step's one-call half-layers run by one C loop.

:class:`DecodeStep` takes the plans a captured step made for its half-layers (:class:`GqaToken`,
:class:`MlaToken`, :class:`RouteToken` with :class:`MoeToken` or :class:`QuantMoeToken`) and calls
their kernels one after another in C, each half reading the previous one's outputs; it stops where
a half is the caller's (an op-by-op half), a router meets a NaN or a kernel declines,
and the caller runs that half its own way and resumes after it. The results are the plans' calls'
one by one, bit for bit.
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .build import address, c_struct, declare, load
from .elementwise import RouteToken
from .fused import GqaToken, MlaToken, PackedArgs, SeqRows, projection
from .gemv import PLAN_ROWS, MoeToken, Outputs
from .quant import QuantMoeToken
from .sample import LogitProcessing, SampleScratch, sample_row_params

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
# moe_decode_steps' per-step callback: (step index, the step's input tokens [T]) -> 0, or nonzero to stop
OnStep = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64))
declare({
    # (halves, n, start, embed, ids, h, x, T, D, positions, block table, context length, row offsets, row lengths,
    # slots, h_last, y_last, threads)
    "moe_decode_step": [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _ptr, ctypes.c_int32, _ptr, _ptr,
                        _ptr, _ptr, _ptr, _int],
    # (x, T, D, weight, packed weight, V, scratch, its rows, logits, threads)
    "moe_logits_rows": [_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _int],
    # (halves, n, embed, D, T, ids, pos0, block table, row offsets, block size, h_last, y_last,
    # head weight, packed head, V, head scratch, its rows, logits, stop ids, their count, max steps, budget ns,
    # wake, wake0, each step's normed rows (or NULL), SampleRow per row (or NULL: greedy), sampling scratch
    # (float, int32), on_step callback (or NULL), threads)
    "moe_decode_steps": [_ptr, _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr,
                         _i64, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr,
                         OnStep, _int],
})
StepEmbedC = c_struct("StepEmbed", "emb: ptr; vocab: i64; nw: ptr; eps: f32; h x: ptr")
StepHalfC = c_struct("StepHalf", "kind: i64; plan route ids wts: ptr; K: i64; cos_tab sin_tab: ptr; "
                                 "interleaved: i64; nw: ptr; neps: f32; h_out y_out: ptr")
KINDS = {GqaToken: 1, MlaToken: 2, MoeToken: 3, QuantMoeToken: 4}  # the plans step.c runs (its STEP_*)


class StepHalf(NamedTuple):
    """A one-call half-layer for :class:`DecodeStep`: its plan (attention, or experts with their
    ``route`` plan or a fixed choice ``ids`` / ``weights [rows, K]``, a dense MLP's expert 0 of
    weight 1), and the next norm ``(weight [D] bf16, eps)`` its residual tail applies."""

    plan: GqaToken | MlaToken | MoeToken | QuantMoeToken
    norm: tuple[torch.Tensor, float]
    route: RouteToken | None = None
    ids: torch.Tensor | None = None
    weights: torch.Tensor | None = None


class DecodeStep:
    """The half-layers of a captured step (``halves``: a :class:`StepHalf`, or None for one the
    caller runs) for steps of up to ``rows`` rows of one sequence. Each half writes to buffers of
    its own, made here (:meth:`outputs`: their first rows, for the caller's half of a one-row
    step to write into); the last half's normed result is a new tensor each step."""

    def __init__(self, halves: list[StepHalf | None], D: int, rows: int,
                 embed: tuple[torch.Tensor, torch.Tensor, float] | None = None):
        self.n, self.D, self.rows = len(halves), D, rows
        self.embeds, self._embed_ref = self._embedding(embed, D, rows), None
        if self.embeds:
            self._embed_ref = address(self._embed_c)
        self._h = torch.empty(self.n, rows, D, dtype=torch.bfloat16)
        self._y = torch.empty(self.n, rows, D, dtype=torch.bfloat16)
        self._steps_y = torch.empty(rows, D, dtype=torch.bfloat16)  # (steps: the last half's normed rows, logits)
        self._steps_logits: torch.Tensor | None = None
        self._sampling = SampleScratch()
        self._one = [Outputs(self._h[i, :1], self._y[i, :1]) for i in range(self.n)]
        self._c = (StepHalfC * self.n)()
        self._halves, self._keep = halves, []  # (the plans and tensors the C structs point into)
        self.plans = [None] * self.n  # the plan of each half the loop runs (None: the caller's)
        for i, half in enumerate(halves):
            c = self._c[i]
            c.h_out, c.y_out = address(self._h[i]), address(self._y[i])
            kind = self._kind(half, D, rows)
            if kind == 0:
                continue
            w, eps = half.norm
            c.kind, c.plan, c.nw, c.neps = kind, half.plan.ref, address(w), eps
            if half.route is not None:
                c.route = half.route.ref
            elif half.ids is not None:
                ids = half.ids.to(torch.int64).contiguous()
                wts = half.weights.to(torch.float32).contiguous()
                c.ids, c.wts, c.K = address(ids), address(wts), ids.shape[1]
                self._keep.append((ids, wts))
            self.plans[i] = half.plan
        self._ref = address(self._c)

    def _embedding(self, embed: tuple[torch.Tensor, torch.Tensor, float] | None, D: int, rows: int) -> bool:
        """The step's embedding ``(weight [vocab, D], first input norm's weight [D], eps)`` for the
        loop to run first (:meth:`from_ids`), where it can: bf16 CPU tensors, contiguous."""
        if embed is None:
            return False
        emb, w, eps = embed
        if (any(t.dtype != torch.bfloat16 or t.is_cuda or not t.is_contiguous() for t in (emb, w))
                or emb.dim() != 2 or emb.shape[1] != D or w.shape != (D,)):
            return False
        self._eh, self._ex = torch.empty(rows, D, dtype=torch.bfloat16), torch.empty(rows, D, dtype=torch.bfloat16)
        self._e = (self._eh[:1], self._ex[:1])
        self._embed_c = StepEmbedC(address(emb), emb.shape[0], address(w), eps, address(self._eh), address(self._ex))
        self._embed_keep = (emb, w)
        return True

    @staticmethod
    def _kind(half: StepHalf | None, D: int, rows: int) -> int:
        """step.c's kind for ``half``, 0 where the loop cannot run it (the caller's)."""
        if half is None or not half.plan.ok or type(half.plan) not in KINDS:
            return 0
        w, _ = half.norm
        if w.dtype != torch.bfloat16 or w.shape != (D,) or not w.is_contiguous() or w.is_cuda or half.plan.D != D:
            return 0
        kind = KINDS[type(half.plan)]
        if kind >= 3:
            if half.route is not None:
                if half.route.D != D or rows > RouteToken.MAX_ROWS:
                    return 0
            elif (half.ids is None or half.weights is None or half.ids.shape != half.weights.shape
                  or half.ids.dim() != 2 or half.ids.shape[0] < rows or not 0 < half.ids.shape[1] <= 64):
                return 0
        return kind

    def outputs(self, i: int) -> Outputs:
        """Half ``i``'s buffers' first rows (``[1, D]``): where a one-row step's caller half writes."""
        return self._one[i]

    def rotary(self, i: int, cos_PH: torch.Tensor, sin_PH: torch.Tensor, interleaved: bool) -> None:
        """Attention half ``i``'s rotary tables, set again whenever they grow (they must live as long
        as they are set). Tables the kernel does not take (not float32 and contiguous, or a GQA
        rotary over part of the head) leave that half to the caller, whose plan declines them too."""
        plan = self._halves[i].plan if self._halves[i] is not None else None
        if (cos_PH.dtype != torch.float32 or sin_PH.dtype != torch.float32 or cos_PH.shape != sin_PH.shape
                or not cos_PH.is_contiguous() or not sin_PH.is_contiguous()
                or (isinstance(plan, GqaToken) and cos_PH.shape[-1] * 2 != plan.hd)):
            self._c[i].kind, self.plans[i] = 0, None
            return
        c = self._c[i]
        c.cos_tab, c.sin_tab, c.interleaved = address(cos_PH), address(sin_PH), int(interleaved)

    def __call__(self, start: int, h_TD: torch.Tensor, x_TD: torch.Tensor, positions_T: torch.Tensor,
                 block_table: torch.Tensor, context_len: int, slots_T: torch.Tensor, last: torch.Tensor,
                 rows: SeqRows | None = None) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Halves ``start ..`` of a step of ``T`` rows (``h``, ``x [T, D]``: half ``start``'s inputs;
        ``positions``, ``slots [T]`` int64, ``block_table`` int32: one sequence's blocks (its rows end
        its ``context_len`` tokens), or with ``rows`` (:class:`SeqRows`) the step's table of several
        sequences; ``last [T, D]``: where the last half's normed result goes). Returns ``(stop, h, x)``:
        the first half not run (``n`` when all ran) and its inputs (``x`` is ``last`` then)."""
        T = x_TD.shape[0]
        if any(t.shape != (T, self.D) or t.dtype != torch.bfloat16 or not t.is_contiguous() for t in (h_TD, x_TD)):
            raise ValueError("DecodeStep: h and x must be contiguous bf16 [T, D]")
        return self._run(start, h_TD, x_TD, None, T, positions_T, block_table, context_len, slots_T, last, rows)

    def from_ids(self, ids_T: torch.Tensor, positions_T: torch.Tensor, block_table: torch.Tensor, context_len: int,
                 slots_T: torch.Tensor, last: torch.Tensor,
                 rows: SeqRows | None = None) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """As ``self(0, ...)`` for the step's token ids (``ids [T]`` int64), embedded and normed
        first by the loop (:attr:`embeds`); None where it does not (an id outside the vocabulary:
        the caller embeds them its way)."""
        T = ids_T.shape[0]
        if not self.embeds or ids_T.dtype != torch.int64 or ids_T.dim() != 1 or not ids_T.is_contiguous():
            return None
        return self._run(0, None, None, ids_T, T, positions_T, block_table, context_len, slots_T, last, rows)

    def _run(self, start: int, h_TD: torch.Tensor | None, x_TD: torch.Tensor | None, ids_T: torch.Tensor | None,
             T: int, positions_T: torch.Tensor, block_table: torch.Tensor, context_len: int, slots_T: torch.Tensor,
             last: torch.Tensor, rows: SeqRows | None) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        if (not 0 < T <= self.rows or (T > context_len if rows is None else not rows.fits(T, block_table))
                or last.shape != (T, self.D) or last.dtype != torch.bfloat16
                or not last.is_contiguous() or positions_T.dtype != torch.int64 or slots_T.dtype != torch.int64
                or positions_T.shape != (T,) or slots_T.shape != (T,) or not positions_T.is_contiguous()
                or not slots_T.is_contiguous() or block_table.dtype != torch.int32 or block_table.stride(-1) != 1):
            raise ValueError("DecodeStep: inputs of another shape, dtype or layout than the step's")
        stop = load().moe_decode_step(self._ref, self.n, start, self._embed_ref, address(ids_T), address(h_TD),
                                      address(x_TD), T, self.D, positions_T.data_ptr(), block_table.data_ptr(),
                                      context_len, *((None, None) if rows is None else (address(rows.offsets),
                                                                                        address(rows.lens))),
                                      slots_T.data_ptr(), self._h[-1].data_ptr(), last.data_ptr(),
                                      torch.get_num_threads())
        if stop < 0:
            return None
        if stop == start:
            return (stop, h_TD, x_TD) if ids_T is None else (0, *self._embedded(T))
        if stop == self.n:
            return stop, self._h[-1, :T], last
        if T == 1:
            return stop, *self._one[stop - 1]
        return stop, self._h[stop - 1, :T], self._y[stop - 1, :T]

    @property
    def runs_whole(self) -> bool:
        """Whether the loop runs a whole one-row step from its token: the embedding and every half."""
        return self.embeds and all(p is not None for p in self.plans)

    def decode_steps(self, head: LogitsRows, tokens: list[int], positions: list[int], block_table: torch.Tensor,
                     block_size: int, steps: int, stop: tuple[int, ...] = (), budget_s: float = float("inf"),
                     wake: ctypes.c_int64 | None = None, rows_out: torch.Tensor | None = None,
                     sample: Sequence[tuple[float, int, float, float, int]] | None = None,
                     processing: Sequence[LogitProcessing | None] | None = None,
                     raw: Sequence[torch.Tensor | None] | None = None,
                     on_step: Callable[[int, Sequence[int]], bool] | None = None) -> list[list[int]]:
        """Up to ``steps`` decode steps of ``T = len(tokens)`` sequences in one C call
        (``moe_decode_steps``): sequence t's first step embeds ``tokens[t]`` at ``positions[t]``, each
        later one the token its step before chose; each step is a :meth:`from_ids` step of the T rows
        over ``block_table`` (int32, contiguous: ``[T, blocks]``, row t sequence t's blocks through
        position ``positions[t] + steps - 1``; ``[blocks]`` for one), ``head``'s logits of it and each
        row's token: the greedy choice (the first NaN, else the first largest: ``argmax_rows``), or with
        ``sample`` row t's draw as ``sample[t] = (temperature, top_k, top_p, min_p, key)`` says at the
        token's position (``sample_rows``), bit for bit; with ``processing``, row t's logits processed
        first as ``processing[t]`` says (biases, penalties: ``moe_penalize_rows``), its counts then
        taking each chosen token; with ``raw``, row t's logits of step i before any processing copied
        to ``raw[t][i]`` (float32 ``[steps, V]``, contiguous; None: not kept); with ``on_step``, called
        in each step after its logits and before its draws as ``on_step(i, tokens)`` (``tokens[t]``: row
        t's input token of step i, the one step i - 1 chose): a grammar takes the token and writes the
        row's mask (``LogitProcessing.mask``); False ends the call there, before step i is counted.
        Stops early after a step in which some row chose a token in ``stop``, once ``budget_s`` seconds
        have passed, or once ``wake`` (read at each step's end) has changed. With ``rows_out`` (bf16
        ``[steps, T, D]``, contiguous) each completed step's normed last rows, the LM head's input, are
        written there. Returns each sequence's tokens, one per step completed ([] each where the loop
        does not run whole steps (:attr:`runs_whole`) or its first step declines: the caller runs it
        its own way)."""
        T = len(tokens)
        if not (self.runs_whole and head.ok and head.D == self.D and steps > 0 and 0 < T <= min(self.rows, 32)):
            return [[] for _ in tokens]
        table = block_table.view(1, -1) if block_table.dim() == 1 else block_table
        if (table.dtype != torch.int32 or table.dim() != 2 or table.shape[0] != T or not table.is_contiguous()
                or len(positions) != T or table.shape[1] * block_size < max(positions) + steps):
            raise ValueError("DecodeStep.decode_steps: the block table must be contiguous int32 [T, blocks], each "
                             "row its sequence's blocks through the last step")
        if rows_out is not None and (rows_out.dtype != torch.bfloat16 or rows_out.shape != (steps, T, self.D)
                                     or not rows_out.is_contiguous()):
            raise ValueError("DecodeStep.decode_steps: rows_out must be contiguous bf16 [steps, T, D]")
        if sample is not None and len(sample) != T:
            raise ValueError(f"DecodeStep.decode_steps: sample has {len(sample)} rows for {T} sequences")
        if raw is not None and (sample is None or len(raw) != T or any(
                r is not None and (r.dtype != torch.float32 or r.shape != (steps, head.V) or not r.is_contiguous())
                for r in raw)):
            raise ValueError("DecodeStep.decode_steps: raw needs sample and, per row, None or contiguous float32 "
                             "[steps, V]")
        ids = (ctypes.c_int64 * ((steps + 1) * T))(*tokens)
        pos0 = (ctypes.c_int64 * T)(*positions)
        toff = (ctypes.c_int64 * T)(*range(0, T * table.shape[1], table.shape[1])) if T > 1 else None
        stops = (ctypes.c_int64 * max(len(stop), 1))(*stop)
        if wake is None:
            wake = ctypes.c_int64(0)
        if self._steps_logits is None or self._steps_logits.shape != (self.rows, head.V):
            self._steps_logits = torch.empty(self.rows, head.V, dtype=torch.float32)
        rows_c, sval, sidx = None, None, None
        if sample is not None:
            rows_c = sample_row_params(sample, processing, raw)
            sval, sidx = self._sampling.take(T, head.V)
        budget_ns = int(min(budget_s, 1e9) * 1e9)
        callback, failed = OnStep(), []  # (NULL)
        if on_step is not None:
            if sample is None:
                raise ValueError("DecodeStep.decode_steps: on_step needs sample (the masks it writes are rows')")

            def call(i: int, tokens) -> int:
                try:
                    return 0 if on_step(i, tokens[:T]) else 1
                except BaseException as e:  # (ctypes would print it and go on): end the call, raise it after
                    failed.append(e)
                    return 1

            callback = OnStep(call)
        done = load().moe_decode_steps(self._ref, self.n, self._embed_ref, self.D, T, ids, pos0, table.data_ptr(),
                                       toff, block_size, self._h[-1].data_ptr(), self._steps_y.data_ptr(),
                                       *head.args, self._steps_logits.data_ptr(), stops, len(stop), steps,
                                       budget_ns, ctypes.addressof(wake), wake.value,
                                       None if rows_out is None else rows_out.data_ptr(), rows_c, sval, sidx,
                                       callback, torch.get_num_threads())
        if failed:
            raise failed[0]
        return [list(ids[T + t:(done + 1) * T:T]) for t in range(T)]

    def _embedded(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The loop's embedded rows and their norm, as tensors."""
        return (self._e[0], self._e[1]) if T == 1 else (self._eh[:T], self._ex[:T])


class LogitsRows:
    """The LM head of a captured step's rows in one C call: ``plan(x [T, D])`` returns float32
    logits ``[T, V]``, each row as a one-row step's head computes it (``ops.lm_head_logits`` at one
    row: the bf16 GEMV rounded to bf16, then widened, the weight read once for all rows; or a packed
    weight's (:data:`PackedArgs`) GEMM of each row in float32). ``plan.ok`` is False where it does
    not apply (then every call returns None)."""

    def __init__(self, w: torch.Tensor | PackedArgs):
        self.ok = False
        if isinstance(w, torch.Tensor):
            if w.dim() != 2:
                return
            V, D = w.shape
        else:
            V, D = w[0].shape[0], w[0].shape[1] * (2 if w[1] is not None else 1)
        proj = projection(w, V, D) if load() is not None else None
        if proj is None:
            return
        self.V, self.D = V, D
        self._tmp = torch.empty(PLAN_ROWS, V, dtype=torch.bfloat16)  # the bf16 GEMV's rounded rows
        self._keep = (w, proj)
        self._args = (proj[0], address(proj[1]), V, address(self._tmp), PLAN_ROWS)
        self.ok = True

    @property
    def args(self) -> tuple:
        """The head's arguments of ``moe_logits_rows`` after ``x, T, D`` and before ``logits`` (weight,
        packed weight, V, scratch, its rows), for a C caller of it (:meth:`DecodeStep.decode_steps`)."""
        return self._args

    def __call__(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        if (not self.ok or x_TD.dtype != torch.bfloat16 or x_TD.dim() != 2 or x_TD.shape[1] != self.D
                or not x_TD.is_contiguous() or x_TD.is_cuda):
            return None
        T = x_TD.shape[0]
        out = torch.empty(T, self.V, dtype=torch.float32)
        if load().moe_logits_rows(x_TD.data_ptr(), T, self.D, *self._args, out.data_ptr(), torch.get_num_threads()):
            return None
        return out
