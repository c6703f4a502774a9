"""Grouped-GEMM experts over expert-major rows: ``experts(x_RD, counts_e) -> y_RD``.

Rows arrive sorted by (local) expert, ``counts_e[i]`` of them for expert i. Every expert's
rows go through one fused gate/up GEMM, SwiGLU, and one down GEMM. Backends:
- ``torch``: the CPU fast path; a loop over experts (never over tokens), skipping empty ones.
- ``triton``: the GPU kernel in :mod:`experts.triton_moe` (block-aligned sorted ids).
- ``megablocks``: MegaBlocks' grouped GEMM where that package is installed (GPU only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

import cpu_kernels
from ops import ROW_BUCKET, bmm, grouped_linear, linear, pad_rows, padded_rows, silu_mul

from .reference import swiglu

Backend = Literal["auto", "torch", "triton", "megablocks"]


@dataclass(frozen=True)
class Activation:
    """SwiGLU, optionally gpt-oss's clamped variant (``alpha``, ``limit``)."""

    limit: float | None = None
    alpha: float | None = None


def fused_swiglu(h: torch.Tensor, act: Activation = Activation(), dim: int = -1) -> torch.Tensor:
    """:func:`experts.reference.swiglu` of ``h`` laid out ``[gate | up]`` along ``dim`` (-1, or 1
    of a 3-D ``[n, 2F, m]``). Plain SwiGLU is :func:`ops.silu_mul` (one C pass on CPU, also on the
    transposed views the few-row GEMMs return); gpt-oss's clamped form the torch ops."""
    if act.alpha is None and act.limit is None:
        return silu_mul(h, dim)
    if dim == 1 and h.dim() == 3:
        return swiglu(h.transpose(1, 2), act.limit, act.alpha).transpose(1, 2)
    return swiglu(h, act.limit, act.alpha)


def grouped_swiglu_torch(x_RD: torch.Tensor, counts: list[int], w13_e2FD: torch.Tensor, w2_eDF: torch.Tensor,
                         b13_e2F: torch.Tensor | None, b2_eD: torch.Tensor | None, act: Activation) -> torch.Tensor:
    if x_RD.device.type == "cpu" and 0 < max(counts, default=0):
        E, F2, D = w13_e2FD.shape
        extras = cpu_kernels.StackedExtras(b13_e2F, b2_eD, act.alpha, act.limit, E, F2 // 2, D)
        y_RD = cpu_kernels.amx_experts(x_RD, counts, w13_e2FD, w2_eDF, extras)  # on AMX tiles (or vdpbf16ps)
        if y_RD is not None:
            return y_RD
    h = grouped_linear(x_RD, w13_e2FD, counts, b13_e2F)  # every expert in one call, where native (AVX2)
    if h is not None:
        y_RD = grouped_linear(fused_swiglu(h, act), w2_eDF, counts, b2_eD)
        if y_RD is not None:
            return y_RD
    y_RD = torch.empty(x_RD.shape[0], w2_eDF.shape[1], dtype=x_RD.dtype, device=x_RD.device)
    if x_RD.device.type == "cpu" and 0 < max(counts, default=0) <= BATCHED_MAX_ROWS:
        _batched_runs(x_RD, counts, w13_e2FD, w2_eDF, b13_e2F, b2_eD, act, y_RD)
        return y_RD
    # an expert's rows run padded to padded_rows(n) (few distinct GEMM shapes on CPU), the padding
    # being the next expert's rows, or zeros past the end; padded rows' results are dropped
    x_pad = x_RD
    if x_RD.device.type == "cpu" and any(padded_rows(n) != n for n in counts):
        x_pad = pad_rows(x_RD, x_RD.shape[0] + ROW_BUCKET)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        x = x_pad[start:start + padded_rows(n)] if x_pad is not x_RD else x_RD[start:start + n]
        h = linear(x, w13_e2FD[e], None if b13_e2F is None else b13_e2F[e])
        h = fused_swiglu(h, act)
        y_RD[start:start + n] = linear(h, w2_eDF[e], None if b2_eD is None else b2_eD[e])[:n]
        start += n
    return y_RD


def swiglu_mlp_cpu(x_TD: torch.Tensor, w13_2FD: torch.Tensor, w2_DF: torch.Tensor) -> torch.Tensor | None:
    """``w2 @ (silu(g) * u)`` with ``[g | u] = w13 @ x`` on CPU in one C call (the one-token expert
    kernel at one row, the AMX experts kernel at more), with the roundings of the three-step path;
    None when neither applies."""
    if x_TD.device.type != "cpu" or x_TD.dim() != 2:
        return None
    if x_TD.shape[0] == 1:
        y = cpu_kernels.expert_token(x_TD[0], [w13_2FD], [w2_DF], [1.0])
        return None if y is None else y.unsqueeze(0)
    return cpu_kernels.amx_experts(x_TD, [x_TD.shape[0]], w13_2FD.unsqueeze(0), w2_DF.unsqueeze(0))


# Decode-sized groups (every expert's rows fit in this many) run as batched GEMMs over pieces of
# up to 8 consecutive non-empty experts, rows padded to the piece's largest group rounded up to a
# multiple of 8 (few distinct shapes, so oneDNN's kernels for them stay cached; a new shape costs
# ~5 ms): two bmm per piece instead of two GEMMs (and their small ops) per expert, and the
# batched form streams the weights faster on CPU (measured with 8 experts of 1024 x 2816: 44-49
# vs 52-61 ms per 8 layers at 8-32 rows).
BATCHED_MAX_ROWS = 64


def _batched_runs(x_RD: torch.Tensor, counts: list[int], w13_e2FD: torch.Tensor, w2_eDF: torch.Tensor,
                  b13_e2F: torch.Tensor | None, b2_eD: torch.Tensor | None, act: Activation,
                  y_RD: torch.Tensor) -> None:
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    for e, end in _pieces(counts):
        r0, r1 = starts[e], starts[end]
        if end - e == 1:  # a lone expert: plain GEMMs
            h = fused_swiglu(linear(x_RD[r0:r1], w13_e2FD[e], None if b13_e2F is None else b13_e2F[e]), act)
            y_RD[r0:r1] = linear(h, w2_eDF[e], None if b2_eD is None else b2_eD[e])
            continue
        m = padded_rows(max(max(counts[e:end]), 2))
        # row j of expert e + i sits at padded position i*m + j (built in Python: a few index ops
        # per piece instead of two per expert); the padding rows are zeros
        expert_of = [i - e for i in range(e, end) for _ in range(counts[i])]
        row_of = [j for i in range(e, end) for j in range(counts[i])]
        ei, ji = torch.tensor(expert_of), torch.tensor(row_of)
        x = x_RD.new_zeros(end - e, m, x_RD.shape[1])
        x[ei, ji] = x_RD[r0:r1]
        h = bmm(w13_e2FD[e:end], x.transpose(1, 2))  # [n, 2F, m]: weights stream once per piece
        if b13_e2F is not None:
            h = h + b13_e2F[e:end].unsqueeze(-1)
        a = fused_swiglu(h, act, dim=1)  # [n, F, m]
        y = bmm(w2_eDF[e:end], a)  # [n, D, m]
        if b2_eD is not None:
            y = y + b2_eD[e:end].unsqueeze(-1)
        y_RD[r0:r1] = y.transpose(1, 2)[ei, ji]


def _pieces(counts: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive non-empty experts, cut into pieces of 8, 4, 2 or 1 experts (few
    distinct batch sizes, so few GEMM shapes): ``[(first, end), ...]``."""
    out, e = [], 0
    while e < len(counts):
        if counts[e] == 0:
            e += 1
            continue
        end = e
        while end < len(counts) and counts[end] > 0:
            end += 1
        while e < end:
            size = next(p for p in (8, 4, 2, 1) if p <= end - e)
            out.append((e, e + size))
            e += size
    return out


def resolve_backend(backend: Backend, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" else "torch"


def expert_slots(num_experts: int, expert_start: int = 0, num_local_experts: int | None = None,
                 slot_experts: Sequence[int] | None = None) -> tuple[int, ...]:
    """The logical expert each slot holds: ``slot_experts`` if given (any distinct ids), else the
    contiguous range ``expert_start .. expert_start + num_local_experts - 1`` (validated)."""
    if slot_experts is None:
        n = num_experts - expert_start if num_local_experts is None else num_local_experts
        slot_experts = range(expert_start, expert_start + n)
    slots = tuple(int(e) for e in slot_experts)
    if not slots or len(set(slots)) != len(slots) or not all(0 <= e < num_experts for e in slots):
        raise ValueError(f"slot_experts {list(slots)} must be distinct expert ids in [0, {num_experts})")
    return slots


class SlottedExperts(nn.Module):
    """The experts interface every experts module implements (plain, packed, offloaded).

    - ``forward(x_RD, counts_e) -> y_RD``: rows grouped by slot, as a dispatcher hands them over.
    - ``forward_local(x_TD, ids_TK, weights_TK, shared=None) -> y_TD | None``: dispatch, experts
      and combine in one go for a layer whose experts are all on this process (a one-token step
      through :meth:`forward_token`); None where that does not apply (then dispatch). Only classes
      with ``has_forward_local`` offer it and :meth:`forward_token`; ``SparseMoE`` reads the flag
      once. Classes with ``fuses_shared`` also take a shared expert's ``(w13, w2)`` there, added as
      :meth:`forward_token` adds it (None where that call does not apply).
    - ``forward_token(x_1D, ids_K, weights_K, shared=None, residual=None, into=None)``: one token
      (the captured batch-1 decode, :mod:`moe.cpu_decode`), optionally with a shared expert and the
      decoder's residual add and next norm in the same C call, written to ``into``
      (:class:`cpu_kernels.Outputs`) when given; None where that does not apply.
    - loading: :meth:`owns` (which experts' tensors to read), :meth:`weight_loader` (place one
      checkpoint tensor), ``offloaded`` (the loader hands tensor locations to ``add_source``
      instead), :meth:`post_load` (once the weights are in).

    Slot ``i`` holds logical expert ``slot_experts[i]``. ``backend`` (auto/torch/triton/megablocks)
    is resolved against the weights' device when set, after ``.to()`` and in :meth:`post_load`:
    ``resolved_backend`` is what the calls read.
    """

    offloaded: bool = False  # the tensors stay in the checkpoint files (experts/offload.py)
    has_forward_local: bool = False  # forward_local and forward_token exist
    fuses_shared: bool = False  # forward_local takes a shared expert

    def _set_slots(self, num_experts: int, expert_start: int, num_local_experts: int | None,
                   slot_experts: Sequence[int] | None) -> None:
        self.slot_experts = expert_slots(num_experts, expert_start, num_local_experts, slot_experts)
        self._slot_of = {e: i for i, e in enumerate(self.slot_experts)}
        self.num_experts, self.num_local = num_experts, len(self.slot_experts)
        # the lowest expert held: with a contiguous range, slot i holds expert_start + i
        self.expert_start = min(self.slot_experts)
        self.holds_all = self.slot_experts == tuple(range(num_experts))  # every expert, in id order

    @property
    def logical_ids(self) -> list[int]:
        """The distinct experts held, ascending."""
        return sorted(self.slot_experts)

    def owns(self, expert_id: int) -> bool:
        return expert_id in self._slot_of

    @property
    def backend(self) -> Backend:
        return self._backend

    @backend.setter
    def backend(self, backend: Backend) -> None:
        self._backend = backend
        self._resolve_backend()

    def _resolve_backend(self) -> None:
        p = next(self.parameters(), None)
        self.resolved_backend = resolve_backend(self._backend, p.device if p is not None else torch.device("cpu"))

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if hasattr(self, "_backend"):  # moved (.to, .cuda): the backend may resolve differently
            self._resolve_backend()
        return out

    def forward(self, x_RD: torch.Tensor, counts_e: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_local(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                      shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        return None

    def forward_token(self, x_1D: torch.Tensor, ids_K: torch.Tensor, weights_K: torch.Tensor,
                      shared: tuple[torch.Tensor, ...] | None = None,
                      residual: cpu_kernels.Residual | None = None, into: cpu_kernels.Outputs | None = None):
        return None

    def token_plan(self, shared: tuple[torch.Tensor, ...] | None = None):
        """The plan of :meth:`forward_token`'s one C call (a captured step runs it from C), or None."""
        return None

    @staticmethod
    def _same_shared(kept: tuple[torch.Tensor, ...] | None, shared: tuple[torch.Tensor, ...] | None) -> bool:
        """Whether a plan built for shared expert ``kept`` serves ``shared``: the same tensors (callers
        build their tuples afresh; a plan is kept per weights, not per tuple)."""
        if kept is None or shared is None:
            return kept is shared
        return len(kept) == len(shared) and all(a is b for a, b in zip(kept, shared))

    def tile_extras(self) -> cpu_kernels.StackedExtras:
        """What the experts kernels (:func:`cpu_kernels.amx_moe` and kin) take for these experts'
        biases and activation (none for plain SwiGLU), checked once per bias tensors."""
        b13, b2 = getattr(self, "b13", None), getattr(self, "b2", None)
        key = tuple(None if b is None else b.data_ptr() for b in (b13, b2))
        cached = getattr(self, "_tile_extras", None)
        if cached is None or cached[0] != key:
            act = self.activation
            cached = (key, cpu_kernels.StackedExtras(b13, b2, act.alpha, act.limit, self.num_local,
                                                     self.intermediate, self.hidden))
            self._tile_extras = cached
        return cached[1]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str,
                      expert_id: int | None = None) -> None:
        raise NotImplementedError

    def add_source(self, param: nn.Parameter, path, name: str, shard_id: str, expert_id: int | None,
                   transform=None) -> None:
        raise NotImplementedError(f"{type(self).__name__} holds its tensors: the loader hands them to weight_loader")

    def post_load(self) -> None:
        """Called by the loader once every tensor is in: the backend is resolved on the final device."""
        self._resolve_backend()


class GroupedExperts(SlottedExperts):
    """The experts of one MoE layer this process holds, stacked by slot: ``w13 [e, 2F, D]``,
    ``w2 [e, D, F]``; rows arrive grouped by slot (``counts_e[i]`` rows for slot ``i``).

    Slot ``i`` holds logical expert ``slot_experts[i]``. By default that is the contiguous range
    ``expert_start .. expert_start + num_local_experts - 1``; under expert parallelism with
    replicas a rank's slots may be any list of distinct experts (e.g. ``[3, 0, 1]``).
    ``intermediate_shard=(r, n)`` keeps slice ``r`` of ``n`` of every expert's intermediate dim
    (expert tensor parallelism): gate/up rows ``[r*F/n, (r+1)*F/n)`` and the same down columns,
    so the ``n`` partial outputs sum to the full one; the down bias is kept by slice 0 only.

    Checkpoint tensors arrive per expert (``weight_loader(param, tensor, shard_id, expert_id)``)
    or stacked over all experts (``expert_id=None``); :meth:`owns` tells the loader which
    experts' tensors it may skip reading.
    """

    has_forward_local = True
    fuses_shared = True

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, bias: bool = False,
                 activation: Activation = Activation(), dtype: torch.dtype = torch.float32,
                 expert_start: int = 0, num_local_experts: int | None = None, backend: Backend = "auto",
                 slot_experts: Sequence[int] | None = None, intermediate_shard: tuple[int, int] = (0, 1)):
        super().__init__()
        self._set_slots(num_experts, expert_start, num_local_experts, slot_experts)
        shard, shards = intermediate_shard
        if intermediate % shards or not 0 <= shard < shards:
            raise ValueError(f"the experts' intermediate size ({intermediate}) is not divisible by "
                             f"expert_tensor_parallel ({shards})")
        self.hidden, self.full_intermediate = hidden, intermediate
        self.intermediate = intermediate // shards  # this process's slice of it
        self.shard, self.shards = shard, shards
        self.activation = activation
        e = self.num_local
        self.w13 = self._param(e, 2 * self.intermediate, hidden, dtype=dtype)
        self.w2 = self._param(e, hidden, self.intermediate, dtype=dtype)
        self.b13 = self._param(e, 2 * self.intermediate, dtype=dtype) if bias else None
        self.b2 = self._param(e, hidden, dtype=dtype) if bias else None
        self.backend = backend  # resolved against the weights' device
        self._token_plan: tuple = (None, None)  # (the weights' pointers it was made for, cpu_kernels.MoeToken)

    def _param(self, *shape: int, dtype: torch.dtype) -> nn.Parameter:
        p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
        p.weight_loader = self.weight_loader
        return p

    def _my_slice(self, loaded: torch.Tensor, shard_id: str, is_down_bias: bool) -> torch.Tensor:
        """This process's part of one expert's tensor (all of it without expert-TP)."""
        if self.shards == 1:
            return loaded
        F_, f, r = self.full_intermediate, self.intermediate, self.shard
        if shard_id in ("gate", "up"):
            return loaded.narrow(0, r * f, f)
        if shard_id == "gate_up":
            return torch.cat([loaded.narrow(0, r * f, f), loaded.narrow(0, F_ + r * f, f)])
        if is_down_bias:  # added once: the partial outputs of the slices are summed
            return loaded if r == 0 else torch.zeros_like(loaded)
        return loaded.narrow(-1, r * f, f)  # down weight [D, F]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str,
                      expert_id: int | None = None) -> None:
        """Place one checkpoint tensor. ``shard_id``: ``gate``/``up`` (rows of w13 or b13),
        ``down`` (w2 or b2), or ``gate_up`` (both halves at once, already ``[gate | up]``).
        With ``expert_id=None`` the tensor holds every expert stacked on dim 0."""
        if expert_id is None:
            if loaded.shape[0] != self.num_experts:
                raise ValueError(f"stacked experts {shard_id}: {loaded.shape[0]} experts in the checkpoint, "
                                 f"{self.num_experts} in the model")
            for e in self.slot_experts:
                self.weight_loader(param, loaded[e], shard_id, e)
            return
        slot = self._slot_of.get(expert_id)
        if slot is None:
            return
        if shard_id not in ("gate", "up", "down", "gate_up"):
            raise ValueError(f"unknown expert shard {shard_id!r}")
        dst = param.data[slot]
        f = self.intermediate
        if shard_id == "gate":
            dst = dst[:f]
        elif shard_id == "up":
            dst = dst[f:]
        want = list(dst.shape)  # the whole expert's tensor this slot's slice comes from
        if param is not self.b2:
            want[-1 if shard_id == "down" else 0] *= self.shards
        if list(loaded.shape) != want:
            raise ValueError(f"expert {expert_id} {shard_id}: parameter {tuple(want)} vs checkpoint "
                             f"{tuple(loaded.shape)}")
        dst.copy_(self._my_slice(loaded, shard_id, param is self.b2))

    def forward_token(self, x_1D: torch.Tensor, ids_K: torch.Tensor, weights_K: torch.Tensor,
                      shared: tuple[torch.Tensor, ...] | None = None,
                      residual: cpu_kernels.Residual | None = None, into: cpu_kernels.Outputs | None = None):
        """One token on the CPU torch path (decode at batch 1): ``sum_k w_k * expert_k(x)`` with the
        same arithmetic as dispatch -> :meth:`forward` -> combine (weights rounded to the activation
        dtype, summed in ascending expert order), minus the permutation ops. ``shared``: a shared
        SwiGLU expert's ``(w13, w2)`` whose output is added (bf16) in the same C call;
        ``residual``: ``(h, norm weight, eps)``, the result then ``(h + y, norm(h + y))`` (see
        :func:`cpu_kernels.moe_token`; written to ``into`` when given); given either, the result is
        None unless that call runs. ``x [T, D]`` with ``ids`` / ``weights [T, K]``: the rows of one
        sequence (a verify step's), each as one row (the C call only).
        None: not applicable (another backend, or an expert this process does not hold)."""
        if self.resolved_backend != "torch":
            return None
        # the same arithmetic in one C call (bf16): per layer ~150 us of op-by-op overhead less
        plan = self.token_plan(shared) if x_1D.device.type == "cpu" else None
        if plan is not None:
            y = plan(x_1D, ids_K, weights_K, residual, into)
            if y is not None:
                return y
        if shared is not None or residual is not None or x_1D.shape[0] != 1:  # only the one-call path adds them
            return None
        ids_K, weights_K = ids_K.reshape(-1), weights_K.reshape(-1)
        experts = ids_K.tolist()
        if not all(e in self._slot_of for e in experts):
            return None
        # python floats holding the weights rounded to x's dtype: ``out * w`` rounds like the combine
        pairs = sorted(zip(experts, weights_K.to(x_1D.dtype).tolist()))
        outs = []
        for e, w in pairs:
            i = self._slot_of[e]
            h = linear(x_1D, self.w13[i], None if self.b13 is None else self.b13[i])
            h = fused_swiglu(h, self.activation)
            outs.append(linear(h, self.w2[i], None if self.b2 is None else self.b2[i]) * w)
        if len(outs) <= 2:  # one rounding of the sum either way
            return outs[0] if len(outs) == 1 else outs[0] + outs[1]
        # the combine's index_add_ sums a token's rows in float32 and rounds once
        y = outs[0].float()
        for out in outs[1:]:
            y += out
        return y.to(x_1D.dtype)

    def token_plan(self, shared: tuple[torch.Tensor, ...] | None = None) -> cpu_kernels.MoeToken | None:
        """:meth:`forward_token`'s one C call for these weights (with their biases and gpt-oss's clamped
        SwiGLU, each rounding the ops' own) and ``shared`` expert, checked once per weights and shared
        expert (a captured step's are fixed; it calls the plan's kernel too), or None where that call
        does not apply (another backend, experts elsewhere)."""
        w13, w2 = self.w13, self.w2
        if self.resolved_backend != "torch" or not self.holds_all or w13.device.type != "cpu":
            return None
        key, plan = self._token_plan
        if key != (w13.data_ptr(), w2.data_ptr()) or not self._same_shared(plan.shared, shared):
            act = self.activation
            plan = cpu_kernels.MoeToken(w13, w2, shared, self.b13, self.b2, act.alpha, act.limit)
            self._token_plan = ((w13.data_ptr(), w2.data_ptr()), plan)
        return plan

    def forward_local(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                      shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Dispatch, :meth:`forward` and combine of a layer whose experts are all here
        (:class:`parallel.dispatch.LocalDispatcher`): one token through :meth:`forward_token`
        (no permutation needed); more as one C call on CPUs with AMX or AVX512-BF16 (any number of
        rows), with the same arithmetic; None when that does not apply (then dispatch). ``shared``:
        a plain shared expert's ``(w13, w2)``, added (bf16) in the same call, or None returned where
        that call does not take it."""
        if x_TD.shape[0] == 1:
            return self.forward_token(x_TD, ids_TK[0], weights_TK[0], shared)
        if x_TD.device.type != "cpu" or self.resolved_backend != "torch" or not self.holds_all:
            return None
        return cpu_kernels.amx_moe(x_TD, ids_TK, weights_TK, self.w13, self.w2, self.tile_extras(), shared)

    def forward(self, x_RD: torch.Tensor, counts_e: torch.Tensor) -> torch.Tensor:
        backend = self.resolved_backend
        if backend == "torch":
            return grouped_swiglu_torch(x_RD, counts_e.tolist(), self.w13, self.w2, self.b13, self.b2, self.activation)
        ids_R = torch.repeat_interleave(torch.arange(self.num_local, device=x_RD.device), counts_e)
        if backend == "triton":
            from .triton_moe import fused_moe_triton

            ones = torch.ones(x_RD.shape[0], 1, dtype=torch.float32, device=x_RD.device)
            return fused_moe_triton(x_RD, self.w13, self.w2, ones, ids_R.unsqueeze(1), b13_E2F=self.b13,
                                    b2_ED=self.b2, swiglu_limit=self.activation.limit,
                                    swiglu_alpha=self.activation.alpha)
        if backend == "megablocks":
            from .megablocks_backend import grouped_swiglu_megablocks

            return grouped_swiglu_megablocks(x_RD, counts_e, self.w13, self.w2, self.b13, self.b2, self.activation)
        raise ValueError(f"unknown experts backend {backend!r} (choose auto, torch, triton or megablocks)")

