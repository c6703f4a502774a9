"""The decoder stack every supported family shares: embed -> N x (attention, MLP/MoE) -> norm -> head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from parallel import ParallelLMHead, VocabParallelEmbedding, get_tp_size

from ..config import ModelConfig
from .layers import Attention, DenseMLP, ForwardContext, RMSNorm, SparseMoE
from .mla import MLAttention


@dataclass(frozen=True)
class KVCacheSpec:
    """Per-layer cache shape: ``k [blocks, block_size, num_kv_heads, k_dim]`` and likewise V,
    or one latent tensor (``latent=True``) whose first ``v_dim`` dims serve as V."""

    num_kv_heads: int
    k_dim: int
    v_dim: int
    latent: bool = False

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        dims = self.k_dim if self.latent else self.k_dim + self.v_dim
        return self.num_kv_heads * dims * size


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = MLAttention(cfg, idx, dtype) if cfg.mla else Attention(cfg, idx, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.sparse_layers[idx]:
            self.mlp: nn.Module = SparseMoE(cfg, dtype)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size, dtype)

    def forward(self, positions_T: torch.Tensor, h_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h_TD = h_TD + self.self_attn(positions_T, self.input_layernorm(h_TD), ctx)
        x = self.post_attention_layernorm(h_TD)
        mlp_out = self.mlp(x, ctx) if isinstance(self.mlp, SparseMoE) else self.mlp(x)
        return h_TD + mlp_out


class MoECausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids_T: torch.Tensor, positions_T: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids_T)
        for layer in self.layers:
            h = layer(positions_T, h, ctx)
        return self.norm(h)

    def compute_logits(self, h_ND: torch.Tensor) -> torch.Tensor:
        # contiguous: the few-row GEMM path returns a transposed view, slow for the row-wise ops after
        return self.lm_head(h_ND).float().contiguous()

    def kv_cache_spec(self) -> list[KVCacheSpec]:
        cfg = self.cfg
        if cfg.mla:
            spec = KVCacheSpec(1, cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim, cfg.mla.kv_lora_rank, latent=True)
        else:
            attn = self.layers[0].self_attn
            spec = KVCacheSpec(attn.num_kv_heads, cfg.head_dim, cfg.head_dim)
        return [spec] * cfg.num_layers

    def sparse_layers(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoE)]


def tp_check(cfg: ModelConfig) -> None:
    tp = get_tp_size()
    if cfg.num_heads % tp:
        raise ValueError(f"num_attention_heads ({cfg.num_heads}) is not divisible by tensor_parallel ({tp})")
