"""Parallelism: process-group state, tensor-parallel layers and token dispatchers."""
from .dispatch import AllGatherDispatcher, AllToAllDispatcher, DispatchMeta, LocalDispatcher, make_ep_dispatcher
from .layers import (ColumnParallelLinear, PackableWeight, ParallelLMHead, QKVParallelLinear, ReplicatedLinear,
                     RowParallelLinear, ShardedRMSNorm, VocabParallelEmbedding, default_weight_loader)
from .moe_parallel import DataParallelDispatcher, SplitTokensDispatcher, local_expert_slots, make_moe_dispatcher
from .sharding import ShardingConfig, expert_placement, load_sharding, placement_from_counts
from .state import (ParallelState, build_parallel_state, get_dp_rank, get_dp_size, get_ep_rank, get_ep_size,
                    get_etp_rank, get_etp_size, get_parallel_state, get_tp_rank, get_tp_size, init_single_process,
                    set_parallel_state, tp_all_reduce, world_all_gather_ints, world_all_gather_object,
                    world_broadcast_object)

__all__ = [
    "ParallelState", "set_parallel_state", "get_parallel_state", "init_single_process", "build_parallel_state",
    "get_tp_rank", "get_tp_size", "get_ep_rank", "get_ep_size", "get_etp_rank", "get_etp_size",
    "get_dp_rank", "get_dp_size", "tp_all_reduce", "world_all_gather_ints", "world_all_gather_object",
    "world_broadcast_object",
    "ColumnParallelLinear", "QKVParallelLinear", "RowParallelLinear", "ReplicatedLinear",
    "VocabParallelEmbedding", "ParallelLMHead", "ShardedRMSNorm", "default_weight_loader", "PackableWeight",
    "LocalDispatcher", "DispatchMeta", "AllToAllDispatcher", "AllGatherDispatcher", "make_ep_dispatcher",
    "SplitTokensDispatcher", "DataParallelDispatcher", "make_moe_dispatcher", "local_expert_slots",
    "ShardingConfig", "load_sharding", "expert_placement", "placement_from_counts",
]
