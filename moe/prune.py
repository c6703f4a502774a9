"""``moe prune``: drop each MoE layer's least useful routed experts and write a smaller checkpoint.

Usefulness is measured, not guessed: calibration prompts run through the engine and every MoE layer
keeps the ``keep`` experts with the highest score. Two scores:

* ``freq``: tokens routed to the expert (``record_expert_counts=True``, :meth:`moe.LLM.expert_counts`);
* ``reap`` (REAP, router-weighted expert activation pruning): the mean, over the calibration tokens
  routed to the expert, of its router weight times the norm of its output, ``mean_t g_e(x_t) ||E_e(x_t)||``
  -- an expert that is picked often but contributes little to the layer's output ranks low.
 The output is the same Hugging Face layout with fewer experts:
per-expert tensors (``...experts.{e}...``) of dropped experts are left out and the kept ones
renumbered ``0..keep-1`` in their original order; stacked expert tensors (gpt-oss) and the
router's rows (weight, bias, DeepSeek's correction bias) are sliced to the kept experts; the
config's expert count becomes ``keep``. transformers loads the result as it loads the original.

The router still normalizes over what is left (softmax over ``keep`` logits, or top-k weights
renormalized as before), as in the expert-pruning literature's simplest form; how much quality
that costs is measured by the caller (docs/speculative.md reports it for the default model); ``--refit``
(:mod:`moe.refit`) then solves the kept experts' down projections to make up part of it, without training.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .config import read_config_json
from .loader import checkpoint_files, iter_tensor_names
from .models import parse_config
from .quantize import _ShardWriter, copy_side_files, prepare_output_dir

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_PER_EXPERT = re.compile(r"^(?P<pre>.*\.experts\.)(?P<e>\d+)(?P<post>\..+)$")
_STACKED = re.compile(r"^.*\.experts\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?$")  # no expert index
_ROUTER = re.compile(r"^.*\.(gate|router)\.(weight|bias|e_score_correction_bias)$")


@dataclass
class PruneReport:
    out: Path
    kept: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept expert ids (ascending)
    tensors_dropped: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


SCORES = ("freq", "reap")


def choose_experts(counts: torch.Tensor, keep: int) -> list[list[int]]:
    """Per MoE layer (rows of ``counts [layers, E]``: routed tokens or REAP scores), the ``keep``
    highest-scoring experts, ascending; ties go to the lower id."""
    out = []
    for row in counts.tolist():
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        out.append(sorted(order[:keep]))
    return out


def prune_checkpoint(src: str | Path, out: str | Path, keep: int, counts: torch.Tensor, *,
                     max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> PruneReport:
    """Write ``src`` keeping ``keep`` routed experts per MoE layer, chosen by ``counts``
    (``[moe_layers, num_experts]``: :meth:`moe.LLM.expert_counts` or :func:`calibration_scores`)."""
    src, out = Path(src), Path(out)
    hf = read_config_json(src)
    if hf.get("quantization_config"):
        raise ValueError(f"{src} is quantized: prune the unquantized checkpoint, then `moe quantize` the result")
    cfg = parse_config(hf)
    E = cfg.num_experts
    if not E:
        raise ValueError(f"{src} ({cfg.architecture}) has no routed experts to prune")
    if not cfg.top_k <= keep < E:
        raise ValueError(f"--keep-experts {keep}: choose from {cfg.top_k} (experts per token) to {E - 1} "
                         f"(this model has {E} experts)")
    if cfg.router.num_groups > 1:
        raise ValueError(f"{cfg.architecture} routes within {cfg.router.num_groups} expert groups (n_group): "
                         "pruning would break the groups; not supported")
    moe_layers = [i for i, sparse in enumerate(cfg.sparse_layers) if sparse]
    if tuple(counts.shape) != (len(moe_layers), E):
        raise ValueError(f"expert counts of shape {tuple(counts.shape)}, expected ({len(moe_layers)}, {E}): "
                         "record them on this model")
    prepare_output_dir(src, out, overwrite)

    report = PruneReport(out, kept=dict(zip(moe_layers, choose_experts(counts, keep))))
    new_id = {layer: {e: i for i, e in enumerate(kept)} for layer, kept in report.kept.items()}
    writer = _ShardWriter(out, max_shard_bytes)
    for reader, name in iter_tensor_names(checkpoint_files(src)):
        t = reader.get(name)
        report.bytes_in += t.nbytes
        m = _LAYER.search(name)
        layer = int(m.group(1)) if m else None
        if layer in report.kept and ".shared_expert" not in name:
            per = _PER_EXPERT.match(name)
            if per is not None:
                e = int(per["e"])
                if e not in new_id[layer]:
                    report.tensors_dropped += 1
                    continue
                name = f"{per['pre']}{new_id[layer][e]}{per['post']}"
            elif (_STACKED.match(name) or _ROUTER.match(name)) and t.dim() >= 1 and t.shape[0] == E:
                t = t.index_select(0, torch.tensor(report.kept[layer]))
        writer.add(name, t)
        report.bytes_out += t.nbytes
    writer.close()

    hf = dict(hf)
    for key in EXPERT_COUNT_KEYS:
        if key in hf:
            hf[key] = keep
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / "pruned_experts.json").write_text(json.dumps(
        {"source": str(src), "keep": keep, "kept_experts": {str(k): v for k, v in report.kept.items()}}, indent=1))
    copy_side_files(src, out)
    return report


def calibration_counts(model: str | Path, prompts: Sequence[str | dict], dtype: str = "auto") -> torch.Tensor:
    """Tokens per expert and layer over ``prompts`` (their prompt tokens: one generated token each)."""
    return calibration_scores(model, prompts, "freq", dtype)[0]


def calibration_scores(model: str | Path, prompts: Sequence[str | dict], score: str = "freq",
                       dtype: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``[moe_layers, num_experts]`` scores over the prompt tokens of ``prompts`` (module docstring), and the
    routed-token counts (the ``freq`` scores) of the same run."""
    from . import LLM, SamplingParams

    if score not in SCORES:
        raise ValueError(f"--score {score!r}: choose {' or '.join(SCORES)}")
    llm = LLM(str(model), dtype=dtype, record_expert_counts=True)
    reap = ReapRecorder(llm.engine.runner.model.sparse_layers()) if score == "reap" else None
    try:
        outs = llm.generate(list(prompts), SamplingParams(max_tokens=1, temperature=0))
    finally:
        if reap is not None:
            reap.remove()
    bad = [o.error for o in outs if o.error]
    if bad:
        raise ValueError(f"calibration prompt rejected: {bad[0]}")
    counts = llm.expert_counts()
    if reap is None:
        return counts, counts
    if not torch.equal(reap.counts_LE, counts.to(torch.int64)):  # a step bypassed the MoE modules' forward
        raise RuntimeError("REAP saw other tokens than the engine routed; calibrate on prompts of 2+ tokens")
    return reap.scores(), counts


class ReapRecorder:
    """Accumulates REAP sums on the engine's MoE layers through forward pre-hooks: each layer's input is
    routed again (:func:`routing.route`, as the layer does) and every routed row run through that
    expert alone, unweighted, to read ``||E_e(x)||``."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        if not layers:
            raise ValueError("the model has no MoE layers to score")
        if not all(layer.dispatcher.is_local for layer in layers):
            raise ValueError("--score reap runs on one process (every expert local); drop --sharding")
        E = layers[0].router_cfg.num_experts
        self.sums_LE = torch.zeros(len(layers), E, dtype=torch.float64)
        self.counts_LE = torch.zeros(len(layers), E, dtype=torch.int64)
        self.handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, i: int):
        from routing import route

        def hook(layer: torch.nn.Module, args: tuple) -> None:
            x_TD = args[0]
            weights_TK, ids_TK = route(layer.gate(x_TD), layer.router_cfg, layer.e_score_correction_bias)
            E, K = layer.router_cfg.num_experts, ids_TK.shape[1]
            flat_R = ids_TK.flatten()
            order_R = torch.argsort(flat_R, stable=True)  # rows grouped by expert, as the experts take them
            counts_E = torch.bincount(flat_R, minlength=E)
            with torch.no_grad():
                y_RD = layer.experts(x_TD[order_R // K], counts_E)
            contrib_R = weights_TK.flatten()[order_R].double() * y_RD.double().norm(dim=-1)
            self.sums_LE[i].index_add_(0, flat_R[order_R].cpu(), contrib_R.cpu())
            self.counts_LE[i] += counts_E.cpu()
        return hook

    def scores(self) -> torch.Tensor:
        """Mean router weight x output norm per expert (0 for an expert no calibration token reached)."""
        return (self.sums_LE / self.counts_LE.clamp(min=1)).float()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def pruned_quality(reference: str | Path, pruned: str | Path, wins: torch.Tensor, dtype: str = "auto") -> dict:
    """Top-1 agreement of ``pruned`` with ``reference`` and both perplexities, teacher-forced over ``wins``
    (:func:`moe.distill_data.windows`), both run by our engine."""
    from . import LLM
    from .distill_data import agreement, engine_topk

    ref = engine_topk(LLM(str(reference), dtype=dtype), wins, 1)
    return agreement(ref, engine_topk(LLM(str(pruned), dtype=dtype), wins, 1)) | {"positions": int(ref.top1_NL.numel())}
