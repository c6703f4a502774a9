"""A real Slurm job on this machine: munge, slurmctld and two slurmd "nodes" started by the test
(by PID), then `srun -N2 -n2` of the generate script; every rank equals the single process.

Slurm and munge come from Debian (slurm-wlm, munge), installed by .ci/run and the README set-up.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_parallel_engine import SCRIPT, TWO_RANKS, _check_same_as_single_process, _rank_env, _write_spec
from launch.env import free_port as _free_port

SBIN = ("/usr/sbin", "/usr/bin")


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([*SBIN, os.environ.get("PATH", "")]))
    assert path, f"{name} not found: apt-get install slurm-wlm munge (as .ci/run does)"
    return path


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    b = tmp_path_factory.mktemp("slurm")
    os.chmod(b, 0o755)
    host = socket.gethostname()
    subprocess.run([_tool("mungekey"), "--create", f"--keyfile={b}/munge.key"], check=True, capture_output=True)
    os.chmod(b / "munge.key", 0o600)
    (b / "munge").mkdir(mode=0o755)
    procs: list[subprocess.Popen] = []
    procs.append(subprocess.Popen([_tool("munged"), "-F", f"--socket={b}/munge/sock", f"--key-file={b}/munge.key",
                                   f"--pid-file={b}/munged.pid", f"--log-file={b}/munged.log",
                                   f"--seed-file={b}/munged.seed", "--force"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    ctl_port, d1, d2 = _free_port(), _free_port(), _free_port()
    conf = b / "slurm.conf"
    conf.write_text(f"""ClusterName=moetest
SlurmctldHost={host}
SlurmctldPort={ctl_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={b}/munge/sock
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool-%n
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd-%n.pid
SlurmctldLogFile={b}/slurmctld.log
SlurmdLogFile={b}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={d1} CPUs=2 RealMemory=4000
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={d2} CPUs=2 RealMemory=4000
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    (b / "state").mkdir()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        time.sleep(0.5)  # munged's socket
        procs.append(subprocess.Popen([_tool("slurmctld"), "-D", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for node in ("n1", "n2"):
            procs.append(subprocess.Popen([_tool("slurmd"), "-D", "-f", str(conf), "-N", node], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run([_tool("sinfo"), "-h", "-o", "%T %D"], env=env, capture_output=True, text=True)
            if out.stdout.split()[:2] == ["idle", "2"]:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"Slurm nodes never became idle: {out.stdout} {out.stderr}\n"
                                 + (b / "slurmctld.log").read_text()[-2000:])
        yield env
    finally:
        for p in reversed(procs):  # stop every daemon we started, by PID
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def paths(checkpoint):
    return {"qwen3_moe": checkpoint("qwen3_moe")}


@pytest.fixture(scope="module")
def reference(paths):
    from test_parallel_engine import REQUESTS, _params

    from moe import LLM

    llm = LLM(str(paths["qwen3_moe"]), dtype="float32", block_size=4)
    outs = llm.generate([{"prompt_token_ids": r["prompt_token_ids"]} for r in REQUESTS], _params())
    return [{"token_ids": o.outputs[0].token_ids,
             "logprobs": [{str(k): v for k, v in d.items()} for d in o.outputs[0].logprobs]} for o in outs]


def test_srun_two_nodes_match_single_process(slurm, paths, reference, tmp_path):
    cases = {"qwen3_ep2_all_to_all": TWO_RANKS["qwen3_ep2_all_to_all"]}
    spec = _write_spec(tmp_path, cases, paths)
    # node names do not resolve here: the master is the first node's address
    env = {**_rank_env(), **slurm, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    cmd = [_tool("srun"), "-N2", "-n2", "--ntasks-per-node=1", sys.executable, str(SCRIPT), str(spec),
           str(tmp_path / "out")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ranks = [json.loads((tmp_path / "out" / f"qwen3_ep2_all_to_all.rank{r}.json").read_text()) for r in range(2)]
    _check_same_as_single_process(ranks, reference)


@pytest.mark.parametrize("mode", ["torchrun", "srun"])
def test_moe_launch_submits_an_sbatch_job_that_matches_single_process(slurm, tmp_path, mode):
    """`moe launch --launcher slurm --wait` writes the sbatch script, submits it to the test's
    two-node Slurm, waits for the job, and rank 0's output equals a one-process `moe generate`."""
    gen = ["generate", "--dtype", "float32", "--temperature", "0", "--max-tokens", "8", "--json", "--no-stream",
           "The module defines", "A list is"]
    root = str(Path(__file__).resolve().parents[1])
    base = {**_rank_env(), "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    want = subprocess.run([sys.executable, "-m", "moe", *gen], capture_output=True, text=True, timeout=120, env=base)
    assert want.returncode == 0, want.stderr[-2000:]
    sharding = tmp_path / "ep2.yaml"
    sharding.write_text("expert_parallel: 2\ndata_parallel: 2\ndispatcher: all_to_all\ntimeout_seconds: 120\n")
    # the job inherits this environment (sbatch --export=ALL): torchrun from the venv, SLURM_CONF
    env = {**base, **slurm, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    cmd = [sys.executable, "-m", "moe", "launch", "--launcher", "slurm", "--nnodes", "2", "--nproc-per-node", "1",
           "--slurm-mode", mode, "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "--sharding", str(sharding), "--sbatch-file", str(tmp_path / "job.sbatch"), "--wait", "--", *gen]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    logs = "".join(p.read_text() for p in tmp_path.glob("moe-*.out"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:] + logs[-4000:]
    assert "Submitted batch job" in res.stdout and "#SBATCH --nodes=2" in (tmp_path / "job.sbatch").read_text()
    got = [line for line in logs.splitlines() if line.startswith("{")]
    expected = [line for line in want.stdout.splitlines() if line.startswith("{")]
    assert len(expected) == 2 and got == expected, logs[-4000:]
