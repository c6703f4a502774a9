"""Expert offloading: routed experts stay in the checkpoint's safetensors files; a bounded cache
holds the ones being used.

- :class:`CheckpointReader` reads one expert's part of a tensor through a ``safe_open`` memory map
  (``get_slice``: only that expert's bytes, never the whole stacked tensor) and copies it out.
  safetensors' tensors are lazy views of a private map, so every page read stays in the process
  RSS while the map lives: the reader drops its maps after ``recycle_bytes`` of reads.
- :class:`ExpertCache` holds resident experts of every offloaded layer under one byte budget.
  An expert is pinned while it computes and never evicted then; otherwise the victim is the one
  with the lowest routing frequency (tokens routed to it, decayed each time its layer runs: this
  weighs recency too), the least recently used among equals. After a layer's router has run, a
  background thread prefetches the experts the next layer will likely use: a transition table
  learned online (experts active in this layer -> experts active in the next), the next layer's
  frequencies breaking ties. Prefetch never evicts the current layer's experts or pinned ones;
  prefetched experts not yet used are evicted last.
- :class:`OffloadedExperts` has :class:`~experts.grouped.GroupedExperts`' interface; the loader
  hands it where each expert tensor is (:meth:`~OffloadedExperts.add_source`) instead of the
  tensor, and it computes each expert with the same kernels as the resident modules (float or
  packed, see :mod:`experts.quant_layer`), so outputs are bit-identical with and without offloading.

Statistics (:class:`CacheStats`): one lookup per (layer call, expert with rows); ``hits`` found
it resident, ``misses`` did not (loaded on demand, or waited for its prefetch), so
``hits + misses == lookups``; ``stall_seconds`` is the time forward waited for loads;
``bytes_loaded`` counts checkpoint bytes read (demand and prefetch).
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import accumulate

import torch
from torch import nn

import cpu_kernels

from .formats import WeightFormat
from .grouped import Activation, Backend, SlottedExperts, grouped_swiglu_torch
from .quant_grouped import grouped_swiglu_quant_torch, prepare_cpu
from .quant_layer import WEIGHTS, ExpertTensors, tensor_nbytes

Key = tuple[int, int]  # (layer slot in the cache, local expert slot)


def _return_freed_blocks_to_os() -> None:
    """Fix glibc's mmap threshold at 256 KiB (process-wide; set again by every offloaded cache).

    glibc raises the threshold after large blocks are freed and then serves expert-sized blocks
    from its heaps, which keep the memory after an eviction: RSS would grow with every load
    (measured: +40 MiB over a 24 MiB cache in tests/test_offload.py). With a fixed threshold
    every large block is its own mapping, returned to the OS when freed.
    """
    cpu_kernels.set_malloc_thresholds(256 << 10)


class CheckpointReader:
    """Copies slices of safetensors tensors out of ``safe_open`` maps, recycling the maps (module doc)."""

    def __init__(self, recycle_bytes: int = 64 << 20):
        self.recycle_bytes = recycle_bytes
        self._handles: dict[str, object] = {}
        self._since_open = 0
        self._lock = threading.Lock()

    def read(self, path: str, name: str, index: int | None = None,
             transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
             into: Callable[[torch.Tensor], None] | None = None) -> int:
        """Read tensor ``name`` (``index``: only row ``index`` of its dim 0), apply ``transform``, and hand
        the result to ``into`` (which copies what it needs; the tensor is a view of the map). Returns
        the bytes read."""
        from safetensors import safe_open

        with self._lock:
            f = self._handles.get(path)
            if f is None:
                f = self._handles[path] = safe_open(path, framework="pt")
            sl = f.get_slice(name)
            t = sl[index:index + 1] if index is not None else sl[:]
            nbytes = t.nbytes
            if transform is not None:
                t = transform(t)
            if into is not None:
                into(t[0] if index is not None else t)
            del t, sl
            self._since_open += nbytes
            if self._since_open >= self.recycle_bytes:
                self._handles.clear()  # unmaps: the pages read leave our RSS
                self._since_open = 0
        return nbytes

    def close(self) -> None:
        with self._lock:
            self._handles.clear()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    prefetch_loads: int = 0  # experts a prefetch brought in
    prefetch_hits: int = 0  # hits on those, before their first use
    bytes_loaded: int = 0
    evictions: int = 0
    stall_seconds: float = 0.0

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    def as_dict(self) -> dict:
        return {**asdict(self), "lookups": self.lookups}


class ResidentExpert:
    """One expert's weights as it computes: float ``[1, ., .]`` tensors or 1-expert compute layouts."""

    def __init__(self, w13, w2, b13: torch.Tensor | None, b2: torch.Tensor | None, fmt: WeightFormat | None):
        self.w13, self.w2, self.b13, self.b2, self.fmt = w13, w2, b13, b2, fmt
        self.nbytes = tensor_nbytes([w13, w2, b13, b2])

    def compute(self, x_MD: torch.Tensor, act: Activation) -> torch.Tensor:
        n = [x_MD.shape[0]]
        if self.fmt is None:
            return grouped_swiglu_torch(x_MD, n, self.w13, self.w2, self.b13, self.b2, act)
        return grouped_swiglu_quant_torch(x_MD, n, self.w13, self.w2, self.fmt, self.b13, self.b2, act)


class _Entry:
    __slots__ = ("expert", "nbytes", "pins", "ready", "error", "prefetched", "last_use")

    def __init__(self, nbytes: int, prefetched: bool):
        self.expert: ResidentExpert | None = None
        self.nbytes, self.pins, self.ready, self.error = nbytes, 0, False, None
        self.prefetched, self.last_use = prefetched, 0


class ExpertCache:
    """Resident experts of every offloaded layer under one budget of ``capacity_bytes`` (module doc)."""

    def __init__(self, capacity_bytes: int, *, prefetch: bool = True, freq_decay: float = 0.8,
                 recycle_bytes: int | None = None):
        if capacity_bytes <= 0:
            raise ValueError(f"expert_cache={capacity_bytes} bytes: give the expert cache a positive size")
        self.capacity = int(capacity_bytes)
        self.prefetch = prefetch
        self.freq_decay = freq_decay
        self.reader = CheckpointReader(recycle_bytes or min(self.capacity // 4, 64 << 20))
        _return_freed_blocks_to_os()
        self.stats = CacheStats()
        self._layers: list[OffloadedExperts] = []
        self._freq: list[torch.Tensor] = []  # per layer [e]: decayed tokens routed
        self._trans: list[torch.Tensor | None] = []  # per layer [e_this, e_next]: co-activation counts
        self._active: list[torch.Tensor | None] = []  # per layer: experts with rows in its last call
        self._entries: dict[Key, _Entry] = {}
        self._used = 0
        self._clock = 0
        self._current = -1
        self._queue: list[Key] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()

    # ---- layers ---------------------------------------------------------------------------
    def register(self, layer: OffloadedExperts) -> int:
        """Add a layer (in model order: prefetch looks at the next one); returns its slot."""
        self._layers.append(layer)
        self._freq.append(torch.zeros(layer.num_local, dtype=torch.float64))
        self._trans.append(None)
        self._active.append(None)
        return len(self._layers) - 1

    def check_fits(self, layer: OffloadedExperts) -> None:
        if layer.expert_nbytes > self.capacity:
            raise ValueError(f"expert_cache ({self.capacity:,} bytes) is smaller than one expert of this model "
                             f"({layer.expert_nbytes:,} bytes resident); give expert_cache at least that much")

    @property
    def used_bytes(self) -> int:
        return self._used

    def resident(self) -> list[Key]:
        with self._cond:
            return [k for k, e in self._entries.items() if e.ready]

    def is_resident(self, slot: int, expert: int) -> bool:
        e = self._entries.get((slot, expert))
        return e is not None and e.ready

    # ---- one layer call -------------------------------------------------------------------
    def begin_layer(self, slot: int, counts: Sequence[int]) -> None:
        """Record the routing of a layer call and prefetch for the next layer."""
        c = torch.tensor(counts, dtype=torch.float64)
        active = c > 0
        with self._cond:
            self._clock += 1
            self._current = slot
            self._freq[slot].mul_(self.freq_decay).add_(c)
            prev = (slot - 1) % len(self._layers)
            if self._active[prev] is not None:
                if self._trans[prev] is None:
                    self._trans[prev] = torch.zeros(len(self._freq[prev]), len(c), dtype=torch.float64)
                self._trans[prev] += torch.outer(self._active[prev].double(), active.double())
            self._active[slot] = active
            if self.prefetch:
                self._schedule_prefetch(slot, active)

    def _schedule_prefetch(self, slot: int, active: torch.Tensor) -> None:
        nxt = (slot + 1) % len(self._layers)
        trans, freq = self._trans[slot], self._freq[nxt]
        score = freq / (freq.sum() + 1e-9) * 1e-3
        if trans is not None:
            rows = trans[active]
            score = score + (rows / rows.sum(1, keepdim=True).clamp(min=1)).sum(0)
        # as many experts as this layer uses, in the room this layer's own experts leave
        room = self.capacity // max(self._layers[nxt].expert_nbytes, 1) - int(active.sum())
        k = max(0, min(int(active.sum()), room, len(score)))
        top = [int(i) for i in score.topk(k).indices if score[i] > 0]
        self._queue = [(nxt, e) for e in top if (nxt, e) not in self._entries]  # stale requests dropped
        if self._queue:
            if self._thread is None:
                # the thread holds only a weak reference: a dropped engine's cache (and thread) go away
                self._thread = threading.Thread(target=_prefetch_loop, args=(weakref.ref(self), self._cond),
                                                name="expert-prefetch", daemon=True)
                self._thread.start()
                _LIVE_CACHES.add(self)
            self._cond.notify_all()

    def acquire(self, slot: int, expert: int) -> ResidentExpert:
        """The resident expert, loading it (or waiting for its prefetch) on a miss; pinned until :meth:`release`."""
        key = (slot, expert)
        t0 = time.perf_counter()
        with self._cond:
            ent = self._entries.get(key)
            if ent is not None and ent.ready:
                self.stats.hits += 1
                if ent.prefetched:
                    self.stats.prefetch_hits += 1
                    ent.prefetched = False
                ent.pins += 1
                ent.last_use = self._clock
                return ent.expert
            self.stats.misses += 1
            if ent is not None:  # a prefetch is loading it
                ent.pins += 1
                while not ent.ready and ent.error is None:
                    self._cond.wait()
                self.stats.stall_seconds += time.perf_counter() - t0
                if ent.error is not None:
                    raise RuntimeError(f"loading expert {expert} of offloaded layer {slot} failed") from ent.error
                ent.prefetched = False
                ent.last_use = self._clock
                return ent.expert
            layer = self._layers[slot]
            self._make_room(layer.expert_nbytes, protect=(), wait=True)
            ent = self._entries[key] = _Entry(layer.expert_nbytes, prefetched=False)
            ent.pins = 1
            self._used += ent.nbytes
        self._load(key, ent)
        self.stats.stall_seconds += time.perf_counter() - t0
        if ent.error is not None:
            raise ent.error
        return ent.expert

    def release(self, slot: int, expert: int) -> None:
        with self._cond:
            ent = self._entries[(slot, expert)]
            ent.pins -= 1
            ent.last_use = self._clock
            self._cond.notify_all()

    # ---- loading and eviction -------------------------------------------------------------
    def _load(self, key: Key, ent: _Entry) -> None:
        try:
            expert, nread = self._layers[key[0]].read_expert(key[1])
        except BaseException as e:  # noqa: BLE001 -- handed to whoever waits for this entry
            with self._cond:
                ent.error = e
                del self._entries[key]
                self._used -= ent.nbytes
                self._cond.notify_all()
            return
        with self._cond:
            self._used += expert.nbytes - ent.nbytes
            ent.nbytes, ent.expert, ent.ready, ent.last_use = expert.nbytes, expert, True, self._clock
            self.stats.bytes_loaded += nread
            self.stats.prefetch_loads += ent.prefetched
            self._make_room(0, protect=(), wait=False)  # in case the expert came out larger than estimated
            self._cond.notify_all()

    def _make_room(self, need: int, protect: Sequence[int], wait: bool) -> bool:
        """Evict until ``need`` more bytes fit (caller holds the lock); False if that is impossible now."""
        while self._used + need > self.capacity:
            # prefetched and not yet used: evicted last (the prefetch predicted them for what comes next)
            victims = [(e.prefetched, float(self._freq[k[0]][k[1]]), e.last_use, k) for k, e in self._entries.items()
                       if e.ready and e.pins == 0 and k[0] not in protect]
            if victims:
                *_, k = min(victims)
                self._used -= self._entries.pop(k).nbytes
                self.stats.evictions += 1
            elif wait and any(not e.ready for e in self._entries.values()):
                self._cond.wait()  # a load in flight becomes evictable when it lands
            elif wait:
                raise RuntimeError(f"expert cache: {need:,} bytes do not fit beside the pinned experts "
                                   f"({self._used:,} of {self.capacity:,} bytes used)")
            else:
                return False
        return True

    def __del__(self) -> None:
        cond = getattr(self, "_cond", None)  # None: __init__ raised before creating it
        if cond is not None:
            with cond:  # wake the prefetch thread so it sees the cache is gone
                self._closed = True
                cond.notify_all()

    def close(self) -> None:
        """Stop the prefetch thread and drop every resident expert and file map."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._cond:
            self._entries.clear()
            self._used = 0
        self.reader.close()


def _prefetch_loop(ref: "weakref.ref[ExpertCache]", cond: threading.Condition) -> None:
    """Load queued experts until the cache closes or is garbage-collected."""
    # A second thread running multi-threaded torch ops keeps its own OpenMP team, and while this
    # thread lives the main thread's decode ran 3x slower (measured: 352 -> 120 tok/s on the
    # default model). Copies out of the files need no intra-op parallelism.
    torch.set_num_threads(1)
    while True:
        with cond:
            while True:
                cache = ref()
                if cache is None or cache._closed:
                    return
                if cache._queue:
                    break
                del cache  # no strong reference while waiting
                cond.wait()
            key = cache._queue.pop(0)
            if key in cache._entries:
                continue
            need = cache._layers[key[0]].expert_nbytes
            if not cache._make_room(need, protect=(cache._current,), wait=False):
                continue
            ent = cache._entries[key] = _Entry(need, prefetched=True)
            cache._used += need
        cache._load(key, ent)
        del cache


# A prefetch thread still inside a torch call when the interpreter exits aborts the process:
# stop every live cache's thread first.
_LIVE_CACHES: weakref.WeakSet[ExpertCache] = weakref.WeakSet()
atexit.register(lambda: [c.close() for c in list(_LIVE_CACHES)])


@dataclass(frozen=True)
class _Source:
    role: str
    shard_id: str
    path: str
    name: str
    expert_id: int | None  # None: the tensor stacks every expert on dim 0
    transform: Callable[[torch.Tensor], torch.Tensor] | None


class OffloadedExperts(SlottedExperts):
    """The experts of one MoE layer, read from the checkpoint into ``cache`` as the router asks (module doc).

    ``fmt`` is the checkpoint's packed format (None: float experts in ``dtype``). Slots as in
    :class:`~experts.grouped.GroupedExperts`. Parameters are empty placeholders named by role
    (``w13``, ``qweight_w13``, ``b2``, ...) so the loader can map names to this module; it calls
    :meth:`add_source` (``offloaded`` is True) and never reads these tensors itself.
    """

    offloaded = True

    def __init__(self, num_experts: int, hidden: int, intermediate: int, cache: ExpertCache,
                 fmt: WeightFormat | None = None, *, bias: bool = False, activation: Activation = Activation(),
                 dtype: torch.dtype = torch.float32, expert_start: int = 0, num_local_experts: int | None = None,
                 backend: Backend = "auto", slot_experts: Sequence[int] | None = None,
                 intermediate_shard: tuple[int, int] = (0, 1)):
        super().__init__()
        if tuple(intermediate_shard) != (0, 1):
            raise NotImplementedError("offloaded experts cannot be split by expert_tensor_parallel yet")
        self._set_slots(num_experts, expert_start, num_local_experts, slot_experts)
        self.hidden, self.intermediate = hidden, intermediate
        self.activation, self.dtype = activation, dtype
        self.layout = ExpertTensors(hidden, intermediate, fmt, dtype, bias)
        self.fmt = self.layout.fmt
        self._role_of = self.layout.register_roles(self, None)  # empty: the tensors stay in the files
        self.backend = backend  # computed on the CPU whatever it names (forward checks the device)
        self._sources: dict[int, list[_Source]] = {}
        self._stacked: list[_Source] = []
        self.cache = cache
        self.slot = cache.register(self)
        self.expert_nbytes = 0  # resident bytes of one expert, known after post_load

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str,
                      expert_id: int | None = None) -> None:
        raise RuntimeError("offloaded experts are read from the checkpoint on demand: the loader must hand over "
                           "tensor locations (add_source), not tensors")

    def add_source(self, param: nn.Parameter, path, name: str, shard_id: str, expert_id: int | None,
                   transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Checkpoint tensor ``name`` in file ``path`` fills ``param``'s role (``shard_id``) of ``expert_id``
        (None: every expert, stacked on dim 0)."""
        src = _Source(self._role_of[param], shard_id, str(path), name, expert_id, transform)
        if expert_id is None:
            self._stacked.append(src)
        elif self.owns(expert_id):
            self._sources.setdefault(expert_id, []).append(src)

    def post_load(self) -> None:
        """Check every expert's tensors were found; size one resident expert; check it fits the cache."""
        super().post_load()
        for e in self.slot_experts:
            for role in self.layout.specs:
                have = {s.shard_id for s in self._sources.get(e, []) + self._stacked if s.role == role}
                if not any(need <= have for need in self.layout.shards_needed(role)):
                    raise ValueError(f"the checkpoint lacks expert {e}'s {role} ({sorted(have) or 'nothing'} found)")
        zeros = {r: torch.zeros(s.shape, dtype=s.dtype) for r, s in self.layout.specs.items()}
        self.expert_nbytes = self._assemble(zeros).nbytes
        self.cache.check_fits(self)

    def _assemble(self, tensors: dict[str, torch.Tensor]) -> ResidentExpert:
        b13, b2 = tensors.get("b13"), tensors.get("b2")
        b13, b2 = (None if b is None else b[None] for b in (b13, b2))
        if self.fmt is None:
            return ResidentExpert(tensors["w13"][None], tensors["w2"][None], b13, b2, None)
        w13, w2 = (prepare_cpu(self.fmt, {t: v[None] for t, v in self.layout.packed(tensors, w).items()})
                   for w in WEIGHTS)
        return ResidentExpert(w13, w2, b13, b2, self.fmt)

    def read_expert(self, slot: int) -> tuple[ResidentExpert, int]:
        """Expert ``slot`` read from the checkpoint; also the bytes read."""
        e = self.slot_experts[slot]
        tensors = {r: torch.empty(s.shape, dtype=s.dtype) for r, s in self.layout.specs.items()}
        nread = 0
        for src in self._sources.get(e, []) + self._stacked:
            def place(t: torch.Tensor, src: _Source = src) -> None:
                self.layout.place(src.role, tensors[src.role], t, src.shard_id, f"{src.name} (expert {e})")

            nread += self.cache.reader.read(src.path, src.name, e if src.expert_id is None else None,
                                            src.transform, into=place)
        return self._assemble(tensors), nread

    def forward(self, x_RD: torch.Tensor, counts_e: torch.Tensor) -> torch.Tensor:
        if x_RD.device.type != "cpu":
            raise NotImplementedError("offloaded experts compute on the CPU; run the engine with device='cpu'")
        counts = counts_e.tolist()
        self.cache.begin_layer(self.slot, counts)
        starts = list(accumulate(counts, initial=0))
        y_RD = torch.empty(x_RD.shape[0], self.hidden, dtype=x_RD.dtype)
        active = [i for i, n in enumerate(counts) if n]
        active.sort(key=lambda i: not self.cache.is_resident(self.slot, i))  # hits first: prefetch gets time
        for i in active:
            rows = slice(starts[i], starts[i + 1])
            expert = self.cache.acquire(self.slot, i)
            try:
                y_RD[rows] = expert.compute(x_RD[rows], self.activation)
            finally:
                self.cache.release(self.slot, i)
        return y_RD
