"""Tiny random checkpoints of every supported family, written with transformers' save_pretrained."""
from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.08, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)


def _configs() -> dict:
    from transformers import (DeepseekV2Config, DeepseekV3Config, GptOssConfig, MixtralConfig, OlmoeConfig,
                              Qwen2MoeConfig, Qwen3MoeConfig)

    ds = dict(COMMON, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
              moe_intermediate_size=32, intermediate_size=96, n_shared_experts=1, first_k_dense_replace=1,
              num_experts_per_tok=2, n_group=4, topk_group=2)
    return {
        "mixtral": (MixtralConfig, dict(COMMON, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": (Qwen2MoeConfig, dict(COMMON, intermediate_size=96, moe_intermediate_size=48,
                                           shared_expert_intermediate_size=64, num_experts=6, num_experts_per_tok=2,
                                           decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False)),
        "qwen3_moe": (Qwen3MoeConfig, dict(COMMON, head_dim=24, intermediate_size=96, moe_intermediate_size=48,
                                           num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                                           mlp_only_layers=[2], norm_topk_prob=True)),
        "olmoe": (OlmoeConfig, dict(COMMON, intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                    clip_qkv=3.0)),
        "gpt_oss": (GptOssConfig, dict(COMMON, head_dim=16, intermediate_size=48, num_local_experts=4,
                                       num_experts_per_tok=2, sliding_window=6,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                       rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                                        "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                        "original_max_position_embeddings": 64})),
        "deepseek_v2": (DeepseekV2Config, dict(ds, q_lora_rank=None, n_routed_experts=8,
                                               topk_method="group_limited_greedy", routed_scaling_factor=2.0)),
        "deepseek_v3": (DeepseekV3Config, dict(ds, q_lora_rank=24, n_routed_experts=8, routed_scaling_factor=2.5,
                                               norm_topk_prob=True,
                                               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                                "factor": 4.0, "original_max_position_embeddings": 64,
                                                                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                                                "mscale_all_dim": 1.0})),
    }


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v2", "deepseek_v3"]


def make_checkpoint(family: str, out: Path, seed: int = 0, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    cls, kw = _configs()[family]
    cfg = cls(**{**kw, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand_like(buf) * 0.2)
        for name, p in model.named_parameters():
            if name.endswith("sinks") or "bias" in name:
                p.copy_(torch.randn_like(p) * 0.1)
            if "norm" in name:  # non-trivial norm weights catch a skipped norm
                p.copy_(1.0 + torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return out


def make_mtp_checkpoint(out: Path, seed: int = 0, own_head: bool = True, own_embed: bool = False) -> Path:
    """The tiny DeepSeek-V3 checkpoint of ``make_checkpoint("deepseek_v3", out, seed)`` (the same target
    weights) plus one multi-token-prediction layer in the published layout, in a shard of its own as
    DeepSeek-V3 ships it: ``model.layers.{N}.`` (N = num_hidden_layers) holding ``enorm``, ``hnorm``,
    ``eh_proj`` [D, 2D], a decoder layer under the usual names (MLA attention + MoE: a random layer N
    of a transformers DeepseekV3 one layer deeper), ``shared_head.norm`` and, with ``own_head``,
    ``shared_head.head`` [V, D] (else the target's lm_head serves); with ``own_embed`` also
    ``embed_tokens`` [V, D]. Values differ from the target's head and embedding, so a test can tell
    which one ran. transformers writes no MTP tensors, hence this."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    make_checkpoint("deepseek_v3", out, seed)
    cfg = json.loads((out / "config.json").read_text())
    n, d, v = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    donor = make_checkpoint("deepseek_v3", out / "mtp-donor", seed + 1, num_hidden_layers=n + 1)
    prefix = f"model.layers.{n}."
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(donor.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update((k, f.get_tensor(k)) for k in f.keys() if k.startswith(prefix))
    g = torch.Generator().manual_seed(seed + 2)
    for name in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"{prefix}{name}.weight"] = 1.0 + 0.1 * torch.randn(d, generator=g)
    tensors[f"{prefix}eh_proj.weight"] = 0.08 * torch.randn(d, 2 * d, generator=g)
    if own_head:
        tensors[f"{prefix}shared_head.head.weight"] = 0.08 * torch.randn(v, d, generator=g)
    if own_embed:
        tensors[f"{prefix}embed_tokens.weight"] = 0.08 * torch.randn(v, d, generator=g)
    for path in donor.iterdir():
        path.unlink()
    donor.rmdir()
    shard = "model-mtp.safetensors"
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / shard), metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.is_file():  # a sharded save: list the new shard's tensors too
        data = json.loads(index.read_text())
        data["weight_map"].update(dict.fromkeys(tensors, shard))
        index.write_text(json.dumps(data, indent=2))
    cfg["num_nextn_predict_layers"] = 1
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def dequantized_copy(qdir: Path, out: Path, fmt) -> Path:
    """The float checkpoint a ``moe quantize`` output (``fmt``: its :class:`WeightFormat`) stands for:
    every packed group (``<prefix>.<name>`` for the format's tensor names: experts, and with
    ``--all-linear`` attention, dense MLPs and the LM head) dequantized to ``<prefix>.weight``;
    stacked experts written per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``)."""
    import json
    import re

    from safetensors import safe_open
    from safetensors.torch import save_file

    assert "weight" not in fmt.tensor_names, "moe quantize's formats (int4 / int8) only"
    out.mkdir()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(qdir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():
                prefix, _, leaf = name.rpartition(".")
                if leaf in fmt.tensor_names:
                    groups.setdefault(prefix, {})[leaf] = h.get_tensor(name)
                else:
                    tensors[name] = h.get_tensor(name)
    for prefix, packed in groups.items():
        w = fmt.dequantize(packed)
        stacked = re.fullmatch(r"(.*\.experts)\.(gate_up_proj|down_proj)", prefix)
        if stacked is None:
            tensors[prefix + ".weight"] = w
            continue
        for e in range(w.shape[0]):
            base = f"{stacked[1]}.{e}."
            if stacked[2] == "down_proj":
                tensors[base + "down_proj.weight"] = w[e]
            else:
                F = w.shape[1] // 2
                tensors[base + "gate_proj.weight"], tensors[base + "up_proj.weight"] = w[e, :F], w[e, F:]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    hf = json.loads((qdir / "config.json").read_text())
    hf.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(hf))
    return out
