"""Building blocks shared by every family: norms, attention, dense MLP and the MoE block.

Shapes: T tokens of the flattened step, D hidden, H heads, E experts, K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from experts import Activation, fused_swiglu, swiglu_mlp_cpu
from kvcache import AttentionMetadata, paged_attention, write_kv
from ops import add_rms_norm, rms_norm
from parallel import (ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear, ShardedRMSNorm,
                      get_etp_rank, get_etp_size, get_tp_size, local_expert_slots, make_moe_dispatcher)
from parallel.dispatch import NO_STEP, DispatchStep
from routing import RouterConfig, expert_counts, route

from ..config import ModelConfig
from .quant_weights import make_experts
from .rope import RotaryEmbedding


@dataclass
class ForwardContext:
    """What every layer needs from the engine for one step."""

    meta: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    record_expert_counts: bool = False
    # what the MoE layers' dispatchers may need to know about the step (data_parallel > 1: every
    # DP group's token count; this rank runs only its own group's tokens)
    dispatch_step: DispatchStep = NO_STEP


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, out)


def add_norm(h_TD: torch.Tensor, d_TD: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual ``h + d`` and ``norm`` of it (one C pass for bf16 on CPU)."""
    return add_rms_norm(h_TD, d_TD, norm.weight, norm.eps)


class Attention(nn.Module):
    """Grouped-query attention over the paged KV cache (Mixtral, Qwen, OLMoE, gpt-oss)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          bias=cfg.attention_bias, dtype=dtype)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias, dtype=dtype)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope, cfg.rope_interleaved)
        self.scale = cfg.softmax_scale or cfg.head_dim ** -0.5
        self.sliding_window = cfg.sliding_windows[layer_idx] if cfg.sliding_windows else None
        self.clip_qkv = cfg.clip_qkv
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
        elif cfg.qk_norm == "full":
            if get_tp_size() > 1:  # the heads are split: the norm's statistics span the ranks
                from parallel import get_tp_rank

                r, reps = get_tp_rank(), self.qkv_proj.kv_replicas
                self.q_norm = ShardedRMSNorm(cfg.num_heads * cfg.head_dim, self.num_heads * cfg.head_dim, r, 1,
                                             cfg.rms_norm_eps, dtype)
                self.k_norm = ShardedRMSNorm(cfg.num_kv_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim,
                                             r // reps, reps, cfg.rms_norm_eps, dtype)
            else:
                self.q_norm = RMSNorm(cfg.num_heads * cfg.head_dim, cfg.rms_norm_eps, dtype)
                self.k_norm = RMSNorm(cfg.num_kv_heads * cfg.head_dim, cfg.rms_norm_eps, dtype)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads, dtype=torch.float32), requires_grad=False) \
            if cfg.attention_sinks else None
        if self.sinks is not None:
            self.sinks.weight_loader = self._load_sinks

    def _load_sinks(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        from parallel import get_tp_rank

        param.data.copy_(loaded.narrow(0, get_tp_rank() * self.num_heads, self.num_heads))

    def forward(self, positions_T: torch.Tensor, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T = x_TD.shape[0]
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x_TD).split([q_size, kv_size, kv_size], dim=-1)
        if self.qk_norm == "full":
            if isinstance(self.q_norm, ShardedRMSNorm):
                q, k = ShardedRMSNorm.apply_pair(self.q_norm, q, self.k_norm, k)
            else:
                q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        # per-head q/k norms (in place: q and k stay the qkv row's heads) in the rotation's pass
        norms = (self.q_norm, self.k_norm) if self.qk_norm == "head" else None
        q, k = self.rotary.rotate_pair_(positions_T, q, k, norms)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        write_kv(k_cache, v_cache, k, v, ctx.meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, ctx.meta, self.scale, self.sliding_window, self.sinks)
        return self.o_proj(o.reshape(T, q_size))


class DenseMLP(nn.Module):
    """SwiGLU MLP with merged gate/up projection (dense layers and shared experts)."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [intermediate, intermediate], dtype=dtype)
        self.down_proj = RowParallelLinear(intermediate, hidden, dtype=dtype)

    @property
    def plain(self) -> bool:
        """No biases, one TP rank, float weights (not packed): what the one-call C kernels compute."""
        return (not self.down_proj.split and self.gate_up_proj.bias is None and self.down_proj.bias is None
                and self.gate_up_proj.weight_format is None and self.down_proj.weight_format is None)

    def forward(self, x_TD: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        """``ctx`` unused (an MLP keeps no per-step state): the signature of every MLP block."""
        if self.plain:
            y = swiglu_mlp_cpu(x_TD, self.gate_up_proj.weight, self.down_proj.weight)  # one C call
            if y is not None:
                return y
        return self.down_proj(fused_swiglu(self.gate_up_proj(x_TD)))


class SparseMoE(nn.Module):
    """router -> dispatch -> grouped experts -> combine, plus optional shared expert."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        rc: RouterConfig = cfg.router
        self.router_cfg = rc
        self.gate = ReplicatedLinear(cfg.hidden_size, rc.num_experts, bias=cfg.router_bias, dtype=dtype)
        self.e_score_correction_bias = None
        if rc.use_correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(rc.num_experts, dtype=torch.float32),
                                                        requires_grad=False)
        # one rank: LocalDispatcher; several: each rank's slice of the tokens goes through the
        # expert-parallel dispatcher the sharding names, after the data-parallel groups' tokens
        # are gathered when data_parallel > 1 (parallel/moe_parallel.py)
        self.dispatcher = make_moe_dispatcher(rc.num_experts)
        self.experts = make_experts(
            cfg.experts, rc.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, bias=cfg.expert_bias,
            activation=Activation(cfg.swiglu_limit, cfg.swiglu_alpha), dtype=dtype,
            slot_experts=local_expert_slots(rc.num_experts), intermediate_shard=(get_etp_rank(), get_etp_size()))
        self.shared_expert = None
        self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, dtype)
            if cfg.shared_expert_gate:
                self.shared_expert_gate = ReplicatedLinear(cfg.hidden_size, 1, dtype=dtype)
        self.last_counts_E: torch.Tensor | None = None
        # tokens routed to each expert since the engine began recording (ForwardContext.record_expert_counts)
        self.counts_E = torch.zeros(rc.num_experts, dtype=torch.int64)
        # composed once: with every expert on this process and an experts module that has the
        # one-call local form, try it first (it declines steps it does not take); else always
        # dispatch -> experts -> combine
        self.fused_local = self.dispatcher.is_local and self.experts.has_forward_local
        # and the shared expert in the same call where the experts take it: one of the routed
        # experts' dims, ungated (its weights then stream in the routed experts' loops rather than
        # in a call of their own, with the add: DeepSeek-V3's shape on machine D, alternating in one
        # process, 64-token prompts 1.03x, 16 sequences decoding 1.05x, 2048-token prompts 1.02x)
        self.fused_shared = (self.fused_local and self.experts.fuses_shared and self.shared_expert_gate is None
                             and cfg.shared_expert_intermediate_size == cfg.moe_intermediate_size)

    def forward(self, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        weights_TK, ids_TK = self.route(x_TD, ctx)
        return self.experts_and_shared(x_TD, weights_TK, ids_TK, ctx)

    def route(self, x_TD: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights_TK, ids_TK)``, counted per expert when the engine records them."""
        logits_TE = self.gate(x_TD)
        weights_TK, ids_TK = route(logits_TE, self.router_cfg, self.e_score_correction_bias)
        self.count(ids_TK, ctx)
        return weights_TK, ids_TK

    def count(self, ids_TK: torch.Tensor, ctx: ForwardContext) -> None:
        """Tokens per expert of a routed step, kept when the engine records them."""
        if ctx.record_expert_counts:
            self.last_counts_E = expert_counts(ids_TK, self.router_cfg.num_experts).cpu()
            self.counts_E += self.last_counts_E

    def experts_and_shared(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor,
                           ctx: ForwardContext) -> torch.Tensor:
        """The routed experts' weighted sum for tokens already routed, plus the shared expert."""
        se = self.shared_expert
        if self.fused_shared and se.plain:
            y_TD = self.experts.forward_local(x_TD, ids_TK, weights_TK, (se.gate_up_proj.weight, se.down_proj.weight))
            if y_TD is not None:
                return y_TD
        y_TD = self.experts.forward_local(x_TD, ids_TK, weights_TK) if self.fused_local else None
        if y_TD is None:
            x_RD, counts_e, meta = self.dispatcher.dispatch(x_TD, ids_TK, weights_TK, ctx.dispatch_step)
            y_TD = self.dispatcher.combine(self.experts(x_RD, counts_e), meta)
        if self.shared_expert is not None:
            shared = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared
            y_TD = y_TD + shared
        return y_TD
