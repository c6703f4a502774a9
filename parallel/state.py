"""Process-group state: set once per process, read through getters that fail when unset.

A single-process engine sets the trivial state (every size 1, no torch.distributed); a
multi-process launch sets real groups with :func:`build_parallel_state`. Layers and
dispatchers read this state; model files never call torch.distributed themselves.

Rank layout, ``world_size = tensor_parallel * data_parallel``:

- attention, dense MLPs, shared experts, embeddings, LM head: tensor-parallel inside a group
  of ``tp_size`` consecutive ranks: ``dp_rank = rank // tp_size``, ``tp_rank = rank % tp_size``;
  TP group ``d`` is ranks ``d*tp .. d*tp + tp - 1``. Each of the ``dp_size`` TP groups runs its
  own sequences (DP attention); with ``data_parallel`` 1 the one TP group is the whole world.
- the DP group of a rank is the ranks with its ``tp_rank``, one per TP group
  (``{tp_rank, tp + tp_rank, ...}``): MoE layers all-gather the token rows of the TP groups
  over it, so every rank holds all tokens of the step (parallel/moe_parallel.py).
- MoE layers: ``ep_rank = rank // etp_size``, ``etp_rank = rank % etp_size`` with
  ``etp_size = world_size / expert_parallel`` (``ShardingConfig.expert_tensor_parallel``).
  The EP group of a rank is the ranks with its ``etp_rank`` (one per expert set); its ETP group
  is the ranks with its ``ep_rank`` (the same experts, each holding a slice of their
  intermediate dim). Example, 4 ranks, expert_parallel 2: EP groups {0, 2} and {1, 3}, ETP
  groups {0, 1} and {2, 3}.

Example, 4 ranks, ``tensor_parallel: 2, data_parallel: 2, expert_parallel: 4``
(examples/sharding/ep4-tp2.yaml): TP groups {0, 1} and {2, 3}, DP groups {0, 2} and {1, 3},
one EP group {0, 1, 2, 3} (each rank a quarter of the experts), no expert-TP.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .sharding import ShardingConfig


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None  # the ranks with this tp_rank, one per TP group
    ep_group: dist.ProcessGroup | None = None
    etp_group: dist.ProcessGroup | None = None
    sharding: ShardingConfig | None = None  # None: the single-process layout

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} outside tensor_parallel size {self.tp_size}")
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank {self.ep_rank} outside expert_parallel size {self.ep_size}")
        if not 0 <= self.etp_rank < self.etp_size:
            raise ValueError(f"etp_rank {self.etp_rank} outside expert_tensor_parallel size {self.etp_size}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {self.dp_rank} outside data_parallel size {self.dp_size}")


_STATE: ParallelState | None = None


def set_parallel_state(state: ParallelState) -> None:
    global _STATE
    _STATE = state


def init_single_process() -> ParallelState:
    """The trivial layout: one process holds everything."""
    set_parallel_state(ParallelState())
    return get_parallel_state()


def get_parallel_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError(
            "parallel state is not initialised: call parallel.init_single_process() or "
            "parallel.set_parallel_state(...) before building a model (the engine does this)"
        )
    return _STATE


def get_tp_size() -> int:
    return get_parallel_state().tp_size


def get_tp_rank() -> int:
    return get_parallel_state().tp_rank


def get_ep_size() -> int:
    return get_parallel_state().ep_size


def get_ep_rank() -> int:
    return get_parallel_state().ep_rank


def get_etp_size() -> int:
    return get_parallel_state().etp_size


def get_etp_rank() -> int:
    return get_parallel_state().etp_rank


def get_dp_size() -> int:
    return get_parallel_state().dp_size


def get_dp_rank() -> int:
    return get_parallel_state().dp_rank


def build_parallel_state(sharding: ShardingConfig, rank: int, world_size: int) -> ParallelState:
    """Create the process groups of ``sharding`` (torch.distributed must be initialised when
    ``world_size`` > 1) and set the state. Every rank must call this, in the same order as its
    other group creations: ``new_group`` is collective."""
    if sharding.resolved_world_size != world_size:
        raise ValueError(f"the sharding needs world_size {sharding.resolved_world_size} but this job has "
                         f"{world_size} ranks")
    tp, dp = sharding.tensor_parallel, sharding.data_parallel
    ep, etp = sharding.expert_parallel, sharding.expert_tensor_parallel
    timeout = timedelta(seconds=sharding.timeout_seconds)

    def group(ranks: list[int]) -> dist.ProcessGroup | None:
        if len(ranks) == 1:
            return None
        if len(ranks) == world_size:
            return dist.group.WORLD
        return dist.new_group(ranks, timeout=timeout)

    def grid(rows: int, cols: int) -> tuple[int, int, object, object]:
        """Ranks laid out row-major in a rows x cols grid: this rank's (row, col), and the groups
        of its row and of its column. Every rank creates every group, in the same order."""
        my_row, my_col = divmod(rank, cols)
        row_group = col_group = None
        for r in range(rows):
            g = group([r * cols + c for c in range(cols)])
            if r == my_row:
                row_group = g
        for c in range(cols):
            g = group([r * cols + c for r in range(rows)])
            if c == my_col:
                col_group = g
        return my_row, my_col, row_group, col_group

    dp_rank, tp_rank, tp_group, dp_group = grid(dp, tp)  # a TP group is a row; DP groups are columns
    ep_rank, etp_rank, etp_group, ep_group = grid(ep, etp)  # an expert group's ranks split experts' F
    state = ParallelState(rank=rank, world_size=world_size, tp_rank=tp_rank, tp_size=tp, ep_rank=ep_rank,
                          ep_size=ep, etp_rank=etp_rank, etp_size=etp, dp_rank=dp_rank, dp_size=dp,
                          tp_group=tp_group, dp_group=dp_group, ep_group=ep_group, etp_group=etp_group,
                          sharding=sharding)
    set_parallel_state(state)
    return state


def tp_all_reduce(x):
    """Sum ``x`` over the tensor-parallel group (identity when tp_size is 1). The ranks of a TP
    group hold the same tokens, so when a data-parallel group runs no token in a step (``x`` is
    empty) all its ranks skip the collective together."""
    st = get_parallel_state()
    if st.tp_size == 1 or x.numel() == 0:
        return x
    if not x.is_contiguous():  # e.g. the rows of a padded few-row GEMM: reduce what the view shows
        x = x.contiguous()
    dist.all_reduce(x, group=st.tp_group)
    return x


def dp_all_reduce(x):
    """Sum ``x`` in place over the data-parallel group (identity when dp_size is 1): each DP group
    ran its own sequences, so per-group tallies add up to the job's."""
    st = get_parallel_state()
    if st.dp_size == 1:
        return x
    dist.all_reduce(x, group=st.dp_group)
    return x


def tp_all_gather_last_dim(x):
    """Concatenate the tensor-parallel shards of ``x`` along its last dim."""
    st = get_parallel_state()
    if st.tp_size == 1:
        return x
    if x.numel() == 0:  # as in tp_all_reduce: the whole TP group skips it
        return x.new_empty(*x.shape[:-1], x.shape[-1] * st.tp_size)
    parts = [torch.empty_like(x) for _ in range(st.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=st.tp_group)
    return torch.cat(parts, dim=-1)


# ---- whole-job helpers for the engine's SPMD loop ---------------------------------------------

def world_all_gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's ``values`` (the same length on every rank), in rank order."""
    st = get_parallel_state()
    if st.world_size == 1:
        return [list(values)]
    t = torch.tensor(values, dtype=torch.int64)
    parts = [torch.empty_like(t) for _ in range(st.world_size)]
    dist.all_gather(parts, t)
    return [p.tolist() for p in parts]


def world_all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (pickled), in rank order, on every rank."""
    st = get_parallel_state()
    if st.world_size == 1:
        return [obj]
    out: list[Any] = [None] * st.world_size
    dist.all_gather_object(out, obj)
    return out


def world_broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it (pickled), on every rank."""
    if get_parallel_state().world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def is_collective_failure(e: BaseException) -> bool:
    """A failure of a collective (a dead or stalled peer), as gloo and NCCL report it."""
    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        k in text for k in ("gloo", "NCCL", "Connection closed", "Connection reset", "imed out", "Broken pipe"))
