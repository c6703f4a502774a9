"""Model configuration: one normalized, frozen view of a checkpoint's config.json.

Every supported family's config.json is parsed into :class:`ModelConfig` by its parser in
``moe/models/<family>.py``; the rest of the engine reads only these fields.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routing import RouterConfig

if TYPE_CHECKING:
    from parallel import ShardingConfig

    from .models.quant_weights import ExpertsPlan


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek multi-head latent attention dimensions."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: dict
    rope_interleaved: bool = False
    attention_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # "head" (Qwen3), "full" (OLMoE) or None
    clip_qkv: float | None = None
    sliding_windows: tuple[int | None, ...] = ()
    attention_sinks: bool = False
    # MoE
    router: RouterConfig | None = None
    moe_intermediate_size: int = 0
    dense_intermediate_size: int = 0
    sparse_layers: tuple[bool, ...] = ()
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float | None = None
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    mla: MLAConfig | None = None
    softmax_scale: float | None = None  # overrides head_dim ** -0.5 (DeepSeek YaRN mscale)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    raw: dict = field(default_factory=dict, repr=False, compare=False)
    # how routed experts are held (packed format, offloading): set by the engine, see moe/models/quant_weights.py
    experts: ExpertsPlan | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) is not divisible by "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if len(self.sparse_layers) != self.num_layers:
            raise ValueError("sparse_layers must list every layer")

    @property
    def num_experts(self) -> int:
        return self.router.num_experts if self.router else 0

    @property
    def top_k(self) -> int:
        return self.router.top_k if self.router else 0


def read_config_json(model_dir: str | Path) -> dict:
    path = Path(model_dir)
    cfg_path = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist: pass a directory holding config.json "
                                "and *.safetensors (a Hugging Face checkpoint)")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json in {str(path)!r}: is this a Hugging Face checkpoint directory?")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); re-download or re-save the checkpoint") from e


def rope_parameters(hf: dict) -> dict:
    """Merge transformers v5 ``rope_parameters`` with older ``rope_theta``/``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    if "rope_theta" not in params:
        params["rope_theta"] = hf.get("rope_theta", 10000.0)
    scaling = hf.get("rope_scaling") or {}
    for k, v in scaling.items():
        params.setdefault(k, v)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    return params


def eos_ids(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "tb": 1000**4}


def parse_bytes(value: str | int | float) -> int:
    """``"4GiB"``, ``"512MB"``, ``1e9`` -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    import re

    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size: use a number of bytes or e.g. '512MiB', '4GiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class EngineConfig:
    """Every engine option, validated up front: the one place that lists them.

    ``LLM(model, **options)`` passes its keyword arguments here (:meth:`from_options`) and the
    CLI maps its engine flags onto these fields (moe/cli.py, ``ENGINE_FLAGS``).
    """

    model: str  # checkpoint directory (config.json, *.safetensors, tokenizer.json)
    dtype: str = "auto"  # weights and activations: auto (the checkpoint's; bf16 for fp16 on CPU) or one of DTYPES
    kv_cache_memory: str | int | None = None  # bytes or "4GiB"; None: sized for max_num_seqs (at most 2 GiB)
    kv_cache_dtype: str = "auto"  # "auto": the model dtype; "fp8" (= "fp8_e4m3"): e4m3 with per-row scales
    block_size: int = 16  # tokens per KV cache block (a power of two)
    max_num_seqs: int = 64  # sequences running at once
    max_model_len: int | None = None  # prompt + output tokens per sequence; None: the model's context
    # tokens per step (longer prompts are prefilled in chunks): vLLM's CPU defaults, 4096 for the offline API
    # (more rows per expert in a prompt step), 2048 for `moe serve` (shorter steps beside decoding requests)
    max_num_batched_tokens: int = 4096
    # greedy decode steps run back to back in one call at most (CPU, the captured step's sequences; 1: off)
    num_scheduler_steps: int = 16
    seed: int | None = 0  # the sampler's generator (draws of requests without a SamplingParams.seed); None: unseeded
    enable_prefix_caching: bool = True  # reuse the KV blocks of a prompt prefix seen before
    experts_backend: str = "auto"  # grouped expert GEMMs: auto, torch, triton or megablocks
    device: str = "cpu"  # "cpu" or "cuda" (under a launcher: each rank's GPU, see the sharding)
    load_progress: bool = False  # a progress bar while the weights load
    # parallel layout: a YAML path, a dict of its keys or a ShardingConfig (read into one here);
    # None: one process, unless a launcher started several (then its world size must be 1)
    sharding: str | Path | dict | ShardingConfig | None = None
    quantization: str | None = None  # None/"auto": the checkpoint's quantization_config; else it must match
    offload_experts: bool = False  # routed experts stay in the checkpoint files, behind a cache
    expert_cache: str | int | None = None  # bytes of that cache, e.g. "4GiB" (default 2GiB)
    # speculative decoding, vLLM's dict: {"method": "ngram" | "draft_model" | "draft", "num_speculative_tokens": 4,
    # "model": drafter path, ...} (moe.spec_decode.SpeculativeConfig)
    speculative_config: dict | None = None
    record_expert_counts: bool = False  # count tokens per expert and layer (LLM.expert_counts)
    # CPU: run every GEMM shape a step can make once at load (moe.warmup), so that no request pays
    # oneDNN's kernel builds
    warmup: bool = False
    # default sampling parameters (what a request leaves unset): "auto" takes the checkpoint's
    # generation_config.json (temperature, top_p, top_k, min_p, penalties, max_new_tokens), as
    # vLLM does; "vllm": none of the model's; or a directory holding a generation_config.json
    generation_config: str = "auto"
    override_generation_config: dict | None = None  # laid over those, e.g. {"temperature": 0.6}
    max_logprobs: int = 20  # log-probs a request may ask for per token (logprobs, prompt_logprobs); -1: any

    @classmethod
    def from_options(cls, model: str, **options: Any) -> EngineConfig:
        """``EngineConfig(model, **options)``; an unknown option is named with the valid ones."""
        valid = [f.name for f in fields(cls) if f.name != "model"]
        for name in options:
            if name not in valid:
                near = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise TypeError(f"{name!r} is not an engine option{hint}: the options are {', '.join(valid)} "
                                "(each documented in moe.config.EngineConfig)")
        return cls(model=model, **options)

    def __post_init__(self) -> None:
        from .models.quant_weights import check_expert_options

        check_expert_options(self.quantization, self.offload_experts, self.expert_cache)
        if self.sharding is not None:
            from parallel import ShardingConfig, load_sharding

            if not isinstance(self.sharding, ShardingConfig):
                object.__setattr__(self, "sharding", load_sharding(self.sharding))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported: choose one of {', '.join(DTYPES)}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of two (e.g. 16)")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} must be at least 2")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs={self.max_logprobs} must be >= 0, or -1 for no limit")
        if self.num_scheduler_steps < 1:
            raise ValueError(f"num_scheduler_steps={self.num_scheduler_steps} must be at least 1 (1: one step a call)")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be at least 1")
        if self.kv_cache_memory is not None:
            parse_bytes(self.kv_cache_memory)
        from kvcache import check_kv_cache_dtype

        check_kv_cache_dtype(self.kv_cache_dtype)
        from .spec_decode import SpeculativeConfig

        SpeculativeConfig.parse(self.speculative_config)
        if self.experts_backend not in ("auto", "torch", "triton", "megablocks"):
            raise ValueError(f"experts_backend={self.experts_backend!r}: choose auto, torch, triton or megablocks")
