"""An MoE layer over every rank of the job, when its input tokens are the same on all of them.

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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .dispatch import LocalDispatcher, make_ep_dispatcher
from .state import get_parallel_state


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

    def __init__(self, inner, ep_rank: int, ep_size: int, ep_group: dist.ProcessGroup | None,
                 etp_size: int, etp_group: dist.ProcessGroup | None):
        self.inner = inner
        self.ep_rank, self.ep_size, self.ep_group = ep_rank, ep_size, ep_group
        self.etp_size, self.etp_group = etp_size, etp_group

    def dispatch(self, x_TD: torch.Tensor, ids_TK: torch.Tensor,
                 weights_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, SplitMeta]:
        T = x_TD.shape[0]
        bounds = _slice_bounds(T, self.ep_size)
        a, b = bounds[self.ep_rank], bounds[self.ep_rank + 1]
        x_RD, counts_e, inner = self.inner.dispatch(x_TD[a:b], ids_TK[a:b], weights_TK[a:b])
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


def local_expert_slots(num_experts: int) -> list[int]:
    """Logical expert id of each expert slot this rank holds (all experts without EP)."""
    st = get_parallel_state()
    if st.ep_size == 1:
        return list(range(num_experts))
    if st.sharding is None:
        raise RuntimeError("expert_parallel > 1 needs the ShardingConfig in the parallel state "
                           "(parallel.build_parallel_state sets it)")
    return st.sharding.slots(num_experts)[st.ep_rank]


def make_moe_dispatcher(num_experts: int) -> LocalDispatcher | SplitTokensDispatcher:
    """:class:`LocalDispatcher` on one rank; otherwise the split-tokens wrapper around the EP
    dispatcher the sharding names (or a LocalDispatcher when only expert-TP is in play)."""
    st = get_parallel_state()
    if st.ep_size == 1 and st.etp_size == 1:
        return LocalDispatcher(num_experts)
    if st.ep_size == 1:
        inner = LocalDispatcher(num_experts)
    else:
        inner = make_ep_dispatcher(st.sharding, num_experts, st.ep_group)
    return SplitTokensDispatcher(inner, st.ep_rank, st.ep_size, st.ep_group, st.etp_size, st.etp_group)
