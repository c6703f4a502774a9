"""``moe plan`` and ``moe launch``: will a model fit a sharding, and start it on every rank.

:func:`register` adds both commands to a typer app (moe/cli.py calls it). The ranks learn the
sharding file from the ``MOE_SHARDING`` environment variable set here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

LAUNCHERS = ("torchrun", "mpirun", "slurm", "deepspeed")
SHARDING_ENV = "MOE_SHARDING"


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def plan(
    model: str = typer.Option(..., "--model", "-m", help="config.json or a checkpoint directory."),
    sharding: Path = typer.Option(..., "--sharding", help="Sharding YAML (see examples/sharding)."),
    gpu_memory: str = typer.Option(..., "--gpu-memory", help="Memory of one device, e.g. 141GiB or 80GB."),
    max_model_len: Optional[int] = typer.Option(None, help="Tokens per sequence (default: the model's maximum)."),
    max_num_seqs: int = typer.Option(1, help="Sequences cached at once per data-parallel replica."),
    dtype: str = typer.Option("auto", help="Weights: auto (the checkpoint's), bfloat16, float16, float32, float8."),
    experts: Optional[str] = typer.Option(None, help="Routed experts packed as int8, int4, fp8_block or mxfp4."),
    kv_cache_dtype: Optional[str] = typer.Option(None, help="KV cache: bfloat16, float16, float32 or fp8 "
                                                             "(default: the weights' dtype)."),
    memory_utilization: float = typer.Option(0.9, help="Fraction of device memory the engine may use."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Parameters, bytes per rank and whether they fit (exit code 1 when they do not)."""
    from parallel.sharding import load_sharding

    from .config import parse_bytes, read_config_json
    from .models import parse_config
    from .plan import format_plan
    from .plan import plan as make_plan

    try:
        cfg = load_sharding(sharding)
        length = max_model_len or parse_config(read_config_json(model)).max_position_embeddings
        result = make_plan(model, cfg, parse_bytes(gpu_memory), length, max_num_seqs, dtype,
                           kv_dtype=kv_cache_dtype, experts=experts, memory_utilization=memory_utilization)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(json.dumps(result.as_dict()) if json_out else format_plan(result))
    if not result.fits:
        raise typer.Exit(1)


def launch(
    launcher: str = typer.Option(..., "--launcher", help="torchrun, mpirun, slurm or deepspeed."),
    nnodes: int = typer.Option(1, "--nnodes", min=1),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="Ranks (GPUs) per node."),
    sharding: Optional[Path] = typer.Option(None, "--sharding", help="Sharding YAML; its world size is checked."),
    node_rank: int = typer.Option(0, "--node-rank", help="torchrun: this node's index (run once per node)."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Address of rank 0's node."),
    master_port: int = typer.Option(29500, "--master-port"),
    hostfile: Optional[str] = typer.Option(None, "--hostfile", help="mpirun/deepspeed host file."),
    oversubscribe: bool = typer.Option(False, "--oversubscribe", help="mpirun: more ranks than cores."),
    slurm_mode: str = typer.Option("torchrun", "--slurm-mode",
                                   help="torchrun: one task per node; srun: one task per rank."),
    sbatch_file: Path = typer.Option(Path("moe-launch.sbatch"), "--sbatch-file", help="Where to write the script."),
    partition: Optional[str] = typer.Option(None, "--partition"),
    time_limit: Optional[str] = typer.Option(None, "--time", help="Slurm time limit, e.g. 01:00:00."),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="Slurm GPUs per node."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command (and sbatch script), run nothing."),
    wait: bool = typer.Option(False, "--wait", help="slurm: wait for the job to end (sbatch --wait) and "
                                                     "exit with its exit code."),
    args: Optional[list[str]] = typer.Argument(None, help="The moe command every rank runs, after --."),
) -> None:
    """Start ``python -m moe <args>`` on every rank, e.g.
    ``moe launch --launcher torchrun --nproc-per-node 8 --sharding ep8.yaml -- generate --model ./ckpt "Hi"``."""
    from launch.commands import (Program, deepspeed_command, mpirun_command, run, sbatch_command, sbatch_script,
                                 torchrun_command)
    from parallel.sharding import load_sharding

    if launcher not in LAUNCHERS:
        _fail(ValueError(f"--launcher {launcher!r} is unknown: choose {', '.join(LAUNCHERS)}"))
    if not args:
        _fail(ValueError("nothing to run: add the moe command after --, e.g. -- generate --model ./ckpt 'Hello'"))
    env: dict[str, str] = {}
    try:
        if sharding is not None:
            cfg = load_sharding(sharding)
            cfg.validate_for_world(nnodes * nproc_per_node,
                                   launcher=f"--nnodes {nnodes} x --nproc-per-node {nproc_per_node}")
            env[SHARDING_ENV] = str(sharding.resolve())
        program = Program("moe", tuple(args))
        if launcher == "torchrun":
            argv = torchrun_command(program, nnodes=nnodes, nproc_per_node=nproc_per_node, node_rank=node_rank,
                                    master_addr=master_addr, master_port=master_port, torchrun=_tool("torchrun"))
        elif launcher == "deepspeed":
            argv = deepspeed_command(program, nnodes=nnodes, nproc_per_node=nproc_per_node, hostfile=hostfile,
                                     master_addr=master_addr, master_port=master_port, deepspeed=_tool("deepspeed"),
                                     env=env)
        elif launcher == "mpirun":
            if master_addr is None and nnodes == 1:
                master_addr = "127.0.0.1"
            # without an address (several nodes) ranks fall back to mpi4py to agree on one
            rank_env = {**env, **({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
                                  if master_addr else {})}
            argv = mpirun_command(program, nnodes=nnodes, nproc_per_node=nproc_per_node, hostfile=hostfile,
                                  oversubscribe=oversubscribe, env=rank_env, export=["PYTHONPATH"]
                                  if _has_pythonpath() else [])
        else:
            script = sbatch_script(program, nnodes=nnodes, nproc_per_node=nproc_per_node, mode=slurm_mode,
                                   partition=partition, time_limit=time_limit, gpus_per_node=gpus_per_node,
                                   master_addr=master_addr, master_port=master_port, env=env)
            argv = sbatch_command(str(sbatch_file), wait=wait, sbatch=_tool("sbatch"))
            if dry_run:
                typer.echo(f"# {sbatch_file}\n{script}")
            else:
                sbatch_file.write_text(script)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    # torchrun and deepspeed pass their environment on to the ranks; mpirun and Slurm got it above
    run_env = env if launcher in ("torchrun", "deepspeed") else {}
    try:
        code = run(argv, dry_run=dry_run, env=run_env)
    except FileNotFoundError as e:
        _fail(e)
    raise typer.Exit(code)


def _tool(name: str) -> str:
    """The launcher installed beside this Python (same environment, same torch), else PATH's."""
    import sys

    sibling = Path(sys.executable).with_name(name)
    return str(sibling) if sibling.exists() else name


def _has_pythonpath() -> bool:
    import os

    return bool(os.environ.get("PYTHONPATH"))


def register(app: typer.Typer) -> None:
    """Add ``plan`` and ``launch`` to ``app``."""
    app.command("plan")(plan)
    app.command("launch", context_settings={"allow_interspersed_args": False})(launch)
