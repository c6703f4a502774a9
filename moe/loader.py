"""Stream a Hugging Face safetensors checkpoint into a model, one tensor at a time.

Peak memory is the model plus one tensor: each tensor is read from its (memory-mapped) file,
copied into its parameter's slice by the parameter's own ``weight_loader``, and dropped.
Tensors of experts this process does not own are never read.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from experts.grouped import SlottedExperts
from parallel import PackableWeight, default_weight_loader

from .config import ModelConfig
from .models.families import mtp_config
from .models.mtp import MTPModel, published_tensor_shapes
from .models.quant_weights import checkpoint_rules
from .models.weights import IGNORED, Rule, map_name, rules_for


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e}); re-download it") from e
        files = [d / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {d} is incomplete: shard(s) {', '.join(missing)} listed in "
                                    f"{index.name} are missing; download them or fix the index")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {d}: the engine loads safetensors checkpoints "
                                "(convert .bin/.pt weights with transformers' save_pretrained)")
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {path}: {e}. The file is truncated or corrupt; re-download or re-save it") from e


class _ShardReader:
    """One safetensors file, memory-mapped. Tensors read from the map stay resident while it is
    open, so the map is dropped and re-opened every ``recycle_bytes``: resident memory stays at
    the model plus at most that much, not twice the model."""

    def __init__(self, path: Path, recycle_bytes: int = 64 << 20):
        self.path, self.recycle_bytes, self.read = path, recycle_bytes, 0
        self.f = _open(path)

    def keys(self) -> list[str]:
        return list(self.f.keys())

    def get(self, name: str) -> torch.Tensor:
        try:
            t = self.f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read tensor {name} from {self.path}: {e}; "
                             "the file is truncated or corrupt") from e
        self.read += t.numel() * t.element_size()
        return t

    def recycle_if_due(self) -> None:
        """Call once the last tensor read has been copied out and dropped."""
        if self.read >= self.recycle_bytes:
            self.f = _open(self.path)
            self.read = 0


def tensor_locations(files: list[Path]) -> dict[str, Path]:
    """Every tensor name of a checkpoint and the file holding it (headers only)."""
    return {name: path for path in files for name in _open(path).keys()}


def iter_tensor_names(files: list[Path]) -> Iterator[tuple[_ShardReader, str]]:
    for path in files:
        reader = _ShardReader(path)
        for name in reader.keys():
            yield reader, name


def decoder_param(num_layers: int) -> Callable[[str], str | None]:
    """The default ``rename`` of :func:`load_weights`: every parameter but those of layers from
    ``num_layers`` on (DeepSeek-V3's multi-token-prediction layers, loaded by :func:`load_mtp`)."""
    def keep(param: str) -> str | None:
        m = re.match(r"layers\.(\d+)\.", param)
        return None if m and int(m.group(1)) >= num_layers else param

    return keep


def load_weights(model: nn.Module, model_dir: str | Path, rules: list[Rule], num_layers: int,
                 tied_embeddings: bool = False, progress: bool = False,
                 rename: Callable[[str], str | None] | None = None) -> None:
    """Fill ``model``'s parameters from the checkpoint. ``rules`` name each tensor's parameter in the
    decoder stack's naming; ``rename`` maps that name to ``model``'s, or to None for a tensor of
    another model in the same checkpoint (default: :func:`decoder_param` of ``num_layers``)."""
    rename = rename or decoder_param(num_layers)
    params = dict(model.named_parameters(remove_duplicate=False))
    # routed experts load through their modules' interface (owns, weight_loader, add_source, post_load)
    all_experts = [m for m in model.modules() if isinstance(m, SlottedExperts)]
    experts_of = {id(p): m for m in all_experts for p in m.parameters(recurse=False)}
    files = checkpoint_files(model_dir)
    loaded: set[str] = set()
    expert_parts: dict[str, set[tuple[int | None, str]]] = defaultdict(set)
    unexpected: list[str] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(_open(p).keys()) for p in files), desc="Loading weights", unit="tensor",
                   leave=False)
    for reader, name in iter_tensor_names(files):
        path = reader.path
        if bar is not None:
            bar.update(1)
        target = map_name(rules, name)
        if target is None:
            if not any(p.fullmatch(name) for p in IGNORED):
                unexpected.append(name)
            continue
        pname = rename(target.param)
        if pname is None:
            continue  # e.g. DeepSeek-V3's multi-token-prediction layer when loading the decoder
        if pname == "lm_head.weight" and tied_embeddings:
            continue
        param = params.get(pname)
        if param is None:
            unexpected.append(name)
            continue
        experts = experts_of.get(id(param))
        if experts is not None:
            if target.expert_id is not None and not experts.owns(target.expert_id):
                continue
            if experts.offloaded:  # read on demand from the file (experts/offload.py)
                experts.add_source(param, path, name, target.shard_id, target.expert_id, target.transform)
                loaded.add(pname)
                continue
        tensor = reader.get(name)
        if target.transform is not None:
            tensor = target.transform(tensor)
        try:
            if experts is not None:
                experts.weight_loader(param, tensor, target.shard_id, target.expert_id)
            elif getattr(param, "weight_loader", None) is not None:  # a sharded layer's (parallel/)
                param.weight_loader(param, tensor, target.shard_id)
            else:
                default_weight_loader(param, tensor)
        except ValueError as e:
            raise ValueError(f"{name} in {path.name}: {e}") from e
        del tensor  # may be a view of the file map: drop it before the map is recycled
        reader.recycle_if_due()
        loaded.add(pname)
        if experts is not None:
            expert_parts[pname].add((target.expert_id, target.shard_id))
    if bar is not None:
        bar.close()
    missing = [n for n in params if n not in loaded and not (n == "lm_head.weight" and tied_embeddings)]
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks {len(missing)} tensor(s) the model needs, e.g. "
                         f"{', '.join(missing[:5])}; is config.json from the same model as the weights?")
    for pname, parts in expert_parts.items():
        if (None, "gate_up") in parts or (None, "down") in parts:
            continue
        experts = experts_of[id(params[pname])]
        need = {"gate", "up"} if pname.endswith("w13") or pname.endswith("b13") else {"down"}
        for e in experts.logical_ids:  # the experts this process holds (not always a contiguous range)
            have = {s for (x, s) in parts if x == e}
            if not (need <= have or "gate_up" in have):
                raise ValueError(f"checkpoint {model_dir} lacks expert {e} of {pname} ({sorted(need - have)})")
    for experts in all_experts:  # e.g. packed experts build their compute layout once their weights are in
        experts.post_load()
    for layer in model.modules():  # packed linear layers (moe quantize --all-linear) likewise
        if isinstance(layer, PackableWeight):
            layer.post_load()
    if unexpected:
        import logging

        logging.getLogger("moe").warning("ignored %d checkpoint tensor(s) with no place in the model, e.g. %s",
                                         len(unexpected), ", ".join(unexpected[:3]))


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a checkpoint and its shape (headers only, nothing read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        f = _open(path)
        shapes.update((name, tuple(f.get_slice(name).get_shape())) for name in f.keys())
    return shapes


def _check_mtp_layer(shapes: dict[str, tuple[int, ...]], mcfg: ModelConfig, first: int, k: int, packed: bool,
                     model_dir: Path) -> None:
    """A clear error, before anything is read, for an MTP layer missing from the checkpoint or a tensor of
    it missing or misshaped (against the published layout and config.json)."""
    prefix = f"model.layers.{first + k}."
    if not any(name.startswith(prefix) for name in shapes):
        raise ValueError(f"config.json of {model_dir} declares num_nextn_predict_layers={mcfg.num_layers}, but the "
                         f"checkpoint holds no tensor of multi-token-prediction layer {k} ({prefix}*): this export "
                         "dropped the MTP weights; use a checkpoint that keeps them, or another speculative method")
    stacked = prefix + "mlp.experts.gate_up_proj" in shapes
    optional = {prefix + "embed_tokens.weight", prefix + "shared_head.head.weight"}
    for name, want in published_tensor_shapes(mcfg, first, k, per_expert=not stacked).items():
        have = shapes.get(name)
        if have is None:
            if name in optional or (packed and ".experts." in name):  # packed experts have their own names
                continue
            raise ValueError(f"checkpoint {model_dir} lacks {name} (shape {want}) of multi-token-prediction layer "
                             f"{k}: the export is incomplete; re-download it or use another speculative method")
        if have != want:
            raise ValueError(f"{name} in checkpoint {model_dir} has shape {have}, expected {want} from config.json "
                             f"(multi-token-prediction layer {k}): the weights and config.json are from different "
                             "models, or the export is broken")


def load_mtp(model_path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
             target: nn.Module | None = None, progress: bool = False) -> MTPModel | None:
    """The checkpoint's DeepSeek multi-token-prediction layer(s) as an :class:`MTPModel` in eval mode,
    or None when config.json declares none (``num_nextn_predict_layers`` absent or 0).

    ``cfg`` is the target's parsed config (with its experts plan, so packed experts load alike).
    The embedding is the first MTP layer's own copy when the checkpoint holds one, else the target's;
    a layer without ``shared_head.head`` uses the target's ``lm_head``. Given the loaded ``target``
    those target tensors are shared with it instead of read again."""
    mcfg = mtp_config(cfg)
    if mcfg is None:
        return None
    model_dir = Path(model_path)
    first, n = cfg.num_layers, mcfg.num_layers
    if target is not None and (target.cfg.hidden_size, target.cfg.vocab_size) != (cfg.hidden_size, cfg.vocab_size):
        raise ValueError(f"the multi-token-prediction head in {model_dir} has hidden size {cfg.hidden_size} and "
                         f"vocabulary {cfg.vocab_size}, the target {target.cfg.hidden_size} and "
                         f"{target.cfg.vocab_size}: it was trained for another model; give the head trained for "
                         "this one (moe distill --student mtp --teacher TARGET)")
    shapes = tensor_shapes(checkpoint_files(model_dir))
    packed = cfg.experts is not None and cfg.experts.fmt is not None
    for k in range(n):
        _check_mtp_layer(shapes, mcfg, first, k, packed, model_dir)
    own_embed = f"model.layers.{first}.embed_tokens.weight" in shapes
    own_heads = [f"model.layers.{first + k}.shared_head.head.weight" in shapes for k in range(n)]
    with torch.device(device):
        model = MTPModel(mcfg, dtype, first, own_heads)
    # what this load fills: the MTP layers, and the embedding / fallback head unless shared with the target
    filled = nn.Module()
    filled.layers = model.layers
    if own_embed or target is None:
        filled.embed_tokens = model.embed_tokens
    if model.lm_head is not None and target is None:
        filled.lm_head = model.lm_head
    if target is not None:
        if not own_embed:
            model.embed_tokens = target.embed_tokens
        if model.lm_head is not None:
            model.lm_head = target.lm_head

    def rename(param: str) -> str | None:
        m = re.match(r"layers\.(\d+)\.(.+)", param)
        if m is None:  # the decoder's embedding, final norm, LM head
            if param == "embed_tokens.weight":
                return param if not own_embed and hasattr(filled, "embed_tokens") else None
            return param if param == "lm_head.weight" and hasattr(filled, "lm_head") else None
        k = int(m.group(1)) - first
        if not 0 <= k < n:
            return None  # a decoder layer
        if m.group(2) == "embed_tokens.weight":  # the MTP layers share one embedding (the first layer's copy)
            return "embed_tokens.weight" if k == 0 else None
        return f"layers.{k}.{m.group(2)}"

    rules = checkpoint_rules(cfg.experts, rules_for(cfg.architecture), model_dir)
    load_weights(filled, model_dir, rules, n, tied_embeddings=cfg.tie_word_embeddings and hasattr(filled, "lm_head"),
                 progress=progress, rename=rename)
    return model.eval()
