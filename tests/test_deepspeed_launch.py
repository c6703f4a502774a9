"""The DeepSpeed launcher, for real, on CPU over gloo.

``deepspeed --num_gpus 2`` starts the torchrun tests' 2-rank script
(tests/parallel_scripts/generate.py: ``LLM(path, sharding=...)``, two of their layouts) and every
rank returns the single-process outputs; ``deepspeed --hostfile --no_ssh --node_rank N`` starts two one-rank
"nodes" on loopback; and the command ``moe launch --launcher deepspeed --dry-run`` prints runs
as printed.

Needs the ``deepspeed`` extra (``pip install -e ".[deepspeed]"``, as .ci/run does); the real
runs are skipped without it. DeepSpeed >= 0.16 falls back to its CPU accelerator when torch
sees no GPU: the launcher then counts one "device" per NUMA node (1 without numactl), and
``--num_gpus N`` sets the number of ranks per node whatever that count is. No CUDA, no
oneCCL and no intel_extension_for_pytorch are needed to launch: the ranks join over gloo
through launch.env, not through deepspeed.comm.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from launch.commands import Program, deepspeed_command
from launch.env import free_port
from test_launch import RANK_SCRIPT  # each rank reports its launcher environment and an all-reduce
from test_parallel_engine import SCRIPT, _check_same_as_single_process, _rank_env, _write_spec
from test_parallel_engine import paths, reference  # noqa: F401  (fixtures: tiny checkpoints, single-process outputs)

ROOT = Path(__file__).resolve().parents[1]
EP2 = ROOT / "examples" / "sharding" / "ep2.yaml"


def _deepspeed() -> str | None:
    """The `deepspeed` runner of this environment (installed beside this Python by the extra)."""
    if importlib.util.find_spec("deepspeed") is None:
        return None
    beside = Path(sys.executable).with_name("deepspeed")
    return str(beside) if beside.exists() else shutil.which("deepspeed")


needs_deepspeed = pytest.mark.skipif(_deepspeed() is None,
                                     reason="deepspeed not installed (pip install -e '.[deepspeed]')")


def _job_env() -> dict[str, str]:
    env = {k: v for k, v in _rank_env().items() if k not in ("MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")}
    # the ranks import moe/launch from this checkout, installed or not
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}


def _run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a launcher in its own session; on a timeout kill the whole group (runner and ranks)."""
    p = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{argv[0]} did not finish in {timeout}s:\n{err[-4000:]}")
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


# two of the torchrun tests' two-rank layouts (test_parallel_engine.TWO_RANKS): the launcher is
# what is under test here, the layouts are covered there
CASES = {"qwen3_ep2_all_to_all": ("qwen3_moe", dict(tensor_parallel=2, expert_parallel=2)),
         "deepseek_ep2_all_gather": ("deepseek_v3", dict(tensor_parallel=2, expert_parallel=2,
                                                         dispatcher="all_gather"))}


@needs_deepspeed
def test_real_deepspeed_two_ranks_match_single_process(paths, reference, tmp_path):  # noqa: F811
    spec = _write_spec(tmp_path, CASES, paths)
    argv = deepspeed_command(Program(str(SCRIPT), (str(spec), str(tmp_path / "out")), module=False),
                             nproc_per_node=2, master_port=free_port(), deepspeed=_deepspeed())
    res = _run(argv, _job_env(), tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    for name, (family, _) in CASES.items():
        ranks = [json.loads((tmp_path / "out" / f"{name}.rank{r}.json").read_text()) for r in range(2)]
        assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
        _check_same_as_single_process(ranks, reference[family])


@needs_deepspeed
def test_real_deepspeed_two_nodes_on_loopback(tmp_path):
    """Multi-node without pdsh/ssh: the runner is started once per "node" with the same
    hostfile and ``--no_ssh --node_rank N``, as on clusters that start one runner per node.
    Ranks get RANK/CROSS_RANK from the hostfile order and LOCAL_RANK 0 of LOCAL_SIZE 1."""
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    (tmp_path / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    env = _job_env()
    nodes = [subprocess.Popen([_deepspeed(), "--hostfile", "hostfile", "--no_ssh", "--node_rank", str(n),
                               "--master_addr", "127.0.0.1", "--master_port", port, "rank.py", "--flag"],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for n in (0, 1)]
    try:
        logs = [p.communicate(timeout=120)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["launcher"], r["rank"], r["world"], r["local_rank"], r["local_world"]) for r in reports] == [
        ("deepspeed", 0, 2, 0, 1), ("deepspeed", 1, 2, 0, 1)]
    assert {r["sum"] for r in reports} == {3.0} and {r["backend"] for r in reports} == {"gloo"}
    # without --no_local_rank DeepSpeed appends --local_rank=N before the script's own arguments
    assert [r["argv"] for r in reports] == [["--local_rank=0", "--flag"]] * 2


GENERATE = ["generate", "Once upon a time", "--max-tokens", "12", "--temperature", "0", "--dtype", "float32",
            "--json"]


def _dry_run(port: int) -> str:
    from moe.cli import app

    res = CliRunner().invoke(app, ["launch", "--launcher", "deepspeed", "--nproc-per-node", "2", "--master-port",
                                   str(port), "--sharding", str(EP2), "--dry-run", "--", *GENERATE])
    assert res.exit_code == 0, res.output
    return res.stdout.strip()


def test_moe_launch_deepspeed_dry_run_prints_the_command():
    line = _dry_run(29555)
    words = shlex.split(line)
    assert words[0] == f"MOE_SHARDING={EP2}"
    assert Path(words[1]).name == "deepspeed"
    assert words[2:] == ["--num_gpus", "2", "--master_port", "29555", "--no_local_rank", "--module", "moe", *GENERATE]


@needs_deepspeed
def test_moe_launch_deepspeed_dry_run_command_runs_as_printed(tmp_path):
    """The printed line, run by a shell, starts 2 ranks of ``python -m moe generate`` with the
    ep2 sharding; rank 0 prints exactly what one process prints."""
    from moe.cli import app

    line = _dry_run(free_port())
    res = _run(["bash", "-c", line], _job_env(), tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    printed = [json.loads(s) for s in res.stdout.splitlines() if s.startswith("{")]
    single = CliRunner().invoke(app, GENERATE)
    assert single.exit_code == 0, single.output
    want = json.loads(single.stdout.strip().splitlines()[-1])
    assert printed == [want]  # one line: only rank 0 prints
    assert len(want["token_ids"]) == 12
    assert "dist_world_size=2" in res.stdout + res.stderr  # two ranks, started by deepspeed.launcher.launch
