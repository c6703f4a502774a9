"""Command lines for the launchers that start one Python process per rank.

Pure functions: each returns an argv list (or, for Slurm, the text of an sbatch script); only
:func:`run` executes anything. The program every rank runs is a :class:`Program`, usually
``python -m moe <args>``.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .env import DEFAULT_PORT


@dataclass(frozen=True)
class Program:
    """``python -m module args...`` (``module=True``) or ``python script.py args...``."""

    target: str = "moe"
    args: tuple[str, ...] = ()
    module: bool = True
    python: str = field(default_factory=lambda: sys.executable or "python3")

    def argv(self) -> list[str]:
        return [self.python, *(["-m"] if self.module else []), self.target, *self.args]


def torchrun_command(program: Program, *, nnodes: int = 1, nproc_per_node: int = 1, node_rank: int = 0,
                     master_addr: str | None = None, master_port: int = DEFAULT_PORT,
                     rdzv_backend: str | None = None, rdzv_id: str | None = None,
                     torchrun: str = "torchrun") -> list[str]:
    """One torchrun per node. Single node without a master address: ``--standalone``.
    Multi-node: static rendezvous (``--node-rank`` is respected) at master_addr:port, or with
    ``rdzv_backend="c10d"`` an elastic rendezvous where ranks follow arrival order."""
    cmd = [torchrun, "--nproc-per-node", str(nproc_per_node)]
    if nnodes == 1 and master_addr is None and rdzv_backend is None:
        cmd.append("--standalone")
    elif rdzv_backend is not None:
        if master_addr is None:
            raise ValueError("a rendezvous backend needs master_addr (the rendezvous host)")
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", rdzv_backend,
                "--rdzv-endpoint", f"{master_addr}:{master_port}", "--rdzv-id", rdzv_id or "moe"]
    else:
        if master_addr is None:
            raise ValueError(f"torchrun over {nnodes} nodes needs master_addr (node 0's address)")
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank),
                "--master-addr", master_addr, "--master-port", str(master_port)]
    if program.module:
        cmd.append("-m")
    return cmd + [program.target, *program.args]


def mpirun_command(program: Program, *, nnodes: int = 1, nproc_per_node: int = 1,
                   hosts: Sequence[str] = (), hostfile: str | None = None, oversubscribe: bool = False,
                   allow_run_as_root: bool | None = None, env: Mapping[str, str] | None = None,
                   export: Sequence[str] = (), mpirun: str = "mpirun") -> list[str]:
    """Open MPI: ``-n`` ranks, ``ppr:N:node`` mapping on several nodes, ``-x`` to pass
    variables (``env`` sets NAME=value, ``export`` forwards the caller's NAME)."""
    cmd = [mpirun, "-n", str(nnodes * nproc_per_node)]
    if allow_run_as_root is None:
        allow_run_as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if allow_run_as_root:
        cmd.append("--allow-run-as-root")
    if oversubscribe:
        cmd.append("--oversubscribe")
    if hostfile:
        cmd += ["--hostfile", hostfile]
    elif hosts:
        cmd += ["-H", ",".join(f"{h}:{nproc_per_node}" for h in hosts)]
    if nnodes > 1:
        cmd += ["--map-by", f"ppr:{nproc_per_node}:node"]
    for name, value in (env or {}).items():
        cmd += ["-x", f"{name}={value}"]
    for name in export:
        cmd += ["-x", name]
    return cmd + program.argv()


def deepspeed_command(program: Program, *, nnodes: int = 1, nproc_per_node: int = 1,
                      hostfile: str | None = None, master_addr: str | None = None,
                      master_port: int = DEFAULT_PORT, deepspeed: str = "deepspeed",
                      env: Mapping[str, str] | None = None) -> list[str]:
    """The DeepSpeed launcher (pdsh over a hostfile for several nodes). ``--no_local_rank``
    keeps ``--local_rank=N`` out of the program's arguments: ranks read LOCAL_RANK instead.
    ``env`` must reach every rank: on one node the launcher's own environment carries it, but pdsh
    forwards only a few prefixes (PYTHON*, NCCL*, ...), so with several nodes the program runs
    under ``env K=V ...`` (``--no_python``)."""
    cmd = [deepspeed]
    if nnodes > 1:
        if hostfile is None:
            raise ValueError(f"deepspeed over {nnodes} nodes needs a hostfile ('host slots=N' per line)")
        cmd += ["--hostfile", hostfile, "--num_nodes", str(nnodes)]
    elif hostfile:
        cmd += ["--hostfile", hostfile]
    cmd += ["--num_gpus", str(nproc_per_node)]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    cmd += ["--master_port", str(master_port), "--no_local_rank"]
    if nnodes > 1 and env:
        return cmd + ["--no_python", "env", *(f"{k}={v}" for k, v in env.items()), *program.argv()]
    if program.module:
        cmd.append("--module")
    return cmd + [program.target, *program.args]


def sbatch_script(program: Program, *, nnodes: int = 1, nproc_per_node: int = 1, mode: str = "torchrun",
                  job_name: str = "moe", partition: str | None = None, time_limit: str | None = None,
                  gpus_per_node: int | None = None, master_addr: str | None = None,
                  master_port: int = DEFAULT_PORT, env: Mapping[str, str] | None = None,
                  extra_sbatch: Sequence[str] = (), output: str = "%x-%j.out") -> str:
    """An sbatch script. ``mode="torchrun"``: one task per node, each running torchrun with an
    elastic (c10d) rendezvous on the first node, so no per-node rank is needed.
    ``mode="srun"``: one task per rank; ranks read SLURM_PROCID/SLURM_LOCALID (launch.env).
    The master is the first host of the job (``scontrol show hostnames``) unless given."""
    if mode not in ("torchrun", "srun"):
        raise ValueError(f"mode {mode!r}: choose torchrun (one task per node) or srun (one task per rank)")
    tasks = 1 if mode == "torchrun" else nproc_per_node
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nnodes}",
             f"#SBATCH --ntasks-per-node={tasks}", f"#SBATCH --output={output}"]
    if mode == "torchrun":
        lines.append(f"#SBATCH --cpus-per-task={max(nproc_per_node, 1)}")
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    lines += [f"#SBATCH {opt}" for opt in extra_sbatch]
    lines += ["set -euo pipefail", ""]
    master = shlex.quote(master_addr) if master_addr else '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    lines += [f"export MASTER_ADDR={master}", f"export MASTER_PORT={master_port}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    lines.append('echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes, master $MASTER_ADDR:$MASTER_PORT"')
    if mode == "torchrun":
        run = torchrun_command(program, nnodes=nnodes, nproc_per_node=nproc_per_node, master_addr="$MASTER_ADDR",
                               master_port=master_port, rdzv_backend="c10d", rdzv_id="$SLURM_JOB_ID")
        lines.append(f"srun {_shell_join(run)}")
    else:
        lines.append(f"srun {_shell_join(program.argv())}")
    return "\n".join(lines) + "\n"


def _shell_join(argv: Sequence[str]) -> str:
    """Like shlex.join, but words holding ``$VAR`` are double-quoted so the shell expands them."""
    return " ".join(f'"{a}"' if "$" in a and '"' not in a else shlex.quote(a) for a in argv)


def sbatch_command(script_path: str, *, wait: bool = False, sbatch: str = "sbatch") -> list[str]:
    return [sbatch, *(["--wait"] if wait else []), script_path]


def format_command(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def run(argv: Sequence[str], dry_run: bool = False, env: Mapping[str, str] | None = None) -> int:
    """Run ``argv`` (inheriting stdio) and return its exit code; with ``dry_run`` only print it."""
    if dry_run:
        extra = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        print(f"{extra} {format_command(argv)}".strip())
        return 0
    full_env = {**os.environ, **(env or {})}
    try:
        return subprocess.run(list(argv), env=full_env).returncode
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{argv[0]!r} is not installed or not on PATH ({e.strerror})") from e
