"""``moe prune``: drop each MoE layer's least-used routed experts and write a smaller checkpoint.

Usage is measured, not guessed: calibration prompts run through the engine with
``record_expert_counts=True`` (:meth:`moe.LLM.expert_counts`), and every MoE layer keeps its
``keep`` most-routed experts. The output is the same Hugging Face layout with fewer experts:
per-expert tensors (``...experts.{e}...``) of dropped experts are left out and the kept ones
renumbered ``0..keep-1`` in their original order; stacked expert tensors (gpt-oss) and the
router's rows (weight, bias, DeepSeek's correction bias) are sliced to the kept experts; the
config's expert count becomes ``keep``. transformers loads the result as it loads the original.

The router still normalizes over what is left (softmax over ``keep`` logits, or top-k weights
renormalized as before), as in the expert-pruning literature's simplest form; how much quality
that costs is measured by the caller (docs/quantization.md reports it for the default model).
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


def choose_experts(counts: torch.Tensor, keep: int) -> list[list[int]]:
    """Per MoE layer (rows of ``counts [layers, E]``), the ``keep`` most-routed experts, ascending;
    ties go to the lower id."""
    out = []
    for row in counts.tolist():
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        out.append(sorted(order[:keep]))
    return out


def prune_checkpoint(src: str | Path, out: str | Path, keep: int, counts: torch.Tensor, *,
                     max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> PruneReport:
    """Write ``src`` keeping ``keep`` routed experts per MoE layer, chosen by ``counts``
    (``[moe_layers, num_experts]``, e.g. :meth:`moe.LLM.expert_counts`)."""
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
    from . import LLM, SamplingParams

    llm = LLM(str(model), dtype=dtype, record_expert_counts=True)
    outs = llm.generate(list(prompts), SamplingParams(max_tokens=1, temperature=0))
    bad = [o.error for o in outs if o.error]
    if bad:
        raise ValueError(f"calibration prompt rejected: {bad[0]}")
    return llm.expert_counts()
