"""Students for ``moe distill``, as transformers models (the training library; our engine serves the result).

* a drafter: the teacher's family cut to ``layers`` decoder layers, MoE or dense, initialised from the
  teacher's embeddings, first layers, final norm and LM head (whatever has the same name and shape);
* an existing checkpoint (e.g. a pruned copy of the teacher): its routers and experts train, the rest is
  frozen (or every weight trains: ``what="all"``); with ``lora_rank`` the experts stay frozen and low-rank
  adapters on them train instead, merged into the weights before saving.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

_ROUTER = re.compile(r"\.(gate|router)\.(weight|bias)$")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
              "merges.txt", "chat_template.jinja", "generation_config.json")


def draft_config(teacher: str | Path, layers: int, mlp: str, dense_intermediate: int | None):
    """The teacher's transformers config cut to ``layers`` decoder layers; ``mlp="dense"`` makes every layer a
    dense SwiGLU MLP of ``dense_intermediate`` (families with dense layers: Qwen-MoE, DeepSeek)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(teacher))
    n_teacher = cfg.num_hidden_layers
    if not 1 <= layers < n_teacher:
        raise ValueError(f"--draft-layers {layers}: choose from 1 to {n_teacher - 1} (the teacher has {n_teacher})")
    if mlp not in ("moe", "dense"):
        raise ValueError(f"--draft-mlp {mlp!r}: choose moe or dense")
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:layers]
    if mlp == "dense":
        if hasattr(cfg, "mlp_only_layers"):  # Qwen2-MoE / Qwen3-MoE
            cfg.mlp_only_layers = list(range(layers))
        elif hasattr(cfg, "first_k_dense_replace"):  # DeepSeek
            cfg.first_k_dense_replace = layers
        else:
            raise ValueError(f"--draft-mlp dense: {cfg.model_type} has no dense decoder layers; "
                             "use --draft-mlp moe (a cut-down copy of the teacher)")
        if dense_intermediate:
            cfg.intermediate_size = dense_intermediate
    elif hasattr(cfg, "mlp_only_layers"):
        cfg.mlp_only_layers = [i for i in cfg.mlp_only_layers if i < layers]
    return cfg


def build_draft_student(teacher: str | Path, layers: int, mlp: str = "moe", dense_intermediate: int | None = None,
                        seed: int = 0) -> tuple[nn.Module, list[str]]:
    """The drafter and the names of the tensors copied from the teacher (the others start random)."""
    from transformers import AutoModelForCausalLM

    cfg = draft_config(teacher, layers, mlp, dense_intermediate)
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    teacher_sd = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).state_dict()
    own = student.state_dict()
    copied = {n: t for n, t in teacher_sd.items() if n in own and own[n].shape == t.shape}
    student.load_state_dict(copied, strict=False)
    return student, sorted(copied)


def load_student(path: str | Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


class LowRankDelta(nn.Module):
    """``W + B @ A`` on a weight ``[..., out, in]`` (stacked experts keep their leading expert dim); ``B`` starts
    at zero so training begins from the checkpoint's own function."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator):
        super().__init__()
        *lead, out_dim, in_dim = weight.shape
        self.A = nn.Parameter(torch.randn(*lead, rank, in_dim, generator=generator) / in_dim ** 0.5)
        self.B = nn.Parameter(torch.zeros(*lead, out_dim, rank))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.B @ self.A


def select_trainable(model: nn.Module, what: str, lora_rank: int = 0, seed: int = 0) -> dict[str, int]:
    """Set ``requires_grad``: ``what="all"`` (a drafter, or a recovery that trains every weight) or
    ``"router+experts"`` (recovery); with ``lora_rank`` the experts get :class:`LowRankDelta` adapters and only
    those (and the routers) train.
    Returns the trainable parameter count per group."""
    names = dict(model.named_parameters())
    experts = [n for n in names if ".experts." in n and names[n].dim() >= 2]
    routers = [n for n in names if _ROUTER.search(n) and ".experts." not in n and "shared_expert" not in n]
    if what == "all":  # DistillConfig refuses --lora-rank with it
        for p in model.parameters():
            p.requires_grad_(True)
        return {"all": sum(p.numel() for p in model.parameters())}
    if not experts or not routers:
        raise ValueError("the student has no routed experts: recovery trains routers and experts "
                         "(a dense student would be --student draft)")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in routers:
        names[n].requires_grad_(True)
    counts = {"router": sum(names[n].numel() for n in routers)}
    if not lora_rank:
        for n in experts:
            names[n].requires_grad_(True)
        counts["experts"] = sum(names[n].numel() for n in experts)
        return counts
    if lora_rank < 1:
        raise ValueError(f"--lora-rank {lora_rank} must be at least 1")
    g = torch.Generator().manual_seed(seed)
    counts["lora"] = 0
    for n in experts:
        module_name, attr = n.rsplit(".", 1)
        module = model.get_submodule(module_name)
        delta = LowRankDelta(names[n].detach(), lora_rank, g)
        parametrize.register_parametrization(module, attr, delta)
        counts["lora"] += delta.A.numel() + delta.B.numel()
    return counts


def merge_adapters(model: nn.Module) -> None:
    """Fold every :class:`LowRankDelta` into its weight, leaving plain parameters to save."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


def save_student(model: nn.Module, out: Path, dtype: torch.dtype, side_files_from: Path) -> None:
    """A standard Hugging Face checkpoint in ``out``: config.json + model.safetensors in ``dtype``, and the
    tokenizer / generation config of ``side_files_from``."""
    merge_adapters(model)
    model.config.output_router_logits = False
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    model.float()
    for name in SIDE_FILES:
        if (side_files_from / name).is_file():
            shutil.copy2(side_files_from / name, out / name)
