"""Which launcher started this process, and joining its process group.

:func:`detect_launch_env` reads the variables each launcher sets (checked in this order):

- torchrun: ``TORCHELASTIC_RUN_ID`` plus RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE /
  MASTER_ADDR / MASTER_PORT.
- deepspeed: the same torch variables plus CROSS_RANK / CROSS_SIZE / LOCAL_SIZE, and
  ``--local_rank=N`` in argv unless started with ``--no_local_rank``.
- Open MPI (mpirun): OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE; the master
  address comes from MASTER_ADDR / MASTER_PORT, else rank 0 picks one and broadcasts it with
  mpi4py.
- Slurm (srun): SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID inside a job step (SLURM_STEP_ID
  set; a batch script itself is not a rank); master = MASTER_ADDR or the first host of
  SLURM_JOB_NODELIST, port = MASTER_PORT or one derived from the job id.
- plain RANK / WORLD_SIZE set by hand ("env"), else a single process.
"""
from __future__ import annotations

import atexit
import os
import random
import re
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Sequence

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # torchrun | deepspeed | mpirun | slurm | env | single
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"{self.launcher}: rank {self.rank} outside world_size {self.world_size}")
        if not 0 <= self.local_rank < max(self.local_world_size, 1):
            raise ValueError(f"{self.launcher}: local_rank {self.local_rank} outside local_world_size "
                             f"{self.local_world_size}")

    @property
    def init_method(self) -> str:
        if self.master_addr is None or self.master_port is None:
            raise RuntimeError(f"{self.launcher} gave no master address: set MASTER_ADDR and MASTER_PORT")
        return f"tcp://{self.master_addr}:{self.master_port}"


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as e:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from e


def _port(env: Mapping[str, str]) -> int | None:
    return _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else None


def _argv_local_rank(argv: Sequence[str]) -> int | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            return int(arg.split("=", 1)[1])
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            return int(argv[i + 1])
    return None


def detect_launch_env(environ: Mapping[str, str] | None = None, argv: Sequence[str] | None = None) -> LaunchEnv:
    """This process's place in the job, from the launcher's environment (see module doc)."""
    env = os.environ if environ is None else environ
    argv = sys.argv if argv is None else argv
    if "TORCHELASTIC_RUN_ID" in env and "RANK" in env:
        return LaunchEnv("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK"),
                         _int(env, "LOCAL_WORLD_SIZE"), env.get("MASTER_ADDR"), _port(env))
    argv_local = _argv_local_rank(argv)
    if "RANK" in env and ("CROSS_RANK" in env or "LOCAL_SIZE" in env or argv_local is not None):
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else argv_local
        return LaunchEnv("deepspeed", _int(env, "RANK"), _int(env, "WORLD_SIZE"), local,
                         _int(env, "LOCAL_SIZE") if "LOCAL_SIZE" in env else _int(env, "WORLD_SIZE"),
                         env.get("MASTER_ADDR"), _port(env))
    if "OMPI_COMM_WORLD_RANK" in env:
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        addr, port = env.get("MASTER_ADDR"), _port(env)
        if addr is None or port is None:
            addr, port = _mpi_master(rank, world, addr, port)
        return LaunchEnv("mpirun", rank, world, _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
                         _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"), addr, port)
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        world = _int(env, "SLURM_NTASKS")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = env.get("MASTER_ADDR") or (expand_nodelist(nodelist)[0] if nodelist else None)
        port = _port(env) or (_slurm_port(env["SLURM_JOB_ID"]) if env.get("SLURM_JOB_ID") else None)
        return LaunchEnv("slurm", _int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID"),
                         _slurm_local_size(env, world), addr, port)
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv("env", _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK")
                         if "LOCAL_RANK" in env else 0, _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env
                         else _int(env, "WORLD_SIZE"), env.get("MASTER_ADDR"), _port(env))
    return LaunchEnv("single", 0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), _port(env))


def _slurm_port(job_id: str) -> int:
    # every rank derives the same port from the job id; spread jobs over 20000..29999
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 10000


def _slurm_local_size(env: Mapping[str, str], world: int) -> int:
    """Tasks on this node: SLURM_TASKS_PER_NODE is e.g. ``"2(x3),1"``, indexed by SLURM_NODEID."""
    spec = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE")
    if not spec:
        return world
    per_node: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot read SLURM_TASKS_PER_NODE={spec!r}")
        per_node += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return per_node[min(node, len(per_node) - 1)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, expanded: ``"n[1-3],x"`` -> n1, n2, n3, x;
    ``"gpu[01-02,07]"`` keeps zero padding -> gpu01, gpu02, gpu07; ``"a[1-2]-ib[3-4]"`` is a
    product of ranges -> a1-ib3, a1-ib4, a2-ib3, a2-ib4."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts += _expand_host(item)
    return hosts


def _split_top_level(s: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    items.append(s[start:])
    return [i.strip() for i in items if i.strip()]


def _expand_host(pattern: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    out = []
    for rng in m.group(1).split(","):
        lo, _, hi = rng.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"cannot expand Slurm node list range {rng!r} in {pattern!r}")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            out += [f"{head}{n:0{width}d}{rest}" for rest in _expand_host(tail)]
    return out


def free_port(host: str = "") -> int:
    """A free port below the kernel's ephemeral range (Linux), else any free one. Processes started
    after the choice (torchrun's rendezvous, gloo's listeners) bind port 0 and get theirs from that
    range, so none of them can take this port before its user binds it, as a port 0 choice could."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    rng = random.SystemRandom()
    for _ in range(200):
        with socket.socket() as s:
            try:
                s.bind((host, rng.randrange(max(1024, low - 12000), low) if low > 2048 else 0))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port below the ephemeral range")


def _mpi_master(rank: int, world: int, addr: str | None, port: int | None) -> tuple[str, int]:
    """Rank 0 picks an address and a free port and broadcasts them with mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            "mpirun started this process without MASTER_ADDR/MASTER_PORT and mpi4py is not installed: "
            "pass them to every rank (mpirun -x MASTER_ADDR=<rank 0 host> -x MASTER_PORT=29500 ...) "
            "or pip install mpi4py") from None
    if rank == 0:
        addr = addr or socket.gethostbyname(socket.gethostname())
        port = port or free_port()
    return MPI.COMM_WORLD.bcast((addr, port), root=0)


def resolve_backend(backend: str = "auto") -> str:
    import torch

    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend {backend!r} is unknown: choose auto, nccl or gloo")
    return backend


def init_distributed(env: LaunchEnv, backend: str = "auto", timeout_seconds: float = 600.0) -> str:
    """Join the job's default process group (left again at exit); returns the backend used.

    ``timeout_seconds`` bounds the rendezvous and every collective: a rank that never comes up
    or dies mid-run makes the others fail with an error naming the rank and address instead of
    hanging forever.
    """
    import torch
    import torch.distributed as dist

    backend = resolve_backend(backend)
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise RuntimeError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, not rank {env.rank} of {env.world_size}")
        return dist.get_backend()
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank % max(torch.cuda.device_count(), 1))
    addr = env.master_addr or "127.0.0.1"
    port = env.master_port or (free_port() if env.world_size == 1 else None)
    if port is None:
        raise RuntimeError(f"{env.launcher}: no master port for a {env.world_size}-rank job: set MASTER_PORT")
    init_method = f"tcp://{addr}:{port}"
    try:
        dist.init_process_group(backend, init_method=init_method, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=timeout_seconds))
    except Exception as e:  # rendezvous timeouts surface as several store/runtime error types
        cause = (str(e).splitlines() or [""])[0][:300]  # c10d appends a C++ stack trace
        raise RuntimeError(
            f"rank {env.rank} of {env.world_size} ({env.launcher}) could not join the {backend} process group at "
            f"{init_method} within {timeout_seconds:g}s: check that every rank started, that {addr} is reachable "
            f"from this node and port {port} is open (set MASTER_ADDR/MASTER_PORT), and the logs of the "
            f"other ranks. Cause: {type(e).__name__}: {cause}") from e
    atexit.register(leave_process_group)  # exiting with live gloo/NCCL groups can abort the process
    return backend


def leave_process_group() -> None:
    """Destroy the default process group, if any (registered at exit by :func:`init_distributed`)."""
    import torch.distributed as dist

    # A gloo worker thread drops its reference to a finished collective's tensors just after the
    # caller's wait returns, and that needs the GIL; if the interpreter is already finalizing, the
    # thread is killed and the process aborts ("terminate called without an active exception").
    # Releasing the GIL for a moment lets those drops finish first.
    time.sleep(0.05)
    if dist.is_initialized():
        dist.destroy_process_group()
