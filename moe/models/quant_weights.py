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
                   and ``mlp.experts.down_proj.*``. With ``"modules": ["experts",
                   "linear"]`` (``moe quantize --all-linear``, int4/int8 only) the linear
                   layers :data:`PACKED_LINEAR` names are packed too, as
                   ``<source name>.{qweight,scales,zeros}`` (``self_attn.q_proj.qweight``,
                   ``lm_head.scales``, ...). Everything else is as in the source.
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

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from experts import GroupedExperts
from experts.formats import FORMATS, Fp8BlockWeights, Int4Weights, Int8Weights, Mxfp4Weights, WeightFormat, \
    format_from_config
from experts.offload import ExpertCache, OffloadedExperts
from experts.quant_layer import QuantGroupedExperts
from parallel import PackableWeight

from .weights import L, MOE, Rule, Target, map_name, rule

QUANT_METHOD = "moe_experts"  # ours (moe quantize)
PACKED_TENSORS = ("qweight", "scales", "zeros", "weight", "weight_scale_inv", "blocks")
# the layers ``--all-linear`` packs (module names of MoECausalLM): attention projections but MLA's
# kv_b_proj (read per head as W_UK / W_UV, not as a linear), dense MLPs, shared experts and the LM
# head (not when tied to the embedding); embeddings, norms, routers and shared-expert gates stay
PACKED_LINEAR = re.compile(r"lm_head|layers\.\d+\.(?:self_attn\.(?:qkv_proj|q_proj|q_a_proj|q_b_proj|"
                           r"kv_a_proj_with_mqa|o_proj)|mlp\.(?:shared_expert\.)?(?:gate_up_proj|down_proj))")
LINEAR_FORMATS = (Int4Weights, Int8Weights)  # what ops.PackedLinearWeight computes with
DEFAULT_EXPERT_CACHE = "2GiB"


@dataclass(frozen=True)
class ExpertsPlan:
    """How a model's routed experts are held: packed in ``fmt`` (None: the model dtype), and
    resident or offloaded behind ``cache`` (one cache shared by every layer)."""

    fmt: WeightFormat | None = None
    method: str | None = None  # the quant_method fmt was read from
    cache: ExpertCache | None = None
    linear: bool = False  # the PACKED_LINEAR layers are packed in fmt too (moe quantize --all-linear)


def read_quantization(hf: dict) -> tuple[str | None, WeightFormat | None]:
    """``(quant_method, format of the routed experts)`` from config.json; ``(None, None)`` when unquantized."""
    qc = hf.get("quantization_config")
    if not qc:
        return None, None
    method = qc.get("quant_method")
    if method == QUANT_METHOD:
        modules = packed_modules(qc)
        # "calibration" records how the codes were chosen (moe quantize --method); the layout is the format's
        fmt = format_from_config({k: v for k, v in qc.items() if k not in ("quant_method", "modules", "calibration")})
        if "linear" in modules and not isinstance(fmt, LINEAR_FORMATS):
            raise ValueError(f"quantization_config: modules {modules} with format {fmt.name}: packed linear layers "
                             "are int4 or int8")
        return method, fmt
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


def packed_modules(qc: dict) -> list[str]:
    """What our ``quantization_config`` says is packed: ``["experts"]`` or ``["experts", "linear"]``."""
    modules = list(qc.get("modules", ["experts"]))
    if modules not in (["experts"], ["experts", "linear"]):
        raise ValueError(f"quantization_config.modules={modules}: supported are ['experts'] (moe quantize) and "
                         "['experts', 'linear'] (moe quantize --all-linear)")
    return modules


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
    linear = method == QUANT_METHOD and "linear" in packed_modules(hf["quantization_config"])
    return ExpertsPlan(fmt, method, cache, linear)


def make_experts(plan: ExpertsPlan | None, num_experts: int, hidden: int, intermediate: int, **kw) -> nn.Module:
    """The experts module of one MoE layer: GroupedExperts' arguments, held as ``plan`` says."""
    if plan is None or (plan.fmt is None and plan.cache is None):
        return GroupedExperts(num_experts, hidden, intermediate, **kw)
    if plan.cache is not None:
        return OffloadedExperts(num_experts, hidden, intermediate, plan.cache, plan.fmt, **kw)
    return QuantGroupedExperts(num_experts, hidden, intermediate, plan.fmt, **kw)


def pack_linear_layers(model: nn.Module, plan: ExpertsPlan | None, tied_head: bool) -> None:
    """Before loading: the :data:`PACKED_LINEAR` layers of ``model`` (a MoECausalLM) hold their
    weights packed in ``plan.fmt`` when the checkpoint packs them (``plan.linear``); a tied head
    stays the embedding."""
    if plan is None or not plan.linear:
        return
    for name, mod in model.named_modules():
        if isinstance(mod, PackableWeight) and PACKED_LINEAR.fullmatch(name) and not (tied_head and name == "lm_head"):
            mod.pack(plan.fmt)


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


class PackedLinearRule:
    """A rule for the packed tensors of a :data:`PACKED_LINEAR` layer: ``<proj>.qweight`` (``scales``,
    ``zeros``) maps where ``rules`` map ``<proj>.weight``, onto the layer's parameter of that name."""

    def __init__(self, rules: list[Rule], tensor_names: tuple[str, ...]):
        self.rules = rules
        self.suffix = re.compile(r"(.*)\.(" + "|".join(tensor_names) + ")")

    def apply(self, name: str) -> Target | None:
        m = self.suffix.fullmatch(name)
        target = map_name(self.rules, m[1] + ".weight") if m else None
        if target is None or not target.param.endswith(".weight") or not PACKED_LINEAR.fullmatch(target.param[:-7]):
            return None
        if target.transform is not None:
            raise ValueError(f"{name}: this family transforms {m[1]}.weight at load, which packed codes cannot take")
        return replace(target, param=target.param[:-6] + m[2])


def checkpoint_rules(plan: ExpertsPlan | None, rules: list[Rule], model_dir: str | Path) -> list[Rule]:
    """``rules`` (the family's) with the rules ``plan``'s checkpoint layout adds in front."""
    if plan is None or plan.fmt is None:
        return rules
    extra = packed_expert_rules()
    if plan.linear:
        extra.append(PackedLinearRule(rules, plan.fmt.tensor_names))  # type: ignore[arg-type]  # a Rule-like
    if plan.method == "mxfp4":
        extra += GPT_OSS_MXFP4
    if plan.method == "fp8":
        extra.append(DequantFp8Rule(rules, model_dir, plan.fmt))  # type: ignore[arg-type]  # a Rule-like
    return extra + rules
