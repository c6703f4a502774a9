"""Calibrated packing of routed experts (``moe quantize --calibration TEXT --method awq|gptq``).

A calibration text runs through the float model; for every MoE layer and expert the inputs of
the tokens *routed to that expert* are summarised as ``H = X^T X`` (the second moment the
quantization error of ``y = x W^T`` is weighed by: the output error of a weight error ``d`` on
those tokens is ``d^T H d`` per row) and their mean ``|x|`` per input channel -- for gate/up the
layer's hidden states, for down the expert's own SwiGLU outputs. The methods then choose, per
expert, codes in the *same* packed format, so the loader and kernels are unchanged:

- ``rtn``: round to nearest (no calibration).
- ``awq`` (activation-aware, after Lin et al. 2023): down_proj's input channels are scaled by
  ``s = mean|h|^alpha`` (normalised), ``alpha`` searched on a grid for the least output error;
  the scale is folded exactly into up_proj's rows (``h = silu(g) * u`` is linear in ``u``), so
  salient channels get finer codes at no runtime cost. Then every weight's group ranges are
  clipped, per row and group, to the fraction (1.0 down to 0.5) with the least output error.
  gate/up inputs are the shared, normed hidden state: a per-expert scale there could only fold
  into the norm every expert and the router share, so gate/up get the clipping only.
- ``gptq`` (Frantar et al. 2022): columns are rounded one at a time, largest ``diag H`` first
  (act-order), and each rounding error is spread over the not yet rounded columns through the
  inverse Hessian (1% damping); each group's scale and zero point come from the original weights
  (static groups), so the codes stay in column order in the packed tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from experts.formats import WeightFormat, _IntGroupWeights

METHODS = ("rtn", "awq", "gptq")
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 ... 0.5
AWQ_ALPHAS = tuple(i / 20 for i in range(21))  # 0 (plain RTN) ... 1


@dataclass
class ExpertStats:
    """Routed-input statistics of one expert: ``x`` feeds gate/up, ``h`` feeds down."""

    tokens: int = 0
    h_x: torch.Tensor | None = None  # [D, D] sum of x x^T
    h_h: torch.Tensor | None = None  # [F, F] sum of h h^T
    abs_h: torch.Tensor | None = None  # [F] sum of |h|

    def add(self, x: torch.Tensor, h: torch.Tensor) -> None:
        x, h = x.float(), h.float()
        if self.h_x is None:
            self.h_x, self.h_h, self.abs_h = x.t() @ x, h.t() @ h, h.abs().sum(0)
        else:
            self.h_x += x.t() @ x
            self.h_h += h.t() @ h
            self.abs_h += h.abs().sum(0)
        self.tokens += x.shape[0]


@dataclass
class Calibration:
    """What ``quantize_checkpoint`` needs per ``(layer, expert)``: the statistics, and for awq the
    down_proj input scales (folded into up_proj's rows)."""

    method: str
    stats: dict[tuple[int, int], ExpertStats] = field(default_factory=dict)
    down_scales: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


def collect_stats(model_dir: str, prompts: list[list[int]]) -> tuple[dict[tuple[int, int], ExpertStats], object]:
    """Run ``prompts`` (token ids) through the float32 model; per ``(layer, expert)`` the statistics
    of the tokens routed to it. Also returns the engine's model (its float expert weights)."""
    from experts.grouped import GroupedExperts, fused_swiglu
    from routing import route

    from . import LLM, SamplingParams
    from .models.layers import SparseMoE

    llm = LLM(model_dir, dtype="float32", kv_cache_memory=1 << 26)
    model = llm.engine.model
    stats: dict[tuple[int, int], ExpertStats] = {}

    def hook_for(layer: int, moe: SparseMoE):
        experts = moe.experts
        if not isinstance(experts, GroupedExperts) or not experts.holds_all or experts.shards != 1:
            raise ValueError("calibration needs the float model with every expert in one process")

        @torch.no_grad()
        def hook(module, args):
            x_TD = args[0]
            _, ids_TK = route(moe.gate(x_TD), moe.router_cfg, moe.e_score_correction_bias)
            for e in ids_TK.unique().tolist():
                x = x_TD[(ids_TK == e).any(-1)].float()
                g = x @ experts.w13[e].float().t()
                if experts.b13 is not None:
                    g = g + experts.b13[e].float()
                h = fused_swiglu(g, experts.activation)
                stats.setdefault((layer, e), ExpertStats()).add(x, h)
        return hook

    handles = [layer.mlp.register_forward_pre_hook(hook_for(i, layer.mlp))
               for i, layer in enumerate(model.layers) if isinstance(layer.mlp, SparseMoE)]
    try:
        llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=1, temperature=0))
    finally:
        for h in handles:
            h.remove()
    return stats, model


def calibrate(model_dir: str, prompts: list[list[int]], fmt: WeightFormat, method: str) -> Calibration:
    """Statistics for ``method`` (awq: the down_proj scales too) on ``prompts``."""
    if method not in METHODS or method == "rtn":
        raise ValueError(f"calibrated method {method!r} is unknown: choose awq or gptq (rtn needs no calibration)")
    if not isinstance(fmt, _IntGroupWeights):
        raise ValueError(f"--method {method} packs int4/int8 group-wise formats, not {fmt.name}")
    if not prompts:
        raise ValueError("the calibration text is empty: give a file with text like your workload's")
    stats, model = collect_stats(model_dir, prompts)
    cal = Calibration(method, stats)
    if method == "awq":
        from .models.layers import SparseMoE

        for i, layer in enumerate(model.layers):
            moe = layer.mlp
            if not isinstance(moe, SparseMoE):
                continue
            ex = moe.experts
            plain = ex.b13 is None and ex.activation.limit is None and ex.activation.alpha is None
            for e in range(ex.num_experts):
                st = stats.get((i, e))
                if plain and st is not None:
                    cal.down_scales[(i, e)] = awq_scale(fmt, ex.w2[e].float(), st)
    return cal


def output_error(d_NK: torch.Tensor, H_KK: torch.Tensor) -> torch.Tensor:
    """``sum over rows of d H d^T``: the squared output error of weight error ``d`` on the calibration tokens."""
    return ((d_NK @ H_KK) * d_NK).sum()


def awq_scale(fmt: _IntGroupWeights, w_NK: torch.Tensor, st: ExpertStats) -> torch.Tensor:
    """Per input channel scale ``s [K]`` for ``w``: the grid alpha whose ``Q(w * s) / s`` has the least output error."""
    mean_abs = (st.abs_h / max(st.tokens, 1)).clamp(min=1e-8)
    best, best_err = torch.ones_like(mean_abs), None
    for alpha in AWQ_ALPHAS:
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centred around 1 (the codes only see ratios)
        q = fmt.dequantize(fmt.quantize(w_NK * s)) / s
        err = output_error(q - w_NK, st.h_h)
        if best_err is None or err < best_err:
            best, best_err = s, err
    return best


def awq_clip(fmt: _IntGroupWeights, w_NK: torch.Tensor, H_KK: torch.Tensor) -> torch.Tensor:
    """Per row and group the clip ratio (``CLIP_RATIOS``) with the least output error ``[N, G]``."""
    gs, K = fmt.group_size, w_NK.shape[-1]
    # the group's diagonal block of H: groups are quantized independently, cross-group terms ignored
    G = -(-K // gs)
    Hp = H_KK.new_zeros(G * gs, G * gs)
    Hp[:K, :K] = H_KK
    Hb = torch.stack([Hp[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(G)])  # [G, gs, gs]
    best_err = best = None
    for r in CLIP_RATIOS:
        clip = torch.full((w_NK.shape[0], G), r)
        d = fmt.dequantize(fmt.quantize(w_NK, clip)) - w_NK.float()
        dg = torch.nn.functional.pad(d, (0, G * gs - K)).unflatten(-1, (G, gs))
        err = torch.einsum("ngi,gij,ngj->ng", dg, Hb, dg)
        if best is None:
            best, best_err = clip, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, clip, best), torch.where(better, err, best_err)
    return best


def gptq(fmt: _IntGroupWeights, w_NK: torch.Tensor, H_KK: torch.Tensor, damp: float = 0.01,
         act_order: bool = True) -> dict:
    """GPTQ's error-compensating rounding of ``w`` under ``H`` into ``fmt``'s packed tensors.

    ``act_order``: columns with the largest input energy (``diag H``) are rounded first, while the
    most columns remain to absorb their error; each group's grid is then taken from the original
    weights up front ("static groups"), as the codes of a group are no longer rounded together."""
    W = w_NK.float().clone()
    N, K = W.shape
    gs = fmt.group_size
    H = H_KK.double().clone()
    dead = torch.diag(H) == 0  # channels no calibration token used: nothing to compensate with
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        grids = [fmt.group_grid(W[:, g:g + gs][:, None, :]) for g in range(0, K, gs)]
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        grids, perm = [], torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    codes = torch.empty(N, K)
    # lazy batch updates (GPTQ's blocks of 128 columns); natural order keeps whole groups in a block,
    # as each group's grid is taken there from its already-updated columns
    block = gs * max(1, 128 // gs)
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        W1, Hinv1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        E1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            if act_order:
                scale, zero = grids[int(perm[b0 + i]) // gs]
            elif i % gs == 0:
                scale, zero = fmt.group_grid(W1[:, i:i + gs][:, None, :])  # [N, 1]
                grids.append((scale, zero))
            q = fmt.codes(W1[:, i, None, None], scale, zero)[:, 0, 0]
            codes[:, perm[b0 + i]] = q
            value = (q if zero is None else q - zero[:, 0]) * scale[:, 0].float()
            err = (W1[:, i] - value) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            E1[:, i] = err
        W[:, b1:] -= E1 @ Hinv[b0:b1, b1:]
    scales = torch.cat([s for s, _ in grids], 1)
    return fmt.pack(codes, scales, None if grids[0][1] is None else torch.cat([z for _, z in grids], 1))


def pack_expert_weight(fmt: WeightFormat, w_NK: torch.Tensor, method: str, H_KK: torch.Tensor | None) -> dict:
    """One expert's ``[N, K]`` weight packed by ``method`` (RTN where the expert got no calibration tokens)."""
    if method == "rtn" or H_KK is None:
        return fmt.quantize(w_NK)
    if method == "awq":
        return fmt.quantize(w_NK, awq_clip(fmt, w_NK, H_KK))
    return gptq(fmt, w_NK, H_KK)
