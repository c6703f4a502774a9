"""DeepSeek-V3 multi-token prediction (MTP): the checkpoint's extra layer(s) run as a drafter.

The same layout serves the MTP-style heads ``moe distill --student mtp`` trains for a target without
one (a Qwen3-MoE decoder layer in DeepSeek's place, in a checkpoint directory of its own, given as
``speculative_config={"method": "mtp", "model": PATH}``; :mod:`moe.distill_mtp`).

Checkpoint layout (config.json ``num_nextn_predict_layers = n``; N = ``num_hidden_layers``): after the
N decoder layers, ``model.layers.{N + k}.`` holds MTP layer k:

- ``enorm``, ``hnorm`` [D]: RMSNorms of the next token's embedding and of the previous hidden state;
- ``eh_proj`` [D, 2D]: their concatenation, embedding first, projected back to D;
- a full decoder layer under the names every layer uses (``input_layernorm``, ``self_attn.*`` (MLA),
  ``post_attention_layernorm``, ``mlp.*`` (MoE, or a dense MLP where the stack has one));
- ``shared_head.norm`` [D] and ``shared_head.head`` [V, D] (some exports leave the head out: the
  target's ``lm_head`` then serves, as the DeepSeek-V3 report shares the output head);
- in some exports ``embed_tokens`` [V, D], equal to the target's (the report shares the embedding).

One step for the row of position i (DeepSeek-V3 technical report, section 2.2; the order of
eh_proj's input is the published weights' and the reference implementations', embedding first; the
report writes it the other way round):

    h'_i   = eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i)))
    out_i  = shared_head.norm(decoder_layer(h'_i at position i))
    logits = shared_head.head(out_i)                                  # predicts t_{i+2}

Hidden-state convention. ``h_i`` is the target's last hidden state AFTER its final norm: the tensor
:meth:`MoECausalLM.forward` returns and :meth:`MoECausalLM.compute_logits` turns into the logits of
t_{i+1} (vLLM's and SGLang's MTP drafters take exactly this: the target model's output hidden states,
which DeepSeek's model returns after ``model.norm``). :meth:`MTPModel.forward` returns ``out_i`` in
the same convention (after ``shared_head.norm``), so a K > 1 draft feeds it back as the next step's
``prev_hidden`` (SGLang's chaining; vLLM chains the state before ``shared_head.norm``).

Positions and cache. Row i runs at position i, the position of ``h_i`` (RoPE is relative, so Megatron's
training positions, shifted by one, give the same attention). Its K/V go to the slot of target token
i, so the MTP cache takes the target's block tables and slot mapping as they are
(:meth:`MTPModel.kv_cache_spec` has the target's block layout). vLLM zeroes the embedding of the
position-0 row; the report, Megatron's training code and SGLang do not, and neither does this module.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from parallel import ParallelLMHead, ReplicatedLinear, VocabParallelEmbedding

from ..config import ModelConfig
from .decoder import DecoderLayer, KVCacheSpec, layer_kv_spec
from .layers import ForwardContext, RMSNorm, SparseMoE


class SharedHead(nn.Module):
    """The MTP layer's final norm and, when the checkpoint holds one, its own output head."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, with_head: bool):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype=dtype) if with_head else None


class MTPLayer(DecoderLayer):
    """A decoder layer (same parameter names, so the checkpoint's tensors map one to one) with the
    MTP input fusion in front and the shared head's norm after. ``idx`` is the layer's index among
    the MTP layers: its KV cache is ``ctx.kv_caches[idx]`` of the MTP model's own caches."""

    def __init__(self, cfg: ModelConfig, idx: int, dtype: torch.dtype, with_head: bool):
        super().__init__(cfg, idx, dtype)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.eh_proj = ReplicatedLinear(2 * cfg.hidden_size, cfg.hidden_size, dtype=dtype)
        self.shared_head = SharedHead(cfg, dtype, with_head)

    def fuse(self, embeds_TD: torch.Tensor, prev_hidden_TD: torch.Tensor) -> torch.Tensor:
        """The layer's input (its residual stream's first value) from embeddings of t_{i+1} and hidden states h_i."""
        return self.eh_proj(torch.cat([self.enorm(embeds_TD), self.hnorm(prev_hidden_TD)], dim=-1))

    def predict(self, positions_T: torch.Tensor, embeds_TD: torch.Tensor, prev_hidden_TD: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """``shared_head.norm`` of the layer's output for embeddings of t_{i+1} and hidden states h_i."""
        h_TD = self.fuse(embeds_TD, prev_hidden_TD)
        _, out_TD = super().forward(positions_T, h_TD, self.input_layernorm(h_TD), ctx, self.shared_head.norm)
        return out_TD


class MTPModel(nn.Module):
    """The MTP layer(s) of a DeepSeek checkpoint. ``cfg`` describes the MTP layers as layers
    ``0 .. n-1`` (:func:`moe.models.families.mtp_config`); ``first_layer`` is N, where they sit in
    the checkpoint. ``own_heads[k]``: layer k has its own ``shared_head.head`` (default: all do);
    layers without one use ``lm_head`` (the target's head, tied to the embedding when the target's is)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, first_layer: int,
                 own_heads: Sequence[bool] | None = None):
        super().__init__()
        heads = list(own_heads) if own_heads is not None else [True] * cfg.num_layers
        if len(heads) != cfg.num_layers:
            raise ValueError(f"own_heads lists {len(heads)} layers, the config {cfg.num_layers} MTP layers")
        self.cfg = cfg
        self.first_layer = first_layer
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(MTPLayer(cfg, k, dtype, heads[k]) for k in range(cfg.num_layers))
        self.lm_head: ParallelLMHead | None = None
        if not all(heads):
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
            if cfg.tie_word_embeddings:
                self.lm_head.weight = self.embed_tokens.weight

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(self, input_ids_T: torch.Tensor, prev_hidden_TD: torch.Tensor, positions_T: torch.Tensor,
                ctx: ForwardContext, layer: int = 0) -> torch.Tensor:
        """Row i: ``input_ids_T[i]`` = t_{i+1}, ``prev_hidden_TD[i]`` = h_i (the target's output, or this
        model's for a later draft), ``positions_T[i]`` = i. Returns ``out_TD`` (after shared_head.norm),
        whose logits predict t_{i+2}. ``ctx.kv_caches`` are this model's caches (:meth:`kv_cache_spec`)."""
        return self.layers[layer].predict(positions_T, self.embed_tokens(input_ids_T), prev_hidden_TD, ctx)

    def fuse(self, input_ids_T: torch.Tensor, prev_hidden_TD: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """MTP layer ``layer``'s input for the rows :meth:`forward` takes (what its decoder layer runs on)."""
        return self.layers[layer].fuse(self.embed_tokens(input_ids_T), prev_hidden_TD)

    def compute_logits(self, hidden_TD: torch.Tensor, layer: int = 0) -> torch.Tensor:
        head = self.layers[layer].shared_head.head
        if head is None:
            head = self.lm_head
        # contiguous: the few-row GEMM path returns a transposed view (as MoECausalLM.compute_logits)
        return head(hidden_TD).float().contiguous()

    def kv_cache_spec(self) -> list[KVCacheSpec]:
        """One cache per MTP layer in its attention's layout (the target's block size and block tables)."""
        return [layer_kv_spec(self.cfg, layer) for layer in self.layers]

    def sparse_layers(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoE)]


def published_tensor_shapes(cfg: ModelConfig, first_layer: int, layer: int,
                            per_expert: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor of MTP layer ``layer`` in the published (Hugging Face) layout, full (unsharded)
    shapes, by checkpoint name: what a complete layer holds, beside the optional ``embed_tokens`` and
    ``shared_head.head`` (both [V, D], listed too). ``per_expert``: routed experts one tensor each
    (DeepSeek's own layout), else stacked ``experts.gate_up_proj`` [E, 2F, D] / ``experts.down_proj`` [E, D, F]."""
    D, V = cfg.hidden_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "enorm.weight": (D,), "hnorm.weight": (D,), "eh_proj.weight": (D, 2 * D),
        "shared_head.norm.weight": (D,), "shared_head.head.weight": (V, D), "embed_tokens.weight": (V, D),
        "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
    }
    shapes.update({f"self_attn.{name}": shape for name, shape in attention_shapes(cfg).items()})
    if cfg.sparse_layers[layer]:
        E, F = cfg.num_experts, cfg.moe_intermediate_size
        shapes["mlp.gate.weight"] = (E, D)
        if cfg.router.use_correction_bias:
            shapes["mlp.gate.e_score_correction_bias"] = (E,)
        if per_expert:
            for e in range(E):
                shapes.update({f"mlp.experts.{e}.gate_proj.weight": (F, D), f"mlp.experts.{e}.up_proj.weight": (F, D),
                               f"mlp.experts.{e}.down_proj.weight": (D, F)})
        else:
            shapes.update({"mlp.experts.gate_up_proj": (E, 2 * F, D), "mlp.experts.down_proj": (E, D, F)})
        mlp, inter = "mlp.shared_experts", cfg.shared_expert_intermediate_size
    else:
        mlp, inter = "mlp", cfg.dense_intermediate_size
    if inter:
        shapes.update({f"{mlp}.gate_proj.weight": (inter, D), f"{mlp}.up_proj.weight": (inter, D),
                       f"{mlp}.down_proj.weight": (D, inter)})
    prefix = f"model.layers.{first_layer + layer}."
    return {prefix + name: shape for name, shape in shapes.items()}


def attention_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """An attention block's tensors in the published layout, by name under ``self_attn.``: DeepSeek's MLA, or
    Qwen3-MoE's GQA with per-head QK-norm (the families :data:`moe.models.families.MTP_SPARSE` names)."""
    D, H = cfg.hidden_size, cfg.num_heads
    m = cfg.mla
    if m is None:
        q, kv = H * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        shapes = {"q_proj.weight": (q, D), "k_proj.weight": (kv, D), "v_proj.weight": (kv, D), "o_proj.weight": (D, q)}
        if cfg.attention_bias:
            shapes.update({"q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,)})
        if cfg.o_bias:
            shapes["o_proj.bias"] = (D,)
        if cfg.qk_norm == "head":
            shapes.update({"q_norm.weight": (cfg.head_dim,), "k_norm.weight": (cfg.head_dim,)})
        return shapes
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    shapes = {
        "kv_a_proj_with_mqa.weight": (m.kv_lora_rank + m.qk_rope_head_dim, D),
        "kv_a_layernorm.weight": (m.kv_lora_rank,),
        "kv_b_proj.weight": (H * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
        "o_proj.weight": (D, H * m.v_head_dim),
    }
    if m.q_lora_rank is None:
        shapes["q_proj.weight"] = (H * qk, D)
    else:
        shapes.update({"q_a_proj.weight": (m.q_lora_rank, D), "q_a_layernorm.weight": (m.q_lora_rank,),
                       "q_b_proj.weight": (H * qk, m.q_lora_rank)})
    return shapes
