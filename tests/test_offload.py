"""Expert offloading: the cache's policy and accounting on fake layers; the engine's outputs
bit-identical with and without offloading down to a one-expert cache (float, packed, stacked
checkpoints); statistics that add up; peak RSS bounded in a subprocess; errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experts.formats import Int4Weights
from experts.offload import ExpertCache, OffloadedExperts
from moe import LLM, SamplingParams
from moe.models.quant_weights import expert_cache
from moe.quantize import quantize_checkpoint

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [{"prompt_token_ids": torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist()}
           for n in (5, 13)]
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)


# ---------------------------------------------------------------------------------------------
# the cache on fake layers


class FakeExpert:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes


class FakeLayer:
    """What the cache needs of a layer: its expert count and size, and a way to read an expert."""

    def __init__(self, num_local: int, nbytes: int = 100):
        self.num_local, self.expert_nbytes = num_local, nbytes
        self.reads: list[int] = []

    def read_expert(self, i: int):
        self.reads.append(i)
        return FakeExpert(self.expert_nbytes), self.expert_nbytes


def _run(cache: ExpertCache, slot: int, counts: list[int]) -> None:
    """One layer call: what OffloadedExperts.forward does with the cache."""
    cache.begin_layer(slot, counts)
    for i, n in enumerate(counts):
        if n:
            cache.acquire(slot, i)
            assert cache.used_bytes <= cache.capacity
            cache.release(slot, i)


def test_eviction_prefers_rarely_routed_then_least_recent():
    cache = ExpertCache(300, prefetch=False)
    layer = FakeLayer(5)
    cache.register(layer)
    _run(cache, 0, [5, 1, 0, 0, 0])
    _run(cache, 0, [5, 0, 1, 0, 0])  # expert 1 now has the lowest frequency (1 * 0.8^1 < 1)
    _run(cache, 0, [0, 0, 0, 1, 0])
    assert sorted(cache.resident()) == [(0, 0), (0, 2), (0, 3)]
    _run(cache, 0, [0, 0, 0, 0, 1])  # frequencies now 5.76, -, 0.64, 0.8: expert 2 goes
    assert sorted(cache.resident()) == [(0, 0), (0, 3), (0, 4)]
    s = cache.stats
    assert (s.hits, s.misses, s.evictions) == (1, 5, 2)
    assert s.lookups == 6 and s.bytes_loaded == 500 and layer.reads == [0, 1, 2, 3, 4]


def test_pinned_experts_are_never_evicted():
    cache = ExpertCache(100, prefetch=False)
    cache.register(FakeLayer(2))
    cache.begin_layer(0, [1, 1])
    cache.acquire(0, 0)  # pinned
    with pytest.raises(RuntimeError, match="do not fit beside the pinned"):
        cache.acquire(0, 1)
    cache.release(0, 0)
    cache.acquire(0, 1)
    assert cache.resident() == [(0, 1)]


def test_cache_smaller_than_an_expert_is_an_error():
    cache = ExpertCache(99, prefetch=False)
    layer = FakeLayer(2)
    cache.register(layer)
    with pytest.raises(ValueError, match=r"expert_cache \(99 bytes\) is smaller than one expert .*100 bytes"):
        cache.check_fits(layer)
    with pytest.raises(ValueError, match="positive"):
        ExpertCache(0)


def test_prefetch_learns_next_layer_experts():
    cache = ExpertCache(250, prefetch=True)  # room for this layer's expert and one prefetched
    for layer in (FakeLayer(4), FakeLayer(4)):
        cache.register(layer)
    # layer 1 always uses expert (i + 1) % 4 after layer 0 used expert i: learned in the first 4 steps
    for step in range(8):
        i = step % 4
        _run(cache, 0, [int(e == i) for e in range(4)])
        deadline = time.monotonic() + 5
        while step >= 4 and not cache.is_resident(1, (i + 1) % 4) and time.monotonic() < deadline:
            time.sleep(0.001)
        _run(cache, 1, [int(e == (i + 1) % 4) for e in range(4)])
    s = cache.stats
    assert s.prefetch_loads >= 4 and s.prefetch_hits >= 4  # once learned, layer 1 always hits
    assert s.hits + s.misses == s.lookups == 16
    cache.close()


# ---------------------------------------------------------------------------------------------
# the engine


def _generate(path: Path, prefetch: bool = True, **kw):
    llm = LLM(str(path), dtype="float32", kv_cache_memory=1 << 20, max_num_seqs=4, **kw)
    lookups = [0]
    cache = expert_cache(llm.engine.model)
    if cache is not None:
        cache.prefetch = prefetch
        begin, release = cache.begin_layer, cache.release

        def counting_begin(slot, counts):
            lookups[0] += sum(1 for n in counts if n)
            begin(slot, counts)

        def checked_release(slot, expert):
            assert cache.used_bytes <= cache.capacity
            release(slot, expert)

        cache.begin_layer, cache.release = counting_begin, checked_release
    outs = llm.generate(PROMPTS, PARAMS)
    result = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]
    return result, llm, cache, lookups[0]


@pytest.fixture(scope="module")
def int4_deepseek(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds-int4") / "q"
    quantize_checkpoint(checkpoint("deepseek_v3"), out, Int4Weights(32))
    return out


@pytest.mark.parametrize("model", ["mixtral", "gpt_oss", "deepseek_v3-int4"])
def test_offloaded_outputs_identical(model, checkpoint, int4_deepseek, monkeypatch):
    path = int4_deepseek if model == "deepseek_v3-int4" else checkpoint(model)
    # offloaded experts compute one at a time; the resident reference does too here (not as the
    # batched decode-sized GEMMs of experts/grouped.py, which round differently in the last bits)
    # so that any difference is the cache's doing
    monkeypatch.setattr("experts.grouped.BATCHED_MAX_ROWS", 0)
    want, llm, _, _ = _generate(path)
    layers = llm.engine.model.sparse_layers()
    num_experts = layers[0].experts.num_local
    del llm
    one = None
    for per_layer in (num_experts, 1, 0):  # every expert resident, one per layer, one in all
        for prefetch in (False, True):
            if per_layer == num_experts and prefetch:
                continue
            if one is None:  # the size of one resident expert, from a roomy run
                _, llm, cache, _ = _generate(path, offload_experts=True, expert_cache="1GiB")
                one = max(m.experts.expert_nbytes for m in llm.engine.model.sparse_layers())
                cache.close()
            size = one * max(1, per_layer * len(layers))
            got, llm, cache, lookups = _generate(path, prefetch, offload_experts=True, expert_cache=size)
            assert got == want, (model, per_layer, prefetch)  # bit-identical tokens and log-probs
            s = cache.stats
            assert s.hits + s.misses == s.lookups == lookups > 0
            assert s.bytes_loaded > 0 and s.stall_seconds > 0
            if per_layer == num_experts:  # everything fits: each expert is read once, never evicted
                assert s.evictions == 0 and s.misses == len(cache.resident())
            if size == one:
                assert len(cache.resident()) <= 1
            assert all(isinstance(m.experts, OffloadedExperts) for m in llm.engine.model.sparse_layers())
            cache.close()


def test_a_dropped_engine_leaves_no_prefetch_thread(checkpoint):
    """The prefetch thread holds its cache weakly: dropping the engine ends it (a live extra
    thread that ran torch ops slowed every later torch call of the process ~3x)."""
    import gc
    import threading

    def prefetchers():
        return [t for t in threading.enumerate() if t.name == "expert-prefetch"]

    _, llm, cache, _ = _generate(checkpoint("mixtral"), True, offload_experts=True, expert_cache="300KiB")
    assert cache.stats.prefetch_loads > 0 and prefetchers()
    del llm, cache
    gc.collect()
    deadline = time.time() + 10
    while prefetchers() and time.time() < deadline:
        time.sleep(0.05)
    assert not prefetchers()


def test_stacked_experts_read_one_expert_slice(checkpoint):
    """gpt-oss stacks every expert in one tensor: a miss reads that expert's slice, not the tensor."""
    _, llm, cache, _ = _generate(checkpoint("gpt_oss"), offload_experts=True, expert_cache="1GiB")
    cfg = llm.engine.model_config
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    per_expert = 4 * (2 * F * D + D * F + 2 * F + D)  # fp32 gate_up, down and both biases
    assert cache.stats.bytes_loaded == cache.stats.misses * per_expert
    cache.close()


def test_offload_option_errors(checkpoint):
    path = str(checkpoint("mixtral"))
    with pytest.raises(ValueError, match="smaller than one expert"):
        LLM(path, dtype="float32", offload_experts=True, expert_cache=1000)
    with pytest.raises(ValueError, match="set offload_experts=True"):
        LLM(path, expert_cache="1GiB")
    with pytest.raises(ValueError, match="cannot read '1 GB please' as a size"):
        LLM(path, offload_experts=True, expert_cache="1 GB please")


# ---------------------------------------------------------------------------------------------
# peak RSS, measured in a child process

RSS_SCRIPT = r"""
import json, re, sys
import torch
torch.set_num_threads(1)
from moe import LLM, SamplingParams
from moe.models.quant_weights import expert_cache

def kib(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
base = kib("VmRSS")
llm = LLM(sys.argv[1], dtype="float32", kv_cache_memory=1 << 20, max_num_seqs=2, **json.loads(sys.argv[2]))
out = llm.generate([{"prompt_token_ids": list(range(3, 35))}], SamplingParams(temperature=0.0, max_tokens=8))
peak = kib("VmHWM")
nonexpert = sum(p.numel() * p.element_size() for n, p in llm.engine.model.named_parameters() if ".experts." not in n)
cache = expert_cache(llm.engine.model)
print(json.dumps({"growth": peak - base, "nonexpert": nonexpert, "tokens": out[0].outputs[0].token_ids,
                  "stats": cache.stats.as_dict() if cache else None}))
"""


@pytest.fixture(scope="module")
def big_experts(tmp_path_factory) -> tuple[Path, int]:
    """A Mixtral whose experts (192 MiB, fp32) dwarf everything else (~6 MiB), one file per layer."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("big_experts")
    L, E, D, F, V = 4, 16, 256, 1024, 320
    hf = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=V, hidden_size=D,
              intermediate_size=F, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
              num_local_experts=E, num_experts_per_tok=2, max_position_embeddings=128, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False, dtype="float32")
    (d / "config.json").write_text(json.dumps(hf))
    g = torch.Generator().manual_seed(0)
    save_file({"model.embed_tokens.weight": torch.randn(V, D, generator=g), "model.norm.weight": torch.ones(D),
               "lm_head.weight": torch.randn(V, D, generator=g) * D ** -0.5}, str(d / "model-0.safetensors"))
    for layer in range(L):
        p = f"model.layers.{layer}."
        t = {p + "input_layernorm.weight": torch.ones(D), p + "post_attention_layernorm.weight": torch.ones(D),
             p + "block_sparse_moe.gate.weight": torch.randn(E, D, generator=g)}
        for n, rows in (("q", D), ("k", D // 2), ("v", D // 2), ("o", D)):
            t[p + f"self_attn.{n}_proj.weight"] = torch.randn(rows, D, generator=g) * D ** -0.5
        for e in range(E):
            q = p + f"block_sparse_moe.experts.{e}."
            t[q + "w1.weight"] = torch.randn(F, D, generator=g) * D ** -0.5
            t[q + "w3.weight"] = torch.randn(F, D, generator=g) * D ** -0.5
            t[q + "w2.weight"] = torch.randn(D, F, generator=g) * F ** -0.5
        save_file(t, str(d / f"model-{layer + 1}.safetensors"))
    return d, L * E * 3 * D * F * 4


def _child(path: Path, **kw) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), json.dumps(kw)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_bounded_by_cache(big_experts):
    path, expert_bytes = big_experts
    cache = 24 << 20  # 8 of the 64 experts
    slack = 48 << 20  # KV cache, activations, allocator and interpreter noise
    resident = _child(path)
    offloaded = _child(path, offload_experts=True, expert_cache=cache)
    assert offloaded["tokens"] == resident["tokens"]
    assert resident["growth"] >= expert_bytes  # the measurement sees the experts when they are resident
    bound = offloaded["nonexpert"] + cache + slack
    print(f"\npeak RSS growth: resident {resident['growth'] / 2**20:.0f} MiB, offloaded "
          f"{offloaded['growth'] / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB; experts "
          f"{expert_bytes / 2**20:.0f} MiB, cache {cache / 2**20:.0f} MiB); stats {offloaded['stats']}")
    assert offloaded["growth"] <= bound
    s = offloaded["stats"]
    assert s["hits"] + s["misses"] == s["lookups"] and s["evictions"] > 0
