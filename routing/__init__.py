"""Routing: router logits -> (weights, expert ids) for every gating form we support."""
from .gating import RouterConfig, RoutingResult, expert_counts, route, top_k_ids

__all__ = ["RouterConfig", "RoutingResult", "route", "expert_counts", "top_k_ids"]
