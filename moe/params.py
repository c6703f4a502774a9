"""Parameter and memory accounting from a config alone (the model is built on the meta device)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # per token: everything but the routed experts, plus top_k of them per MoE layer
    routed_experts: int
    embedding: int  # input embedding + LM head (counted in total and active)

    def as_dict(self) -> dict:
        return {"total_params": self.total, "active_params": self.active,
                "routed_expert_params": self.routed_experts, "embedding_params": self.embedding}


def build_meta_model(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16):
    from parallel import get_parallel_state, init_single_process

    from .models import MoECausalLM

    try:
        get_parallel_state()
    except RuntimeError:
        init_single_process()
    with torch.device("meta"):
        return MoECausalLM(cfg, dtype)


def count_params(cfg: ModelConfig) -> ParamCounts:
    model = build_meta_model(cfg)
    total = routed = embed = 0
    active_routed = 0
    for name, p in model.named_parameters():  # tied weights appear once
        n = p.numel()
        total += n
        if ".mlp.experts." in name:
            routed += n
            active_routed += n * cfg.top_k // max(cfg.num_experts, 1)
        if name.startswith(("embed_tokens", "lm_head")):
            embed += n
    return ParamCounts(total, total - routed + active_routed, routed, embed)
