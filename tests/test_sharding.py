"""ShardingConfig schema and validation, expert placement and load balancing."""
from __future__ import annotations

from pathlib import Path

import pytest

from parallel.sharding import (PhysicalPlacement, ShardingConfig, expert_placement, load_sharding,
                               placement_from_counts, resolve_auto)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "sharding"


def test_defaults_are_one_process():
    cfg = ShardingConfig()
    assert cfg.resolved_world_size == 1 and cfg.expert_tensor_parallel == 1
    assert cfg.as_dict()["world_size"] == 1


def test_load_yaml_and_dict_agree(tmp_path):
    text = ("tensor_parallel: 2\ndata_parallel: 2\nexpert_parallel: 4\ndispatcher: all_gather\n"
            "placement: round_robin\nredundant_experts: 4\nbackend: gloo\ndevice: cpu\ntimeout_seconds: 30\n")
    (tmp_path / "s.yaml").write_text(text)
    from_file = load_sharding(tmp_path / "s.yaml")
    from_dict = load_sharding({"tensor_parallel": 2, "data_parallel": 2, "expert_parallel": 4,
                               "dispatcher": "all_gather", "placement": "round_robin", "redundant_experts": 4,
                               "backend": "gloo", "device": "cpu", "timeout_seconds": 30})
    assert from_file == from_dict
    assert from_file.resolved_world_size == 4 and from_file.expert_tensor_parallel == 1


def test_explicit_placement_map(tmp_path):
    (tmp_path / "p.yaml").write_text("expert_parallel: 2\ndata_parallel: 2\nplacement:\n  0: [0, 3]\n  1: [1, 2]\n")
    cfg = load_sharding(tmp_path / "p.yaml")
    assert cfg.placement == ((0, 3), (1, 2))
    assert cfg.slots(4) == [[0, 3], [1, 2]]
    assert cfg.as_dict()["placement"] == {0: [0, 3], 1: [1, 2]}


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_files_load(name):
    cfg = load_sharding(EXAMPLES / name)
    assert cfg.resolved_world_size == cfg.tensor_parallel * cfg.data_parallel


def test_example_layouts():
    assert load_sharding(EXAMPLES / "ep4-tp2.yaml").resolved_world_size == 4
    ds16 = load_sharding(EXAMPLES / "ds-v3-16gpu.yaml")
    ds16.validate_for_model(256)
    assert len(ds16.slots(256)[0]) == 17
    kimi32 = load_sharding(EXAMPLES / "kimi-k2-32gpu.yaml")
    kimi32.validate_for_world(32)
    assert len(kimi32.slots(384)[5]) == 13


@pytest.mark.parametrize("raw, field, fix", [
    ({"world_size": 4, "tensor_parallel": 2}, "data_parallel", "set data_parallel: 2"),
    ({"world_size": 6, "tensor_parallel": 4}, "tensor_parallel", "choose tensor_parallel from 1, 2, 3, 6"),
    ({"data_parallel": 4, "expert_parallel": 3}, "expert_parallel", "choose one of 1, 2, 4"),
    ({"tensor_parallel": 0}, "tensor_parallel", "positive integer"),
    ({"dispatcher": "ring"}, "dispatcher", "all_to_all or all_gather"),
    ({"placement": "random"}, "placement", "contiguous or round_robin"),
    ({"backend": "mpi"}, "backend", "auto, nccl, gloo"),
    ({"backend": "nccl", "device": "cpu"}, "backend nccl", "device: 'cuda:{local_rank}'"),
    ({"device": "cuda:{gpu}"}, "device", "{local_rank}"),
    ({"redundant_experts": 2}, "redundant_experts", "expert_parallel > 1"),
    ({"timeout_seconds": 0}, "timeout_seconds", "positive"),
    ({"expert_parallel": 2, "data_parallel": 2, "placement": {0: [0, 1]}}, "placement", "ranks 0..1"),
])
def test_errors_name_field_and_fix(raw, field, fix):
    with pytest.raises(ValueError) as e:
        load_sharding(raw)
    assert field in str(e.value) and fix in str(e.value)


def test_unknown_key_lists_valid_ones(tmp_path):
    (tmp_path / "typo.yaml").write_text("tensor_parallel: 2\nexpert_paralel: 2\n")
    with pytest.raises(ValueError) as e:
        load_sharding(tmp_path / "typo.yaml")
    msg = str(e.value)
    assert "expert_paralel" in msg and "did you mean 'expert_parallel'" in msg
    assert "valid keys: world_size, tensor_parallel, expert_parallel, data_parallel" in msg
    assert "typo.yaml" in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sharding(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_sharding(tmp_path / "list.yaml")


@pytest.mark.parametrize("raw, experts, fix", [
    ({"data_parallel": 8, "expert_parallel": 8}, 4, "lower expert_parallel to at most 4"),
    ({"data_parallel": 8, "expert_parallel": 8}, 60, "set redundant_experts: 4"),
    ({"data_parallel": 2, "expert_parallel": 2}, 0, "set expert_parallel: 1"),
    ({"data_parallel": 2, "expert_parallel": 2, "redundant_experts": 6}, 4, "at most 4"),
    ({"data_parallel": 2, "expert_parallel": 2, "placement": {0: [0, 1], 1: [2, 2]}}, 4, "twice on rank 1"),
    ({"data_parallel": 2, "expert_parallel": 2, "placement": {0: [0, 1], 1: [2, 9]}}, 4, "outside 0..3"),
    ({"data_parallel": 2, "expert_parallel": 2, "placement": {0: [0, 1], 1: [1, 2]}}, 4, "experts [3] on no rank"),
    ({"data_parallel": 2, "expert_parallel": 2, "placement": {0: [0], 1: [1, 2, 3]}}, 4, "needs 2 slots"),
])
def test_model_validation(raw, experts, fix):
    with pytest.raises(ValueError) as e:
        load_sharding(raw).validate_for_model(experts)
    assert fix in str(e.value)


def test_more_ranks_than_experts_with_redundant_slots_is_fine():
    cfg = ShardingConfig(data_parallel=8, expert_parallel=8, redundant_experts=4)
    cfg.validate_for_model(4)
    slots = cfg.slots(4)
    assert all(len(s) == 1 for s in slots) and sorted(sum(slots, [])) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_world_size_must_match_launcher():
    cfg = ShardingConfig(tensor_parallel=8, data_parallel=2, expert_parallel=16)
    cfg.validate_for_world(16)
    with pytest.raises(ValueError) as e:
        cfg.validate_for_world(8, launcher="torchrun --nproc-per-node 8")
    assert "world_size 16" in str(e.value) and "torchrun --nproc-per-node 8 starts 8" in str(e.value)


def test_resolve_auto():
    cfg = ShardingConfig(tensor_parallel=2)
    assert (resolve_auto(cfg, cuda_available=False).backend, resolve_auto(cfg, False).device) == ("gloo", "cpu")
    gpu = resolve_auto(cfg, cuda_available=True)
    assert gpu.backend == "nccl" and gpu.device_for(local_rank=3) == "cuda:3"
    assert resolve_auto(ShardingConfig(backend="gloo"), cuda_available=True).backend == "gloo"


# ---- placement ----------------------------------------------------------------------------

def test_contiguous_and_round_robin():
    assert expert_placement(8, 4, "contiguous") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert expert_placement(8, 4, "round_robin") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert expert_placement(1, 1) == [[0]]


def test_redundant_replicas_never_share_a_rank():
    assert expert_placement(6, 4, "contiguous", 2) == [[0, 1], [2, 3], [4, 5], [0, 1]]
    assert expert_placement(6, 4, "round_robin", 2) == [[0, 4], [1, 5], [2, 0], [3, 1]]
    assert expert_placement(6, 2, "round_robin", 2) == [[0, 2, 4, 1], [1, 3, 5, 0]]
    for ep, red in [(2, 2), (4, 4), (8, 8), (3, 3)]:
        for mode in ("contiguous", "round_robin"):
            slots = expert_placement(9 if ep == 3 else 8, ep, mode, red)
            assert all(len(set(s)) == len(s) for s in slots), (ep, red, mode, slots)
            PhysicalPlacement.from_slots(slots)  # validates every expert has a home


def test_several_copies_per_expert():
    slots = expert_placement(3, 4, "contiguous", 9)  # every expert on every rank
    assert [sorted(s) for s in slots] == [[0, 1, 2]] * 4
    slots = expert_placement(19, 8, "round_robin", 101)  # rounds of copies need the fallback layout
    assert all(len(set(s)) == len(s) == 15 for s in slots)


def test_explicit_placement_is_returned_as_given():
    assert expert_placement(4, 2, ((3, 0), (1, 2))) == [[3, 0], [1, 2]]


def test_physical_placement_replicas_round_trip():
    p = PhysicalPlacement.from_slots([[0, 2, 4, 5], [0, 1, 3, 4]])
    assert p.ep_size == 2 and p.slots_per_rank == 4 and p.num_experts == 6
    assert p.replicas(0) == [(0, 0), (1, 0)] and p.replicas(3) == [(1, 2)]
    assert PhysicalPlacement.from_replicas({e: p.replicas(e) for e in range(6)}) == p
    with pytest.raises(ValueError, match="same, non-zero number"):
        PhysicalPlacement.from_slots([[0, 1], [2]])


def _rank_loads(slots, counts):
    copies = {e: sum(s.count(e) for s in slots) for e in range(len(counts))}
    return [sum(counts[e] / copies[e] for e in s) for s in slots]


def test_placement_from_counts_worked_example():
    counts = [90, 10, 30, 20, 40, 10]
    slots = placement_from_counts(counts, 2, 8)
    assert slots == [[0, 2, 4, 5], [0, 1, 3, 4]]
    assert _rank_loads(slots, counts) == [105, 95]
    assert _rank_loads(expert_placement(6, 2), counts) == [130, 70]


def test_placement_from_counts_balances_skewed_load():
    counts = [1000] + [10] * 15  # one very hot expert
    base = _rank_loads(expert_placement(16, 4), counts)
    balanced_slots = placement_from_counts(counts, 4, 20)
    balanced = _rank_loads(balanced_slots, counts)
    assert max(base) / (sum(base) / 4) > 3
    assert max(balanced) / (sum(balanced) / 4) < 1.1
    assert sum(s.count(0) for s in balanced_slots) == 4  # hot expert on every rank
    assert all(len(s) == 5 for s in balanced_slots)
    # without redundant slots it still spreads the load by packing
    packed = _rank_loads(placement_from_counts([8, 7, 6, 5, 4, 3, 2, 1], 2, 8), [8, 7, 6, 5, 4, 3, 2, 1])
    assert packed == [18, 18]


def test_placement_from_counts_accepts_tensors_and_checks_sizes():
    import torch

    assert placement_from_counts(torch.tensor([3, 1]), 2, 2) == [[0], [1]]
    with pytest.raises(ValueError, match="multiple of the rank count"):
        placement_from_counts([1, 2, 3], 2, 3)
    with pytest.raises(ValueError, match="one copy per rank"):
        placement_from_counts([1, 2], 2, 6)
