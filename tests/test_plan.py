"""Memory planning: published parameter totals, bytes per rank, fit, and ``moe plan --json``."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from moe.cli_parallel import register
from moe.plan import plan
from parallel.sharding import ShardingConfig, load_sharding

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
SHARDING = ROOT / "examples" / "sharding"
GiB = 2**30

# Mixtral-8x7B's public config.json (the fields planning reads): 46.7B total, 12.9B active
MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
           "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mixtral") / "config.json"
    path.write_text(json.dumps(MIXTRAL))
    return path


@pytest.fixture(scope="module")
def ds_v3_one_rank():
    return plan(CONFIGS / "deepseek_v3.json", ShardingConfig(), 80 * 10**9, max_model_len=4096, max_num_seqs=1)


@pytest.fixture(scope="module")
def kimi_16():
    return plan(CONFIGS / "kimi_k2.json", load_sharding(SHARDING / "kimi-k2-16gpu.yaml"), 141 * GiB,
                max_model_len=32768, max_num_seqs=16, dtype="float8")


def within(value: float, published: float, tolerance: float = 0.03) -> bool:
    return abs(value / published - 1) <= tolerance


def test_deepseek_v3_published_totals(ds_v3_one_rank):
    p = ds_v3_one_rank
    assert within(p.total_params, 671e9) and within(p.active_params, 37e9)
    assert p.architecture == "DeepseekV3ForCausalLM" and p.dtype == "bfloat16"


def test_kimi_k2_published_totals(kimi_16):
    assert within(kimi_16.total_params, 1e12) and within(kimi_16.active_params, 32e9)


def test_one_rank_holds_everything_and_a_small_gpu_does_not_fit(ds_v3_one_rank):
    p = ds_v3_one_rank
    assert p.params_per_rank == p.total_params
    assert p.per_rank.weights == 2 * p.total_params
    assert p.per_rank.routed_experts == 2 * p.routed_expert_params
    assert p.kv_bytes_per_token == 61 * (512 + 64) * 2  # MLA latent + rope key per layer, bfloat16
    assert p.per_rank.kv_cache == p.kv_bytes_per_token * 4096
    assert not p.fits and p.headroom_bytes < 0 and p.max_num_seqs_that_fit == 0


def test_bytes_per_rank_add_up(kimi_16, ds_v3_one_rank):
    p = kimi_16
    world, E, slots = 16, 384, 400
    assert p.expert_slots_per_rank == slots // world
    # every physical slot (experts + replicas) is held exactly once across the ranks; float8: 1 byte
    assert p.per_rank.routed_experts * world == p.routed_expert_params * slots // E
    assert p.per_rank.weights * world >= p.total_params  # replication only adds
    # MLA's latent cache is replicated on every TP rank: the same bytes per token as one rank
    assert p.kv_bytes_per_token == 61 * 576 * 2
    assert p.fits and p.max_num_seqs_that_fit >= p.max_num_seqs
    assert p.per_rank.total == p.per_rank.weights + p.per_rank.kv_cache + p.per_rank.workspace
    d = p.as_dict()
    json.dumps(d)
    assert {"total_params", "active_params", "per_rank"} <= set(d)
    assert d["per_rank"]["total"] == p.per_rank.total and d["sharding"]["world_size"] == 16


def test_tensor_parallel_split_and_gqa_kv(mixtral):
    one = plan(mixtral, ShardingConfig(), 80 * GiB, max_model_len=4096, max_num_seqs=1)
    assert within(one.total_params, 46.7e9, 0.01) and within(one.active_params, 12.9e9, 0.01)
    assert one.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2
    tp16 = plan(mixtral, ShardingConfig(tensor_parallel=16), 80 * GiB, max_model_len=4096, max_num_seqs=1)
    assert tp16.per_rank.attention * 16 > one.per_rank.attention  # KV heads replicated past 8 ranks
    assert tp16.per_rank.embeddings * 16 == one.per_rank.embeddings
    assert tp16.kv_bytes_per_token == 32 * 2 * 1 * 128 * 2  # one KV head per rank
    # no expert parallelism: every rank holds every expert, split 16 ways in its intermediate dim
    assert tp16.expert_slots_per_rank == 8 and tp16.per_rank.routed_experts * 16 == one.per_rank.routed_experts


def test_packed_expert_formats_and_fp8_kv(mixtral):
    """Bytes per format: each packed format's routed-expert bytes (scales counted) from its own
    specs; choosing one changes only the routed experts; fp8 KV is one byte per element + scales."""
    from experts.formats import get_format

    one = plan(mixtral, ShardingConfig(), 80 * GiB, max_model_len=4096, max_num_seqs=1)
    by = one.routed_expert_bytes_by_format
    assert by["bfloat16"] == one.per_rank.routed_experts == 2 * one.routed_expert_params
    int4 = get_format("int4")  # group 128, bfloat16 scales: 4.125 bits per weight
    gate_up, down = int4.packed_specs((2 * 14336, 4096)), int4.packed_specs((4096, 14336))
    per_expert = sum(math.prod(t.shape) * t.dtype.itemsize for specs in (gate_up, down) for t in specs.values())
    assert per_expert == 3 * 4096 * 14336 // 2 + 3 * 4096 * 14336 // 128 * 2  # nibbles + one bf16 scale per group
    assert by["int4"] == 32 * 8 * per_expert
    assert by["int4"] <= 0.3 * by["bfloat16"] and 0.5 * by["bfloat16"] < by["int8"] < 0.53 * by["bfloat16"]
    assert by["mxfp4"] < by["int8"] and by["fp8_block"] < by["int8"]
    q = plan(mixtral, ShardingConfig(), 80 * GiB, max_model_len=4096, max_num_seqs=1, experts="int4", kv_dtype="fp8")
    assert q.per_rank.routed_experts == by["int4"] and q.per_rank.attention == one.per_rank.attention
    assert q.kv_bytes_per_token == 32 * 2 * 8 * (128 + 4)  # e4m3 + a float32 scale per (token, head) row
    assert q.as_dict()["experts_format"] == "int4" and q.as_dict()["kv_dtype"] == "fp8"
    # expert TP 16 splits the intermediate dim to 896 = 7 groups of 128: still packable
    tp16 = plan(mixtral, ShardingConfig(tensor_parallel=16), 80 * GiB, 4096, 1, experts="int4")
    assert tp16.per_rank.routed_experts * 16 == by["int4"]
    with pytest.raises(ValueError, match="experts format 'int5'.*choose one of int8, int4, fp8_block, mxfp4"):
        plan(mixtral, ShardingConfig(), GiB, 16, 1, experts="int5")
    with pytest.raises(ValueError, match="kv_dtype 'int8'"):
        plan(mixtral, ShardingConfig(), GiB, 16, 1, kv_dtype="int8")


def test_invalid_shardings_are_named(mixtral):
    with pytest.raises(ValueError, match="set redundant_experts: 2"):
        plan(CONFIGS / "deepseek_v3.json", ShardingConfig(data_parallel=3, expert_parallel=3), GiB, 16, 1)
    with pytest.raises(ValueError, match=r"num_attention_heads \(32\) is not divisible by tensor_parallel \(3\)"):
        plan(mixtral, ShardingConfig(tensor_parallel=3), GiB, 16, 1)
    with pytest.raises(ValueError, match="dtype 'int3'"):
        plan(mixtral, ShardingConfig(), GiB, 16, 1, dtype="int3")


def test_cli_plan_json(mixtral, tmp_path):
    app = typer.Typer()
    register(app)
    (tmp_path / "ep2.yaml").write_text("data_parallel: 2\nexpert_parallel: 2\n")
    runner = CliRunner()
    args = ["plan", "--model", str(mixtral), "--sharding", str(tmp_path / "ep2.yaml"), "--max-model-len", "4096",
            "--json"]
    ok = runner.invoke(app, args + ["--gpu-memory", "80GiB"])
    assert ok.exit_code == 0, ok.output
    d = json.loads(ok.stdout)
    assert within(d["total_params"], 46.7e9, 0.01) and d["fits"] is True
    assert d["per_rank"]["routed_experts"] * 2 == 2 * d["routed_expert_params"]  # half the experts each, bf16
    small = runner.invoke(app, args + ["--gpu-memory", "16GB"])
    assert small.exit_code == 1 and json.loads(small.stdout)["fits"] is False
    human = runner.invoke(app, args[:-1] + ["--gpu-memory", "16GB"])
    assert "fits         NO" in human.stdout
    bad = runner.invoke(app, ["plan", "--model", str(tmp_path / "missing"), "--sharding", str(tmp_path / "ep2.yaml"),
                              "--gpu-memory", "1GB"])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_cli_launch_checks_world_size_and_prints(tmp_path):
    app = typer.Typer()
    register(app)
    (tmp_path / "s.yaml").write_text("tensor_parallel: 2\ndata_parallel: 2\nexpert_parallel: 4\n")
    runner = CliRunner()
    ok = runner.invoke(app, ["launch", "--launcher", "torchrun", "--nproc-per-node", "4", "--sharding",
                             str(tmp_path / "s.yaml"), "--dry-run", "--", "generate", "--model", "./ckpt", "Hi"])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.strip().endswith("torchrun --nproc-per-node 4 --standalone -m moe generate --model ./ckpt Hi")
    assert f"MOE_SHARDING={tmp_path / 's.yaml'}" in ok.stdout
    bad = runner.invoke(app, ["launch", "--launcher", "mpirun", "--nnodes", "2", "--nproc-per-node", "4",
                              "--sharding", str(tmp_path / "s.yaml"), "--dry-run", "--", "generate"])
    assert bad.exit_code == 2 and "world_size 4" in bad.output and "8 processes" in bad.output
    job = tmp_path / "job.sbatch"
    slurm_args = ["launch", "--launcher", "slurm", "--nnodes", "2", "--nproc-per-node", "2", "--sharding",
                  str(tmp_path / "s.yaml"), "--sbatch-file", str(job)]
    slurm = runner.invoke(app, slurm_args + ["--dry-run", "--", "generate", "--model", "x"])
    assert slurm.exit_code == 0 and "#SBATCH --nodes=2" in slurm.stdout and f"sbatch {job}" in slurm.stdout
    assert not job.exists()  # a dry run writes nothing
    if shutil.which("sbatch") is None:  # for real: the script is written, then sbatch is missing here
        real = runner.invoke(app, slurm_args + ["--", "generate", "--model", "x"])
        assert real.exit_code == 2 and "not installed" in real.output and "srun torchrun" in job.read_text()
    mpi = runner.invoke(app, ["launch", "--launcher", "mpirun", "--nproc-per-node", "4", "--dry-run", "--",
                              "generate", "Hi"])
    assert "-x MASTER_ADDR=127.0.0.1" in mpi.stdout and " -m moe generate Hi" in mpi.stdout
