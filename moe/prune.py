"""``moe prune``: drop each MoE layer's least useful routed experts and write a smaller checkpoint.

Usefulness is measured, not guessed: calibration prompts run through the engine and every MoE layer
keeps the ``keep`` experts with the highest score. Three scores:

* ``freq``: tokens routed to the expert (``record_expert_counts=True``, :meth:`moe.LLM.expert_counts`);
* ``reap`` (REAP, router-weighted expert activation pruning): the mean, over the calibration tokens
  routed to the expert, of its router weight times the norm of its output, ``mean_t g_e(x_t) ||E_e(x_t)||``
  -- an expert that is picked often but contributes little to the layer's output ranks low;
* ``recon`` (layer-wise reconstruction, the criterion of Lu et al. 2024, "Not All Experts are Equal",
  which searches every subset): starting from all experts, each layer drops, one at a time, the expert
  whose removal changes the layer's routed output least over the calibration tokens (squared error of
  the weighted sum of expert outputs, the router restricted to the experts left as the pruned router
  is); an expert scores by how late it goes, so the ``keep`` best are the set left at ``keep``. It
  judges experts together (two experts that do the same job: one of them goes), where ``freq`` and
  ``reap`` score each alone. On the default model the greedy order kept the sets an exhaustive
  search over every subset keeps, at 6 and at 4 of 8 (docs/speculative.md). Cost: every expert runs
  on every kept calibration token (up to ``RECON_TOKENS`` a layer, within ``RECON_BYTES``), and about
  ``E^2 / 2`` subsets are tried a layer: for models with tens of experts, not hundreds
  (``RECON_MAX_EXPERTS``).

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


SCORES = ("freq", "reap", "recon")
RECON_TOKENS = 32768  # calibration rows a layer the recon score keeps at most (the first ones) ...
RECON_BYTES = 1 << 30  # ... and as many as keep all layers' inputs, and one layer's expert outputs, in this
RECON_MAX_EXPERTS = 64


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
        raise ValueError(f"--score {score!r}: choose {score_names()}")
    llm = LLM(str(model), dtype=dtype, record_expert_counts=True)
    layers = llm.engine.runner.model.sparse_layers()
    recorder = ReapRecorder(layers) if score == "reap" else ReconRecorder(layers) if score == "recon" else None
    try:
        outs = llm.generate(list(prompts), SamplingParams(max_tokens=1, temperature=0))
    finally:
        if recorder is not None:
            recorder.remove()
    bad = [o.error for o in outs if o.error]
    if bad:
        raise ValueError(f"calibration prompt rejected: {bad[0]}")
    counts = llm.expert_counts()
    if recorder is None:
        return counts, counts
    if not torch.equal(recorder.counts_LE, counts.to(torch.int64)):  # a step bypassed the MoE modules' forward
        raise RuntimeError(f"--score {score} saw other tokens than the engine routed; calibrate on prompts of 2+ "
                           "tokens")
    return recorder.scores(), counts


def score_names() -> str:
    """The scores, for messages: ``freq, reap or recon``."""
    return f"{', '.join(SCORES[:-1])} or {SCORES[-1]}"


class _LayerHooks:
    """Forward pre-hooks on the engine's MoE layers (one process: every expert local), removed by :meth:`remove`:
    a subclass's ``_hook(i)`` for layer ``i``."""

    score = ""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        if not layers:
            raise ValueError("the model has no MoE layers to score")
        if not all(layer.dispatcher.is_local for layer in layers):
            raise ValueError(f"--score {self.score} runs on one process (every expert local); drop --sharding")
        self.handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class ReapRecorder(_LayerHooks):
    """Accumulates REAP sums on the engine's MoE layers through forward pre-hooks: each layer's input is
    routed again (:func:`routing.route`, as the layer does) and every routed row run through that
    expert alone, unweighted, to read ``||E_e(x)||``."""

    score = "reap"

    def __init__(self, layers: Sequence[torch.nn.Module]):
        E = layers[0].router_cfg.num_experts if layers else 0
        self.sums_LE = torch.zeros(len(layers), E, dtype=torch.float64)
        self.counts_LE = torch.zeros(len(layers), E, dtype=torch.int64)
        super().__init__(layers)

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


class ReconRecorder(_LayerHooks):
    """Keeps each MoE layer's calibration inputs through forward pre-hooks (the first
    :data:`RECON_TOKENS` rows a layer, fewer where :data:`RECON_BYTES` would not hold them; every routed
    row counted), then ranks the layer's experts by greedy elimination (:func:`elimination_ranks`)."""

    score = "recon"

    def __init__(self, layers: Sequence[torch.nn.Module], max_tokens: int = RECON_TOKENS):
        if not layers:
            raise ValueError("the model has no MoE layers to score")
        E = layers[0].router_cfg.num_experts
        if E > RECON_MAX_EXPERTS:
            raise ValueError(f"--score recon tries ~E^2/2 expert subsets a layer: {E} experts are too many "
                             f"(at most {RECON_MAX_EXPERTS}); use --score reap")
        D = layers[0].gate.weight.shape[1]
        # (inputs kept in the model's dtype for every layer; every expert's float32 output for one layer)
        elem = layers[0].gate.weight.element_size()
        max_tokens = min(max_tokens, RECON_BYTES // (len(layers) * D * elem), RECON_BYTES // (E * D * 4))
        self.layers, self.max_tokens = list(layers), max_tokens
        self.inputs: list[list[torch.Tensor]] = [[] for _ in layers]
        self.counts_LE = torch.zeros(len(layers), E, dtype=torch.int64)
        super().__init__(layers)

    def _hook(self, i: int):
        from routing import route

        def hook(layer: torch.nn.Module, args: tuple) -> None:
            x_TD = args[0]
            ids_TK = route(layer.gate(x_TD), layer.router_cfg, layer.e_score_correction_bias)[1]
            self.counts_LE[i] += torch.bincount(ids_TK.flatten(), minlength=self.counts_LE.shape[1]).cpu()
            room = self.max_tokens - sum(len(x) for x in self.inputs[i])
            if room > 0:
                self.inputs[i].append(x_TD[:room].detach().clone())
        return hook

    def scores(self) -> torch.Tensor:
        """Each expert's elimination rank per layer (higher: kept longer)."""
        return torch.stack([elimination_ranks(layer, torch.cat(xs)) for layer, xs in zip(self.layers, self.inputs)])


def elimination_ranks(layer: torch.nn.Module, x_TD: torch.Tensor) -> torch.Tensor:
    """Greedy backward elimination of one MoE layer's routed experts over the rows ``x_TD``: while more
    than ``top_k`` are left, drop the one whose removal moves the layer's routed output (float32 weighted
    sum of the experts' outputs, routed by :func:`routing.route` over the logits of the experts left, as
    the pruned model routes) least in squared error from the full layer's; ``[E]`` ranks: the step an
    expert went at (0 first), ``E`` for the ``top_k`` never dropped."""
    from routing import route

    cfg, bias = layer.router_cfg, layer.e_score_correction_bias
    E, K, T = cfg.num_experts, cfg.top_k, x_TD.shape[0]
    with torch.no_grad():
        logits_TE = layer.gate(x_TD).float()
        # every expert's output for every row: the rows repeated, grouped by expert as the experts take them
        y_ETD = layer.experts(x_TD.repeat(E, 1), torch.full((E,), T, dtype=torch.int64)).float().view(E, T, -1)

        def routed(left: list[int]) -> torch.Tensor:
            idx = torch.tensor(left)
            w_TK, ids_TK = route(logits_TE[:, idx], cfg, None if bias is None else bias[idx])
            return torch.einsum("tk,tkd->td", w_TK.float(), y_ETD[idx[ids_TK], torch.arange(T).unsqueeze(1)])

        full_TD = routed(list(range(E)))
        left, ranks = list(range(E)), torch.full((E,), float(E))
        for step in range(E - K):
            errs = [float((routed([e for e in left if e != c]) - full_TD).square().sum()) for c in left]
            gone = left[errs.index(min(errs))]
            left.remove(gone)
            ranks[gone] = step
    return ranks


def pruned_quality(reference: str | Path, pruned: str | Path, wins: torch.Tensor, dtype: str = "auto") -> dict:
    """Top-1 agreement of ``pruned`` with ``reference`` and both perplexities, teacher-forced over ``wins``
    (:func:`moe.distill_data.windows`), both run by our engine."""
    from . import LLM
    from .distill_data import agreement, engine_topk

    ref = engine_topk(LLM(str(reference), dtype=dtype), wins, 1)
    return agreement(ref, engine_topk(LLM(str(pruned), dtype=dtype), wins, 1)) | {"positions": int(ref.top1_NL.numel())}
