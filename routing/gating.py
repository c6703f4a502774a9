"""Top-k gating, every form the supported families use, behind one interface.

``route(logits_TE, cfg) -> RoutingResult(weights_TK, ids_TK)``; shapes: T tokens, E experts,
K top-k. The router's linear projection lives in the model; this module only turns logits
into a choice of experts and mixing weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

import cpu_kernels

Scoring = Literal["softmax", "sigmoid"]


@dataclass(frozen=True)
class RouterConfig:
    """How one family picks experts.

    - ``scoring``: softmax or sigmoid over the router logits.
    - ``topk_before_softmax``: gpt-oss/ Switch style, softmax over the k selected logits only.
    - ``renormalize``: divide the selected weights by their sum (Mixtral, Qwen3 ``norm_topk_prob``).
    - ``num_groups``/``topk_groups``: DeepSeek group-limited selection; groups are ranked by the
      sum of their two best scores (``noaux_tc``) or their best score (``group_limited_greedy``).
    - ``use_correction_bias``: DeepSeek-V3 ``noaux_tc``; the bias shifts selection only, the
      mixing weights are the unbiased scores.
    - ``scaling_factor``: multiplies the final weights (``routed_scaling_factor``).
    """

    num_experts: int
    top_k: int
    scoring: Scoring = "softmax"
    topk_before_softmax: bool = False
    renormalize: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    use_correction_bias: bool = False
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"router top_k ({self.top_k}) must be in [1, num_experts={self.num_experts}]")
        if self.num_experts % self.num_groups:
            raise ValueError(f"num_experts ({self.num_experts}) is not divisible by n_group ({self.num_groups})")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"topk_group ({self.topk_groups}) must be in [1, n_group={self.num_groups}]")


class RoutingResult(NamedTuple):
    weights_TK: torch.Tensor  # float32
    ids_TK: torch.Tensor  # int64


def top_k_ids(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest along the last dim, largest first; of equal values the lower
    index first (a stable descending sort: ``torch.topk`` leaves that order to its algorithm). The
    C router (``cpu_kernels.route_select``) picks in the same order, so a choice that hangs on a tie
    -- frequent with bf16 logits -- is the same on every path."""
    return values.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def _mask_to_top_groups(scores_TE: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """Keep only experts of the ``topk_groups`` best groups; the rest get -inf."""
    T, E = scores_TE.shape
    grouped = scores_TE.view(T, cfg.num_groups, E // cfg.num_groups)
    if cfg.group_score == "top2_sum":
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    else:
        group_scores = grouped.max(dim=-1).values
    keep = top_k_ids(group_scores, cfg.topk_groups)  # [T, topk_groups]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(T, E)
    return scores_TE.masked_fill(~expert_mask, float("-inf"))


def route(logits_TE: torch.Tensor, cfg: RouterConfig, correction_bias_E: torch.Tensor | None = None) -> RoutingResult:
    logits = logits_TE.float()
    if cfg.topk_before_softmax:
        out = cpu_kernels.route_select(logits, "topk_softmax", cfg.top_k, None, 1, 1, True, False, 0.0,
                                       cfg.scaling_factor) \
            if logits.device.type == "cpu" else None  # (one C pass: the captured step's router computes the same)
        if out is not None and out[3] is None:
            return RoutingResult(out[0], out[1])
        ids = top_k_ids(logits, cfg.top_k)  # (or a NaN logit: torch's order of NaNs)
        weights = torch.softmax(logits.gather(1, ids), dim=-1)
        return RoutingResult(weights * cfg.scaling_factor, ids)

    if cfg.use_correction_bias and correction_bias_E is None:
        raise ValueError("router uses a correction bias but none was loaded (e_score_correction_bias)")
    if logits.device.type == "cpu":  # scoring and selection in one C pass (~12 torch ops per layer with groups)
        out = cpu_kernels.route_select(
            logits, cfg.scoring, cfg.top_k, correction_bias_E if cfg.use_correction_bias else None, cfg.num_groups,
            cfg.topk_groups, cfg.group_score == "top2_sum", cfg.renormalize,
            1e-20 if cfg.scoring == "sigmoid" else 0.0, cfg.scaling_factor)
        if out is not None:
            weights, ids, scores, tied = out
            if tied is not None:  # a NaN selection: torch's order of NaNs
                weights[tied], ids[tied] = _select(scores[tied], cfg, correction_bias_E)
            return RoutingResult(weights, ids)
    scores = torch.softmax(logits, dim=-1) if cfg.scoring == "softmax" else torch.sigmoid(logits)
    return RoutingResult(*_select(scores, cfg, correction_bias_E))


def _select(scores: torch.Tensor, cfg: RouterConfig, correction_bias_E: torch.Tensor | None):
    selection = scores
    if cfg.use_correction_bias:
        selection = scores + correction_bias_E.float()
    if cfg.num_groups > 1:
        selection = _mask_to_top_groups(selection, cfg)
    if cfg.top_k == 1 and not cfg.use_correction_bias:
        weights, ids = selection.max(dim=-1, keepdim=True)
    else:
        ids = top_k_ids(selection, cfg.top_k)
        weights = scores.gather(1, ids)
    if cfg.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if cfg.scoring == "sigmoid" else 0.0))
    return weights * cfg.scaling_factor, ids


def expert_counts(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: ``[E]`` int64 (statistics, load balancing)."""
    return torch.bincount(ids_TK.flatten(), minlength=num_experts)
