"""How a model is spread over ranks: one frozen, validated :class:`ShardingConfig`, and where
each expert lives (:func:`expert_placement`, :func:`placement_from_counts`).

How the sizes compose (the vLLM / SGLang layout):

- Attention, dense MLPs, shared experts, embeddings and the LM head run tensor-parallel in
  groups of ``tensor_parallel`` ranks; ``data_parallel`` such groups each serve their own
  sequences. So ``world_size = tensor_parallel * data_parallel``.
- MoE layers use every rank: the routed experts are spread over ``expert_parallel`` ranks
  (``expert_parallel`` divides ``world_size``). The remaining factor
  ``expert_tensor_parallel = world_size // expert_parallel`` splits each expert's
  intermediate dim over the ranks that hold the same experts (SGLang's ``moe_tp_size``);
  it is 1 when experts are spread over all ranks (vLLM's ``--enable-expert-parallel``).

Example: 4 ranks, ``tensor_parallel: 2, data_parallel: 2, expert_parallel: 4``: ranks {0,1}
and {2,3} each run attention TP-2 on their own batch; in every MoE layer the 4 ranks hold a
quarter of the experts each and tokens travel to their experts' ranks and back.

Physical slots: each EP rank holds ``(num_experts + redundant_experts) / expert_parallel``
expert slots. A slot holds one logical expert; with ``redundant_experts`` the hottest experts
get replicas in the extra slots so their load is shared (DeepSeek's EPLB idea).
"""
from __future__ import annotations

import difflib
import heapq
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

DISPATCHERS = ("all_to_all", "all_gather")
PLACEMENTS = ("contiguous", "round_robin")
BACKENDS = ("auto", "nccl", "gloo")

Placement = str | tuple[tuple[int, ...], ...]  # a name, or explicit logical expert ids per EP rank


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True)
class ShardingConfig:
    """One parallel layout. Read from YAML with :func:`load_sharding`; every field has a
    default so ``ShardingConfig()`` is the single-process layout."""

    world_size: int | None = None  # None: tensor_parallel * data_parallel
    tensor_parallel: int = 1
    expert_parallel: int = 1
    data_parallel: int = 1
    dispatcher: str = "all_to_all"
    placement: Placement = "contiguous"
    redundant_experts: int = 0
    backend: str = "auto"
    device: str = "auto"  # "auto", "cpu", or a template like "cuda:{local_rank}"
    timeout_seconds: float = 600.0

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "expert_parallel", "data_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.world_size is not None and (not isinstance(self.world_size, int) or self.world_size < 1):
            raise ValueError(f"world_size must be a positive integer or omitted, got {self.world_size!r}")
        attention = self.tensor_parallel * self.data_parallel
        if self.world_size is not None and self.world_size != attention:
            fix = (f"set data_parallel: {self.world_size // self.tensor_parallel}"
                   if self.world_size % self.tensor_parallel == 0 else
                   f"choose tensor_parallel from {_divisors(self.world_size)}")
            raise ValueError(
                f"tensor_parallel ({self.tensor_parallel}) x data_parallel ({self.data_parallel}) = {attention} "
                f"but world_size is {self.world_size}: attention runs on every rank, so {fix} (or omit world_size)")
        world = self.resolved_world_size
        if world % self.expert_parallel:
            raise ValueError(f"expert_parallel ({self.expert_parallel}) does not divide world_size ({world}): "
                             f"choose one of {_divisors(world)}")
        if self.dispatcher not in DISPATCHERS:
            raise ValueError(f"dispatcher {self.dispatcher!r} is unknown: choose {' or '.join(DISPATCHERS)}")
        if isinstance(self.placement, str):
            if self.placement not in PLACEMENTS:
                raise ValueError(f"placement {self.placement!r} is unknown: choose {' or '.join(PLACEMENTS)}, "
                                 "or give a map {rank: [expert ids]}")
        elif len(self.placement) != self.expert_parallel:
            raise ValueError(f"placement lists {len(self.placement)} ranks but expert_parallel is "
                             f"{self.expert_parallel}: give expert ids for ranks 0..{self.expert_parallel - 1}")
        if not isinstance(self.redundant_experts, int) or self.redundant_experts < 0:
            raise ValueError(f"redundant_experts must be a non-negative integer, got {self.redundant_experts!r}")
        if self.redundant_experts and self.expert_parallel == 1:
            raise ValueError(f"redundant_experts ({self.redundant_experts}) only helps with expert_parallel > 1 "
                             "(a replica on the same rank shares no load): set redundant_experts: 0")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is unknown: choose {', '.join(BACKENDS)}")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string such as 'cpu' or 'cuda:{{local_rank}}', got {self.device!r}")
        try:
            self.device_for(local_rank=0, rank=0)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"device {self.device!r} is not a valid template ({e!r}): use 'auto', 'cpu', "
                             "'cuda:{local_rank}' (fields: {local_rank}, {rank})") from e
        if self.backend == "nccl" and self.device.startswith("cpu"):
            raise ValueError("backend nccl needs CUDA devices: set device: 'cuda:{local_rank}' or backend: gloo")
        if not isinstance(self.timeout_seconds, (int, float)) or not self.timeout_seconds > 0:
            raise ValueError(f"timeout_seconds must be positive, got {self.timeout_seconds!r}")

    @property
    def resolved_world_size(self) -> int:
        return self.tensor_parallel * self.data_parallel

    @property
    def expert_tensor_parallel(self) -> int:
        """Ranks sharing one expert set; they split each expert's intermediate dim."""
        return self.resolved_world_size // self.expert_parallel

    def device_for(self, local_rank: int, rank: int = 0) -> str:
        if self.device == "auto":
            return "auto"
        return self.device.format(local_rank=local_rank, rank=rank)

    def num_slots(self, num_experts: int) -> int:
        return num_experts + self.redundant_experts

    def validate_for_model(self, num_experts: int) -> None:
        """Errors for a model with ``num_experts`` routed experts (0: a dense model)."""
        ep, red = self.expert_parallel, self.redundant_experts
        if num_experts == 0:
            if ep > 1:
                raise ValueError(f"expert_parallel ({ep}) needs a MoE model but this one has no routed experts: "
                                 "set expert_parallel: 1")
            return
        if ep > num_experts and red == 0:
            raise ValueError(
                f"expert_parallel ({ep}) exceeds the number of experts ({num_experts}): lower expert_parallel to "
                f"at most {num_experts}, or add redundant_experts (e.g. {ep - num_experts}) so every rank holds a slot")
        if red > num_experts * (ep - 1):
            raise ValueError(f"redundant_experts ({red}) exceeds what {num_experts} experts can use on {ep} ranks "
                             f"(one copy per rank: at most {num_experts * (ep - 1)})")
        slots = num_experts + red
        if slots % ep:
            extra = (-slots) % ep
            raise ValueError(
                f"num_experts ({num_experts}) + redundant_experts ({red}) = {slots} slots do not split evenly over "
                f"expert_parallel ({ep}): set redundant_experts: {red + extra}, or choose expert_parallel from "
                f"{_divisors(slots)}")
        if not isinstance(self.placement, str):
            _check_explicit(self.placement, num_experts, slots // ep)

    def validate_for_world(self, world_size: int, launcher: str = "the launcher") -> None:
        if world_size != self.resolved_world_size:
            raise ValueError(
                f"the sharding needs world_size {self.resolved_world_size} (tensor_parallel {self.tensor_parallel} "
                f"x data_parallel {self.data_parallel}) but {launcher} starts {world_size} processes: launch "
                f"{self.resolved_world_size} ranks (nnodes x nproc_per_node) or change the sharding file")

    def slots(self, num_experts: int) -> list[list[int]]:
        """Logical expert id of every physical slot, per EP rank (validates first)."""
        self.validate_for_model(num_experts)
        return expert_placement(num_experts, self.expert_parallel, self.placement, self.redundant_experts)

    def physical_placement(self, num_experts: int) -> PhysicalPlacement:
        return PhysicalPlacement.from_slots(self.slots(num_experts))

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["world_size"] = self.resolved_world_size
        if not isinstance(self.placement, str):
            d["placement"] = {rank: list(ids) for rank, ids in enumerate(self.placement)}
        return d


def resolve_auto(cfg: ShardingConfig, cuda_available: bool | None = None) -> ShardingConfig:
    """The one place "auto" choices become concrete: backend nccl and device cuda:{local_rank}
    when CUDA is there, else gloo and cpu."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    device = cfg.device if cfg.device != "auto" else ("cuda:{local_rank}" if cuda_available else "cpu")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
    return replace(cfg, device=device, backend=backend)


_KEYS = tuple(f.name for f in fields(ShardingConfig))


def load_sharding(source: str | Path | Mapping[str, Any]) -> ShardingConfig:
    """A :class:`ShardingConfig` from a YAML file or a dict of the same schema.

    Unknown keys are errors (a typo would otherwise silently mean the default). An explicit
    placement is a map ``{rank: [expert ids]}`` with a key for every EP rank.
    """
    where = "sharding"
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        import yaml

        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"sharding file {where!r} does not exist (see examples/sharding/*.yaml)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{where} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{where} must hold a mapping of keys ({', '.join(_KEYS)}), not {type(raw).__name__}")
    for key in raw:
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown key {key!r} in {where}{hint}; valid keys: {', '.join(_KEYS)}")
    if isinstance(raw.get("placement"), Mapping):
        raw["placement"] = _explicit_from_map(raw["placement"], where)
    try:
        return ShardingConfig(**raw)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def _explicit_from_map(mapping: Mapping[Any, Any], where: str) -> tuple[tuple[int, ...], ...]:
    try:
        by_rank = {int(rank): tuple(int(e) for e in ids) for rank, ids in mapping.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"placement in {where} must map rank numbers to lists of expert ids ({e})") from e
    if sorted(by_rank) != list(range(len(by_rank))):
        raise ValueError(f"placement in {where} names ranks {sorted(by_rank)}: give every rank 0..{len(by_rank) - 1}")
    return tuple(by_rank[r] for r in range(len(by_rank)))


def _check_explicit(slots: Sequence[Sequence[int]], num_experts: int, per_rank: int) -> None:
    seen: set[int] = set()
    for rank, ids in enumerate(slots):
        if len(ids) != per_rank:
            raise ValueError(f"placement gives rank {rank} {len(ids)} experts but every rank needs {per_rank} "
                             "slots ((num_experts + redundant_experts) / expert_parallel)")
        if len(set(ids)) != len(ids):
            raise ValueError(f"placement lists an expert twice on rank {rank} ({list(ids)}): a replica belongs "
                             "on another rank")
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"placement on rank {rank} names experts {bad} outside 0..{num_experts - 1}")
        seen.update(ids)
    missing = sorted(set(range(num_experts)) - seen)
    if missing:
        raise ValueError(f"placement leaves experts {missing[:8]}{'...' if len(missing) > 8 else ''} on no rank")


def expert_placement(num_experts: int, ep_size: int, placement: Placement = "contiguous",
                     redundant: int = 0) -> list[list[int]]:
    """Logical expert id of each physical slot, per EP rank: ``slots[rank][local_slot]``.

    Each rank has ``S = (num_experts + redundant) / ep_size`` slots. First every expert gets one
    slot: ``contiguous`` gives rank r experts ``[r*S, (r+1)*S)``, ``round_robin`` gives expert e
    to rank ``e % ep_size``. Then the ``redundant`` slots take replicas of experts 0, 1, ...
    (without load counts; :func:`placement_from_counts` is the load-aware version), each on a
    rank with a free slot that does not hold that expert yet (lowest rank first).

    Example, 6 experts, 2 redundant, 4 ranks (S=2): contiguous -> [[0, 1], [2, 3], [4, 5],
    [0, 1]]; round_robin -> [[0, 4], [1, 5], [2, 0], [3, 1]].
    """
    total = num_experts + redundant
    if num_experts < 1 or ep_size < 1 or total % ep_size:
        raise ValueError(f"{num_experts} experts + {redundant} redundant slots do not split over {ep_size} ranks")
    per_rank = total // ep_size
    if not isinstance(placement, str):
        _check_explicit(placement, num_experts, per_rank)
        return [list(ids) for ids in placement]
    if placement == "contiguous":
        slots = [list(range(r * per_rank, min((r + 1) * per_rank, num_experts))) for r in range(ep_size)]
    elif placement == "round_robin":
        slots = [list(range(r, num_experts, ep_size)) for r in range(ep_size)]
    else:
        raise ValueError(f"placement {placement!r} is unknown: choose {' or '.join(PLACEMENTS)}")
    try:
        for start in range(0, redundant, num_experts):  # one round per extra copy of each expert
            copies = list(range(min(num_experts, redundant - start)))
            for r, extra in enumerate(_match_copies(slots, copies, per_rank)):
                slots[r] += extra
    except ValueError:
        # several extra copies per expert can paint the rounds into a corner; dealing the
        # copies, sorted by expert, round-robin over the ranks always works (<= ep_size copies each)
        copies = sorted(list(range(num_experts)) + [i % num_experts for i in range(redundant)])
        return [copies[r::ep_size] for r in range(ep_size)]
    return slots


def _match_copies(slots: list[list[int]], experts: list[int], per_rank: int) -> list[list[int]]:
    """Give each expert in ``experts`` a free slot on a rank that does not hold it yet.

    A bipartite matching (augmenting paths), not first-fit: when the only free slot is on a
    rank that already holds the expert, a copy placed earlier moves over to make room.
    """
    P = len(slots)
    placed: list[list[int]] = [[] for _ in range(P)]  # indices into ``experts`` per rank

    def place(i: int, seen: set[int]) -> bool:
        allowed = [r for r in range(P) if r not in seen and experts[i] not in slots[r]]
        for r in allowed:  # a free slot first, then try moving an earlier copy away
            if len(slots[r]) + len(placed[r]) < per_rank:
                placed[r].append(i)
                return True
        seen.update(allowed)
        for r in allowed:
            for j in list(placed[r]):
                if place(j, seen):  # j found another rank: its slot here is free for i
                    placed[r].remove(j)
                    placed[r].append(i)
                    return True
        return False

    for i in range(len(experts)):
        if not place(i, set()):
            raise ValueError(f"no rank has a free slot for another copy of expert {experts[i]}: lower "
                             "redundant_experts or give an explicit placement")
    return [[experts[i] for i in sorted(idx)] for idx in placed]


def placement_from_counts(counts_E: Sequence[float], ep_size: int, num_slots: int) -> list[list[int]]:
    """Load-balanced slots from observed tokens per expert (greedy, in the spirit of EPLB).

    1. Replicate: start with one copy per expert; give each of the ``num_slots - E`` extra slots
       to the expert with the highest load per copy (at most ``ep_size`` copies each, since two
       copies on one rank share nothing).
    2. Pack: sort the copies by load (``count / copies``), heaviest first, and put each on the
       least-loaded rank that still has a free slot and does not hold that expert yet.

    Worked example: counts [90, 10, 30, 20, 40, 10], 2 ranks, 8 slots (2 redundant).
    Replicate: expert 0 (90 per copy) gets a second copy (45 each); next expert 4 (40) gets one
    (20 each). Copies by load: 0:45, 0:45, 2:30, 3:20, 4:20, 4:20, 1:10, 5:10. Packing gives
    rank 0 <- 0, 2, 4, 5 (45+30+20+10 = 105) and rank 1 <- 0, 3, 4, 1 (45+20+20+10 = 95),
    returned with slots sorted by expert: [[0, 2, 4, 5], [0, 1, 3, 4]]. The contiguous layout
    [[0, 1, 2], [3, 4, 5]] would put 130 tokens on rank 0 and 70 on rank 1.
    """
    counts = [float(c) for c in (counts_E.tolist() if hasattr(counts_E, "tolist") else counts_E)]
    E = len(counts)
    if E < 1 or ep_size < 1 or num_slots < E or num_slots % ep_size:
        raise ValueError(f"cannot place {E} experts into {num_slots} slots over {ep_size} ranks: num_slots must be "
                         "at least the number of experts and a multiple of the rank count")
    if num_slots - E > E * (ep_size - 1):
        raise ValueError(f"{num_slots - E} redundant slots exceed what {E} experts can use on {ep_size} ranks "
                         f"(at most {E * (ep_size - 1)}: one copy per rank)")
    copies = [1] * E
    heap = [(-c, e) for e, c in enumerate(counts)]  # max-heap on load per copy, ties by lower expert id
    heapq.heapify(heap)
    for _ in range(num_slots - E):
        while True:
            _, e = heapq.heappop(heap)
            if copies[e] < ep_size:
                break
        copies[e] += 1
        if copies[e] < ep_size:
            heapq.heappush(heap, (-counts[e] / copies[e], e))
    items = sorted(((counts[e] / copies[e], e) for e in range(E) for _ in range(copies[e])),
                   key=lambda item: (-item[0], item[1]))
    per_rank = num_slots // ep_size
    load = [0.0] * ep_size
    slots: list[list[int]] = [[] for _ in range(ep_size)]
    for weight, e in items:
        free = [r for r in range(ep_size) if len(slots[r]) < per_rank]
        fresh = [r for r in free if e not in slots[r]] or free
        r = min(fresh, key=lambda r: (load[r], r))
        slots[r].append(e)
        load[r] += weight
    return [sorted(s) for s in slots]


@dataclass(frozen=True)
class PhysicalPlacement:
    """Where every logical expert lives: ``slots[rank][local_slot] = expert id``.

    ``replicas(e)`` lists the (rank, local slot) pairs holding expert ``e``, in rank order;
    dispatchers pick among them per token, so a hot expert's load spreads over its copies.
    """

    slots: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.slots or len({len(s) for s in self.slots}) != 1 or not self.slots[0]:
            raise ValueError("every EP rank must hold the same, non-zero number of expert slots")
        _check_explicit(self.slots, self.num_experts, self.slots_per_rank)

    @classmethod
    def from_slots(cls, slots: Sequence[Sequence[int]]) -> PhysicalPlacement:
        return cls(tuple(tuple(int(e) for e in s) for s in slots))

    @classmethod
    def from_replicas(cls, replicas: Mapping[int, Sequence[tuple[int, int]]]) -> PhysicalPlacement:
        """From ``{expert: [(rank, local_slot), ...]}``."""
        cells = {(r, s): e for e, where in replicas.items() for r, s in where}
        ranks = 1 + max(r for r, _ in cells)
        per_rank = 1 + max(s for _, s in cells)
        if len(cells) != ranks * per_rank:
            raise ValueError(f"replicas fill {len(cells)} of {ranks} x {per_rank} slots: every (rank, slot) "
                             "needs exactly one expert")
        return cls(tuple(tuple(cells[(r, s)] for s in range(per_rank)) for r in range(ranks)))

    @property
    def ep_size(self) -> int:
        return len(self.slots)

    @property
    def slots_per_rank(self) -> int:
        return len(self.slots[0])

    @property
    def num_experts(self) -> int:
        return 1 + max(max(s) for s in self.slots)

    def replicas(self, expert: int) -> list[tuple[int, int]]:
        return [(r, i) for r, s in enumerate(self.slots) for i, e in enumerate(s) if e == expert]

