"""Expert-parallel dispatchers: the permutation by hand, then real gloo process groups.

Every multi-process check compares dispatch -> per-expert reference -> combine with the
single-process LocalDispatcher on the same rank's tokens.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.dispatch import (AllGatherDispatcher, AllToAllDispatcher, LocalDispatcher, _ReplicaTable,
                              make_ep_dispatcher)
from parallel.sharding import PhysicalPlacement, ShardingConfig, expert_placement, placement_from_counts
from launch.env import free_port as _free_port

DISPATCHERS = (AllToAllDispatcher, AllGatherDispatcher)
D = 8


def experts_reference(x_RD: torch.Tensor, counts_e: torch.Tensor, slot_experts: list[int],
                      w_EDD: torch.Tensor) -> torch.Tensor:
    """Expert e is ``tanh(x @ w[e])``; rows arrive grouped by slot."""
    y_RD = torch.empty_like(x_RD)
    start = 0
    for e, n in zip(slot_experts, counts_e.tolist()):
        y_RD[start:start + n] = torch.tanh(x_RD[start:start + n] @ w_EDD[e])
        start += n
    assert start == x_RD.shape[0]
    return y_RD


def local_reference(x_TD, ids_TK, weights_TK, w_EDD):
    E = w_EDD.shape[0]
    disp = LocalDispatcher(E)
    x_RD, counts_e, meta = disp.dispatch(x_TD, ids_TK, weights_TK)
    return disp.combine(experts_reference(x_RD, counts_e, list(range(E)), w_EDD), meta)


def routing(T: int, E: int, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, D, generator=g)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else \
        torch.empty(0, K, dtype=torch.long)
    weights_TK = torch.rand(T, K, generator=g)
    return x_TD, ids_TK, weights_TK


# ---- one process: hand-computed permutations -------------------------------------------------

def test_route_to_rank_and_slot_by_hand():
    disp = AllToAllDispatcher(PhysicalPlacement.from_slots([[0, 1, 2, 3]]))
    rank_A, slot_A = disp.table.route(torch.tensor([[2, 0], [1, 2], [0, 3]]), src_rank=0)
    assert rank_A.tolist() == [0] * 6 and slot_A.tolist() == [2, 0, 1, 2, 0, 3]
    table = _ReplicaTable(PhysicalPlacement.from_slots([[0, 1], [2, 3]]))  # no process group needed
    rank_A, slot_A = table.route(torch.tensor([[2, 0], [1, 3]]), src_rank=0)
    assert rank_A.tolist() == [1, 0, 0, 1] and slot_A.tolist() == [0, 0, 1, 1]


def test_replicas_alternate_by_token_and_source_rank():
    # expert 0 has copies on rank 0 slot 0 and rank 1 slot 0
    table = _ReplicaTable(PhysicalPlacement.from_slots([[0, 1], [0, 2]]))
    ids_TK = torch.tensor([[0, 1], [0, 2], [2, 0]])
    rank_A, slot_A = table.route(ids_TK, src_rank=0)
    assert rank_A.tolist() == [0, 0, 1, 1, 1, 0]  # token t's expert 0 -> copy t % 2
    assert slot_A.tolist() == [0, 1, 0, 1, 1, 0]
    rank_A, _ = table.route(ids_TK, src_rank=1)
    assert rank_A.tolist() == [1, 0, 0, 1, 1, 1]  # shifted by the source rank


@pytest.mark.parametrize("cls", DISPATCHERS)
def test_one_rank_matches_local_dispatcher(cls):
    x_TD, ids_TK, weights_TK = routing(T=7, E=5, K=2, seed=0)
    disp = cls(PhysicalPlacement.from_slots([list(range(5))]))
    x_RD, counts_e, meta = disp.dispatch(x_TD, ids_TK, weights_TK)
    ref_RD, ref_counts, ref_meta = LocalDispatcher(5).dispatch(x_TD, ids_TK, weights_TK)
    assert torch.equal(x_RD, ref_RD) and torch.equal(counts_e, ref_counts)
    y_RD = torch.randn_like(x_RD)
    torch.testing.assert_close(disp.combine(y_RD, meta), LocalDispatcher(5).combine(y_RD, ref_meta))


def test_one_rank_all_to_all_is_bit_identical_to_local_in_bfloat16():
    x_TD, ids_TK, weights_TK = routing(T=9, E=4, K=2, seed=3)
    x_TD = x_TD.bfloat16()
    disp = AllToAllDispatcher(PhysicalPlacement.from_slots([[0, 1, 2, 3]]))
    x_RD, _, meta = disp.dispatch(x_TD, ids_TK, weights_TK)
    ref_RD, _, ref_meta = LocalDispatcher(4).dispatch(x_TD, ids_TK, weights_TK)
    y_RD = torch.tanh(x_RD * 3)
    assert torch.equal(disp.combine(y_RD, meta), LocalDispatcher(4).combine(y_RD, ref_meta))


@pytest.mark.parametrize("cls", DISPATCHERS)
def test_one_rank_worked_example(cls):
    x_TD = torch.arange(3.0).unsqueeze(1).repeat(1, 2)  # token t is the row [t, t]
    disp = cls(PhysicalPlacement.from_slots([[0, 1, 2, 3]]))
    x_RD, counts_e, meta = disp.dispatch(x_TD, torch.tensor([[2, 0], [1, 2], [0, 3]]), torch.ones(3, 2))
    assert x_RD[:, 0].tolist() == [0, 2, 1, 0, 1, 2] and counts_e.tolist() == [2, 1, 2, 1]
    assert disp.combine(x_RD, meta)[:, 0].tolist() == [0.0, 2.0, 4.0]  # each token summed over K=2


def test_make_ep_dispatcher_follows_the_sharding():
    assert isinstance(make_ep_dispatcher(ShardingConfig(), 4), AllToAllDispatcher)
    disp = make_ep_dispatcher(ShardingConfig(dispatcher="all_gather"), 4)
    assert isinstance(disp, AllGatherDispatcher) and disp.placement.slots == ((0, 1, 2, 3),)
    with pytest.raises(RuntimeError, match="init_distributed"):  # 2 EP ranks need a process group
        make_ep_dispatcher(ShardingConfig(data_parallel=2, expert_parallel=2), 4)


@pytest.mark.parametrize("cls", DISPATCHERS)
def test_zero_tokens_and_one_expert(cls):
    disp = cls(PhysicalPlacement.from_slots([[0]]))
    x_RD, counts_e, meta = disp.dispatch(torch.zeros(0, D), torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1))
    assert x_RD.shape == (0, D) and counts_e.tolist() == [0]
    assert disp.combine(x_RD, meta).shape == (0, D)
    x_TD, ids_TK, weights_TK = routing(T=4, E=1, K=1, seed=1)
    w_EDD = torch.randn(1, D, D)
    x_RD, counts_e, meta = disp.dispatch(x_TD, ids_TK, weights_TK)
    assert counts_e.tolist() == [4]
    y_TD = disp.combine(experts_reference(x_RD, counts_e, [0], w_EDD), meta)
    torch.testing.assert_close(y_TD, local_reference(x_TD, ids_TK, weights_TK, w_EDD))


# ---- real process groups ---------------------------------------------------------------------

def _scenarios(P: int) -> list[tuple[str, list[list[int]], int, list[int]]]:
    """(name, slots per rank, top-k, tokens per rank)."""
    E = 2 * P
    hot = placement_from_counts([50, 5, 20, 1, 9, 30], P, num_slots=8)
    return [
        ("contiguous", expert_placement(E, P, "contiguous"), 2, [5, 3, 4, 6][:P]),
        ("round_robin+redundant", expert_placement(6, P, "round_robin", 2), 3, [4, 7, 2, 5][:P]),
        ("eplb", hot, 2, [6, 1, 5, 3][:P]),
        ("zero tokens on rank 1", expert_placement(E, P, "contiguous"), 2, [4, 0, 3, 0][:P]),
        ("one expert on every rank", [[0]] * P, 1, [3, 2, 1, 4][:P]),
    ]


def _check_worked_example(rank: int) -> None:
    """The AllToAllDispatcher / AllGatherDispatcher docstring example, indices by hand."""
    placement = PhysicalPlacement.from_slots([[0, 1], [2, 3]])
    ids_TK = torch.tensor([[2, 0], [1, 3]]) if rank == 0 else torch.tensor([[3, 2]])
    x_TD = torch.tensor([[10.0], [11.0]]) if rank == 0 else torch.tensor([[20.0]])  # r.t -> 10*(r+1)+t
    weights_TK = torch.ones_like(ids_TK, dtype=torch.float32)
    x_RD, counts_e, meta = AllToAllDispatcher(placement).dispatch(x_TD, ids_TK, weights_TK)
    if rank == 0:
        assert meta.token_A.tolist() == [0, 1, 0, 1] and meta.send_splits == [2, 2]
        assert x_RD.flatten().tolist() == [10.0, 11.0]  # expert 0 <- r0.t0, expert 1 <- r0.t1
    else:
        assert meta.send_splits == [0, 2] and meta.recv_splits == [2, 2]
        assert meta.recv_order_R.tolist() == [0, 2, 1, 3]
        assert x_RD.flatten().tolist() == [10.0, 20.0, 11.0, 20.0] and counts_e.tolist() == [2, 2]
    x2_RD, counts2_e, meta2 = AllGatherDispatcher(placement).dispatch(x_TD, ids_TK, weights_TK)
    assert torch.equal(x2_RD, x_RD) and torch.equal(counts2_e, counts_e)
    if rank == 1:
        assert meta2.token_R.tolist() == [0, 2, 1, 2] and meta2.max_tokens == 2


def _worker(rank: int, P: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=P,
                            timeout=timedelta(seconds=60))
    try:
        if P == 2:
            _check_worked_example(rank)
        for i, (name, slots, K, tokens) in enumerate(_scenarios(P)):
            placement = PhysicalPlacement.from_slots(slots)
            E = placement.num_experts
            w_EDD = torch.randn(E, D, D, generator=torch.Generator().manual_seed(100 + i)) / D ** 0.5
            x_TD, ids_TK, weights_TK = routing(tokens[rank], E, K, seed=10 * i + rank)
            expected = local_reference(x_TD, ids_TK, weights_TK, w_EDD)
            rows = []
            for cls in DISPATCHERS:
                disp = cls(placement)
                x_RD, counts_e, meta = disp.dispatch(x_TD, ids_TK, weights_TK)
                assert counts_e.shape == (placement.slots_per_rank,), name
                y_RD = experts_reference(x_RD, counts_e, slots[rank], w_EDD)
                torch.testing.assert_close(disp.combine(y_RD, meta), expected, msg=f"{cls.__name__}: {name}")
                rows.append((x_RD, counts_e))
            # both dispatchers hand the experts the same rows in the same order
            assert torch.equal(rows[0][0], rows[1][0]) and torch.equal(rows[0][1], rows[1][1]), name
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_local(world):
    mp.spawn(_worker, args=(world, _free_port()), nprocs=world, join=True)


# ---- data parallelism: each TP group brings its own tokens -----------------------------------

def _dp_worker(rank: int, world: int, port: int) -> None:
    """ep4-tp2.yaml's layout: TP groups {0,1} and {2,3} hold different tokens (the same inside a
    group); every rank must get back its group's rows of the single-process result, also when a
    group has none, with the token counts given or all-gathered."""
    from parallel import DataParallelDispatcher, build_parallel_state, make_moe_dispatcher
    from parallel.dispatch import DispatchStep

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        E, K = 8, 2
        w_EDD = torch.randn(E, D, D, generator=torch.Generator().manual_seed(5)) / D ** 0.5
        for dispatcher in ("all_to_all", "all_gather"):
            st = build_parallel_state(ShardingConfig(tensor_parallel=2, data_parallel=2, expert_parallel=4,
                                                     dispatcher=dispatcher), rank, world)
            assert (st.dp_rank, st.tp_rank, st.ep_rank, st.etp_size) == (rank // 2, rank % 2, rank, 1)
            disp = make_moe_dispatcher(E)
            assert isinstance(disp, DataParallelDispatcher)
            slots = st.sharding.slots(E)[st.ep_rank]
            for i, sizes in enumerate([(3, 2), (0, 4), (5, 0), (1, 1)]):
                x_TD, ids_TK, weights_TK = routing(sizes[st.dp_rank], E, K, seed=100 * i + st.dp_rank)
                expected = local_reference(x_TD, ids_TK, weights_TK, w_EDD)
                for given in (list(sizes), None):
                    x_RD, counts_e, meta = disp.dispatch(x_TD, ids_TK, weights_TK, DispatchStep(given))
                    y_TD = disp.combine(experts_reference(x_RD, counts_e, slots, w_EDD), meta)
                    torch.testing.assert_close(y_TD, expected, msg=f"{dispatcher} {sizes} {given}")
    finally:
        dist.destroy_process_group()


def test_data_parallel_groups_get_their_own_rows_back():
    mp.spawn(_dp_worker, args=(4, _free_port()), nprocs=4, join=True)
