import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import pytest
import torch

from kvcache.metadata import AttentionMetadata
from kvcache.reference import paged_attention_reference, write_kv_reference
from kvcache.triton_attention import paged_attention_triton, write_kv_triton

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}

# query_lens / context_lens per sequence; H query heads over H_kv cache heads; head dims Dk, Dv.
CASES = {
    # prefill chunks (one a whole prompt), decodes and a long context, GQA 2:1
    "mixed_gqa": dict(q=[5, 1, 17, 3], c=[9, 7, 17, 40], H=4, H_kv=2, Dk=32, Dv=32),
    "decode_only": dict(q=[1, 1, 1], c=[1, 13, 33], H=8, H_kv=2, Dk=32, Dv=32),
    # MLA: one latent cache head, V = first Dv dims of K (a strided view), Dk not a power of two
    "mla": dict(q=[3, 1, 6], c=[3, 20, 11], H=4, H_kv=1, Dk=24, Dv=16, mla=True),
    "window": dict(q=[6, 1, 9], c=[6, 30, 21], H=4, H_kv=4, Dk=16, Dv=16, window=5),
    # group of 3 (non power of two packing), odd head dim, window + sinks as in gpt-oss
    "sinks_window": dict(q=[7, 1, 2], c=[7, 26, 19], H=6, H_kv=2, Dk=20, Dv=20, window=8, sinks=True),
    "sinks_decode": dict(q=[1, 1], c=[10, 5], H=4, H_kv=1, Dk=16, Dv=16, sinks=True),
}


def _make_batch(case: dict, block_size: int, dtype: torch.dtype, seed: int = 0):
    """Random caches holding old context, a shuffled block table, and the step's new q/k/v."""
    g = torch.Generator().manual_seed(seed)
    q_lens, c_lens, H, H_kv, Dk, Dv = case["q"], case["c"], case["H"], case["H_kv"], case["Dk"], case["Dv"]
    n_blocks = [-(-c // block_size) for c in c_lens]
    perm = torch.randperm(sum(n_blocks) + 2, generator=g).tolist()  # non-contiguous physical blocks
    tables, used = [], 0
    for n in n_blocks:
        tables.append(perm[used:used + n])
        used += n
    meta = AttentionMetadata.build(q_lens, c_lens, tables, block_size)
    num_blocks = len(perm)
    k_cache = torch.randn(num_blocks, block_size, H_kv, Dk, generator=g).to(dtype)
    if case.get("mla"):
        v_cache = k_cache[..., :Dv]
    else:
        v_cache = torch.randn(num_blocks, block_size, H_kv, Dv, generator=g).to(dtype)
    T = sum(q_lens)
    q = torch.randn(T, H, Dk, generator=g).to(dtype)
    k = torch.randn(T, H_kv, Dk, generator=g).to(dtype)
    v = k[..., :Dv] if case.get("mla") else torch.randn(T, H_kv, Dv, generator=g).to(dtype)
    sinks = torch.randn(H, generator=g).to(dtype) * 2 if case.get("sinks") else None
    return meta, k_cache, v_cache, q, k, v, sinks


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("case", ["mixed_gqa", "mla"])
def test_write_kv_matches_reference(case: str, block_size: int):
    meta, k_cache, v_cache, _, k, v, _ = _make_batch(CASES[case], block_size, torch.float16)
    k_ref = k_cache.clone()
    v_ref = k_ref[..., : v.shape[-1]] if CASES[case].get("mla") else v_cache.clone()
    write_kv_reference(k_ref, v_ref, k, v, meta.slot_mapping)
    write_kv_triton(k_cache, v_cache, k, v, meta.slot_mapping)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_matches_reference(case: str, block_size: int, dtype: torch.dtype):
    spec = CASES[case]
    meta, k_cache, v_cache, q, k, v, sinks = _make_batch(spec, block_size, dtype)
    write_kv_triton(k_cache, v_cache, k, v, meta.slot_mapping)
    scale = spec["Dk"] ** -0.5
    window = spec.get("window")
    out = paged_attention_triton(q, k_cache, v_cache, meta, scale, sliding_window=window, sinks_H=sinks)
    ref = paged_attention_reference(q, k_cache, v_cache, meta, scale, sliding_window=window, sinks_H=sinks)
    assert out.shape == (q.shape[0], spec["H"], spec["Dv"]) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
