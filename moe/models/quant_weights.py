"""Quantized and offloaded experts at load time: the format from checkpoint metadata, the extra
name rules, and the experts module each MoE layer gets.

The format comes from ``quantization_config`` in config.json, never from file names:

=================  ==========================================================================
``moe_experts``    ours, written by ``moe quantize``: ``{"quant_method": "moe_experts",
                   "format": "int4", "group_size": 128, "symmetric": true, "scale_dtype":
                   "bfloat16", "modules": ["experts"]}``. Routed-expert tensors are
                   ``<expert weight>.<packed tensor>`` in our layout: per expert
                   ``mlp.experts.3.gate_proj.qweight`` (and ``up_proj``, ``down_proj``), or
                   stacked ``mlp.experts.gate_up_proj.scales [E, 2F, G]`` (gate rows, then up)
                   and ``mlp.experts.down_proj.*``. Everything else is as in the source.
``fp8``            DeepSeek-V3: ``{"quant_method": "fp8", "weight_block_size": [128, 128]}``.
                   Every linear of the layers is ``<proj>.weight`` float8_e4m3fn plus
                   ``<proj>.weight_scale_inv`` fp32 per 128x128 block. Routed experts stay
                   packed (``fp8_block``); the other linears (attention, dense MLP, shared
                   experts) are dequantized at load to the model dtype.
``mxfp4``          gpt-oss: ``{"quant_method": "mxfp4"}``. Experts are
                   ``mlp.experts.gate_up_proj_blocks [E, 2F, D/32, 16]`` /
                   ``_scales [E, 2F, D/32]`` with gate and up rows interleaved (gate_0, up_0,
                   gate_1, ...; de-interleaved at load) and ``down_proj_blocks/_scales``.
=================  ==========================================================================
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from experts import GroupedExperts
from experts.formats import FORMATS, Fp8BlockWeights, Mxfp4Weights, WeightFormat, format_from_config
from experts.offload import ExpertCache, OffloadedExperts
from experts.quant_layer import QuantGroupedExperts

from .weights import L, MOE, Rule, Target, map_name, rule

QUANT_METHOD = "moe_experts"  # ours (moe quantize)
PACKED_TENSORS = ("qweight", "scales", "zeros", "weight", "weight_scale_inv", "blocks")
DEFAULT_EXPERT_CACHE = "2GiB"


@dataclass(frozen=True)
class ExpertsPlan:
    """How a model's routed experts are held: packed in ``fmt`` (None: the model dtype), and
    resident or offloaded behind ``cache`` (one cache shared by every layer)."""

    fmt: WeightFormat | None = None
    method: str | None = None  # the quant_method fmt was read from
    cache: ExpertCache | None = None


def read_quantization(hf: dict) -> tuple[str | None, WeightFormat | None]:
    """``(quant_method, format of the routed experts)`` from config.json; ``(None, None)`` when unquantized."""
    qc = hf.get("quantization_config")
    if not qc:
        return None, None
    method = qc.get("quant_method")
    if method == QUANT_METHOD:
        modules = qc.get("modules", ["experts"])
        if list(modules) != ["experts"]:
            raise ValueError(f"quantization_config.modules={modules}: only routed experts (['experts']) are supported")
        # "calibration" records how the codes were chosen (moe quantize --method); the layout is the format's
        return method, format_from_config({k: v for k, v in qc.items()
                                           if k not in ("quant_method", "modules", "calibration")})
    if method == "fp8":
        block = qc.get("weight_block_size")
        if not block or len(block) != 2:
            raise ValueError("quantization_config: fp8 without weight_block_size (per-tensor fp8) is not supported; "
                             "only DeepSeek-V3-style block-scaled fp8 ([128, 128] blocks) is")
        if qc.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"quantization_config.fmt={qc['fmt']!r}: only e4m3 fp8 weights are supported")
        return method, Fp8BlockWeights(int(block[0]), int(block[1]))
    if method == "mxfp4":
        return method, Mxfp4Weights()
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported: this engine reads "
                     f"{QUANT_METHOD} (moe quantize), fp8 (block-scaled, DeepSeek-V3) and mxfp4 (gpt-oss)")


def check_expert_options(quantization: str | None, offload_experts: bool, expert_cache: str | int | None) -> None:
    """Validate the engine's expert options (EngineConfig.__post_init__)."""
    from ..config import parse_bytes

    if quantization not in (None, "auto", *FORMATS):
        raise ValueError(f"quantization={quantization!r} is unknown: choose auto or one of {', '.join(FORMATS)}")
    if expert_cache is not None:
        if not offload_experts:
            raise ValueError("expert_cache is the size of the offloaded-expert cache: set offload_experts=True too")
        if parse_bytes(expert_cache) <= 0:
            raise ValueError(f"expert_cache={expert_cache!r} must be positive, e.g. '2GiB'")


def plan_experts(hf: dict, quantization: str | None = None, offload_experts: bool = False,
                 expert_cache: str | int | None = None, prefetch: bool = True) -> ExpertsPlan | None:
    """The plan for a checkpoint (its config.json ``hf``) and the engine options; None: plain experts."""
    from ..config import parse_bytes

    method, fmt = read_quantization(hf)
    if quantization not in (None, "auto"):
        if fmt is None:
            raise ValueError(f"quantization={quantization!r} but the checkpoint is not quantized (no "
                             f"quantization_config in config.json): write a quantized copy first with "
                             f"`moe quantize --model DIR --format {quantization} --out DIR-{quantization}`")
        if fmt.name != quantization:
            raise ValueError(f"quantization={quantization!r} but the checkpoint's quantization_config says "
                             f"{fmt.name}; leave quantization unset to use the checkpoint's format")
    cache = None
    if offload_experts:
        cache = ExpertCache(parse_bytes(expert_cache if expert_cache is not None else DEFAULT_EXPERT_CACHE),
                            prefetch=prefetch)
    if fmt is None and cache is None:
        return None
    return ExpertsPlan(fmt, method, cache)


def make_experts(plan: ExpertsPlan | None, num_experts: int, hidden: int, intermediate: int, **kw) -> nn.Module:
    """The experts module of one MoE layer: GroupedExperts' arguments, held as ``plan`` says."""
    if plan is None or (plan.fmt is None and plan.cache is None):
        return GroupedExperts(num_experts, hidden, intermediate, **kw)
    if plan.cache is not None:
        return OffloadedExperts(num_experts, hidden, intermediate, plan.cache, plan.fmt, **kw)
    return QuantGroupedExperts(num_experts, hidden, intermediate, plan.fmt, **kw)


def expert_cache(model: nn.Module) -> ExpertCache | None:
    """The offloaded-expert cache of a model (its stats: ``expert_cache(llm.engine.model).stats``)."""
    for m in model.modules():
        if isinstance(m, OffloadedExperts):
            return m.cache
    return None


# ---------------------------------------------------------------------------------------------
# name rules


def packed_expert_rules(tensor_names: tuple[str, ...] = PACKED_TENSORS) -> list[Rule]:
    """Per-expert (``experts.3.gate_proj.qweight``) and stacked (``experts.gate_up_proj.qweight``) packed tensors."""
    t = "(?P<t>" + "|".join(tensor_names) + ")"
    x = "layers.{l}.mlp.experts.{t}_"
    return [
        rule(L + MOE + r"experts\.(?P<e>\d+)\.(?:w1|gate_proj)\." + t, x + "w13", "gate"),
        rule(L + MOE + r"experts\.(?P<e>\d+)\.(?:w3|up_proj)\." + t, x + "w13", "up"),
        rule(L + MOE + r"experts\.(?P<e>\d+)\.(?:w2|down_proj)\." + t, x + "w2", "down"),
        rule(L + MOE + r"experts\.gate_up_proj\." + t, x + "w13", "gate_up"),
        rule(L + MOE + r"experts\.down_proj\." + t, x + "w2", "down"),
    ]


def _deinterleave_rows(t: torch.Tensor) -> torch.Tensor:
    """gpt-oss rows alternate gate_0, up_0, gate_1, ... (dim 1 of ``[E, 2F, ...]``): make them [gate | up]."""
    return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)


GPT_OSS_MXFP4 = [
    rule(L + r"mlp\.experts\.gate_up_proj_(?P<t>blocks|scales)", "layers.{l}.mlp.experts.{t}_w13", "gate_up",
         _deinterleave_rows),
    rule(L + r"mlp\.experts\.down_proj_(?P<t>blocks|scales)", "layers.{l}.mlp.experts.{t}_w2", "down"),
]


class DequantFp8Rule:
    """A rule for fp8 block-scaled linears outside the routed experts: ``<proj>.weight`` maps
    where ``rules`` map it, with a transform that multiplies in its ``<proj>.weight_scale_inv``
    (read from the checkpoint; the loader ignores the scale tensors themselves)."""

    def __init__(self, rules: list[Rule], model_dir: str | Path, fmt: Fp8BlockWeights):
        from ..loader import checkpoint_files, tensor_locations

        self.rules, self.fmt = rules, fmt
        self._where = tensor_locations(checkpoint_files(model_dir))
        self._files: dict[Path, object] = {}

    def apply(self, name: str) -> Target | None:
        scale_name = name + "_scale_inv"
        if not name.endswith(".weight") or scale_name not in self._where:
            return None
        target = map_name(self.rules, name)
        if target is None:
            return None
        return replace(target, transform=self._dequantizer(name, target.transform))

    def _dequantizer(self, name: str, then: Callable | None) -> Callable[[torch.Tensor], torch.Tensor]:
        def dequant(w: torch.Tensor) -> torch.Tensor:
            if w.dtype != torch.float8_e4m3fn:
                raise ValueError(f"{name} has a weight_scale_inv but dtype {str(w.dtype).removeprefix('torch.')}, "
                                 "not float8_e4m3fn")
            try:
                packed = self.fmt.from_tensors({"weight": w, "weight_scale_inv": self._read(name + "_scale_inv")})
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from e
            out = self.fmt.dequantize(packed)
            return then(out) if then is not None else out

        return dequant

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._where[name]
        if path not in self._files:
            self._files[path] = safe_open(str(path), framework="pt")
        return self._files[path].get_tensor(name)


def checkpoint_rules(plan: ExpertsPlan | None, rules: list[Rule], model_dir: str | Path) -> list[Rule]:
    """``rules`` (the family's) with the rules ``plan``'s checkpoint layout adds in front."""
    if plan is None or plan.fmt is None:
        return rules
    extra = packed_expert_rules()
    if plan.method == "mxfp4":
        extra += GPT_OSS_MXFP4
    if plan.method == "fp8":
        extra.append(DequantFp8Rule(rules, model_dir, plan.fmt))  # type: ignore[arg-type]  # a Rule-like
    return extra + rules
