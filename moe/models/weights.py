"""Checkpoint tensor names -> our parameters, for every family.

A rule matches a Hugging Face tensor name and names the parameter it fills, the shard of a
fused parameter it is (``q``/``k``/``v``, ``0``/``1`` for gate/up, ``gate``/``up``/``down``
for experts), its expert id when it holds one expert, and an optional transform for layouts
that differ from ours (gpt-oss stores experts transposed with gate/up interleaved).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

L = r"model\.layers\.(?P<l>\d+)\."
MOE = r"(?:block_sparse_moe|mlp)\."


@dataclass(frozen=True)
class Target:
    param: str
    shard_id: str | None = None
    expert_id: int | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    param: str  # format string over the pattern's named groups
    shard: str | None = None  # literal, or "{name}" of a group
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def apply(self, name: str) -> Target | None:
        m = self.pattern.fullmatch(name)
        if m is None:
            return None
        g = m.groupdict()
        shard = self.shard.format(**g) if self.shard else None
        expert = int(g["e"]) if g.get("e") is not None else None
        return Target(self.param.format(**g), shard, expert, self.transform)


def rule(pattern: str, param: str, shard: str | None = None, transform=None) -> Rule:
    return Rule(re.compile(pattern), param, shard, transform)


_GATE_UP = {"gate": "0", "up": "1"}

COMMON = [
    rule(r"model\.embed_tokens\.weight", "embed_tokens.weight"),
    rule(r"model\.norm\.weight", "norm.weight"),
    rule(r"lm_head\.weight", "lm_head.weight"),
    rule(L + r"(?P<n>input_layernorm|post_attention_layernorm)\.weight", "layers.{l}.{n}.weight"),
    # dense MLP and shared experts (gate/up fused into one column-parallel weight)
    rule(L + r"mlp\.gate_proj\.weight", "layers.{l}.mlp.gate_up_proj.weight", "0"),
    rule(L + r"mlp\.up_proj\.weight", "layers.{l}.mlp.gate_up_proj.weight", "1"),
    rule(L + r"mlp\.down_proj\.weight", "layers.{l}.mlp.down_proj.weight"),
    rule(L + r"mlp\.shared_experts?\.gate_proj\.weight", "layers.{l}.mlp.shared_expert.gate_up_proj.weight", "0"),
    rule(L + r"mlp\.shared_experts?\.up_proj\.weight", "layers.{l}.mlp.shared_expert.gate_up_proj.weight", "1"),
    rule(L + r"mlp\.shared_experts?\.down_proj\.weight", "layers.{l}.mlp.shared_expert.down_proj.weight"),
    rule(L + r"mlp\.shared_expert_gate\.weight", "layers.{l}.mlp.shared_expert_gate.weight"),
    # router
    rule(L + MOE + r"(?:gate|router)\.(?P<p>weight|bias)", "layers.{l}.mlp.gate.{p}"),
    rule(L + r"mlp\.gate\.e_score_correction_bias", "layers.{l}.mlp.e_score_correction_bias"),
    # experts, one tensor per expert (Mixtral w1/w3/w2 or gate/up/down_proj)
    rule(L + MOE + r"experts\.(?P<e>\d+)\.(?:w1|gate_proj)\.weight", "layers.{l}.mlp.experts.w13", "gate"),
    rule(L + MOE + r"experts\.(?P<e>\d+)\.(?:w3|up_proj)\.weight", "layers.{l}.mlp.experts.w13", "up"),
    rule(L + MOE + r"experts\.(?P<e>\d+)\.(?:w2|down_proj)\.weight", "layers.{l}.mlp.experts.w2", "down"),
]

# experts stacked in one tensor, already [E, 2F, D] = [gate | up] and [E, D, F]
STACKED_EXPERTS = [
    rule(L + MOE + r"experts\.gate_up_proj", "layers.{l}.mlp.experts.w13", "gate_up"),
    rule(L + MOE + r"experts\.down_proj", "layers.{l}.mlp.experts.w2", "down"),
]

GQA_ATTENTION = [
    rule(L + r"self_attn\.(?P<s>q|k|v)_proj\.(?P<p>weight|bias)", "layers.{l}.self_attn.qkv_proj.{p}", "{s}"),
    rule(L + r"self_attn\.o_proj\.(?P<p>weight|bias)", "layers.{l}.self_attn.o_proj.{p}"),
    rule(L + r"self_attn\.(?P<n>q_norm|k_norm)\.weight", "layers.{l}.self_attn.{n}.weight"),
    rule(L + r"self_attn\.sinks", "layers.{l}.self_attn.sinks"),
]

MLA_ATTENTION = [
    rule(L + r"self_attn\.(?P<n>q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)\.(?P<p>weight|bias)",
         "layers.{l}.self_attn.{n}.{p}"),
    rule(L + r"self_attn\.(?P<n>q_a_layernorm|kv_a_layernorm)\.weight", "layers.{l}.self_attn.{n}.weight"),
]


# DeepSeek multi-token-prediction layers (``model.layers.{num_hidden_layers + k}``, moe/models/mtp.py): their
# own tensors beside a decoder layer's. The target model skips these layers like the rest of the MTP layer.
MTP = [
    rule(L + r"(?P<n>enorm|hnorm|eh_proj)\.weight", "layers.{l}.{n}.weight"),
    rule(L + r"shared_head\.(?P<n>norm|head)\.weight", "layers.{l}.shared_head.{n}.weight"),
    rule(L + r"embed_tokens\.weight", "layers.{l}.embed_tokens.weight"),
]


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """gpt-oss gate/up columns alternate (gate_0, up_0, gate_1, ...): make them [gate | up]."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)


GPT_OSS_EXPERTS = [
    # [E, D, 2F] interleaved -> [E, 2F, D] as [gate | up]
    rule(L + r"mlp\.experts\.gate_up_proj", "layers.{l}.mlp.experts.w13", "gate_up",
         lambda t: _deinterleave(t).transpose(1, 2)),
    rule(L + r"mlp\.experts\.gate_up_proj_bias", "layers.{l}.mlp.experts.b13", "gate_up", _deinterleave),
    rule(L + r"mlp\.experts\.down_proj", "layers.{l}.mlp.experts.w2", "down", lambda t: t.transpose(1, 2)),
    rule(L + r"mlp\.experts\.down_proj_bias", "layers.{l}.mlp.experts.b2", "down"),
]

# Tensors a checkpoint may carry that inference does not use; fp8 scales of non-expert linears
# are read by the rule that dequantizes their weight (moe/models/quant_weights.py).
IGNORED = [re.compile(p) for p in (r".*rotary_emb\.inv_freq", r"model\.layers\.\d+\.self_attn\.rotary_emb\..*",
                                   r".*\.weight_scale_inv")]


def rules_for(architecture: str) -> list[Rule]:
    if architecture.startswith("Deepseek"):
        return MLA_ATTENTION + COMMON + STACKED_EXPERTS + MTP
    if architecture == "GptOssForCausalLM":
        return GQA_ATTENTION + GPT_OSS_EXPERTS + COMMON
    if architecture == "Qwen3MoeForCausalLM":  # and the MTP-style heads moe distill --student mtp trains for it
        return GQA_ATTENTION + COMMON + STACKED_EXPERTS + MTP
    return GQA_ATTENTION + COMMON + STACKED_EXPERTS


def map_name(rules: list[Rule], name: str) -> Target | None:
    for r in rules:
        t = r.apply(name)
        if t is not None:
            return t
    return None
