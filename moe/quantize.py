"""``moe quantize``: write a copy of a checkpoint whose routed experts are packed in a weight format.

The source is streamed: one tensor at a time is read from its memory-mapped file; expert
weights are brought to our layout by the family's name rules and transforms (``[N, K]`` rows,
gate then up), packed, and buffered until a shard of ``max_shard_bytes`` is written. Routers,
norms, embeddings, attention, dense MLPs and shared experts are copied unchanged. config.json
gains the ``quantization_config`` that :mod:`moe.models.quant_weights` reads back; the
tokenizer and other small files are copied. With a calibration text, the expert codes are chosen
by GPTQ or AWQ (:mod:`moe.calibrate`) instead of round-to-nearest, in the same layout. Output names (see that module):

- per-expert sources: ``model.layers.{l}.mlp.experts.{e}.{gate_proj|up_proj|down_proj}.{tensor}``
- stacked sources: ``model.layers.{l}.mlp.experts.{gate_up_proj|down_proj}.{tensor}``
- with ``all_linear`` (int4/int8): every linear layer ``PACKED_LINEAR`` names (attention, dense
  MLPs, shared experts, the LM head) as ``<source name without .weight>.{tensor}``, rounded to
  nearest (a calibration text chooses the experts' codes only)
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experts.formats import WeightFormat, expected_nbytes

from .calibrate import METHODS, Calibration, calibrate, pack_expert_weight
from .config import read_config_json
from .loader import checkpoint_files, iter_tensor_names
from .models import parse_config, rules_for
from .models.quant_weights import LINEAR_FORMATS, PACKED_LINEAR, QUANT_METHOD
from .models.weights import map_name

_EXPERT_PARAM = re.compile(r"layers\.(?P<l>\d+)\.mlp\.experts\.(?P<w>w13|w2)")
_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj", "gate_up": "gate_up_proj"}
INDEX = "model.safetensors.index.json"


@dataclass
class QuantizeReport:
    out: Path
    files: list[str] = field(default_factory=list)
    expert_tensors: int = 0  # source tensors packed
    linear_tensors: int = 0  # non-expert linear weights packed (all_linear)
    other_tensors: int = 0  # copied unchanged
    expert_bytes_in: int = 0
    expert_bytes_out: int = 0
    total_bytes_out: int = 0

    def as_dict(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "out"}, "out": str(self.out)}


def quantization_config(fmt: WeightFormat, calibration: Calibration | None = None, tokens: int = 0,
                        all_linear: bool = False) -> dict:
    modules = ["experts", "linear"] if all_linear else ["experts"]
    qc = {"quant_method": QUANT_METHOD, **fmt.to_config(), "modules": modules}
    if calibration is not None:  # provenance only: the packed layout is the format's either way
        qc["calibration"] = {"method": calibration.method, "tokens": tokens}
    return qc


def _pack_one(fmt: WeightFormat, w: torch.Tensor, layer: int, expert: int, shard: str, cal: Calibration) -> dict:
    """One expert's weight (``shard``: gate, up, gate_up [gate rows | up rows], down) packed by ``cal.method``."""
    st, s = cal.stats.get((layer, expert)), cal.down_scales.get((layer, expert))
    w = w.float()
    if shard == "down":
        H = st.h_h if st is not None else None
        if s is not None:  # awq: down's input channels times s, up's rows divided by s (exact in float)
            w, H = w * s, H / (s[:, None] * s[None, :])
    else:
        H = st.h_x if st is not None else None
        if s is not None and shard in ("up", "gate_up"):
            w = w.clone()
            w[-s.numel():] /= s[:, None]  # up rows (the second half of gate_up)
    return pack_expert_weight(fmt, w, cal.method, H)


def pack_experts(fmt: WeightFormat, w: torch.Tensor, layer: int, expert: int | None, shard: str,
                 cal: Calibration | None) -> dict:
    """A source expert tensor (one expert's, or stacked ``[E, N, K]`` when ``expert`` is None) packed."""
    if cal is None:
        return fmt.quantize(w)
    if expert is not None:
        return _pack_one(fmt, w, layer, expert, shard, cal)
    parts = [_pack_one(fmt, w[e], layer, e, shard, cal) for e in range(w.shape[0])]
    return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}


class _ShardWriter:
    """Buffers tensors and writes ``model-000NN.safetensors`` files of about ``max_bytes`` each."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.files: list[str] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.weight_map or name in self.buf:
            raise ValueError(f"two source tensors map to the output name {name}")
        self.buf[name] = t.contiguous()
        self.buf_bytes += t.nbytes
        if self.buf_bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buf:
            return
        fname = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.buf, str(self.out / fname), metadata={"format": "pt"})
        self.files.append(fname)
        self.weight_map.update(dict.fromkeys(self.buf, fname))
        self.total += self.buf_bytes
        self.buf, self.buf_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def prepare_output_dir(src: Path, out: Path, overwrite: bool) -> None:
    """An empty ``out`` for a rewritten copy of ``src`` (``overwrite``: clear a non-empty one)."""
    if out.resolve() == src.resolve():
        raise ValueError("--out must differ from --model")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --force")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def copy_side_files(src: Path, out: Path) -> None:
    """The tokenizer, generation config, chat template, ... (all but weights and config.json)."""
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name not in ("config.json", INDEX):
            shutil.copy2(p, out / p.name)


def _packs_linear(target, num_layers: int, tied_head: bool) -> bool:
    """Whether ``--all-linear`` packs the tensor mapped to ``target``: a PACKED_LINEAR weight of the
    decoder (not of a multi-token-prediction layer past ``num_layers``, loaded unpacked; not a head
    tied to the embedding)."""
    if target is None or not target.param.endswith(".weight") or target.transform is not None:
        return False
    if tied_head and target.param == "lm_head.weight":
        return False
    layer = re.match(r"layers\.(\d+)\.", target.param)
    return PACKED_LINEAR.fullmatch(target.param[:-7]) is not None and (layer is None or int(layer[1]) < num_layers)


def quantize_checkpoint(src: str | Path, out: str | Path, fmt: WeightFormat, *, max_shard_bytes: int = 2 << 30,
                        overwrite: bool = False, progress: bool = False, method: str = "rtn",
                        calibration: list[list[int]] | None = None, all_linear: bool = False) -> QuantizeReport:
    """Write ``src`` with its routed experts packed in ``fmt`` to ``out`` (module docstring).

    ``method`` rtn rounds to nearest; awq and gptq (:mod:`moe.calibrate`) need ``calibration``,
    token-id prompts run through the float model to see what each expert's inputs look like.
    ``all_linear`` packs the other linear layers too (llama.cpp Q4_K_M's choice; int4 / int8)."""
    if all_linear and not isinstance(fmt, LINEAR_FORMATS):
        raise ValueError(f"--all-linear packs attention, dense MLPs and the LM head as int4 or int8 (the formats "
                         f"ops.linear computes with); {fmt.name} packs experts only: use --format int4 or int8, "
                         "or drop --all-linear")
    src, out = Path(src), Path(out)
    hf = read_config_json(src)
    if hf.get("quantization_config"):
        raise ValueError(f"{src} is already quantized ({hf['quantization_config'].get('quant_method')}); "
                         "quantize an unquantized (bf16/fp16/fp32) checkpoint")
    cfg = parse_config(hf)
    if not cfg.num_experts:
        raise ValueError(f"{src} ({cfg.architecture}) has no routed experts to quantize")
    F, D = cfg.moe_intermediate_size, cfg.hidden_size
    for what, shape in (("gate/up [2F, D]", (2 * F, D)), ("down [D, F]", (D, F))):
        try:
            fmt.packed_specs(shape)
        except ValueError as e:
            raise ValueError(f"{fmt.name} cannot hold this model's expert {what} = {list(shape)}: {e}") from e
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown: choose {', '.join(METHODS)}")
    if (method == "rtn") != (calibration is None):
        raise ValueError(f"method {method} needs a calibration text (moe quantize --calibration FILE)"
                         if calibration is None else
                         "a calibration text was given with method rtn, which uses none: choose awq or gptq")
    prepare_output_dir(src, out, overwrite)
    cal = calibrate(str(src), calibration, fmt, method) if calibration is not None else None

    rules = rules_for(cfg.architecture)
    report = QuantizeReport(out)
    writer = _ShardWriter(out, max_shard_bytes)
    names = list(iter_tensor_names(checkpoint_files(src)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(names), desc="Quantizing", unit="tensor", leave=False)
    for reader, name in names:
        target = map_name(rules, name)
        m = _EXPERT_PARAM.fullmatch(target.param) if target is not None else None
        tensor = reader.get(name)
        if m is None and all_linear and _packs_linear(target, cfg.num_layers, cfg.tie_word_embeddings):
            try:
                packed = fmt.quantize(tensor)
            except ValueError as e:
                raise ValueError(f"{name} {list(tensor.shape)}: {e}; drop --all-linear") from e
            for t, v in packed.items():
                writer.add(name.removesuffix("weight") + t, v)
            report.linear_tensors += 1
        elif m is None:
            writer.add(name, tensor)
            report.other_tensors += 1
        else:
            w = target.transform(tensor) if target.transform is not None else tensor
            prefix = f"model.layers.{m['l']}.mlp.experts."
            prefix += f"{_PROJ[target.shard_id]}." if target.expert_id is None else \
                f"{target.expert_id}.{_PROJ[target.shard_id]}."
            packed = pack_experts(fmt, w, int(m['l']), target.expert_id, target.shard_id, cal)
            for t, v in packed.items():
                writer.add(prefix + t, v)
            report.expert_tensors += 1
            report.expert_bytes_in += tensor.nbytes
            report.expert_bytes_out += expected_nbytes(fmt, tuple(w.shape))
        del tensor
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    writer.close()
    report.files, report.total_bytes_out = writer.files, writer.total

    tokens = sum(map(len, calibration)) if calibration is not None else 0
    hf = dict(hf, quantization_config=quantization_config(fmt, cal, tokens, all_linear))
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    copy_side_files(src, out)
    return report
