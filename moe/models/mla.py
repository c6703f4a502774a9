"""DeepSeek multi-head latent attention (MLA) with a compressed KV cache.

The cache holds, per token, the normalized latent ``c`` (kv_lora_rank) and the shared rotary
key ``k_pe`` (qk_rope_head_dim): one "head" of ``kv_lora_rank + rope`` dims instead of full
K and V for every head. Attention runs in the absorbed form: the per-head key up-projection
W_UK is folded into the query and the value up-projection W_UV is applied after attention, so
keys and values are read straight from the latent cache (V is a view of its first
kv_lora_rank dims).
"""
from __future__ import annotations

import torch
from torch import nn

import cpu_kernels
from kvcache import paged_attention, write_kv
from parallel import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, get_tp_size
from parallel.layers import padded_rows

from ..config import ModelConfig
from .layers import ForwardContext, RMSNorm
from .rope import RotaryEmbedding


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        m = cfg.mla
        self.layer_idx = layer_idx
        tp = get_tp_size()
        if cfg.num_heads % tp:
            raise ValueError(f"num_attention_heads ({cfg.num_heads}) is not divisible by tensor_parallel ({tp})")
        self.num_heads = cfg.num_heads // tp  # heads split over TP ranks; the latent cache is replicated
        self.nope, self.rope_dim, self.v_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.kv_lora_rank = m.kv_lora_rank
        qk_dim = self.nope + self.rope_dim
        if m.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(cfg.hidden_size, [cfg.num_heads * qk_dim], dtype=dtype)
        else:
            self.q_a_proj = ReplicatedLinear(cfg.hidden_size, m.q_lora_rank, bias=cfg.attention_bias, dtype=dtype)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, 1e-6, dtype)
            self.q_b_proj = ColumnParallelLinear(m.q_lora_rank, [cfg.num_heads * qk_dim], dtype=dtype)
        self.q_lora = m.q_lora_rank is not None
        self.kv_a_proj_with_mqa = ReplicatedLinear(cfg.hidden_size, m.kv_lora_rank + self.rope_dim,
                                                   bias=cfg.attention_bias, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, 1e-6, dtype)
        self.kv_b_proj = ColumnParallelLinear(m.kv_lora_rank, [cfg.num_heads * (self.nope + self.v_dim)], dtype=dtype)
        self.o_proj = RowParallelLinear(cfg.num_heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias, dtype=dtype)
        self.rotary = RotaryEmbedding(self.rope_dim, cfg.max_position_embeddings, cfg.rope, cfg.rope_interleaved)
        self.scale = cfg.softmax_scale or qk_dim ** -0.5

    def forward(self, positions_T: torch.Tensor, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T, H = x_TD.shape[0], self.num_heads
        if T == 1 and x_TD.device.type == "cpu" and self._one_call:
            y = self._forward_token(positions_T, x_TD, ctx)
            if y is not None:
                return y
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_TD))) if self.q_lora else self.q_proj(x_TD)
        q_nope, q_pe = q.view(T, H, self.nope + self.rope_dim).split([self.nope, self.rope_dim], dim=-1)
        latent = self.kv_a_proj_with_mqa(x_TD)
        c_TC, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_TC = self.kv_a_layernorm(c_TC)
        q_pe, k_pe = self.rotary(positions_T, q_pe, k_pe.unsqueeze(1))

        w_uk, w_uv = self._absorbed()
        q_lat = _per_head(q_nope, w_uk, "thn,hnc->thc")
        q_full = torch.cat([q_lat, q_pe], dim=-1)  # [T, H, C + rope]

        # [blocks, block_size, 1, C + rope] and its first C dims (a view) as V
        cache, v_cache = ctx.kv_caches[self.layer_idx]
        write_kv(cache, None, torch.cat([c_TC.unsqueeze(1), k_pe], dim=-1), None, ctx.meta.slot_mapping)
        o_lat = paged_attention(q_full, cache, v_cache, ctx.meta, self.scale)
        o = _per_head(o_lat, w_uv, "thc,hvc->thv")
        return self.o_proj(o.reshape(T, H * self.v_dim))

    @property
    def _one_call(self) -> bool:
        """Whether a token may take :func:`cpu_kernels.mla_token`: no biases, one TP rank."""
        projs = [self.kv_a_proj_with_mqa, self.o_proj] + ([self.q_a_proj] if self.q_lora else [])
        return not self.o_proj.split and all(p.bias is None for p in projs)

    def _forward_token(self, positions_T: torch.Tensor, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """:meth:`forward` for one token as one C call (batch-1 decode; the same arithmetic), or None."""
        cache, _ = ctx.kv_caches[self.layer_idx]
        if not isinstance(cache, torch.Tensor) or ctx.meta.num_seqs != 1:
            return None
        self.rotary.grow_for(positions_T)
        q_a = (self.q_a_proj.weight, self.q_a_layernorm.weight, self.q_a_layernorm.eps, self.q_b_proj.weight) \
            if self.q_lora else (None, None, 0.0, self.q_proj.weight)
        return cpu_kernels.mla_token(
            x_TD, *q_a, self.kv_a_proj_with_mqa.weight, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps,
            self.kv_b_proj.weight, self.o_proj.weight, self.num_heads, self.nope, self.rope_dim, self.v_dim, positions_T,
            self.rotary.cos, self.rotary.sin, self.rotary.interleaved, cache, ctx.meta.block_tables[0],
            ctx.meta.context_lens_list[0], ctx.meta.slot_mapping, self.scale)

    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK ``[H, nope, C]`` and W_UV ``[H, v, C]``: views of kv_b_proj's weight."""
        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w_kv[:, : self.nope], w_kv[:, self.nope:]

    def warm_up(self, rows: list[int]) -> int:
        """Run the two per-head GEMMs at every row count in ``rows`` once (see moe.warmup)."""
        w_uk, w_uv = self._absorbed()
        H = self.num_heads
        for t in rows:
            _per_head(w_uk.new_zeros(t, H, self.nope), w_uk, "thn,hnc->thc")
            _per_head(w_uv.new_zeros(t, H, self.kv_lora_rank), w_uv, "thc,hvc->thv")
        return 2 * len(rows)


def _per_head(x_THa: torch.Tensor, w_Hba: torch.Tensor, eq: str) -> torch.Tensor:
    """``einsum(eq, x, w)``: one GEMM per head, ``eq`` one of the two forms below. On CPU, 1-64
    bf16 rows run on AMX tiles where the CPU has them (:func:`cpu_kernels.amx_heads`); otherwise
    the rows run padded to :func:`parallel.layers.padded_rows` and always from a contiguous copy, so
    the batched GEMM comes in few shapes and one layout (oneDNN builds a kernel for each new one)."""
    if x_THa.device.type != "cpu":
        return torch.einsum(eq, x_THa, w_Hba)
    y = cpu_kernels.heads_vec(x_THa, w_Hba, w_rows_n=_W_ROWS_N[eq]) if x_THa.shape[0] == 1 else None
    if y is None:
        y = cpu_kernels.amx_heads(x_THa, w_Hba, w_rows_n=_W_ROWS_N[eq])
    if y is not None:
        return y
    T = x_THa.shape[0]
    x = torch.cat([x_THa, x_THa.new_zeros(padded_rows(T) - T, *x_THa.shape[1:])])
    return torch.einsum(eq, x, w_Hba)[:T]


# whether the per-head weight's rows run along the output (W_UV [H, v, C]) or the input (W_UK [H, nope, C])
_W_ROWS_N = {"thc,hvc->thv": True, "thn,hnc->thc": False}
