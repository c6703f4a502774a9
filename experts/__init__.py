"""Experts: grouped-GEMM expert computation over expert-major rows (torch, Triton, MegaBlocks)."""
from .grouped import Activation, GroupedExperts, fused_swiglu, grouped_swiglu_torch, swiglu_mlp_cpu
from .reference import moe_reference, swiglu

__all__ = ["Activation", "GroupedExperts", "fused_swiglu", "grouped_swiglu_torch", "moe_reference", "swiglu",
           "swiglu_mlp_cpu"]
