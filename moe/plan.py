"""Will a model fit a sharding? Parameters, bytes per rank, KV cache and headroom from a
config.json alone (models are built on the meta device; no weights are read).

Per rank (every rank holds the same amount: the layouts are symmetric):
- attention, dense MLPs and shared experts: split over ``tensor_parallel`` by the layers'
  own rules (a meta model is built with that TP size, so e.g. KV-head replication is exact);
- embeddings and LM head: vocab-parallel over ``tensor_parallel`` (rows padded to a multiple);
- routed experts: ``(num_experts + redundant_experts) / expert_parallel`` slots per rank, each
  expert's intermediate dim split over ``expert_tensor_parallel`` (see parallel.sharding);
- KV cache: ``max_num_seqs`` sequences of ``max_model_len`` tokens per data-parallel replica.
  MLA keeps one latent vector per token and layer, replicated on every TP rank; GQA splits
  KV heads over TP (replicating them when TP exceeds their count);
- workspace: logits, activations and MoE row buffers of one step plus a fixed runtime
  overhead (CUDA context, communication buffers, allocator slack) -- an estimate.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from parallel import ParallelState, get_parallel_state, set_parallel_state
from parallel.sharding import ShardingConfig

from .config import ModelConfig, read_config_json
from .models import parse_config
from .params import build_meta_model, count_params

BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}
RUNTIME_OVERHEAD_BYTES = 1 << 30
LOGITS_BYTES = 4  # sampling reads float32 logits


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank needs, by kind."""

    attention: int
    dense_mlp: int  # dense layers' MLPs and shared experts
    routed_experts: int
    embeddings: int  # input embedding and LM head
    other: int  # norms, routers
    kv_cache: int
    workspace: int

    @property
    def weights(self) -> int:
        return self.attention + self.dense_mlp + self.routed_experts + self.embeddings + self.other

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "weights": self.weights, "total": self.total}


@dataclass(frozen=True)
class Plan:
    model: str
    architecture: str
    dtype: str
    sharding: ShardingConfig
    total_params: int
    active_params: int
    routed_expert_params: int
    params_per_rank: int
    expert_slots_per_rank: int
    kv_bytes_per_token: int  # per rank, all layers
    kv_dtype: str
    experts_format: str  # the routed experts' format: the weight dtype or a packed format
    routed_expert_bytes_by_format: dict[str, int]  # per rank: the plan's dtype and each packed format
    max_model_len: int
    max_num_seqs: int
    per_rank: RankMemory
    device_memory_bytes: int
    usable_bytes: int  # device memory times the utilization target

    @property
    def fits(self) -> bool:
        return self.per_rank.total <= self.usable_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.usable_bytes - self.per_rank.total

    @property
    def max_num_seqs_that_fit(self) -> int:
        """Full-length sequences per data-parallel replica the remaining memory can cache."""
        free = self.usable_bytes - self.per_rank.weights - self.per_rank.workspace
        per_seq = self.kv_bytes_per_token * self.max_model_len
        return max(free // per_seq, 0) if per_seq else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "architecture": self.architecture, "dtype": self.dtype,
            "sharding": self.sharding.as_dict(),
            "total_params": self.total_params, "active_params": self.active_params,
            "routed_expert_params": self.routed_expert_params, "params_per_rank": self.params_per_rank,
            "expert_slots_per_rank": self.expert_slots_per_rank,
            "kv_bytes_per_token_per_rank": self.kv_bytes_per_token, "kv_dtype": self.kv_dtype,
            "experts_format": self.experts_format,
            "routed_expert_bytes_per_rank_by_format": self.routed_expert_bytes_by_format,
            "max_model_len": self.max_model_len, "max_num_seqs": self.max_num_seqs,
            "per_rank": self.per_rank.as_dict(),
            "device_memory_bytes": self.device_memory_bytes, "usable_bytes": self.usable_bytes,
            "fits": self.fits, "headroom_bytes": self.headroom_bytes,
            "max_num_seqs_that_fit": self.max_num_seqs_that_fit,
        }


@contextmanager
def _parallel_state(state: ParallelState) -> Iterator[None]:
    """Build under ``state``, then put the caller's state back (planning must not change it)."""
    try:
        previous: ParallelState | None = get_parallel_state()
    except RuntimeError:
        previous = None
    set_parallel_state(state)
    try:
        yield
    finally:
        set_parallel_state(previous or ParallelState())


def _per_layer_model(cfg: ModelConfig, tp: int, torch_dtype: torch.dtype):
    """A meta model with one layer of each kind the config has (dense, sparse), built with TP
    size ``tp``: every layer of a kind holds the same parameters, so sizes scale by count."""
    kinds = tuple(k for k in (False, True) if k in cfg.sparse_layers)
    small = replace(cfg, num_layers=len(kinds), sparse_layers=kinds,
                    sliding_windows=cfg.sliding_windows[: len(kinds)] if cfg.sliding_windows else ())
    with _parallel_state(ParallelState(tp_size=tp)):
        return build_meta_model(small, torch_dtype), kinds


def _rank_params(cfg: ModelConfig, tp: int) -> tuple[dict[str, int], int]:
    """Per-rank parameter counts by kind (routed experts excluded), and KV cache elements per
    token and layer, for one TP rank."""
    model, kinds = _per_layer_model(cfg, tp, torch.bfloat16)
    layer_count = {k: sum(1 for s in cfg.sparse_layers if s == k) for k in kinds}
    out = {"attention": 0, "dense_mlp": 0, "embeddings": 0, "other": 0}
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith(("embed_tokens", "lm_head")):
            out["embeddings"] += n
            continue
        if not name.startswith("layers."):
            out["other"] += n  # final norm
            continue
        idx, rest = name.split(".", 2)[1:]
        n *= layer_count[kinds[int(idx)]]
        if rest.startswith("mlp.experts."):
            continue
        if rest.startswith("self_attn."):
            out["attention"] += n
        elif rest.startswith(("mlp.gate.", "mlp.e_score_correction_bias", "mlp.shared_expert_gate.")) \
                or "layernorm" in rest:
            out["other"] += n
        else:
            out["dense_mlp"] += n
    return out, model.kv_cache_spec()[0]


def plan(config_json_path: str | Path, sharding: ShardingConfig, device_memory_bytes: int,
         max_model_len: int, max_num_seqs: int, dtype: str = "auto", *, kv_dtype: str | None = None,
         experts: str | None = None, max_num_batched_tokens: int = 2048, memory_utilization: float = 0.9) -> Plan:
    """Memory per rank of the model at ``config_json_path`` (a config.json or a checkpoint
    directory) under ``sharding``. ``dtype``: weight dtype ("auto": the checkpoint's; "float8"
    counts one byte per weight, ignoring block scales); ``kv_dtype`` defaults to ``dtype``
    (bfloat16 for float8 weights), "fp8" is the engine's e4m3 cache with its per-row scales;
    ``experts``: a packed format for the routed experts (int8, int4, fp8_block, mxfp4 with their
    default options, scales counted), default: ``dtype``."""
    from experts.formats import REPORT_FORMATS, expert_nbytes, get_format

    cfg = parse_config(read_config_json(config_json_path))
    if dtype == "auto":
        dtype = cfg.torch_dtype.replace("torch.", "")
    if dtype not in BYTES_PER_PARAM:
        raise ValueError(f"dtype {dtype!r} is not supported for planning: choose auto, {', '.join(BYTES_PER_PARAM)}")
    kv_dtype = kv_dtype or ("bfloat16" if dtype == "float8" else dtype)
    if kv_dtype not in (*BYTES_PER_PARAM, "fp8"):
        raise ValueError(f"kv_dtype {kv_dtype!r} is not supported: choose one of {', '.join(BYTES_PER_PARAM)}, fp8")
    if experts is not None and experts not in REPORT_FORMATS:
        raise ValueError(f"experts format {experts!r} is not supported for planning: choose one of "
                         f"{', '.join(REPORT_FORMATS)} (or leave it unset for {dtype})")
    if max_model_len < 1 or max_num_seqs < 1:
        raise ValueError("max_model_len and max_num_seqs must be at least 1")
    if not 0 < memory_utilization <= 1:
        raise ValueError(f"memory_utilization {memory_utilization} must be in (0, 1]")
    sharding.validate_for_model(cfg.num_experts)
    tp, etp, world = sharding.tensor_parallel, sharding.expert_tensor_parallel, sharding.resolved_world_size
    if cfg.num_heads % tp:  # MLA layers would silently floor the per-rank head count
        raise ValueError(f"num_attention_heads ({cfg.num_heads}) is not divisible by tensor_parallel ({tp})")
    if cfg.num_experts and cfg.moe_intermediate_size % etp:
        raise ValueError(f"moe_intermediate_size ({cfg.moe_intermediate_size}) is not divisible by "
                         f"expert_tensor_parallel ({etp} = world_size {world} / expert_parallel "
                         f"{sharding.expert_parallel}): set expert_parallel to {world} to spread experts over every "
                         "rank, or to a value whose ratio divides it")

    with _parallel_state(ParallelState()):
        counts = count_params(cfg)
    by_kind, kv_spec = _rank_params(cfg, tp)
    slots = sharding.num_slots(cfg.num_experts) // sharding.expert_parallel if cfg.num_experts else 0
    expert_params = counts.routed_experts * slots // (cfg.num_experts * etp) if cfg.num_experts else 0
    params_per_rank = sum(by_kind.values()) + expert_params

    wb = BYTES_PER_PARAM[dtype]
    act = 2 if dtype == "float8" else wb
    by_format = {dtype: expert_params * wb}
    if cfg.num_experts:
        expert_slots = sum(cfg.sparse_layers) * slots  # every MoE layer holds this rank's slots
        for name in REPORT_FORMATS:
            try:
                by_format[name] = expert_slots * expert_nbytes(get_format(name), cfg.hidden_size,
                                                               cfg.moe_intermediate_size // etp)
            except ValueError as e:  # e.g. a split intermediate dim that is not a multiple of the group
                if name == experts:
                    raise ValueError(f"experts format {experts!r} cannot pack this model's experts at "
                                     f"expert_tensor_parallel {etp}: {e}") from e
    if kv_dtype == "fp8":
        kv_per_token = cfg.num_layers * kv_spec.bytes_per_token(torch.uint8, fp8=True)
    else:
        kv_per_token = cfg.num_layers * kv_spec.bytes_per_token(torch.uint8) * BYTES_PER_PARAM[kv_dtype]
    kv_cache = kv_per_token * max_model_len * max_num_seqs
    step_tokens = min(max_num_batched_tokens, max_model_len * max_num_seqs)
    moe_rows = 2 * etp * step_tokens * cfg.top_k  # a rank's fair share of routed rows, twice for skew
    ffn = max(cfg.dense_intermediate_size // tp, cfg.moe_intermediate_size // max(etp, 1), 1)
    workspace = (max_num_seqs * cfg.vocab_size * LOGITS_BYTES
                 + step_tokens * (8 * cfg.hidden_size + 3 * ffn) * act
                 + moe_rows * (2 * cfg.hidden_size + 3 * cfg.moe_intermediate_size // max(etp, 1)) * act
                 + RUNTIME_OVERHEAD_BYTES)
    per_rank = RankMemory(attention=by_kind["attention"] * wb, dense_mlp=by_kind["dense_mlp"] * wb,
                          routed_experts=by_format[experts or dtype], embeddings=by_kind["embeddings"] * wb,
                          other=by_kind["other"] * wb, kv_cache=kv_cache, workspace=workspace)
    return Plan(model=str(config_json_path), architecture=cfg.architecture, dtype=dtype, sharding=sharding,
                total_params=counts.total, active_params=counts.active, routed_expert_params=counts.routed_experts,
                params_per_rank=params_per_rank, expert_slots_per_rank=slots, kv_bytes_per_token=kv_per_token,
                kv_dtype=kv_dtype, experts_format=experts or dtype, routed_expert_bytes_by_format=by_format,
                max_model_len=max_model_len, max_num_seqs=max_num_seqs, per_rank=per_rank,
                device_memory_bytes=device_memory_bytes,
                usable_bytes=int(device_memory_bytes * memory_utilization))


def format_plan(p: Plan) -> str:
    """A short human-readable report."""
    gib = 2**30
    s = p.sharding
    lines = [
        f"model        {p.model} ({p.architecture})",
        f"params       {p.total_params / 1e9:.1f}B total, {p.active_params / 1e9:.1f}B active per token",
        f"sharding     world {s.resolved_world_size} = tensor_parallel {s.tensor_parallel} x data_parallel "
        f"{s.data_parallel}; expert_parallel {s.expert_parallel} ({p.expert_slots_per_rank} expert slots per rank, "
        f"expert_tensor_parallel {s.expert_tensor_parallel})",
        f"per rank     {p.params_per_rank / 1e9:.2f}B params in {p.dtype}"
        + (f", routed experts in {p.experts_format}" if p.experts_format != p.dtype else ""),
    ]
    for k, v in p.per_rank.as_dict().items():
        lines.append(f"  {k:15s} {v / gib:9.2f} GiB")
    lines += [
        "routed experts per rank by format: " + ", ".join(
            f"{k} {v / gib:.2f} GiB" for k, v in p.routed_expert_bytes_by_format.items()),
        f"kv cache     {p.kv_bytes_per_token:,} bytes/token per rank in {p.kv_dtype}; "
        f"{p.max_num_seqs} x {p.max_model_len} tokens",
        f"device       {p.device_memory_bytes / gib:.1f} GiB, usable {p.usable_bytes / gib:.1f} GiB",
        f"fits         {'yes' if p.fits else 'NO'} (headroom {p.headroom_bytes / gib:.2f} GiB; "
        f"{p.max_num_seqs_that_fit} sequences of {p.max_model_len} tokens would fit)",
    ]
    return "\n".join(lines)
