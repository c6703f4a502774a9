"""An MoE layer over every rank of the job.

With ``data_parallel`` 1, attention runs tensor-parallel over all ranks, so every rank enters an
MoE layer holding the same ``x_TD``. :class:`SplitTokensDispatcher` lets each rank take part
without redoing the others' work:

1. split: EP rank ``p`` of ``P`` keeps its slice of the tokens (``torch.tensor_split`` over the
   token dim; a slice may be empty);
2. dispatch/combine that slice with the inner dispatcher (all-to-all or all-gather over the EP
   group, or :class:`LocalDispatcher` when ``expert_parallel`` is 1);
3. ETP ranks (same experts, a slice of each expert's intermediate dim each) sum their partial
   outputs: one all-reduce over the ETP group;
4. the EP group all-gathers the slices so every rank again holds ``y_TD`` for all tokens.

Example, 4 ranks, expert_parallel 2 (so expert_tensor_parallel 2), T = 5: ranks 0, 1 (EP
rank 0) take tokens 0-2, ranks 2, 3 take tokens 3-4; ranks 0 and 2 exchange rows for the first
half of every expert's intermediate dim, ranks 1 and 3 for the second half; ranks 0+1 and 2+3
sum their halves; then ranks 0+2 (and 1+3) gather the two slices back into 5 tokens.

Routing stays on every rank for all T tokens (the gate GEMM is tiny next to the experts) and
is deterministic, so each slice's routing is what the single-process engine computes.

With ``data_parallel`` > 1 (DP attention) each tensor-parallel group enters the MoE layer with
its own tokens. :class:`DataParallelDispatcher` first makes the tokens the same everywhere:

0. all-gather every TP group's rows (tokens, expert ids, router weights) over the DP group
   (the ranks with this ``tp_rank``), padded to the longest; keep each group's real rows, in
   DP-rank order: ``T = T_0 + T_1 + ...`` tokens, now identical on every rank;
1-4. the split-tokens path above over all ``T``;
5. keep this group's rows ``[T_0 + ... + T_{d-1}, ... + T_d)`` of the output.

A group with no sequence in the step enters with zero rows and takes part in every collective.
The engine knows every group's token count (all ranks schedule the same batch) and passes it
in, which saves a size exchange per layer; without it the sizes are all-gathered first.
Example, ep4-tp2.yaml (4 ranks, TP groups {0,1} and {2,3}, expert_parallel 4): group 0 has
3 tokens, group 1 has 2; ranks 0+2 and 1+3 gather them into the same 5 tokens; EP ranks 0-3
take tokens 0-1, 2, 3 and 4; after the all-to-alls and the gather every rank holds the 5
outputs, ranks 0 and 1 return rows 0-2, ranks 2 and 3 rows 3-4.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .dispatch import NO_STEP, DispatchStep, LocalDispatcher, make_ep_dispatcher
from .state import get_parallel_state


@dataclass(frozen=True)
class DataParallelMeta:
    inner: Any  # the split-tokens meta over all groups' tokens
    start: int  # this group's rows in the gathered tokens: [start, start + num_tokens)
    num_tokens: int


@dataclass(frozen=True)
class SplitMeta:
    inner: Any  # the inner dispatcher's meta for this rank's slice
    num_tokens: int  # T, all tokens
    start: int  # this rank's slice is tokens [start, start + len)


def _slice_bounds(T: int, parts: int) -> list[int]:
    """Start of each of ``parts`` slices, plus T: the first ``T % parts`` slices get one more token."""
    base, extra = divmod(T, parts)
    bounds = [0]
    for p in range(parts):
        bounds.append(bounds[-1] + base + (p < extra))
    return bounds


class SplitTokensDispatcher:
    """Replicated tokens in, replicated outputs out; see the module docstring."""
    is_local = False  # tokens travel between ranks

    def __init__(self, inner, ep_rank: int, ep_size: int, ep_group: dist.ProcessGroup | None,
                 etp_size: int, etp_group: dist.ProcessGroup | None):
        self.inner = inner
        self.ep_rank, self.ep_size, self.ep_group = ep_rank, ep_size, ep_group
        self.etp_size, self.etp_group = etp_size, etp_group

    def dispatch(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                 step: DispatchStep = NO_STEP) -> tuple[torch.Tensor, torch.Tensor, SplitMeta]:
        T = x_TD.shape[0]
        bounds = _slice_bounds(T, self.ep_size)
        a, b = bounds[self.ep_rank], bounds[self.ep_rank + 1]
        x_RD, counts_e, inner = self.inner.dispatch(x_TD[a:b], ids_TK[a:b], weights_TK[a:b], step)
        return x_RD, counts_e, SplitMeta(inner, T, a)

    def combine(self, y_RD: torch.Tensor, meta: SplitMeta) -> torch.Tensor:
        y_tD = self.inner.combine(y_RD, meta.inner)
        if self.etp_size > 1:
            dist.all_reduce(y_tD, group=self.etp_group)
        if self.ep_size == 1:
            return y_tD
        bounds = _slice_bounds(meta.num_tokens, self.ep_size)
        longest = bounds[1] - bounds[0]  # the first slice is never shorter than the others
        parts = [y_tD.new_empty(longest, y_tD.shape[1]) for _ in range(self.ep_size)]
        dist.all_gather(parts, F.pad(y_tD, (0, 0, 0, longest - y_tD.shape[0])).contiguous(), group=self.ep_group)
        return torch.cat([p[: bounds[i + 1] - bounds[i]] for i, p in enumerate(parts)])


class DataParallelDispatcher:
    """Each DP group's tokens in, the same group's outputs out; see the module docstring.

    ``dispatch(x_TD, ids_TK, weights_TK, step)``: ``step.dp_num_tokens`` lists every DP group's
    token count in this step (the engine passes it); ``None`` all-gathers the counts.
    """
    is_local = False  # tokens travel between ranks

    def __init__(self, inner: SplitTokensDispatcher, dp_rank: int, dp_size: int, dp_group: dist.ProcessGroup | None):
        self.inner = inner
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group

    def _gather(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """The real rows of every group's ``t`` (padded to the longest for the all-gather), in DP-rank order."""
        longest = max(sizes)
        parts = [t.new_empty(longest, *t.shape[1:]) for _ in range(self.dp_size)]
        dist.all_gather(parts, F.pad(t, (0, 0, 0, longest - t.shape[0])).contiguous(), group=self.dp_group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def dispatch(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                 step: DispatchStep = NO_STEP) -> tuple[torch.Tensor, torch.Tensor, DataParallelMeta]:
        T = x_TD.shape[0]
        dp_num_tokens = step.dp_num_tokens
        if dp_num_tokens is None:
            sizes_t = torch.tensor([T], device=x_TD.device)
            parts = [torch.empty_like(sizes_t) for _ in range(self.dp_size)]
            dist.all_gather(parts, sizes_t, group=self.dp_group)
            dp_num_tokens = [int(p) for p in parts]
        sizes = list(dp_num_tokens)
        if len(sizes) != self.dp_size or sizes[self.dp_rank] != T:
            raise RuntimeError(f"data-parallel token counts {sizes} do not fit this group (rank {self.dp_rank} of "
                               f"{self.dp_size} holds {T} tokens)")
        start = sum(sizes[: self.dp_rank])
        if max(sizes) == 0:  # no group has a token: nothing to exchange (every rank sees this alike)
            x_RD, counts_e, inner = self.inner.dispatch(x_TD, ids_TK, weights_TK, step)
            return x_RD, counts_e, DataParallelMeta(inner, start, T)
        # expert ids and router weights travel together as float64 (exact for both)
        K = ids_TK.shape[1]
        route_TK2 = torch.cat([ids_TK.to(torch.float64), weights_TK.to(torch.float64)], dim=1)
        x_GD = self._gather(x_TD, sizes)
        route_GK2 = self._gather(route_TK2, sizes)
        ids_GK = route_GK2[:, :K].to(ids_TK.dtype)
        weights_GK = route_GK2[:, K:].to(weights_TK.dtype)
        x_RD, counts_e, inner = self.inner.dispatch(x_GD, ids_GK, weights_GK, step)
        return x_RD, counts_e, DataParallelMeta(inner, start, T)

    def combine(self, y_RD: torch.Tensor, meta: DataParallelMeta) -> torch.Tensor:
        y_GD = self.inner.combine(y_RD, meta.inner)
        return y_GD[meta.start: meta.start + meta.num_tokens]


def local_expert_slots(num_experts: int) -> list[int]:
    """Logical expert id of each expert slot this rank holds (all experts without EP)."""
    st = get_parallel_state()
    if st.ep_size == 1:
        return list(range(num_experts))
    if st.sharding is None:
        raise RuntimeError("expert_parallel > 1 needs the ShardingConfig in the parallel state "
                           "(parallel.build_parallel_state sets it)")
    return st.sharding.slots(num_experts)[st.ep_rank]


def make_moe_dispatcher(num_experts: int) -> LocalDispatcher | SplitTokensDispatcher | DataParallelDispatcher:
    """:class:`LocalDispatcher` on one rank; otherwise the split-tokens wrapper around the EP
    dispatcher the sharding names (or a LocalDispatcher when only expert-TP is in play), inside
    a :class:`DataParallelDispatcher` when ``data_parallel`` > 1."""
    st = get_parallel_state()
    if st.ep_size == 1 and st.etp_size == 1:
        return LocalDispatcher(num_experts)
    if st.ep_size == 1:
        inner = LocalDispatcher(num_experts)
    else:
        inner = make_ep_dispatcher(st.sharding, num_experts, st.ep_group)
    split = SplitTokensDispatcher(inner, st.ep_rank, st.ep_size, st.ep_group, st.etp_size, st.etp_group)
    if st.dp_size == 1:
        return split
    return DataParallelDispatcher(split, st.dp_rank, st.dp_size, st.dp_group)
