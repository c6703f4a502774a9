"""The decoder stack every supported family shares: embed -> N x (attention, MLP/MoE) -> norm -> head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvcache import Fp8Cache
from ops import PackedLinearWeight
from parallel import ParallelLMHead, ShardingConfig, VocabParallelEmbedding

from ..config import ModelConfig
from .layers import Attention, DenseMLP, ForwardContext, RMSNorm, SparseMoE, add_norm
from .mla import MLAttention
from .quant_weights import pack_linear_layers


@dataclass(frozen=True)
class KVCacheSpec:
    """Per-layer cache shape: ``k [blocks, block_size, num_kv_heads, k_dim]`` and likewise V,
    or one latent tensor (``latent=True``) whose first ``v_dim`` dims serve as V."""

    num_kv_heads: int
    k_dim: int
    v_dim: int
    latent: bool = False

    def bytes_per_token(self, dtype: torch.dtype, fp8: bool = False) -> int:
        """Cache bytes per token of this layer; ``fp8``: e4m3 rows plus one float32 scale per row."""
        rows = [self.k_dim] if self.latent else [self.k_dim, self.v_dim]
        if fp8:
            return sum(Fp8Cache.bytes_per_row(self.num_kv_heads, d) for d in rows)
        return self.num_kv_heads * sum(rows) * torch.empty((), dtype=dtype).element_size()

    def allocate(self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str,
                 fp8: bool = False) -> tuple:
        """``(k, v)`` caches; for a latent cache ``v`` is a view of ``k``'s first ``v_dim`` dims."""
        if fp8:
            k = Fp8Cache.zeros(num_blocks, block_size, self.num_kv_heads, self.k_dim, device)
            v = k.narrow(self.v_dim) if self.latent else Fp8Cache.zeros(num_blocks, block_size, self.num_kv_heads,
                                                                         self.v_dim, device)
            return k, v
        k = torch.zeros(num_blocks, block_size, self.num_kv_heads, self.k_dim, dtype=dtype, device=device)
        v = k[..., : self.v_dim] if self.latent else torch.zeros(num_blocks, block_size, self.num_kv_heads, self.v_dim,
                                                                 dtype=dtype, device=device)
        return k, v


def layer_kv_spec(cfg: ModelConfig, layer: "DecoderLayer") -> KVCacheSpec:
    """The cache one decoder layer keeps: MLA's latent, or K and V of its (local) KV heads."""
    if cfg.mla:
        return KVCacheSpec(1, cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim, cfg.mla.kv_lora_rank, latent=True)
    return KVCacheSpec(layer.self_attn.num_kv_heads, cfg.head_dim, cfg.head_dim)


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

    def forward(self, positions_T: torch.Tensor, h_TD: torch.Tensor, x_TD: torch.Tensor, ctx: ForwardContext,
                next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_TD`` is ``input_layernorm(h_TD)``; returns the residual stream after the layer and
        ``next_norm`` of it (the next layer's input norm, or the final norm). (A batch-1 step on
        CPU may run instead as :class:`moe.cpu_decode.CapturedDecode`, equal to this.)"""
        h_TD, x = add_norm(h_TD, self.self_attn(positions_T, x_TD, ctx), self.post_attention_layernorm)
        return add_norm(h_TD, self.mlp(x, ctx), next_norm)


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
        pack_linear_layers(self, cfg.experts, cfg.tie_word_embeddings)  # moe quantize --all-linear checkpoints

    def forward(self, input_ids_T: torch.Tensor, positions_T: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids_T)
        if not self.layers:
            return self.norm(h)
        x = self.layers[0].input_layernorm(h)
        next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        for layer, next_norm in zip(self.layers, next_norms):
            h, x = layer(positions_T, h, x, ctx, next_norm)
        return x

    def compute_logits(self, h_ND: torch.Tensor) -> torch.Tensor:
        # contiguous: the few-row GEMM path returns a transposed view, slow for the row-wise ops after
        return self.lm_head(h_ND).float().contiguous()

    def kv_cache_spec(self) -> list[KVCacheSpec]:
        return [layer_kv_spec(self.cfg, layer) for layer in self.layers]

    def sparse_layers(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoE)]


def check_sharding(cfg: ModelConfig, sharding: ShardingConfig) -> None:
    """Reject a layout this model cannot take, naming the field and the fix, before any process
    group is joined or weight loaded. ``data_parallel`` only multiplies the world: attention,
    dense MLPs and the vocabulary are split ``tensor_parallel`` ways inside each DP group."""
    tp, ep, etp = sharding.tensor_parallel, sharding.expert_parallel, sharding.expert_tensor_parallel
    world = sharding.resolved_world_size

    def choices(n: int) -> str:
        return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)

    if cfg.num_heads % tp:
        raise ValueError(f"num_attention_heads ({cfg.num_heads}) is not divisible by tensor_parallel ({tp}): "
                         f"choose tensor_parallel from {choices(cfg.num_heads)}")
    kv = cfg.num_kv_heads
    if not cfg.mla and (kv % tp if kv >= tp else tp % kv):
        raise ValueError(f"num_key_value_heads ({kv}) and tensor_parallel ({tp}): one must divide the other "
                         f"(KV heads are split, or replicated when fewer than the ranks)")
    sizes = {"intermediate_size (dense MLP layers)": cfg.dense_intermediate_size if not all(cfg.sparse_layers) else 0,
             "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size}
    for name, size in sizes.items():
        if size % tp:
            raise ValueError(f"{name} ({size}) is not divisible by tensor_parallel ({tp}): choose tensor_parallel "
                             f"from {choices(size)}")
    sharding.validate_for_model(cfg.num_experts)
    if cfg.num_experts and cfg.moe_intermediate_size % etp:
        raise ValueError(f"moe_intermediate_size ({cfg.moe_intermediate_size}) is not divisible by "
                         f"expert_tensor_parallel ({etp} = world_size {world} / expert_parallel {ep}): raise "
                         f"expert_parallel so that world_size / expert_parallel divides it (e.g. {world})")


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the loaded model holds: ``total`` (every tensor, packed layouts included), the routed
    experts' and the embedding's."""
    seen: set[int] = set()
    total = experts = embed = 0
    packed = {name for name, m in model.named_modules() if hasattr(m, "weight_nbytes")}
    for name in packed:  # quantized experts keep their CPU layout outside the module's parameters
        n = model.get_submodule(name).weight_nbytes()
        total += n
        experts += n
    for m in model.modules():  # so do packed linear layers (--all-linear): codes, scales, offsets
        if isinstance(getattr(m, "weight", None), PackedLinearWeight):
            total += sum(t.nbytes for t in (m.weight.q, m.weight.s_NG, m.weight.b_NG) if t is not None)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta" or t.data_ptr() in seen or name.rsplit(".", 1)[0] in packed:
            continue
        seen.add(t.data_ptr())
        n = t.numel() * t.element_size()
        total += n
        if ".experts." in name:
            experts += n
        elif "embed_tokens" in name:
            embed += n
    return {"total": total, "routed_experts": experts, "embedding": embed}
