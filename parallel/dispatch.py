"""Token dispatchers: route (token, expert) assignments to expert-major rows and back.

:class:`LocalDispatcher` keeps every expert on this process; :class:`AllToAllDispatcher` and
:class:`AllGatherDispatcher` spread them over an expert-parallel process group.

Shapes: T tokens, D model dim, K top-k, R routed rows, e local experts (local slots under
expert parallelism); A = T*K assignments, P expert-parallel ranks, S slots per rank,
G gathered tokens of all ranks, E logical experts, M copies of an expert.
``dispatch(x_TD, ids_TK, weights_TK, step) -> (x_RD, counts_e, meta)`` orders the T*K assignments by
expert so each expert's rows are contiguous (``step``: a :class:`DispatchStep`, what a dispatcher
may need to know about the whole step; every dispatcher takes it, most ignore it);
``combine(y_RD, meta) -> y_TD`` scatters the expert outputs back, weighted by the router.

Worked example (T=3, K=2, 4 experts): ids_TK = [[2, 0], [1, 2], [0, 3]] flattens to
assignments a = [2, 0, 1, 2, 0, 3]. A stable sort by expert gives order_R = [1, 4, 2, 0, 3, 5]
(experts 0, 0, 1, 2, 2, 3), counts_e = [2, 1, 2, 1], and source tokens token_R = order_R // K
= [0, 2, 1, 0, 1, 2]: x_RD = x_TD[token_R].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .sharding import PhysicalPlacement, ShardingConfig


@dataclass(frozen=True)
class DispatchStep:
    """Per-step facts a dispatcher may use besides its own tokens (filled by the engine once per step)."""

    # data_parallel > 1: every DP group's token count in this step (saves exchanging them per
    # layer); None: a dispatcher that needs them all-gathers them
    dp_num_tokens: tuple[int, ...] | None = None


NO_STEP = DispatchStep()


@dataclass(frozen=True)
class DispatchMeta:
    token_R: torch.Tensor  # source token of each routed row
    weights_R: torch.Tensor  # router weight of each row (float32)
    num_tokens: int


class LocalDispatcher:
    """All experts on this process: a permutation, no communication."""
    is_local = True  # all experts here: a token needs no permutation or exchange

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                 step: DispatchStep = NO_STEP) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta]:
        K = ids_TK.shape[1]
        flat = ids_TK.flatten()
        order_R = torch.argsort(flat, stable=True)
        counts_e = torch.bincount(flat, minlength=self.num_experts)
        token_R = order_R // K
        meta = DispatchMeta(token_R=token_R, weights_R=weights_TK.flatten()[order_R].float(), num_tokens=x_TD.shape[0])
        return x_TD[token_R], counts_e, meta

    def combine(self, y_RD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        # weighted in the activation dtype, as the reference implementations do
        y_RD = y_RD * meta.weights_R.to(y_RD.dtype).unsqueeze(1)
        y_TD = torch.zeros(meta.num_tokens, y_RD.shape[1], dtype=y_RD.dtype, device=y_RD.device)
        return y_TD.index_add_(0, meta.token_R, y_RD)


# ---- Expert parallel: experts spread over the ranks of an EP process group -----------------
#
# Both dispatchers below take a PhysicalPlacement (``slots[rank][local_slot] = expert``) and
# return rows sorted by *local slot* (``counts_e`` has one entry per slot of this rank). Token t
# of rank src sends its assignment of expert e to copy ``(t + src) % n_e`` of e's n_e copies:
# deterministic, identical in both dispatchers, and spread over the copies (consecutive tokens
# alternate; the source rank offsets it so every rank's first token does not hit copy 0).


class _ReplicaTable:
    """``rank_EM``/``slot_EM``: the M-th copy of expert E; ``copies_E``: how many it has."""

    def __init__(self, placement: PhysicalPlacement):
        E = placement.num_experts
        reps = [placement.replicas(e) for e in range(E)]
        M = max(len(r) for r in reps)
        self.rank_EM = torch.zeros(E, M, dtype=torch.long)
        self.slot_EM = torch.zeros(E, M, dtype=torch.long)
        for e, where in enumerate(reps):
            for m, (r, s) in enumerate(where):
                self.rank_EM[e, m], self.slot_EM[e, m] = r, s
        self.copies_E = torch.tensor([len(r) for r in reps], dtype=torch.long)
        self._device = torch.device("cpu")

    def route(self, ids_TK: torch.Tensor, src_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Destination (rank, local slot) of every flattened assignment ``t*K + k``."""
        if ids_TK.device != self._device:
            self.rank_EM, self.slot_EM, self.copies_E = (t.to(ids_TK.device) for t in
                                                        (self.rank_EM, self.slot_EM, self.copies_E))
            self._device = ids_TK.device
        T, K = ids_TK.shape
        e_A = ids_TK.flatten().long()
        t_A = torch.arange(T, device=e_A.device).repeat_interleave(K)
        m_A = (t_A + src_rank) % self.copies_E[e_A]
        return self.rank_EM[e_A, m_A], self.slot_EM[e_A, m_A]


def _group_rank(placement: PhysicalPlacement, group: dist.ProcessGroup | None) -> int:
    if placement.ep_size == 1:
        return 0
    if not dist.is_initialized():
        raise RuntimeError(f"an expert-parallel dispatcher over {placement.ep_size} ranks needs torch.distributed: "
                           "call launch.init_distributed(...) first")
    size = dist.get_world_size(group)
    if size != placement.ep_size:
        raise ValueError(f"the EP process group has {size} ranks but the placement spreads experts over "
                         f"{placement.ep_size}: build the group with expert_parallel ranks")
    return dist.get_rank(group)


@dataclass(frozen=True)
class AllToAllMeta:
    token_A: torch.Tensor  # source token of each sent row, in send order (grouped by rank, then slot)
    weights_A: torch.Tensor  # router weight of each sent row (float32)
    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank
    recv_order_R: torch.Tensor  # received row feeding each slot-sorted row: x_RD = x_recv[recv_order_R]
    num_tokens: int


class AllToAllDispatcher:
    """Tokens travel to the ranks owning their experts and back (two ``all_to_all_single``).

    dispatch: route each assignment to (rank, slot); sort by (rank, slot); exchange the
    per-(rank, slot) row counts (one small all-to-all, so every rank knows its split sizes);
    send the rows; sort the received rows by local slot. combine: undo the local sort, send the
    rows back, and sum them into their tokens weighted by the router.

    Worked example (2 ranks, 4 experts, slots [[0, 1], [2, 3]], K=2).
    Rank 0 has ids_TK = [[2, 0], [1, 3]]: assignments a = 0..3 go to (rank, slot)
    (1,0), (0,0), (0,1), (1,1); sorted by rank*2+slot: order = [1, 2, 0, 3], token_A =
    order // K = [0, 1, 0, 1], send_splits = [2, 2]. Rank 1 has ids_TK = [[3, 2]]: it sends
    token 0 twice to itself (slot 0 for expert 2, then slot 1 for expert 3), send_splits = [0, 2].
    Rank 1 receives [r0.t0 (slot 0), r0.t1 (slot 1), r1.t0 (slot 0), r1.t0 (slot 1)]; sorting
    by slot gives recv_order_R = [0, 2, 1, 3], x_RD = [r0.t0, r1.t0, r0.t1, r1.t0] and
    counts_e = [2, 2].
    """
    is_local = False  # tokens travel between ranks

    def __init__(self, placement: PhysicalPlacement, group: dist.ProcessGroup | None = None):
        self.placement = placement
        self.group = group
        self.rank = _group_rank(placement, group)
        self.table = _ReplicaTable(placement)

    def dispatch(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                 step: DispatchStep = NO_STEP) -> tuple[torch.Tensor, torch.Tensor, AllToAllMeta]:
        P, S, K = self.placement.ep_size, self.placement.slots_per_rank, ids_TK.shape[1]
        rank_A, slot_A = self.table.route(ids_TK, self.rank)
        key_A = rank_A * S + slot_A
        order_A = torch.argsort(key_A, stable=True)
        send_counts_PS = torch.bincount(key_A, minlength=P * S).view(P, S)
        x_send = x_TD[order_A // K]
        if P == 1:
            recv_counts_PS, x_recv = send_counts_PS, x_send
        else:
            recv_counts_PS = torch.empty_like(send_counts_PS)  # [source rank, my slot]
            dist.all_to_all_single(recv_counts_PS, send_counts_PS, group=self.group)
        send_splits = send_counts_PS.sum(1).tolist()
        recv_splits = recv_counts_PS.sum(1).tolist()
        if P > 1:
            x_recv = x_send.new_empty(sum(recv_splits), x_TD.shape[1])
            dist.all_to_all_single(x_recv, x_send.contiguous(), recv_splits, send_splits, group=self.group)
        slots = torch.arange(S, device=x_TD.device).repeat(P)
        slot_recv = torch.repeat_interleave(slots, recv_counts_PS.flatten())
        recv_order_R = torch.argsort(slot_recv, stable=True)
        meta = AllToAllMeta(token_A=order_A // K, weights_A=weights_TK.flatten()[order_A].float(),
                            send_splits=send_splits, recv_splits=recv_splits, recv_order_R=recv_order_R,
                            num_tokens=x_TD.shape[0])
        return x_recv[recv_order_R], recv_counts_PS.sum(0), meta

    def combine(self, y_RD: torch.Tensor, meta: AllToAllMeta) -> torch.Tensor:
        y_recv = torch.empty_like(y_RD)
        y_recv[meta.recv_order_R] = y_RD
        if self.placement.ep_size == 1:
            y_sent = y_recv
        else:
            y_sent = y_RD.new_empty(sum(meta.send_splits), y_RD.shape[1])
            dist.all_to_all_single(y_sent, y_recv, meta.send_splits, meta.recv_splits, group=self.group)
        # weighted and summed in the activation dtype, like LocalDispatcher: with one rank the
        # rows arrive in the same order, so the result is bit-identical to it
        y_sent = y_sent * meta.weights_A.to(y_sent.dtype).unsqueeze(1)
        y_TD = torch.zeros(meta.num_tokens, y_RD.shape[1], dtype=y_sent.dtype, device=y_RD.device)
        return y_TD.index_add_(0, meta.token_A, y_sent)


@dataclass(frozen=True)
class AllGatherMeta:
    token_R: torch.Tensor  # row of the gathered (padded) token buffer feeding each routed row
    weights_R: torch.Tensor  # router weight of each routed row (float32)
    max_tokens: int  # every rank's tokens padded to this many in the gathered buffer
    num_tokens: int


class AllGatherDispatcher:
    """Every rank sees every token: all-gather tokens and routing, compute the rows of the local
    slots, then reduce-scatter the weighted outputs so each rank gets its own tokens back.

    Simpler than all-to-all and good when tokens are few (decode) or experts are replicated;
    it moves ``ep_size`` times more activations. Ranks may hold different token counts: each
    pads to the largest, so the gathered buffer is ``[ep_size * max_tokens, D]`` and rank p's
    token t sits at row ``p * max_tokens + t``.

    Worked example (the same two ranks as :class:`AllToAllDispatcher`): max_tokens = 2, the
    gathered assignments are r0.t0 -> e2, e0; r0.t1 -> e1, e3; r1.t0 -> e3, e2 (r1.t1 is
    padding). Rank 1 owns slots [e2, e3] and keeps (row 0, slot 0), (row 1, slot 1),
    (row 2, slot 1), (row 2, slot 0); sorted by slot: token_R = [0, 2, 1, 2], counts_e = [2, 2]
    -- the same rows in the same order as the all-to-all dispatcher.
    """
    is_local = False  # tokens travel between ranks

    def __init__(self, placement: PhysicalPlacement, group: dist.ProcessGroup | None = None):
        self.placement = placement
        self.group = group
        self.rank = _group_rank(placement, group)
        self.table = _ReplicaTable(placement)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.placement.ep_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts)

    def dispatch(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                 step: DispatchStep = NO_STEP) -> tuple[torch.Tensor, torch.Tensor, AllGatherMeta]:
        P, S = self.placement.ep_size, self.placement.slots_per_rank
        T, K = ids_TK.shape
        sizes = [T]
        if P > 1:
            sizes_P = self._gather(torch.tensor([T], device=x_TD.device))
            sizes = sizes_P.tolist()
        T_max = max(sizes)
        pad = T_max - T
        x_GD = self._gather(F.pad(x_TD, (0, 0, 0, pad))) if P > 1 else x_TD
        ids_GK = self._gather(F.pad(ids_TK, (0, 0, 0, pad))) if P > 1 else ids_TK
        w_GK = self._gather(F.pad(weights_TK, (0, 0, 0, pad))) if P > 1 else weights_TK
        rank_GK = torch.empty_like(ids_GK)
        slot_GK = torch.empty_like(ids_GK)
        for p in range(P):  # each source rank's replica choice uses its own rank and token index
            rows = slice(p * T_max, (p + 1) * T_max)
            r, s = self.table.route(ids_GK[rows], p)
            rank_GK[rows], slot_GK[rows] = r.view(T_max, K), s.view(T_max, K)
        valid_G = torch.arange(T_max, device=x_TD.device).repeat(P) < torch.tensor(
            sizes, device=x_TD.device).repeat_interleave(T_max)
        mine_A = ((rank_GK == self.rank) & valid_G.unsqueeze(1)).flatten()
        a_R = mine_A.nonzero().squeeze(1)
        slot_R = slot_GK.flatten()[a_R]
        order = torch.argsort(slot_R, stable=True)
        a_R = a_R[order]
        token_R = a_R // K
        meta = AllGatherMeta(token_R=token_R, weights_R=w_GK.flatten()[a_R].float(), max_tokens=T_max, num_tokens=T)
        return x_GD[token_R], torch.bincount(slot_R, minlength=S), meta

    def combine(self, y_RD: torch.Tensor, meta: AllGatherMeta) -> torch.Tensor:
        P, D = self.placement.ep_size, y_RD.shape[1]
        # weighted in the activation dtype like LocalDispatcher, but summed in float32: the
        # reduce-scatter adds partial sums of every rank and would round at each step
        y_GD = torch.zeros(P * meta.max_tokens, D, dtype=torch.float32, device=y_RD.device)
        y_GD.index_add_(0, meta.token_R, (y_RD * meta.weights_R.to(y_RD.dtype).unsqueeze(1)).float())
        if P == 1:
            return y_GD[: meta.num_tokens].to(y_RD.dtype)
        y_TD = torch.empty(meta.max_tokens, D, dtype=torch.float32, device=y_RD.device)
        _reduce_scatter(y_TD, y_GD, self.group)
        return y_TD[: meta.num_tokens].to(y_RD.dtype)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    # reduce_scatter_tensor was renamed reduce_scatter_single in recent torch releases
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, group=group)


def make_ep_dispatcher(sharding: ShardingConfig, num_experts: int,
                       group: dist.ProcessGroup | None = None) -> AllToAllDispatcher | AllGatherDispatcher:
    """The dispatcher ``sharding.dispatcher`` names, over ``sharding``'s expert placement."""
    placement = sharding.physical_placement(num_experts)
    cls = AllGatherDispatcher if sharding.dispatcher == "all_gather" else AllToAllDispatcher
    return cls(placement, group)
