"""The MTP-style head ``moe distill --student mtp`` trains for a target that has none (DeepSeek-V3's
multi-token-prediction layer, :mod:`moe.models.mtp`, on a Qwen3-MoE or DeepSeek teacher).

Row i of a window takes the teacher's last hidden state ``h_i`` (after its final norm) and the embedding
of the next token ``t_{i+1}``, and predicts ``t_{i+2}``::

    out_i = shared_head.norm(layer(eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i)))))
    logits_i = lm_head(out_i)                         # the teacher's embedding and head, frozen

so its target distribution is the teacher's own at position ``i + 1`` (its top-k from the engine, the
first position dropped). The decoder ``layer`` is the teacher family's transformers layer, initialised
from the teacher's last layer; ``eh_proj`` starts as ``[small noise | identity]`` (the hidden state
passes through), ``shared_head.norm`` as the teacher's final norm. The teacher runs in torch (float32,
no gradients) beside the head to give ``h``.

The result is a checkpoint directory of the head alone, in DeepSeek's published MTP layout:
``config.json`` (the teacher's, with ``num_nextn_predict_layers: 1``) and ``model.safetensors`` holding
``model.layers.{N}.{enorm, hnorm, eh_proj, <the decoder layer's tensors>, shared_head.norm}`` (N the
teacher's layer count; no embedding or head of its own: the target's serve). The engine loads it with
``speculative_config={"method": "mtp", "model": OUT}`` (:func:`moe.loader.load_mtp`).

Shapes: B windows, L positions, D hidden, V vocabulary.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from .models.families import MTP_SPARSE


def head_config_json(teacher: str | Path, mlp: str, dense_intermediate: int | None) -> dict:
    """The head's config.json: the teacher's, declaring one MTP layer (dense: an MLP of its own width)."""
    hf = json.loads((Path(teacher) / "config.json").read_text())
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in MTP_SPARSE:
        raise ValueError(f"--student mtp: heads are built for {', '.join(MTP_SPARSE)} teachers, not {arch}; "
                         "train a drafter instead (--student draft)")
    if int(hf.get("num_nextn_predict_layers") or 0):
        raise ValueError(f"--teacher {teacher} has multi-token-prediction layers of its own: use them "
                         "(speculative method mtp without a model) or train a drafter (--student draft)")
    if mlp not in ("moe", "dense"):
        raise ValueError(f"--draft-mlp {mlp!r}: choose moe or dense")
    hf["num_nextn_predict_layers"] = 1
    if mlp == "dense":
        if "mlp_only_layers" not in hf:
            raise ValueError(f"--draft-mlp dense: an MTP head on {arch} keeps the teacher's layer kind; "
                             "use --draft-mlp moe")
        hf["mlp_only_layers"] = sorted(set(hf["mlp_only_layers"] or []) | {hf["num_hidden_layers"]})
        if dense_intermediate:
            hf["intermediate_size"] = dense_intermediate
    return hf


class MTPHead(nn.Module):
    """The head being trained, with the frozen teacher beside it (not a submodule: its weights are not the
    head's). ``forward(windows_BL1)`` returns the logits ``[B, L - 1, V]`` of t_{i+2} for rows i = 0 .. L - 2."""

    shift = 1  # row i is scored against the teacher's distribution at position i + 1

    def __init__(self, teacher: str | Path, mlp: str = "moe", dense_intermediate: int | None = None, seed: int = 0):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.config_json = head_config_json(teacher, mlp, dense_intermediate)
        tmodel = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
        for p in tmodel.parameters():
            p.requires_grad_(False)
        self._teacher = [tmodel]
        cfg = copy.deepcopy(tmodel.config)
        for key in ("mlp_only_layers", "intermediate_size"):
            if key in self.config_json:
                setattr(cfg, key, self.config_json[key])
        cfg._attn_implementation = "sdpa"
        self.config = cfg
        self.first_layer = N = cfg.num_hidden_layers
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        norm = type(tmodel.model.norm)
        self.enorm, self.hnorm = norm(D, eps=eps), norm(D, eps=eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.layer = type(tmodel.model.layers[-1])(cfg, N)
        self.shared_head_norm = norm(D, eps=eps)
        last = tmodel.model.layers[-1].state_dict()
        self.copied = sorted(n for n, p in self.layer.named_parameters() if n in last and last[n].shape == p.shape)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # (a transformers layer built outside from_pretrained may hold uninitialised memory)
            for n, p in self.layer.named_parameters():
                if n in self.copied:
                    p.copy_(last[n])
                elif p.dim() == 1:
                    p.fill_(1.0 if "norm" in n else 0.0)
                else:
                    p.normal_(0.0, cfg.initializer_range, generator=g)
            for p in (self.enorm.weight, self.hnorm.weight):
                p.fill_(1.0)
            self.eh_proj.weight.copy_(torch.cat([torch.randn(D, D, generator=g) * cfg.initializer_range,
                                                 torch.eye(D)], dim=1))
            self.shared_head_norm.weight.copy_(tmodel.model.norm.weight)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def forward(self, windows_BL1: torch.Tensor) -> torch.Tensor:
        t = self.teacher
        x_BL = windows_BL1[:, :-1]
        with torch.no_grad():
            h_BLD = t.model(input_ids=x_BL).last_hidden_state  # after the final norm
            e_BLD = t.model.embed_tokens(x_BL[:, 1:])  # t_{i+1} for rows i = 0 .. L - 2
        z = self.eh_proj(torch.cat([self.enorm(e_BLD), self.hnorm(h_BLD[:, :-1])], dim=-1))
        T = z.shape[1]
        pos = torch.arange(T, device=z.device)[None]
        mask = torch.full((T, T), float("-inf"), device=z.device).triu(1)[None, None]
        y = self.layer(z, attention_mask=mask, position_ids=pos, position_embeddings=t.model.rotary_emb(z, pos))
        return t.lm_head(self.shared_head_norm(y))

    def published_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The head's tensors under their checkpoint names (DeepSeek's MTP layout, layer N)."""
        prefix = f"model.layers.{self.first_layer}."
        names = {"enorm.weight": self.enorm.weight, "hnorm.weight": self.hnorm.weight,
                 "eh_proj.weight": self.eh_proj.weight, "shared_head.norm.weight": self.shared_head_norm.weight}
        names.update(self.layer.state_dict())
        return {prefix + n: t.detach().to(dtype).contiguous() for n, t in names.items()}

    def save(self, out: Path, dtype: torch.dtype) -> None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file(self.published_state_dict(dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(self.config_json, dtype=str(dtype).removeprefix("torch."))
        cfg.pop("torch_dtype", None)
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
