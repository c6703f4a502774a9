"""Launcher detection, Slurm node lists, command building, and one real torchrun job."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from launch.commands import (Program, deepspeed_command, format_command, mpirun_command, run, sbatch_command,
                             sbatch_script, torchrun_command)
from launch.env import LaunchEnv, detect_launch_env, expand_nodelist, free_port, init_distributed

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = Program("moe", ("generate", "--model", "./ckpt", "Hello world"), python="python3")


# ---- detection -------------------------------------------------------------------------------

def test_torchrun():
    env = {"TORCHELASTIC_RUN_ID": "abc", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
           "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "29500",
           "SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}  # torchrun inside a Slurm step wins
    assert detect_launch_env(env, argv=[]) == LaunchEnv("torchrun", 5, 8, 1, 4, "n1", 29500)


def test_deepspeed_env_and_argv():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "CROSS_RANK": "1", "CROSS_SIZE": "2",
           "LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600"}
    assert detect_launch_env(env, argv=[]) == LaunchEnv("deepspeed", 3, 4, 1, 2, "10.0.0.1", 29600)
    # older launchers: no LOCAL_RANK in the environment, only --local_rank=N in argv
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    got = detect_launch_env(env, argv=["prog.py", "--local_rank=1"])
    assert (got.launcher, got.local_rank, got.world_size) == ("deepspeed", 1, 2)
    assert detect_launch_env(env, argv=["prog.py", "--local_rank", "1"]).local_rank == 1


def test_mpirun_with_master_from_env():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "29500"}
    assert detect_launch_env(env, argv=[]) == LaunchEnv("mpirun", 2, 4, 0, 2, "a", 29500)


def test_mpirun_without_master_needs_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(RuntimeError) as e:
        detect_launch_env(env, argv=[])
    assert "MASTER_ADDR" in str(e.value) and "MASTER_PORT" in str(e.value) and "mpi4py" in str(e.value)


def test_mpirun_master_broadcast_by_mpi4py(monkeypatch):
    sent = []

    class Comm:
        def bcast(self, value, root):
            sent.append((value, root))
            return value if value[0] else ("10.1.1.1", 40000)  # what rank 0 sent

    mpi = types.ModuleType("mpi4py.MPI")
    mpi.COMM_WORLD = Comm()
    pkg = types.ModuleType("mpi4py")
    pkg.MPI = mpi
    monkeypatch.setitem(sys.modules, "mpi4py", pkg)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)
    base = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    rank0 = detect_launch_env({**base, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, argv=[])
    assert rank0.master_addr and 0 < rank0.master_port < 65536 and sent[0][1] == 0
    rank1 = detect_launch_env({**base, "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, argv=[])
    assert (rank1.master_addr, rank1.master_port) == ("10.1.1.1", 40000)


def test_slurm_srun_step():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "4321", "SLURM_JOB_NODELIST": "gpu[03-04,07],login1", "SLURM_NODEID": "1",
           "SLURM_TASKS_PER_NODE": "2(x3),2"}
    got = detect_launch_env(env, argv=[])
    assert got == LaunchEnv("slurm", 5, 8, 1, 2, "gpu03", 20000 + 4321)
    got = detect_launch_env({**env, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29501"}, argv=[])
    assert (got.master_addr, got.master_port) == ("10.0.0.9", 29501)


def test_slurm_batch_script_is_not_a_rank():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "1"}
    assert detect_launch_env(env, argv=[]).launcher == "single"


def test_plain_env_and_single():
    got = detect_launch_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "5"}, argv=[])
    assert got == LaunchEnv("env", 1, 2, 0, 2, "h", 5)
    assert detect_launch_env({}, argv=[]) == LaunchEnv("single", 0, 1, 0, 1, "127.0.0.1", None)


def test_bad_values_name_the_variable():
    with pytest.raises(ValueError, match="RANK='x'"):
        detect_launch_env({"TORCHELASTIC_RUN_ID": "a", "RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                           "LOCAL_WORLD_SIZE": "2"}, argv=[])
    with pytest.raises(ValueError, match="rank 3 outside world_size 2"):
        LaunchEnv("env", 3, 2, 0, 1, None, None)


@pytest.mark.parametrize("nodelist, hosts", [
    ("n[1-3],x", ["n1", "n2", "n3", "x"]),
    ("node001", ["node001"]),
    ("gpu[01-02,07]", ["gpu01", "gpu02", "gpu07"]),
    ("a[1-2]-ib[3-4]", ["a1-ib3", "a1-ib4", "a2-ib3", "a2-ib4"]),
    ("rack1-n[9-11],rack2-n[1]", ["rack1-n9", "rack1-n10", "rack1-n11", "rack2-n1"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_init_distributed_timeout_is_a_clear_error():
    env = LaunchEnv("env", 1, 2, 1, 2, "127.0.0.1", free_port())  # rank 0 never comes
    with pytest.raises(RuntimeError) as e:
        init_distributed(env, backend="gloo", timeout_seconds=1)
    msg = str(e.value)
    assert "rank 1 of 2" in msg and "could not join" in msg and "MASTER_ADDR" in msg and "\n" not in msg


# ---- commands --------------------------------------------------------------------------------

def test_torchrun_commands():
    assert torchrun_command(PROGRAM, nproc_per_node=2) == [
        "torchrun", "--nproc-per-node", "2", "--standalone", "-m", "moe", "generate", "--model", "./ckpt",
        "Hello world"]
    assert torchrun_command(PROGRAM, nnodes=2, nproc_per_node=8, node_rank=1, master_addr="n1",
                            master_port=1234)[:11] == [
        "torchrun", "--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "n1",
        "--master-port", "1234"]
    rdzv = torchrun_command(PROGRAM, nnodes=2, nproc_per_node=8, master_addr="n1", rdzv_backend="c10d", rdzv_id="j7")
    assert "--rdzv-endpoint" in rdzv and "n1:29500" in rdzv and "--node-rank" not in rdzv
    with pytest.raises(ValueError, match="master_addr"):
        torchrun_command(PROGRAM, nnodes=2)
    script = torchrun_command(Program("run.py", ("a",), module=False), nproc_per_node=2)
    assert script[-2:] == ["run.py", "a"] and "-m" not in script


def test_mpirun_commands():
    cmd = mpirun_command(PROGRAM, nproc_per_node=4, oversubscribe=True, allow_run_as_root=True,
                         env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, export=["PYTHONPATH"])
    assert cmd == ["mpirun", "-n", "4", "--allow-run-as-root", "--oversubscribe", "-x", "MASTER_ADDR=127.0.0.1",
                   "-x", "MASTER_PORT=29500", "-x", "PYTHONPATH", "python3", "-m", "moe", "generate", "--model",
                   "./ckpt", "Hello world"]
    multi = mpirun_command(PROGRAM, nnodes=2, nproc_per_node=8, hosts=["a", "b"], allow_run_as_root=False)
    assert multi[:7] == ["mpirun", "-n", "16", "-H", "a:8,b:8", "--map-by", "ppr:8:node"]
    assert "--allow-run-as-root" not in multi


def test_deepspeed_commands():
    assert deepspeed_command(PROGRAM, nproc_per_node=2) == [
        "deepspeed", "--num_gpus", "2", "--master_port", "29500", "--no_local_rank", "--module", "moe", "generate",
        "--model", "./ckpt", "Hello world"]
    multi = deepspeed_command(PROGRAM, nnodes=2, nproc_per_node=8, hostfile="hosts", master_addr="n1")
    assert multi[:7] == ["deepspeed", "--hostfile", "hosts", "--num_nodes", "2", "--num_gpus", "8"]
    with pytest.raises(ValueError, match="hostfile"):
        deepspeed_command(PROGRAM, nnodes=2)
    # pdsh forwards only a few variable prefixes: over several nodes the sharding rides in `env K=V`
    env = {"MOE_SHARDING": "/s/ds.yaml"}
    multi = deepspeed_command(PROGRAM, nnodes=2, nproc_per_node=8, hostfile="hosts", env=env)
    assert multi[multi.index("--no_local_rank") + 1:] == [
        "--no_python", "env", "MOE_SHARDING=/s/ds.yaml", *PROGRAM.argv()]
    single = deepspeed_command(PROGRAM, nproc_per_node=2, env=env)  # one node: the launcher's own env carries it
    assert "env" not in single and single[single.index("--no_local_rank") + 1:][:2] == ["--module", "moe"]


def test_sbatch_torchrun_per_node():
    text = sbatch_script(PROGRAM, nnodes=2, nproc_per_node=8, gpus_per_node=8, partition="gpu",
                         time_limit="01:00:00", env={"MOE_SHARDING": "/s/ds.yaml"})
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--time=01:00:00"):
        assert f"#SBATCH {directive}" in lines
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    assert "export MOE_SHARDING=/s/ds.yaml" in lines
    assert lines[-1] == ('srun torchrun --nproc-per-node 8 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint '
                         '"$MASTER_ADDR:29500" --rdzv-id "$SLURM_JOB_ID" -m moe generate --model ./ckpt '
                         "'Hello world'")
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # valid shell


def test_sbatch_srun_per_rank_and_command():
    text = sbatch_script(PROGRAM, nnodes=2, nproc_per_node=4, mode="srun", master_addr="10.0.0.1")
    assert "#SBATCH --ntasks-per-node=4" in text and "export MASTER_ADDR=10.0.0.1" in text
    assert text.rstrip().endswith("srun python3 -m moe generate --model ./ckpt 'Hello world'")
    assert sbatch_command("job.sbatch", wait=True) == ["sbatch", "--wait", "job.sbatch"]
    with pytest.raises(ValueError, match="mode"):
        sbatch_script(PROGRAM, mode="mpi")


def test_example_sbatch_template_is_valid_shell():
    subprocess.run(["bash", "-n", str(ROOT / "examples" / "slurm" / "moe-generate.sbatch")], check=True)


def test_run_dry_run_prints_and_runs_nothing(capsys):
    assert run(["false"], dry_run=True, env={"A": "b c"}) == 0
    assert capsys.readouterr().out.strip() == "A='b c' false"
    assert run([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
    with pytest.raises(FileNotFoundError, match="not installed"):
        run(["definitely-not-a-launcher-xyz"])
    assert format_command(["a", "b c"]) == "a 'b c'"


# ---- a real torchrun job ---------------------------------------------------------------------

RANK_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from launch.env import detect_launch_env, init_distributed

env = detect_launch_env()
backend = init_distributed(env, backend="auto", timeout_seconds=60)
total = torch.tensor([float(env.rank + 1)])
dist.all_reduce(total)
# one file per rank: two ranks printing to one pipe can interleave their lines
with open(f"rank{env.rank}.json", "w") as f:
    json.dump({"launcher": env.launcher, "rank": env.rank, "world": env.world_size, "local_rank": env.local_rank,
               "local_world": env.local_world_size, "backend": backend, "sum": total.item(), "argv": sys.argv[1:]}, f)
dist.destroy_process_group()
"""


def test_real_torchrun_two_ranks(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    argv = torchrun_command(Program(str(script), module=False), nproc_per_node=2, torchrun=str(torchrun))
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["launcher"] == "torchrun" and r["world"] == 2 and r["sum"] == 3.0 and r["backend"] == "gloo"
               for r in reports)
    assert [r["local_rank"] for r in reports] == [0, 1]
