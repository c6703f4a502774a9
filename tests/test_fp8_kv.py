"""fp8 (e4m3) KV cache: quantization bounds, the torch and Triton paths against the reference,
engine memory and outputs."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import pytest
import torch

from kvcache import AttentionMetadata, Fp8Cache, paged_attention_reference, paged_attention_torch, write_kv
from kvcache.fp8 import FP8_MAX, dequantize_fp8, quantize_fp8
from kvcache.reference import write_kv_reference
from kvcache.triton_attention import paged_attention_triton, write_kv_triton
from moe import LLM, SamplingParams

from test_engine import _run_engine
from test_quant_default_model import TEXT, teacher_forced_logprobs


def test_quantize_fp8_error_is_within_e4m3_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 32, generator=g) * torch.logspace(-3, 3, 64).view(64, 1, 1)
    x[3, 1] = 0.0  # an all-zero row stays zero (no division by a zero scale)
    q, scale = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 4)
    assert float(q.float().abs().amax(-1)[scale > 1e-30].min()) == FP8_MAX  # each row's max maps to 448
    err = (dequantize_fp8(q, scale, torch.float32) - x).abs()
    # e4m3: 3 mantissa bits (relative step 2^-3, error <= half of it) down to 2^-6, then a fixed 2^-9 step
    bound = x.abs() * 2**-4 + scale.unsqueeze(-1) * 2**-10
    assert bool((err <= bound * (1 + 1e-6)).all())
    assert bool((dequantize_fp8(q, scale, torch.float32)[3, 1] == 0).all())


def test_cpu_quantize_writes_the_bytes_torch_writes():
    # the C pass write_fp8 takes for bf16 rows on CPU (and the captured decode step, in C): the codes and
    # scales of quantize_fp8, bit for bit, for rows across 12 decades, zero rows, and every finite bf16
    # value (consecutive bit patterns: each row's codes meet rounding ties)
    import cpu_kernels

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(3000, 128, generator=g) * torch.logspace(-6, 6, 3000).view(-1, 1)).bfloat16()
    x[5] = 0
    x[7, 3] = 1e-30
    bits = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = bits[torch.isfinite(bits)]
    for rows in (x, every[:every.numel() // 128 * 128].view(-1, 128)):
        got = cpu_kernels.quantize_e4m3(rows)
        if got is None:
            assert cpu_kernels.load() is None
            return
        want = quantize_fp8(rows)
        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("magnitude", [1.0, 1e6])  # 1e6: scales too large for the bit trick, the plain cast
def test_dequantize_fp8_fast_path_equals_the_plain_cast(magnitude: float):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 2, 40, generator=g) * torch.logspace(-8, 0, 50).view(50, 1, 1) * magnitude
    q, scale = quantize_fp8(x)
    plain = q.float() * scale.unsqueeze(-1)
    assert torch.equal(dequantize_fp8(q, scale, torch.float32), plain)
    torch.testing.assert_close(dequantize_fp8(q, scale, torch.bfloat16), plain.to(torch.bfloat16), atol=0, rtol=1e-2)


def _fp8_batch(block_size: int, H: int, H_kv: int, Dk: int, Dv: int, latent: bool, dtype: torch.dtype):
    q_lens, c_lens = [5, 1, 9, 1], [9, 7, 9, 30]
    g = torch.Generator().manual_seed(1)
    n_blocks = [-(-c // block_size) for c in c_lens]
    perm = torch.randperm(sum(n_blocks) + 2, generator=g).tolist()
    tables, used = [], 0
    for n in n_blocks:
        tables.append(perm[used:used + n])
        used += n
    meta = AttentionMetadata.build(q_lens, c_lens, tables, block_size)
    k_cache = Fp8Cache.zeros(len(perm), block_size, H_kv, Dk, "cpu")
    v_cache = k_cache.narrow(Dv) if latent else Fp8Cache.zeros(len(perm), block_size, H_kv, Dv, "cpu")
    # old context: every slot written through the reference, then the step's rows on top
    all_slots = torch.arange(len(perm) * block_size)
    old_k = torch.randn(len(all_slots), H_kv, Dk, generator=g)
    write_kv_reference(k_cache, k_cache if latent else v_cache, old_k,
                       old_k if latent else torch.randn(len(all_slots), H_kv, Dv, generator=g), all_slots)
    T = sum(q_lens)
    q = torch.randn(T, H, Dk, generator=g).to(dtype)
    k = (torch.randn(T, H_kv, Dk, generator=g) * 3).to(dtype)
    v = None if latent else torch.randn(T, H_kv, Dv, generator=g).to(dtype)
    return meta, k_cache, v_cache, q, k, v


def _clone(c: Fp8Cache) -> Fp8Cache:
    return Fp8Cache(c.data.clone(), c.scale.clone())


@pytest.mark.parametrize("latent", [False, True])
def test_fp8_write_triton_and_torch_store_the_reference_bytes(latent: bool):
    meta, k_cache, v_cache, _, k, v, = _fp8_batch(4, 4, 1 if latent else 2, 24 if latent else 32, 16, latent,
                                                  torch.float16)
    ref_k = _clone(k_cache)
    ref_v = ref_k if latent else _clone(v_cache)
    write_kv_reference(ref_k, ref_v, k, k if latent else v, meta.slot_mapping)
    for write in (write_kv, write_kv_triton):
        got_k = _clone(k_cache)
        got_v = None if latent else _clone(v_cache)
        write(got_k, got_v, k, v, meta.slot_mapping)
        pairs = [(got_k, ref_k)] + ([] if latent else [(got_v, ref_v)])
        for got, ref in pairs:
            assert torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8)), write.__name__
            assert torch.equal(got.scale, ref.scale), write.__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("latent", [False, True])
def test_fp8_paged_attention_torch_and_triton_match_reference(latent: bool, dtype: torch.dtype):
    H, H_kv, Dk, Dv = (4, 1, 24, 16) if latent else (4, 2, 32, 32)
    meta, k_cache, v_cache, q, k, v = _fp8_batch(4, H, H_kv, Dk, Dv, latent, dtype)
    write_kv(k_cache, None if latent else v_cache, k, v, meta.slot_mapping)
    ref = paged_attention_reference(q, k_cache, v_cache, meta, 0.3)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(paged_attention_torch(q, k_cache, v_cache, meta, 0.3), ref, **tol)
    torch.testing.assert_close(paged_attention_triton(q, k_cache, v_cache, meta, 0.3), ref, **tol)


def test_fp8_cache_holds_twice_the_tokens_in_the_same_budget():
    budget = 1 << 20
    bf16 = LLM(dtype="bfloat16", kv_cache_memory=budget).engine
    fp8 = LLM(dtype="bfloat16", kv_cache_memory=budget, kv_cache_dtype="fp8").engine
    spec = bf16.model.kv_cache_spec()[0]
    head_dim = spec.k_dim
    # one byte per element plus one float32 scale per (token, head) row, against two bytes per element
    assert fp8.kv_bytes_per_token() * 2 * head_dim == bf16.kv_bytes_per_token() * (head_dim + 4)
    assert fp8.kv_cache_tokens >= 1.8 * bf16.kv_cache_tokens
    k, v = fp8.kv_caches[0]
    assert k.data.dtype == torch.float8_e4m3fn and k.scale.dtype == torch.float32


@pytest.fixture(scope="module")
def reference():
    llm = LLM(dtype="bfloat16", kv_cache_memory=1 << 22, max_logprobs=-1)
    ids = llm.get_tokenizer().encode(TEXT)
    return ids, teacher_forced_logprobs(llm, ids)


def test_fp8_kv_default_model_stays_close_to_bf16(reference):
    ids, ref = reference
    got = teacher_forced_logprobs(LLM(dtype="bfloat16", kv_cache_memory=1 << 22, kv_cache_dtype="fp8",
                                      max_logprobs=-1), ids)
    agreement = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    print(f"fp8 KV cache: top-1 agreement {agreement:.3f}, mean KL {kl:.2e} over {len(ids) - 1} positions")
    assert agreement >= 0.95 and kl < 0.005, (agreement, kl)


def test_fp8_kv_outputs_do_not_depend_on_batching_or_preemption():
    """Each row's bytes depend only on the row: a request alone, in a batch, and recomputed after
    preemption (a tiny cache) gives the same tokens."""
    prompts = ["The module defines", "A list is a mutable sequence, and a tuple is", "Each function returns"]
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    kw = dict(dtype="float32", kv_cache_dtype="fp8", block_size=4)
    roomy = LLM(**kw)
    alone = [roomy.generate(p, sp)[0].outputs[0].token_ids for p in prompts]
    assert [o.outputs[0].token_ids for o in roomy.generate(prompts, sp)] == alone
    # 10 blocks = 40 tokens: each request needs up to ~32, so preemption must happen
    tight = LLM(**kw, kv_cache_memory=10 * 4 * roomy.engine.kv_bytes_per_token())
    assert tight.engine.block_manager.num_blocks == 10
    got, seqs, _ = _run_engine(tight, prompts, [sp] * len(prompts))
    assert sum(s.num_preemptions for s in seqs) > 0, "no preemption happened"
    assert [o.outputs[0].token_ids for o in got] == alone


def test_bad_kv_cache_dtype_is_named():
    with pytest.raises(ValueError, match="kv_cache_dtype='int4'.*choose 'auto'.*'fp8'"):
        LLM(kv_cache_dtype="int4")
