"""The checkpoints bench_peers.py runs every engine on: random bf16 weights in three MoE shapes, built once
with transformers and cached; their active bytes per token (from the safetensors headers); and their
GGUF conversion for llama.cpp (llama.cpp's own converter, as bench_quant.py runs it)."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

COMMON = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, max_position_embeddings=4096,
              initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
# Every shape keeps what the issue names; the rest is the family's usual choice.
SHAPES: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(COMMON, num_attention_heads=16, num_key_value_heads=8, intermediate_size=2816,
                                      num_local_experts=8, num_experts_per_tok=2)),
    # Qwen3-MoE's own head_dim (128, so q_proj widens 1024 -> 2048) and normalised top-k
    "qwen3": ("Qwen3MoeConfig", dict(COMMON, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                                     intermediate_size=2816, moe_intermediate_size=512, num_experts=32,
                                     num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
                                     mlp_only_layers=[])),
    # DeepSeek-V3's MLA dims (vLLM's CPU MLA runs only these latent sizes), grouped sigmoid routing
    "deepseek_v3": ("DeepseekV3Config", dict(
        COMMON, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=32, num_experts_per_tok=4,
        moe_intermediate_size=512, n_shared_experts=1, first_k_dense_replace=1, intermediate_size=2816, n_group=4,
        topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
}
# Families beyond the three, run when named (`--model gpt_oss`), not by `--model all`
MORE_SHAPES: dict[str, tuple[str, dict]] = {
    # gpt-oss: experts with biases and a clamped SwiGLU, a top-k-then-softmax router, sinks, sliding windows
    "gpt_oss": ("GptOssConfig", dict(COMMON, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                                     intermediate_size=512, num_local_experts=32, num_experts_per_tok=4,
                                     sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 4)),
    # Qwen2-MoE: a gated shared expert beside 32 routed ones
    "qwen2_moe": ("Qwen2MoeConfig", dict(COMMON, num_attention_heads=16, num_key_value_heads=16,
                                         intermediate_size=2816, moe_intermediate_size=512, num_experts=32,
                                         num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1,
                                         mlp_only_layers=[], shared_expert_intermediate_size=2048)),
}
# --quick: the same families at toy size (attention and MLA dims kept where vLLM's CPU kernels need them)
QUICK = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=2, intermediate_size=1024)
QUICK_BY_SHAPE = {"mixtral": dict(num_attention_heads=8, num_key_value_heads=4, intermediate_size=1024),
                  "qwen3": dict(num_attention_heads=8, num_key_value_heads=4, moe_intermediate_size=256,
                                num_experts=8, num_experts_per_tok=2),
                  "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, n_group=2,
                                      topk_group=1),
                  "gpt_oss": dict(num_attention_heads=8, num_key_value_heads=4, intermediate_size=256,
                                  num_local_experts=8, num_experts_per_tok=2, layer_types=["sliding_attention",
                                                                                           "full_attention"]),
                  "qwen2_moe": dict(num_attention_heads=8, num_key_value_heads=8, moe_intermediate_size=256,
                                    num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=512)}
# keys written into config.json that transformers' save_pretrained leaves out but other readers need:
# vLLM's DeepSeek-V3 loader wants the routing method named (else it fails on e_score_correction_bias)
CONFIG_EXTRA = {"deepseek_v3": {"topk_method": "noaux_tc", "scoring_func": "sigmoid"}}


def shape(name: str, quick: bool) -> tuple[str, dict]:
    cls, kw = {**SHAPES, **MORE_SHAPES}[name]
    return cls, (kw | QUICK | QUICK_BY_SHAPE[name] if quick else dict(kw))


def ensure_checkpoint(name: str, quick: bool, cache_dir: Path, seed: int) -> Path:
    """Build (once) a random-init checkpoint in bfloat16; rebuilt when its recipe changes."""

    cls_name, kw = shape(name, quick)
    extra = CONFIG_EXTRA.get(name, {})
    meta = {"class": cls_name, "config": kw, "config_extra": extra, "seed": seed, "dtype": "bfloat16"}
    out = cache_dir / (f"{name}-quick" if quick else name)
    meta_path = out / "bench_meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta and list(out.glob("*.safetensors")):
        return out
    print(f"[build] {out.name}: random init (seed {seed}) -> {out}", flush=True)
    t0 = time.perf_counter()
    from bench_generate import save_random_checkpoint

    save_random_checkpoint(cls_name, kw, out, seed)
    cfg_path = out / "config.json"
    # every key of the recipe stays in config.json (save_pretrained drops some at their defaults)
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | kw | extra, indent=2))
    meta_path.write_text(json.dumps(meta, indent=1))
    print(f"[build] {out.name}: done in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def active_bytes_per_token(ckpt: Path) -> dict:
    """Weight bytes one decoded token reads: every tensor but the input embedding (one row of it is read),
    the routed experts scaled by top_k / num_experts (shared experts count whole); the LM head counts."""
    from safetensors import safe_open

    cfg = json.loads((ckpt / "config.json").read_text())
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg["n_routed_experts"]
    share = cfg["num_experts_per_tok"] / experts
    total = routed = embed = 0
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is no dict)
                sl = st.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                n *= 2 if sl.get_dtype() in ("BF16", "F16") else 4
                total += n
                if "embed_tokens" in key:
                    embed += n
                elif ".experts." in key:  # routed only: "shared_experts." does not match
                    routed += n
    active = total - embed - routed + routed * share
    return {"total_bytes": total, "routed_expert_bytes": routed, "embedding_bytes": embed,
            "active_bytes_per_token": int(active)}


# ---- llama.cpp -----------------------------------------------------------------------------------
def llama_cpp_version(python: str) -> str | None:
    """llama-cpp-python's version in that interpreter, or None when it is not installed there."""
    r = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                       text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else None


def llama_cpp_converter(version: str, cache_dir: Path) -> Path:
    """The llama.cpp tree (convert_hf_to_gguf.py, its conversion/ package, gguf-py) vendored in the
    llama-cpp-python source release of the installed version, so the GGUF matches the library reading it."""
    root = cache_dir / f"llama-cpp-python-{version}-convert"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    dl = cache_dir / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    sdist = dl / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dl),
                        f"llama-cpp-python=={version}"], check=True, stdout=subprocess.DEVNULL)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
        for m in members:
            m.name = m.name[len(prefix):]
        tmp = root.parent / f"{root.name}.tmp"
        tar.extractall(tmp, members=members, filter="data")
    tmp.rename(root)
    return root


def ensure_gguf(ckpt: Path, converter: Path) -> Path:
    """The checkpoint as GGUF bf16 (rebuilt when the checkpoint is newer), through bench_quant.py's
    wrapper of convert_hf_to_gguf.py (a placeholder vocabulary: these checkpoints have no tokenizer)."""
    from bench_quant import CONVERT

    out = ckpt.parent / f"{ckpt.name}-gguf" / "model-bf16.gguf"
    newest = max(f.stat().st_mtime for f in ckpt.glob("*.safetensors"))
    if out.is_file() and out.stat().st_mtime >= newest:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"[gguf] {ckpt.name} -> {out}", flush=True)
    r = subprocess.run([sys.executable, "-c", CONVERT, str(converter), str(ckpt), str(out), "bf16"],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        out.unlink(missing_ok=True)
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {ckpt}:\n{r.stderr[-3000:]}")
    return out
