"""Process-group state: set once per process, read through getters that fail when unset.

A single-process engine sets the trivial state (every size 1, no torch.distributed); a
multi-process launch sets real groups. Layers and dispatchers read this state; model files
never call torch.distributed themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    tp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} outside tensor_parallel size {self.tp_size}")
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank {self.ep_rank} outside expert_parallel size {self.ep_size}")


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


def tp_all_reduce(x):
    """Sum ``x`` over the tensor-parallel group (identity when tp_size is 1)."""
    st = get_parallel_state()
    if st.tp_size == 1:
        return x
    dist.all_reduce(x, group=st.tp_group)
    return x


def tp_all_gather_last_dim(x):
    """Concatenate the tensor-parallel shards of ``x`` along its last dim."""
    import torch

    st = get_parallel_state()
    if st.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(st.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=st.tp_group)
    return torch.cat(parts, dim=-1)
