"""The engine's SPMD plumbing: joining the job, and keeping every rank's steps in lock-step.

Under a launcher (torchrun, mpirun, srun) every rank builds the same engine and is given the
same requests (SPMD): the schedules are identical, so every rank enters the same collectives.
:class:`LockStep` checks that each step (one all-gather of a fingerprint of the batch) and takes
rank 0's sampled tokens (one broadcast), so every rank returns the same outputs. With
``data_parallel`` > 1 each data-parallel group runs only its own sequences of the batch; the step
all-gathers every rank's results and takes each group's from its first rank (``tp_rank`` 0).

The collectives themselves live in ``parallel/`` and joining the process group in ``launch/``;
this module only decides when the engine calls them. With one process every call is a no-op.
"""
from __future__ import annotations

import logging
import zlib
from typing import Callable

import torch

from launch import detect_launch_env, init_distributed
from parallel import (ParallelState, ShardingConfig, build_parallel_state, get_parallel_state, init_single_process,
                      world_all_gather_ints, world_all_gather_object, world_broadcast_object)
from parallel.state import dp_all_reduce, is_collective_failure

from .config import EngineConfig, ModelConfig
from .model_runner import StepResult
from .models.decoder import check_sharding
from .scheduler import ScheduledBatch

log = logging.getLogger("moe")


def init_parallel(config: EngineConfig, cfg: ModelConfig) -> tuple[ParallelState, str]:
    """The parallel state and device of this process.

    One process, no sharding: the trivial state. Otherwise the sharding (default: one rank) is
    checked against the model and against the launcher's world size before anything is loaded;
    then this rank joins the job's process group (timeout from the sharding) and the groups of
    the layout are built.
    """
    env = detect_launch_env()
    sharding = config.sharding
    if sharding is None and env.world_size == 1:
        try:
            return get_parallel_state(), config.device
        except RuntimeError:
            return init_single_process(), config.device
    sharding = sharding or ShardingConfig()
    check_sharding(cfg, sharding)
    world = sharding.resolved_world_size
    if env.world_size == 1 and world > 1:
        raise ValueError(
            f"the sharding needs {world} ranks (tensor_parallel {sharding.tensor_parallel} x data_parallel "
            f"{sharding.data_parallel}) but this process was started alone: run the script under a launcher, e.g. "
            f"torchrun --nproc-per-node {world} script.py, or `moe launch --launcher torchrun --nproc-per-node "
            f"{world} --sharding FILE -- generate ...`")
    sharding.validate_for_world(env.world_size, launcher=env.launcher)
    if sharding.device == "auto":  # the engine's device; one GPU per rank
        device = f"cuda:{env.local_rank}" if config.device == "cuda" else config.device
    else:
        device = sharding.device_for(env.local_rank, env.rank)
    backend = sharding.backend if sharding.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
    if backend == "nccl" and not device.startswith("cuda"):
        raise ValueError(f"backend nccl needs a CUDA device but the engine runs on {device!r}: set backend: gloo in "
                         "the sharding, or device: 'cuda:{local_rank}'")
    if world == 1:
        return build_parallel_state(sharding, 0, 1), device
    init_distributed(env, backend, sharding.timeout_seconds)  # joined already: checks rank and world size
    return build_parallel_state(sharding, env.rank, env.world_size), device


class LockStep:
    """Every rank's engine calls, kept identical and their results made one."""

    def __init__(self, state: ParallelState, device: torch.device):
        self.state = state
        self.device = device
        # steps where this rank sampled differently from rank 0 (with data_parallel > 1: its group's first rank)
        self.sampling_mismatches = 0

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over the job (e.g. KV blocks: one block manager on every rank)."""
        return min(min(v) for v in world_all_gather_ints([value]))

    def run(self, batch: ScheduledBatch, run_local: Callable[[], StepResult]) -> StepResult:
        """``run_local()`` on every rank after checking they scheduled the same batch; the results
        every rank returns are its (data-parallel group's) first rank's."""
        st = self.state
        if st.world_size == 1:
            return run_local()
        try:
            self._check_same_batch(batch)
            local = run_local()
            if st.dp_size == 1:
                result = world_broadcast_object(local)
                authority = result
            else:
                every = world_all_gather_object(local)
                result, authority = self._merge_dp_results(every)
        except RuntimeError as e:
            if not is_collective_failure(e):
                raise
            cause = (str(e).splitlines() or [""])[0][:300]
            raise RuntimeError(
                f"rank {st.rank} of {st.world_size}: a collective failed mid-step; another rank has probably died or "
                f"stalled for longer than timeout_seconds ({st.sharding.timeout_seconds:g}s): check the other ranks' "
                f"logs. Cause: {type(e).__name__}: {cause}") from e
        if authority != local:
            # logits are identical on every rank of a TP group by construction; if they ever are not,
            # the group's first rank (rank 0 without data parallelism) decides
            self.sampling_mismatches += 1
            if self.sampling_mismatches == 1:
                log.warning("rank %d sampled differently from rank %d; using rank %d's tokens", st.rank,
                            st.dp_rank * st.tp_size, st.dp_rank * st.tp_size)
        return result

    def sum_over_data_parallel(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-group tallies (e.g. expert counts; the ranks of a group agree) summed over the job."""
        if self.state.dp_size == 1:
            return counts
        return dp_all_reduce(counts.to(self.device)).cpu()  # NCCL reduces device tensors only

    def _merge_dp_results(self, every: list[StepResult]) -> tuple[StepResult, StepResult]:
        """The whole batch's results from every rank's (each DP group's first rank decides for its
        sequences), and the result this rank's group decided."""
        st = self.state
        sampled: dict = {}
        prompt_logprobs: dict = {}
        for d in range(st.dp_size):
            leader = every[d * st.tp_size]
            sampled.update(leader.sampled)
            prompt_logprobs.update(leader.prompt_logprobs)
        return StepResult(sampled, prompt_logprobs), every[st.dp_rank * st.tp_size]

    def _check_same_batch(self, batch: ScheduledBatch) -> None:
        """Every rank must schedule the same batch, or their collectives would not match."""
        h = 0
        for s in batch.seqs:
            ids = s.seq.token_ids[s.start:s.start + s.num_new_tokens]
            h = zlib.crc32(repr((s.seq.request_id, s.start, s.num_new_tokens, ids, s.draft, s.seq.dp_rank)).encode(),
                           h)
        mine = [len(batch.seqs), h]
        every = world_all_gather_ints(mine)
        bad = [r for r, v in enumerate(every) if v != every[0]]
        if bad:
            raise RuntimeError(
                f"rank(s) {bad} scheduled a different batch than rank 0 (fingerprints {every}): every rank must make "
                "the same engine calls (the same prompts, sampling params and order) -- the engine runs SPMD")
