"""config.json parsers, one per supported architecture, into :class:`moe.config.ModelConfig`."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from routing import RouterConfig

from ..config import MLAConfig, ModelConfig, eos_ids, rope_parameters


def _first(hf: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    return default


def _common(hf: dict, **kw: Any) -> dict:
    heads = hf["num_attention_heads"]
    base = dict(
        architecture=hf["architectures"][0],
        model_type=hf.get("model_type", ""),
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=_first(hf, "num_key_value_heads", default=heads),
        head_dim=_first(hf, "head_dim", default=hf["hidden_size"] // heads),
        max_position_embeddings=_first(hf, "max_position_embeddings", default=4096),
        rms_norm_eps=_first(hf, "rms_norm_eps", default=1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope=rope_parameters(hf),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
        torch_dtype=str(_first(hf, "dtype", "torch_dtype", default="float32")),
        raw=hf,
    )
    base.update(kw)
    return base


def parse_mixtral(hf: dict) -> ModelConfig:
    n = hf["num_hidden_layers"]
    sw = hf.get("sliding_window")
    return ModelConfig(**_common(
        hf,
        router=RouterConfig(hf["num_local_experts"], hf["num_experts_per_tok"], renormalize=True),
        moe_intermediate_size=hf["intermediate_size"],
        sparse_layers=(True,) * n,
        sliding_windows=(sw,) * n if sw else (),
    ))


def _qwen_sparse(hf: dict, layer: int) -> bool:
    """Whether Qwen-MoE layer ``layer`` (counting on past the decoder into MTP layers) is MoE."""
    step = hf.get("decoder_sparse_step", 1) or 1
    experts = _first(hf, "num_experts", "num_local_experts", default=0)
    return layer not in set(hf.get("mlp_only_layers") or []) and experts > 0 and (layer + 1) % step == 0


def _qwen_sparse_layers(hf: dict) -> tuple[bool, ...]:
    return tuple(_qwen_sparse(hf, i) for i in range(hf["num_hidden_layers"]))


def _qwen_router(hf: dict) -> RouterConfig:
    return RouterConfig(_first(hf, "num_experts", "num_local_experts"), hf["num_experts_per_tok"],
                        renormalize=bool(hf.get("norm_topk_prob", False)))


def parse_qwen2_moe(hf: dict) -> ModelConfig:
    return ModelConfig(**_common(
        hf,
        attention_bias=bool(hf.get("qkv_bias", True)),
        router=_qwen_router(hf),
        moe_intermediate_size=hf["moe_intermediate_size"],
        dense_intermediate_size=hf.get("intermediate_size", 0),
        sparse_layers=_qwen_sparse_layers(hf),
        shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0),
        shared_expert_gate=bool(hf.get("shared_expert_intermediate_size", 0)),
    ))


def parse_qwen3_moe(hf: dict) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**_common(
        hf,
        attention_bias=bias,
        o_bias=bias,
        qk_norm="head",
        router=_qwen_router(hf),
        moe_intermediate_size=hf["moe_intermediate_size"],
        dense_intermediate_size=hf.get("intermediate_size", 0),
        sparse_layers=_qwen_sparse_layers(hf),
    ))


def parse_olmoe(hf: dict) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**_common(
        hf,
        attention_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=hf.get("clip_qkv"),
        router=_qwen_router(hf),  # the same softmax -> top-k (renormalized if norm_topk_prob)
        moe_intermediate_size=hf["intermediate_size"],
        sparse_layers=(True,) * hf["num_hidden_layers"],
    ))


def parse_gpt_oss(hf: dict) -> ModelConfig:
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    sw = hf.get("sliding_window")
    return ModelConfig(**_common(
        hf,
        attention_bias=bool(hf.get("attention_bias", True)),
        o_bias=bool(hf.get("attention_bias", True)),
        attention_sinks=True,
        sliding_windows=tuple(sw if t == "sliding_attention" else None for t in types),
        router=RouterConfig(_first(hf, "num_local_experts", "num_experts"),
                            _first(hf, "num_experts_per_tok", "experts_per_token"), topk_before_softmax=True),
        router_bias=True,
        expert_bias=True,
        swiglu_limit=float(_first(hf, "swiglu_limit", default=7.0)),
        swiglu_alpha=float(_first(hf, "swiglu_alpha", default=1.702)),
        moe_intermediate_size=hf["intermediate_size"],
        sparse_layers=(True,) * n,
    ))


def _deepseek_sparse(hf: dict, layer: int) -> bool:
    """Whether DeepSeek layer ``layer`` (counting on past the decoder into the MTP layers) is MoE."""
    first_dense = hf.get("first_k_dense_replace", 0) or 0
    freq = hf.get("moe_layer_freq", 1) or 1
    return layer >= first_dense and layer % freq == 0


def _deepseek(hf: dict, v3: bool) -> ModelConfig:
    n = hf["num_hidden_layers"]
    experts = _first(hf, "n_routed_experts", "num_local_experts", "num_experts")
    topk_method = hf.get("topk_method", "noaux_tc" if v3 else "greedy")
    groups = hf.get("n_group") or 1
    grouped = topk_method in ("noaux_tc", "group_limited_greedy")
    router = RouterConfig(
        experts, hf["num_experts_per_tok"],
        scoring="sigmoid" if v3 else "softmax",
        # DeepSeek-V2 never renormalizes (its reference code ignores norm_topk_prob)
        renormalize=bool(hf.get("norm_topk_prob", True)) if v3 else False,
        num_groups=groups if grouped else 1,
        topk_groups=(hf.get("topk_group") or 1) if grouped else 1,
        group_score="top2_sum" if topk_method == "noaux_tc" else "max",
        use_correction_bias=topk_method == "noaux_tc",
        scaling_factor=float(hf.get("routed_scaling_factor", 1.0) or 1.0),
    )
    mla = MLAConfig(hf.get("q_lora_rank"), hf["kv_lora_rank"], hf["qk_nope_head_dim"], hf["qk_rope_head_dim"],
                    hf["v_head_dim"])
    rope = rope_parameters(hf)
    scale = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        import math

        factor = rope["factor"]
        m = 1.0 if factor <= 1 else 0.1 * rope["mscale_all_dim"] * math.log(factor) + 1.0
        scale *= m * m
    shared = hf.get("n_shared_experts") or 0
    return ModelConfig(**_common(
        hf,
        head_dim=mla.qk_rope_head_dim,
        num_kv_heads=hf["num_attention_heads"],
        attention_bias=bool(hf.get("attention_bias", False)),
        rope_interleaved=bool(hf.get("rope_interleave", True)) if v3 else True,
        router=router,
        moe_intermediate_size=hf["moe_intermediate_size"],
        dense_intermediate_size=hf["intermediate_size"],
        sparse_layers=tuple(_deepseek_sparse(hf, i) for i in range(n)),
        shared_expert_intermediate_size=shared * hf["moe_intermediate_size"],
        mla=mla,
        softmax_scale=scale,
    ))


def parse_deepseek_v2(hf: dict) -> ModelConfig:
    return _deepseek(hf, v3=False)


def parse_deepseek_v3(hf: dict) -> ModelConfig:
    return _deepseek(hf, v3=True)


# families whose MTP layers have a known layout: DeepSeek's own, and the MTP-style heads `moe distill --student mtp`
# trains for Qwen3-MoE targets (DeepSeek's layout with Qwen3-MoE decoder layers); each family's rule for
# whether layer i (counting on past the decoder) is MoE
MTP_SPARSE: dict[str, Callable[[dict, int], bool]] = {
    "DeepseekV2ForCausalLM": _deepseek_sparse,
    "DeepseekV3ForCausalLM": _deepseek_sparse,
    "Qwen3MoeForCausalLM": _qwen_sparse,
}


def mtp_config(cfg: ModelConfig) -> ModelConfig | None:
    """The multi-token-prediction layers of a checkpoint (config.json ``num_nextn_predict_layers``; stored
    as ``model.layers.{num_hidden_layers + k}``) as a config whose layers ``0 .. n-1`` are those MTP
    layers, each MoE or dense by its index in the whole stack; None when the checkpoint declares none."""
    n = int(cfg.raw.get("num_nextn_predict_layers") or 0)
    if n <= 0:
        return None
    sparse = MTP_SPARSE.get(cfg.architecture)
    if sparse is None:
        raise ValueError(f"config.json declares num_nextn_predict_layers={n}, but multi-token-prediction layers "
                         f"are supported for {', '.join(MTP_SPARSE)} checkpoints, not {cfg.architecture}: use "
                         "another speculative method (e.g. a draft model)")
    first = cfg.num_layers
    return replace(cfg, num_layers=n, sparse_layers=tuple(sparse(cfg.raw, first + k) for k in range(n)))


PARSERS: dict[str, Callable[[dict], ModelConfig]] = {
    "MixtralForCausalLM": parse_mixtral,
    "Qwen2MoeForCausalLM": parse_qwen2_moe,
    "Qwen3MoeForCausalLM": parse_qwen3_moe,
    "OlmoeForCausalLM": parse_olmoe,
    "GptOssForCausalLM": parse_gpt_oss,
    "DeepseekV2ForCausalLM": parse_deepseek_v2,
    "DeepseekV3ForCausalLM": parse_deepseek_v3,
}


def parse_config(hf: dict) -> ModelConfig:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in PARSERS:
            try:
                return PARSERS[arch](hf)
            except KeyError as e:
                raise ValueError(f"config.json of a {arch} checkpoint lacks the field {e.args[0]!r}") from e
    raise ValueError(f"unsupported architecture {archs or hf.get('model_type')!r}; supported: {', '.join(PARSERS)}")
