"""``moe prune --refit``: after pruning, refit the kept experts' down projections to the unpruned layers.

Pruning changes an MoE layer's output wherever a token's routing touched a dropped expert: the router
now picks among the kept experts. What the layer adds to the residual stream is linear in the kept
experts' down projections ``W_e``: ``y(x) = sum_e g_e(x) W_e a_e(x)`` with the pruned router's weights
``g_e`` and each expert's SwiGLU activations ``a_e``. So one least-squares solve per layer finds the
``W_e`` that bring it closest to the unpruned layer's output on the same inputs, over calibration tokens.
A ridge term pulls the solution toward the weights pruning kept (``ridge`` times the mean of the normal
matrix' diagonal), so that a few thousand tokens do not overfit; its objective at the solution is at most
its value at the original weights, so the refit never raises the calibration error it minimises.
Layers are refit in order, each on the inputs the layers before it, already refit, produce (as GPTQ
quantizes layer after layer). A shared expert, which pruning leaves alone, is the same in both layers
and drops out of the difference.

It runs in float32 on transformers' modules, as ``moe distill`` trains its students, on the families whose
experts are stacked SwiGLU weights without biases (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek); the
routing is :func:`routing.route` with the pruned checkpoint's router, checked on the first batch against
the modules' own output (a family whose layer computes otherwise is refused, not refit wrongly). The
normal matrix has ``(experts x moe_intermediate)^2`` entries per layer, so this is for models up to a few
thousand such rows (the default model: 6 x 256); larger ones are refused with that size named.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from routing import route

from .config import read_config_json
from .models import parse_config
from .prune import _LAYER, _PER_EXPERT

MAX_ROWS = 8192  # experts x moe_intermediate of one layer: the normal matrix is this squared, in float64


@dataclass
class LayerRefit:
    layer: int
    tokens: int
    error_before: float  # |y_pruned - y_unpruned|^2 / |y_unpruned|^2 over the calibration tokens (routed part)
    error_after: float


def moe_blocks(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Layer index -> the layer's MoE block (its ``mlp`` when that holds ``experts``)."""
    blocks = ((i, getattr(layer, "mlp", None)) for i, layer in enumerate(model.model.layers))
    return {i: block for i, block in blocks if hasattr(block, "experts")}


def _check_experts(block: torch.nn.Module, what: str) -> None:
    ex = block.experts
    linear_gate = isinstance(getattr(getattr(block, "gate", None), "weight", None), torch.Tensor)
    stacked = all(isinstance(getattr(ex, n, None), torch.Tensor) for n in ("gate_up_proj", "down_proj"))
    no_bias = all(getattr(ex, n, None) is None for n in ("gate_up_proj_bias", "down_proj_bias"))
    if not (linear_gate and stacked and ex.gate_up_proj.dim() == 3 and no_bias):
        raise ValueError(f"--refit: {what}'s MoE layers are not a linear gate over stacked SwiGLU experts without "
                         "biases; refit supports the Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek layouts")


def _activations(block: torch.nn.Module, e: int, x_TD: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x_TD, block.experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.silu(gate) * up


def _route(block: torch.nn.Module, router, x_TD: torch.Tensor) -> torch.Tensor:
    """Dense ``[T, E]`` routing weights (0 where an expert is not picked)."""
    bias = getattr(block.gate, "e_score_correction_bias", None)
    weights_TK, ids_TK = route(F.linear(x_TD, block.gate.weight), router, bias)
    return torch.zeros(x_TD.shape[0], router.num_experts).scatter_(1, ids_TK, weights_TK.float())


def routed_output(block: torch.nn.Module, router, x_TD: torch.Tensor) -> torch.Tensor:
    g_TE = _route(block, router, x_TD)
    y = torch.zeros_like(x_TD)
    for e in range(router.num_experts):
        rows = g_TE[:, e].nonzero().squeeze(1)
        if len(rows):
            y[rows] += g_TE[rows, e, None] * F.linear(_activations(block, e, x_TD[rows]), block.experts.down_proj[e])
    return y


def _block_output(block: torch.nn.Module, x_TD: torch.Tensor) -> torch.Tensor:
    out = block(x_TD[None])
    return (out[0] if isinstance(out, tuple) else out).reshape(x_TD.shape)


def _block_inputs(model: torch.nn.Module, block: torch.nn.Module, wins: torch.Tensor, batch: int) -> torch.Tensor:
    """The block's inputs over ``wins`` (the forward stops at the block)."""
    got = []

    class _Stop(Exception):
        pass

    def hook(module, args):
        got.append(args[0].reshape(-1, args[0].shape[-1]))
        raise _Stop

    handle = block.register_forward_pre_hook(hook)
    try:
        for s in range(0, len(wins), batch):
            try:
                model(input_ids=wins[s:s + batch])
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(got)


def refit_layer(t_block, s_block, t_router, s_router, x_TD: torch.Tensor, ridge: float, chunk: int = 8192,
                check: bool = False) -> tuple[float, float]:
    """Refit ``s_block``'s down projections in place on inputs ``x_TD``; (relative error before, after)."""
    E, (D, F_) = s_router.num_experts, s_block.experts.down_proj.shape[1:]
    chunks = [x_TD[s:s + chunk] for s in range(0, len(x_TD), chunk)]
    want = [routed_output(t_block, t_router, x) for x in chunks]
    if check:  # each layer's own forward minus its routed part: the same shared expert, if any
        x, have = chunks[0], routed_output(s_block, s_router, chunks[0])
        shared_t, shared_s = _block_output(t_block, x) - want[0], _block_output(s_block, x) - have
        if not torch.allclose(shared_t, shared_s, rtol=1e-4, atol=1e-4 * float(want[0].abs().max())):
            raise ValueError("--refit: this family's MoE layer does not compute what refit models "
                             "(routing or experts differ); not refit")
    AtA = torch.zeros(E * F_, E * F_, dtype=torch.float64)
    AtY = torch.zeros(E * F_, D, dtype=torch.float64)
    YtY = 0.0
    for x, y in zip(chunks, want):
        g_TE = _route(s_block, s_router, x)
        feats = torch.cat([g_TE[:, e:e + 1] * _activations(s_block, e, x) for e in range(E)], 1).double()
        AtA += feats.T @ feats
        AtY += feats.T @ y.double()
        YtY += float(y.double().pow(2).sum())
    W0 = s_block.experts.down_proj.transpose(1, 2).reshape(E * F_, D).double()
    lam = ridge * float(AtA.diagonal().mean())
    W = torch.linalg.solve(AtA + lam * torch.eye(E * F_, dtype=torch.float64), AtY + lam * W0)
    s_block.experts.down_proj.copy_(W.float().reshape(E, F_, D).transpose(1, 2))

    def error(W: torch.Tensor) -> float:  # |feats W - y|^2 / |y|^2 from the sums above
        return (float((W * (AtA @ W)).sum()) - 2 * float((W * AtY).sum()) + YtY) / max(YtY, 1e-30)

    return error(W0), error(W)


def refit_checkpoint(reference: str | Path, pruned: str | Path, wins: torch.Tensor, *, ridge: float = 1.0,
                     batch: int = 16, log=None) -> list[LayerRefit]:
    """Refit ``pruned`` (a :func:`moe.prune.prune_checkpoint` output of ``reference``) in place on token windows
    ``wins [N, L]``, layer after layer; its down-projection tensors are rewritten in their files and dtype."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ValueError("--refit runs the models through transformers: pip install 'transformers>=5'") from None

    if ridge <= 0:
        raise ValueError(f"--refit-ridge {ridge}: must be > 0")
    pruned = Path(pruned)
    t_router, s_cfg = parse_config(read_config_json(reference)).router, parse_config(read_config_json(pruned))
    s_router, rows = s_cfg.router, s_cfg.router.num_experts * s_cfg.moe_intermediate_size
    if rows > MAX_ROWS:
        raise ValueError(f"--refit: {rows} rows (experts x moe_intermediate) per layer, more than {MAX_ROWS}: "
                         "its normal matrix would not fit; prune without --refit")
    teacher = AutoModelForCausalLM.from_pretrained(str(reference), dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(str(pruned), dtype=torch.float32).eval()
    t_blocks, s_blocks = moe_blocks(teacher), moe_blocks(student)
    if not s_blocks or t_blocks.keys() != s_blocks.keys():
        raise ValueError(f"--refit: {pruned} and {reference} do not have the same MoE layers")
    for i in s_blocks:
        _check_experts(t_blocks[i], str(reference))
        _check_experts(s_blocks[i], str(pruned))
    report = []
    with torch.no_grad():
        for n, i in enumerate(s_blocks):
            x = _block_inputs(student, s_blocks[i], wins, batch)
            before, after = refit_layer(t_blocks[i], s_blocks[i], t_router, s_router, x, ridge, check=n == 0)
            report.append(LayerRefit(i, len(x), before, after))
            if log is not None:
                log(f"layer {i}: relative error of its routed output {before:.4f} -> {after:.4f} over {len(x)} tokens")
    _rewrite_down_projections(pruned, {i: b.experts.down_proj for i, b in s_blocks.items()})
    return report


def _rewrite_down_projections(ckpt: Path, down_eDF: dict[int, torch.Tensor]) -> None:
    """Replace each ``layers.{i}...experts.{e}.(down_proj|w2).weight`` of the checkpoint's files in place."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .loader import checkpoint_files

    done, files = set(), []
    for f in checkpoint_files(ckpt):
        with safe_open(str(f), "pt") as r:
            meta, tensors = r.metadata(), {n: r.get_tensor(n) for n in r.keys()}
        changed = False
        for name, t in tensors.items():
            layer, per = _LAYER.search(name), _PER_EXPERT.match(name)
            if layer and per and per["post"] in (".down_proj.weight", ".w2.weight") and int(layer[1]) in down_eDF \
                    and ".shared_expert" not in name:
                new = down_eDF[int(layer[1])][int(per["e"])]
                if new.shape != t.shape:
                    raise ValueError(f"--refit: {name} is {tuple(t.shape)} in {f.name}, refit {tuple(new.shape)}")
                tensors[name], changed = new.to(t.dtype).contiguous(), True
                done.add((int(layer[1]), int(per["e"])))
        if changed:
            files.append((f, tensors, meta))
    want = {(i, e) for i, w in down_eDF.items() for e in range(w.shape[0])}
    if done != want:
        raise ValueError(f"--refit: {ckpt} does not store per-expert down projections under the names refit "
                         f"knows (found {len(done)} of {len(want)}); its files were left as they were")
    for f, tensors, meta in files:
        save_file(tensors, str(f), metadata=meta)
