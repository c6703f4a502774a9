"""Grouped experts on packed weights: :class:`QuantGroupedExperts` is :class:`~experts.grouped.GroupedExperts`
on an :mod:`experts.formats` format -- same ``forward(x_RD, counts_e) -> y_RD``, ``owns``,
``weight_loader``, slots.

Parameters are the format's packed tensors, allocated from ``fmt.packed_specs`` and named
``<tensor>_w13`` / ``<tensor>_w2`` (``qweight_w13``, ``scales_w2``, ``weight_scale_inv_w13``,
``blocks_w2``, ...): ``w13 [e, 2F, D]`` holds gate rows then up rows, ``w2 [e, D, F]``. Every
packed tensor keeps the weight's rows (N) on its first per-expert dim (fp8 scales: row blocks),
so a gate or up shard of one expert is the first or second half of that dim and checkpoint
shards are placed without unpacking (:class:`ExpertTensors`, shared with :mod:`experts.offload`).

fp8 blocks and gate/up: when F is not a multiple of ``block_n``, a 128-row block of the stacked
w13 would hold gate and up rows with two different scales. The layer then uses blocks of
``g = gcd(F, block_n)`` rows (:func:`layer_format`) and repeats each checkpoint scale over the
g-row blocks it covers: exact, nothing is re-quantized.

After loading, :meth:`QuantGroupedExperts.post_load` builds the CPU compute layout once
(:func:`experts.quant_grouped.prepare_cpu`) and releases the packed tensors the layout does not
share; on CUDA (or ``backend="triton"``) the packed tensors feed ``fused_moe_quant_triton``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

import cpu_kernels

from .formats import Fp8BlockWeights, TensorSpec, WeightFormat
from .grouped import Activation, Backend, SlottedExperts
from .quant_grouped import CpuExpertWeights, Q4RowWeights, Q8RowWeights, grouped_swiglu_quant_torch, prepare_cpu

WEIGHTS = ("w13", "w2")


def layer_format(fmt: WeightFormat, intermediate: int) -> WeightFormat:
    """The format a layer stores ``fmt`` checkpoints in: ``fmt`` itself, except fp8 row blocks that
    would straddle gate and up (module docstring)."""
    if isinstance(fmt, Fp8BlockWeights) and intermediate % fmt.block_n:
        return Fp8BlockWeights(math.gcd(intermediate, fmt.block_n), fmt.block_k)
    return fmt


def tensor_nbytes(obj) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (tensors, containers, plain objects)."""
    seen: set[int] = set()
    total = 0

    def walk(o) -> None:
        nonlocal total
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif hasattr(o, "__dict__") and not isinstance(o, (type, nn.Module)):
            walk(vars(o))

    walk(obj)
    return total


class ExpertTensors:
    """One expert's tensors by role, and how a checkpoint tensor lands in them.

    Roles: ``w13 [2F, D]``, ``w2 [D, F]`` (model dtype) when ``fmt`` is None, else the packed
    ``<tensor>_w13`` / ``<tensor>_w2`` of :func:`layer_format` ``(fmt)``; plus ``b13 [2F]``,
    ``b2 [D]`` with biases. ``fmt`` is the checkpoint's format.
    """

    def __init__(self, hidden: int, intermediate: int, fmt: WeightFormat | None, dtype: torch.dtype, bias: bool):
        self.hidden, self.intermediate = hidden, intermediate
        self.checkpoint_fmt = fmt
        self.fmt = None if fmt is None else layer_format(fmt, intermediate)
        shapes = {"w13": (2 * intermediate, hidden), "w2": (hidden, intermediate)}
        self.specs: dict[str, TensorSpec] = {}
        for w, shape in shapes.items():
            if self.fmt is None:
                self.specs[w] = TensorSpec(shape, dtype)
                continue
            try:
                specs = self.fmt.packed_specs(shape)
            except ValueError as e:
                raise ValueError(f"experts {w} of shape {list(shape)} cannot be held as {self.fmt.name}: {e}") from e
            for t, spec in specs.items():
                self.specs[f"{t}_{w}"] = spec
        if bias:
            self.specs["b13"] = TensorSpec((2 * intermediate,), dtype)
            self.specs["b2"] = TensorSpec((hidden,), dtype)

    def register_roles(self, module: nn.Module, leading: tuple[int, ...] | None) -> dict[nn.Parameter, str]:
        """One parameter of ``module`` per role, ``[*leading, *spec.shape]`` (``leading=None``: empty,
        for tensors that stay in the checkpoint files), loaded by ``module.weight_loader``."""
        role_of: dict[nn.Parameter, str] = {}
        for role, spec in self.specs.items():
            shape = (0,) if leading is None else (*leading, *spec.shape)
            p = nn.Parameter(torch.empty(*shape, dtype=spec.dtype), requires_grad=False)
            p.weight_loader = module.weight_loader
            module.register_parameter(role, p)
            role_of[p] = role
        return role_of

    @staticmethod
    def weight_of(role: str) -> str:
        """``w13`` or ``w2``: the weight a role belongs to (``scales_w13`` -> ``w13``, ``b2`` -> ``w2``)."""
        return "w13" if role.endswith("13") else "w2"

    @staticmethod
    def shards_needed(role: str) -> tuple[set[str], ...]:
        """Alternative sets of shards that fill a role completely."""
        return ({"gate", "up"}, {"gate_up"}) if role.endswith("13") else ({"down"},)

    def packed(self, tensors: dict[str, torch.Tensor], weight: str) -> dict[str, torch.Tensor]:
        """The packed dict of ``weight`` (``w13``/``w2``) from tensors by role."""
        suffix = "_" + weight
        return {r[: -len(suffix)]: t for r, t in tensors.items() if r.endswith(suffix)}

    def _adapt_fp8_scale(self, role: str, loaded: torch.Tensor, shard_id: str) -> torch.Tensor:
        src, dst = self.checkpoint_fmt, self.fmt
        if not (role.startswith("weight_scale_inv") and isinstance(src, Fp8BlockWeights)
                and dst.block_n != src.block_n):
            return loaded
        rows = {"gate": self.intermediate, "up": self.intermediate, "gate_up": 2 * self.intermediate,
                "down": self.hidden}[shard_id]
        return loaded.repeat_interleave(src.block_n // dst.block_n, dim=-2)[..., : -(-rows // dst.block_n), :]

    def place(self, role: str, dst: torch.Tensor, loaded: torch.Tensor, shard_id: str, what: str) -> None:
        """Copy checkpoint tensor ``loaded`` (one expert) into ``dst`` (that expert's tensor of ``role``)."""
        if shard_id not in ("gate", "up", "down", "gate_up"):
            raise ValueError(f"unknown expert shard {shard_id!r}")
        if self.fmt is not None:
            loaded = self._adapt_fp8_scale(role, loaded, shard_id)
        if shard_id in ("gate", "up"):
            half = dst.shape[0] // 2
            dst = dst[:half] if shard_id == "gate" else dst[half:]
        if tuple(loaded.shape) != tuple(dst.shape):
            fix = "; check the checkpoint's group/block size against its quantization_config" \
                if self.fmt is not None and role not in ("b13", "b2") else ""
            raise ValueError(f"{what} ({role}, {shard_id}): checkpoint tensor has shape {list(loaded.shape)}, "
                             f"expected {list(dst.shape)}{fix}")
        if loaded.dtype != dst.dtype and not (loaded.is_floating_point() and dst.is_floating_point()
                                              and dst.dtype != torch.float8_e4m3fn):
            raise ValueError(f"{what} ({role}, {shard_id}): checkpoint tensor has dtype "
                             f"{str(loaded.dtype).removeprefix('torch.')}, expected "
                             f"{str(dst.dtype).removeprefix('torch.')}")
        dst.copy_(loaded)


class QuantGroupedExperts(SlottedExperts):
    """The experts of one MoE layer this process holds, packed in ``fmt`` (module docstring).

    Slots and the loader interface are those of :class:`~experts.grouped.GroupedExperts`: slot ``i``
    holds expert ``slot_experts[i]`` (default ``expert_start ..``); ``weight_loader(param, tensor,
    shard_id, expert_id)`` places one checkpoint tensor, ``expert_id=None`` meaning all experts
    stacked on dim 0.
    """

    has_forward_local = True

    def __init__(self, num_experts: int, hidden: int, intermediate: int, fmt: WeightFormat, *, bias: bool = False,
                 activation: Activation = Activation(), dtype: torch.dtype = torch.float32, expert_start: int = 0,
                 num_local_experts: int | None = None, backend: Backend = "auto",
                 slot_experts: Sequence[int] | None = None, intermediate_shard: tuple[int, int] = (0, 1)):
        super().__init__()
        if tuple(intermediate_shard) != (0, 1):
            raise NotImplementedError(f"{fmt.name} experts cannot be split by expert_tensor_parallel "
                                      f"({intermediate_shard[1]}) yet; use expert_parallel for quantized checkpoints")
        self._set_slots(num_experts, expert_start, num_local_experts, slot_experts)
        self.hidden, self.intermediate = hidden, intermediate
        self.activation = activation
        self.layout = ExpertTensors(hidden, intermediate, fmt, dtype, bias)
        self.fmt = self.layout.fmt
        self._role_of = self.layout.register_roles(self, (self.num_local,))
        self.backend = backend  # resolved against the weights' device
        self.b13 = getattr(self, "b13", None)
        self.b2 = getattr(self, "b2", None)
        self._cpu: tuple[CpuExpertWeights, CpuExpertWeights] | None = None
        self._token_plan: tuple = (None, None)  # (the layouts it was made for, cpu_kernels.QuantMoeToken)
        self._released = False

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str,
                      expert_id: int | None = None) -> None:
        role = self._role_of[param]
        if expert_id is None:
            if loaded.shape[0] != self.num_experts:
                raise ValueError(f"stacked experts {role}: {loaded.shape[0]} experts in the checkpoint, "
                                 f"{self.num_experts} in the model")
            for e in self.slot_experts:
                self.weight_loader(param, loaded[e], shard_id, e)
            return
        slot = self._slot_of.get(expert_id)
        if slot is not None:
            self.layout.place(role, param.data[slot], loaded, shard_id, f"expert {expert_id}")

    def packed(self, weight: str) -> dict[str, torch.Tensor]:
        """The packed tensors of ``w13`` or ``w2``, stacked over slots."""
        if self._released:
            raise RuntimeError("the packed expert tensors were released after the CPU compute layout was built; "
                               "set the experts backend before loading")
        return self.layout.packed(dict(self.named_parameters(recurse=False)), weight)

    def weight_nbytes(self) -> int:
        """Bytes held for this layer's experts: the packed parameters, or the CPU layout built from them."""
        params = sum(p.numel() * p.element_size() for p in self.parameters(recurse=False))
        return params + (sum(w.nbytes() for w in self._cpu) if self._cpu is not None else 0)

    def post_load(self) -> None:
        """Build the CPU compute layout once; drop the packed tensors it does not share."""
        super().post_load()
        if self.resolved_backend != "torch" or self._cpu is not None:
            return
        self._cpu = tuple(prepare_cpu(self.fmt, {k: v.detach() for k, v in self.packed(w).items()}) for w in WEIGHTS)
        for role, p in self.named_parameters(recurse=False):
            if role not in ("b13", "b2"):
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)  # the layout holds what it needs
        self._released = True

    def forward_token(self, x_1D: torch.Tensor, ids_K: torch.Tensor, weights_K: torch.Tensor,
                      shared: tuple[torch.Tensor, ...] | None = None,
                      residual: cpu_kernels.Residual | None = None, into: cpu_kernels.Outputs | None = None):
        """One token (decode at batch 1) through its experts in one C call on the C kernels' layouts
        (int8, fp8_block, int4, mxfp4) with the arithmetic of dispatch -> :meth:`forward` ->
        combine, plus a bf16 ``shared`` expert's ``(w13, w2)`` added and the ``residual`` tail, into
        ``into`` when given, rows of one sequence each as one (as :meth:`GroupedExperts.forward_token`);
        with biases and gpt-oss's clamped SwiGLU too. None: not applicable (other formats, experts
        elsewhere): dispatch instead."""
        plan = self.token_plan(shared) if x_1D.device.type == "cpu" else None
        return plan(x_1D, ids_K, weights_K, residual, into) if plan is not None else None

    def token_plan(self, shared: tuple[torch.Tensor, ...] | None = None) -> cpu_kernels.QuantMoeToken | None:
        """:meth:`forward_token`'s one C call for these layouts and ``shared`` expert, checked once
        per layout and shared expert (a captured step's are fixed; it calls the plan's kernel
        too), or None where that call does not apply."""
        w = self._one_call_layouts()
        if w is None:
            return None
        layouts, plan = self._token_plan
        if layouts is not self._cpu or not self._same_shared(plan.shared, shared):
            w13, w2 = w
            act = self.activation
            plan = cpu_kernels.QuantMoeToken(*w13.kernel, w13.token_args(), w2.token_args(), shared, self.b13, self.b2,
                                             act.alpha, act.limit)
            self._token_plan = (self._cpu, plan)
        return plan

    def forward_local(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                      shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Dispatch, experts and combine of a step (any number of rows: decode, verify and prompt
        chunks) in one C call on CPUs with AMX (:func:`cpu_kernels.amx_moe_packed`: 16 weight rows
        dequantized at a time for the tiles); one token through :meth:`forward_token`; None where
        that does not apply (then dispatch), and given a ``shared`` expert (not ``fuses_shared``)."""
        if shared is not None:
            return None
        if x_TD.shape[0] == 1:
            return self.forward_token(x_TD, ids_TK[0], weights_TK[0])
        w = self._one_call_layouts()
        if w is None:
            return None
        fmt, lut, gs, bn = w[0].kernel
        return cpu_kernels.amx_moe_packed(x_TD, ids_TK, weights_TK, fmt, lut, gs, bn, w[0].token_args(),
                                          w[1].token_args(), self.tile_extras())

    def _one_call_layouts(self) -> tuple | None:
        """The CPU layouts when the one-call C paths apply (C kernels' layouts, every expert here), else
        None."""
        if self.resolved_backend != "torch" or not self.holds_all:
            return None
        if self._cpu is None:
            self.post_load()
        w13, w2 = self._cpu
        if type(w13) is not type(w2) or not isinstance(w13, (Q8RowWeights, Q4RowWeights)):
            return None
        return w13, w2

    def forward(self, x_RD: torch.Tensor, counts_e: torch.Tensor) -> torch.Tensor:
        backend = self.resolved_backend
        if backend == "torch":
            if self._cpu is None:
                self.post_load()
            w13, w2 = self._cpu
            return grouped_swiglu_quant_torch(x_RD, counts_e.tolist(), w13, w2, self.fmt, self.b13, self.b2,
                                              self.activation)
        if backend == "triton":
            from .triton_quant import fused_moe_quant_triton

            ids_R = torch.repeat_interleave(torch.arange(self.num_local, device=x_RD.device), counts_e)
            ones = torch.ones(x_RD.shape[0], 1, dtype=torch.float32, device=x_RD.device)
            return fused_moe_quant_triton(x_RD, self.packed("w13"), self.packed("w2"), self.fmt, ones,
                                          ids_R.unsqueeze(1), b13_E2F=self.b13, b2_ED=self.b2,
                                          swiglu_limit=self.activation.limit, swiglu_alpha=self.activation.alpha)
        raise ValueError(f"experts backend {backend!r} has no {self.fmt.name} path: choose auto, torch or triton")
