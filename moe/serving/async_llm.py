"""AsyncLLM: the engine's step loop on its own thread, driven from asyncio.

Why a thread: a step takes milliseconds to seconds; on the HTTP event loop it would stall every
other request and ``/health``. Hand-off is two one-way channels: a thread-safe command queue
(adds, aborts) read by the engine thread at step boundaries, and per-request ``asyncio.Queue``s
filled through ``loop.call_soon_threadsafe`` (one call per step, not per token).

Under a launcher every rank runs this loop (SPMD). Rank 0 alone takes commands; at each step
boundary it broadcasts the batch of commands to all ranks (``world_broadcast_object``), so every
rank makes the same engine calls in the same order. While idle rank 0 still broadcasts an empty
batch every ``heartbeat_s`` so the other ranks' collectives never wait past the sharding's
timeout, and a dead rank surfaces as a failed broadcast within that timeout.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from cpu_kernels.build import release_openmp_threads
from parallel import world_broadcast_object

from ..engine import LLMEngine
from ..outputs import CompletionOutput, RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams

log = logging.getLogger("moe.serving")


class EngineDeadError(RuntimeError):
    """The engine thread stopped (an exception in a step, or a dead rank); no request can run."""


class RequestError(ValueError):
    """The engine rejected one request (bad prompt or parameters); others are unaffected."""


class RequestAborted(RuntimeError):
    """The engine stopped (``shutdown``) while the request's consumer still waited."""


@dataclass
class _Add:
    request_id: str
    prompt: Any
    params: SamplingParams
    stream: bool = True


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Stop:
    pass


@dataclass
class _Stream:
    """The consumer side of one request: its queue on its event loop."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    first_output: bool = False
    t_submit: float = field(default_factory=time.perf_counter)


class AsyncLLM:
    """``async for out in llm.generate(prompt, params, request_id)`` over one shared engine.

    >>> llm = AsyncLLM(LLM(model).engine); llm.start()
    >>> async for out in llm.generate("Hello", SamplingParams(max_tokens=8), "r1"): print(out.delta.text)
    """

    def __init__(self, engine: LLMEngine, heartbeat_s: float | None = None):
        self.engine = engine
        st = engine.parallel
        self.rank, self.world_size = st.rank, st.world_size
        timeout = st.sharding.timeout_seconds if st.sharding is not None else 60.0
        # idle broadcasts well inside the collective timeout keep the other ranks' waits short
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(0.05, min(1.0, timeout / 4))
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams between the loop and the engine thread
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self.dead: BaseException | None = None
        self.last_step_time = time.monotonic()  # when the engine last completed a step (or went idle)
        self.busy = False  # the engine holds unfinished requests
        self.on_dead: Callable[[BaseException], None] | None = None

    # ---- public API ------------------------------------------------------------------------
    def start(self) -> None:
        """Run the engine's step loop on its own thread from now on. The calling thread (which
        built and warmed up the engine) gives back its OpenMP workers: the engine thread's kernels
        get the cores without two teams of workers sharing them (see
        :func:`cpu_kernels.build.release_openmp_threads`)."""
        if self.engine.device.type == "cpu":
            release_openmp_threads()
        self._thread = threading.Thread(target=self._run_guarded, name="moe-engine", daemon=True)
        self._thread.start()

    def run_worker(self) -> None:
        """Ranks other than 0: follow rank 0's commands until it stops (blocks; no HTTP)."""
        self._run_guarded()
        if self.dead is not None:
            raise self.dead

    def shutdown(self, timeout: float = 10.0) -> None:
        self._command(_Stop())
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def num_unstarted(self) -> int:
        """Requests accepted but without their first output yet (queued or in prefill)."""
        with self._lock:
            return sum(1 for s in self._streams.values() if not s.first_output)

    @property
    def num_requests(self) -> int:
        with self._lock:
            return len(self._streams)

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}-{time.monotonic_ns() & 0xFFFFFF:06x}"

    def generate(self, prompt: str | dict, params: SamplingParams, request_id: str | None = None,
                 stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them (each with ``.delta``); the last has
        ``finished``. Leaving the iteration early (or cancellation) aborts the request. ``stream``: its
        consumer hands tokens on as they come (``LLMEngine.add_request``'s; False for an answer sent
        whole).

        The request is queued at once (not at the first ``__anext__``), so it counts against the
        queue bound from the moment it is admitted. Call from a running event loop."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead}")
        rid = request_id or self.new_request_id()
        out = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if rid in self._streams:
                raise RequestError(f"request id {rid!r} is already in use")
            if self.dead is not None:  # died since the check above: nobody would answer this stream
                raise EngineDeadError(f"the engine is dead: {self.dead}")
            self._streams[rid] = out
        if params.structured_outputs is not None and self.rank == 0:
            # a grammar compiles in a worker thread first (seconds for a first one): the engine thread
            # keeps stepping the other requests meanwhile; the request is queued once it is compiled
            out.loop.create_task(self._add_after_compiling(rid, prompt, params, out, stream))
        else:
            self._command(_Add(rid, prompt, params, stream))
        return self._outputs(rid, out)

    async def _add_after_compiling(self, rid: str, prompt, params: SamplingParams, stream: _Stream,
                                   streams: bool) -> None:
        try:
            await asyncio.to_thread(self.engine.prepare_structured_output, params)
        except ValueError as e:
            with self._lock:
                mine = self._streams.pop(rid, None) is stream
            if mine:
                stream.queue.put_nowait(RequestError(str(e)))
            return
        with self._lock:
            still_wanted = self._streams.get(rid) is stream  # (its consumer may have left meanwhile)
        if still_wanted:
            self._command(_Add(rid, prompt, params, streams))

    async def _outputs(self, rid: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(rid, None)
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks at the next step boundary. Its iterator ends with a
        last output: ``finished``, ``finish_reason`` "abort" (as vLLM's AsyncLLM does)."""
        self._command(_Abort(request_id))

    def abort_all(self) -> None:
        """Abort every request still being consumed (shutdown); their iterators end as :meth:`abort` says."""
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self.abort(rid)

    def _command(self, c) -> None:
        """Queue ``c`` for the engine thread and end a multi-step call it may be in (LLMEngine.wake)."""
        self._commands.put(c)
        self.engine.wake()

    # ---- the engine thread -----------------------------------------------------------------
    def _run_guarded(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # every failure must reach the waiting requests
            log.exception("engine loop failed on rank %d", self.rank)
            self.dead = e
            if self.on_dead is not None:
                self.on_dead(e)
            with self._lock:
                streams = list(self._streams.values())
                self._streams.clear()
            err = EngineDeadError(f"the engine failed: {type(e).__name__}: {e}")
            for s in streams:
                s.loop.call_soon_threadsafe(s.queue.put_nowait, err)

    def _take_commands(self, block: bool) -> list:
        cmds = []
        if self.rank == 0:
            try:
                cmds.append(self._commands.get(timeout=self.heartbeat_s) if block else self._commands.get_nowait())
                while True:
                    cmds.append(self._commands.get_nowait())
            except queue.Empty:
                pass
        if self.world_size > 1:  # every rank applies rank 0's commands at the same step boundary
            try:
                cmds = world_broadcast_object(cmds)
            except RuntimeError as e:
                cause = (str(e).splitlines() or [""])[0][:300]
                raise RuntimeError(
                    f"rank {self.rank} of {self.world_size}: the request broadcast failed; another rank has "
                    "probably died or stalled for longer than the sharding's timeout_seconds: check the other "
                    f"ranks' logs. Cause: {cause}") from e
        return cmds

    def _loop(self) -> None:
        engine = self.engine
        while True:
            idle = not engine.has_unfinished_requests()
            self.busy = not idle
            if idle:
                self.last_step_time = time.monotonic()
            cmds = self._take_commands(block=idle)
            rejected: list[tuple[str, Exception]] = []
            aborted: list[RequestOutput] = []
            for c in cmds:
                if isinstance(c, _Stop):
                    for rid in list(engine.seqs):
                        engine.abort(rid)
                    if self.rank == 0:  # iterators still waiting end instead of hanging
                        with self._lock:
                            left = [(rid, RequestAborted(f"request {rid} was aborted: the engine stopped"))
                                    for rid in self._streams]
                        self._deliver([], left)
                    return
                if isinstance(c, _Abort):
                    # a consumer that still waits gets the last output
                    aborted += engine.abort(c.request_id) or self._not_queued_yet(c.request_id)
                elif isinstance(c, _Add):
                    try:
                        engine.add_request(c.prompt, c.params, c.request_id, stream=c.stream)
                    except ValueError as e:  # the same on every rank: add_request is deterministic
                        rejected.append((c.request_id, RequestError(str(e))))
            if (rejected or aborted) and self.rank == 0:
                self._deliver(aborted, rejected)
            if not engine.has_unfinished_requests():
                continue
            self.busy = True
            outs = engine.step()
            self.last_step_time = time.monotonic()
            if self.rank == 0:
                self._deliver(outs, [])

    def _not_queued_yet(self, rid: str) -> list[RequestOutput]:
        """The last output of an aborted request still compiling its grammar (not in the engine yet;
        the compile task sees the stream gone and does not queue it)."""
        with self._lock:
            if self.rank != 0 or rid not in self._streams:
                return []
        done = CompletionOutput(0, "", [], None, "abort")
        return [RequestOutput(rid, None, [], [done], True, RequestMetrics(time.perf_counter()), delta=done)]

    def _deliver(self, outs: list[RequestOutput], errors: list[tuple[str, Exception]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._lock:
            for out in outs:
                s = self._streams.get(out.request_id)
                if s is None:
                    continue  # its consumer left; the abort is on its way
                s.first_output = True
                if out.finished:  # also forgets requests whose iterator was never started
                    del self._streams[out.request_id]
                by_loop.setdefault(s.loop, []).append((s.queue, out))
            for rid, err in errors:
                s = self._streams.pop(rid, None)
                if s is not None:
                    by_loop.setdefault(s.loop, []).append((s.queue, err))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)
