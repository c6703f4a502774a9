"""The C CPU kernels (cpu_kernels/) against their references: paged decode attention against the
float32 reference, rotary embedding and SwiGLU against the torch ops they replace."""
from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap

import pytest

import torch

import cpu_kernels
from cpu_kernels.amx import swiglu_experts_reference
from cpu_kernels.gemv import gemv_reference
from kvcache import AttentionMetadata, paged_attention_reference, paged_attention_torch, write_kv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernel_builds_here():
    # CI has gcc: the kernel must really be in use there, not silently replaced by the fallback
    assert cpu_kernels.load() is not None


def test_build_library_of_this_directory_is_the_loaded_one_and_use_library_swaps_it(tmp_path):
    # benchmarks/bench_kernel_ab.py loads two builds side by side: the same sources must hit the
    # cache (same file, no compile), and use_library must make every binding call the given one
    from cpu_kernels import build

    loaded = cpu_kernels.load()
    same = build.build_library(os.path.join(ROOT, "cpu_kernels"))
    assert same._name == loaded._name
    other = build.build_library(os.path.join(ROOT, "cpu_kernels"))
    try:
        build.use_library(other)
        assert cpu_kernels.load() is other
    finally:
        build.use_library(loaded)
    assert cpu_kernels.load() is loaded
    # a directory without the sources is an error naming the file, not a silent fallback
    with pytest.raises(OSError):
        build.build_library(tmp_path)


def test_vector_bodies_in_use_where_the_cpu_has_them():
    # -march=native: AVX-512 where the CPU has it, else AVX2 + FMA; a build that lost its vector
    # bodies (flags, compiler) would still pass every equality test, only slower
    from cpu_kernels.elementwise import simd_lanes

    flags = _cpu_flags()
    want = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 1
    assert simd_lanes() == want


def _decode_batch(lens, H, Hkv, Dk, Dv, block_size, dtype, latent=False, seed=0, qlens=None):
    g = torch.Generator().manual_seed(seed)
    nblocks = [-(-n // block_size) for n in lens]
    total = sum(nblocks) + 2
    perm = torch.randperm(total, generator=g).tolist()
    tables, at = [], 0
    for n in nblocks:
        tables.append(perm[at:at + n])
        at += n
    k_cache = torch.randn(total, block_size, Hkv, Dk, generator=g).to(dtype)
    v_cache = k_cache[..., :Dv] if latent else torch.randn(total, block_size, Hkv, Dv, generator=g).to(dtype)
    qlens = qlens or [1] * len(lens)
    meta = AttentionMetadata.build(qlens, lens, tables, block_size)
    q = torch.randn(sum(qlens), H, Dk, generator=g).to(dtype)
    return meta, k_cache, v_cache, q


SHAPES = {
    "gqa_2": dict(H=16, Hkv=8, Dk=64, Dv=64),
    "gqa_2_d128": dict(H=8, Hkv=4, Dk=128, Dv=128),  # V sum: 2 score rows x 128 dims per loaded row
    "gqa_8": dict(H=8, Hkv=1, Dk=64, Dv=64),
    "mha_odd_heads": dict(H=7, Hkv=7, Dk=32, Dv=32),
    "group_7": dict(H=7, Hkv=1, Dk=48, Dv=48),  # query-head tiles of 4 + 3
    "dim_not_16": dict(H=6, Hkv=2, Dk=20, Dv=20),  # scalar path
    "dim_24_group_3": dict(H=6, Hkv=2, Dk=24, Dv=24),  # AVX2 only: 8-lane dims, V sums one score row at a time
    "dim_48_group_4": dict(H=8, Hkv=2, Dk=48, Dv=48),  # AVX2: 4 score rows x 16 dims (AVX-512: 16-lane dims)
    "dim_96_group_2": dict(H=4, Hkv=2, Dk=96, Dv=96),  # AVX2: 2 score rows x 32 dims
    "mla_latent": dict(H=16, Hkv=1, Dk=288, Dv=256, latent=True),  # V is a strided view of K
    "group_4_d64": dict(H=8, Hkv=2, Dk=64, Dv=64),  # AVX512-BF16: 4 query heads x 4 cached rows a pass
    "group_2_d64": dict(H=8, Hkv=4, Dk=64, Dv=64),  # AVX512-BF16: 2 query heads x 8 cached rows a pass
    "mla_v3": dict(H=8, Hkv=1, Dk=576, Dv=512, latent=True),  # DeepSeek-V3's latent (512) + rope (64) dims
    "mqa_d128": dict(H=8, Hkv=1, Dk=128, Dv=128),  # one KV head, V apart from K
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 24])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_decode_kernel_matches_reference(shape, batch, dtype):
    spec = dict(SHAPES[shape])
    latent = spec.pop("latent", False)
    lens = torch.randint(1, 150, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    meta, k_cache, v_cache, q = _decode_batch(lens, block_size=16, dtype=dtype, latent=latent, **spec)
    scale = spec["Dk"] ** -0.5
    out = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
    ref = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    assert out.dtype == dtype and out.shape == (batch, spec["H"], spec["Dv"])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,sinks", [(5, False), (40, True), (None, True), (1, False)])
@pytest.mark.parametrize("block_size", [16, 5, 37])
def test_decode_kernel_window_and_sinks(window, sinks, block_size, dtype):
    # block sizes under, at and over the kernel's 16-row score tiles
    lens = [1, 4, 5, 6, 39, 40, 41, 97]
    meta, k_cache, v_cache, q = _decode_batch(lens, 8, 4, 32, 32, block_size, dtype, seed=3)
    sinks_H = torch.randn(8, generator=torch.Generator().manual_seed(1)) * 3 if sinks else None
    out = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, 0.2,
                                            window, sinks_H)
    ref = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), meta, 0.2, window, sinks_H)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["gqa_2", "gqa_2_d128", "group_7", "dim_not_16", "mla_latent"])
def test_decode_kernel_several_rows_per_sequence(shape, dtype):
    # speculative decoding's verify rows and short prompts: each of a sequence's Q rows sees its own
    # causal prefix of the cache (a whole prompt when Q equals the context)
    spec = dict(SHAPES[shape])
    latent = spec.pop("latent", False)
    lens, qlens = [9, 1, 40, 16, 3, 77], [5, 1, 16, 16, 2, 1]
    meta, k_cache, v_cache, q = _decode_batch(lens, block_size=16, dtype=dtype, latent=latent, seed=7,
                                              qlens=qlens, **spec)
    scale = spec["Dk"] ** -0.5
    out = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                            query_start=meta.query_start_loc)
    ref = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("group", [4, 2])
@pytest.mark.parametrize("window,sinks", [(None, False), (40, True)])
@pytest.mark.parametrize("block_size", [16, 5])
def test_decode_kernel_query_heads_scored_together_as_one_by_one(window, sinks, block_size, group):
    # bf16, 4 (or 2) query heads per KV head, dims a multiple of 32: AVX512-BF16 builds score 4 heads x
    # 4 cached rows (2 x 8) a pass, each row's chunks loaded once for the heads; every head's result is
    # bit-identical to that head run alone (one query head per KV head), verify rows too
    lens, qlens = [1, 5, 40, 133], [1, 1, 3, 1]
    meta, k_cache, v_cache, q = _decode_batch(lens, 8, 8 // group, 64, 64, block_size, torch.bfloat16, seed=5,
                                              qlens=qlens)
    sinks_H = torch.randn(8, generator=torch.Generator().manual_seed(6)) * 3 if sinks else None
    args = (meta.block_tables, meta.context_lens, 0.125, window)
    out = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, *args, sinks_H, meta.query_start_loc)
    for h in range(8):
        kv = slice(h // group, h // group + 1)
        alone = cpu_kernels.paged_decode_attention(q[:, h:h + 1].contiguous(), k_cache[:, :, kv], v_cache[:, :, kv],
                                                   *args, sinks_H[h:h + 1] if sinks else None, meta.query_start_loc)
        assert torch.equal(out[:, h:h + 1], alone)
    ref = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), meta, 0.125, window, sinks_H)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("window,sinks", [(5, False), (40, True), (None, True), (1, False), (3, True)])
@pytest.mark.parametrize("block_size", [16, 5])
def test_decode_kernel_several_rows_window_and_sinks(window, sinks, block_size):
    # rows of one sequence see different windows: the first row's oldest keys are out of the last row's
    lens, qlens = [4, 6, 39, 41, 97, 12], [4, 3, 8, 2, 16, 12]
    meta, k_cache, v_cache, q = _decode_batch(lens, 8, 4, 32, 32, block_size, torch.float32, seed=4, qlens=qlens)
    sinks_H = torch.randn(8, generator=torch.Generator().manual_seed(2)) * 3 if sinks else None
    out = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, 0.2,
                                            window, sinks_H, meta.query_start_loc)
    ref = paged_attention_reference(q, k_cache, v_cache, meta, 0.2, window, sinks_H)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _fp8_cache_of(cache: torch.Tensor, g: torch.Generator, latent_of=None):
    """An fp8 cache (kvcache.Fp8Cache) of ``cache``'s shape holding every finite e4m3 code (random bytes,
    NaN codes dropped) and a scale of 2^-2 .. 2^2 / 448 per (slot, head) row; with ``latent_of``, a view of that
    cache's leading dims (MLA's V)."""
    from kvcache import Fp8Cache

    if latent_of is not None:
        return latent_of.narrow(cache.shape[-1])
    codes = torch.randint(0, 256, cache.shape, generator=g, dtype=torch.int32)
    codes[(codes & 0x7F) == 0x7F] = 0x11  # (0x7f / 0xff: e4m3fn's NaN)
    data = codes.to(torch.uint8).view(torch.float8_e4m3fn)
    scale = 2.0 ** (torch.rand(cache.shape[:3], generator=g) * 4 - 2) / 448  # (rows' largest ~0.25-4, as quantized)
    return Fp8Cache(data, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["gqa_2", "gqa_2_d128", "gqa_8", "group_7", "dim_not_16", "mla_latent",
                                   "group_4_d64", "group_2_d64"])
def test_decode_kernel_reads_fp8_caches(shape, dtype):
    # fp8 (e4m3) K/V rows with a scale per (slot, head), read in place: every code (subnormals too) through the
    # score paths (vdpbf16ps on bf16 queries of head groups of 2 / 4, float32 otherwise) and the V sums, with
    # decode rows and several rows per sequence, windows and sinks; against the reference over the same cache
    spec = dict(SHAPES[shape])
    latent = spec.pop("latent", False)
    lens, qlens = [1, 9, 40, 16, 150, 77], [1, 5, 1, 16, 1, 3]
    meta, k_bf, v_bf, q = _decode_batch(lens, block_size=16, dtype=dtype, latent=latent, seed=11, qlens=qlens, **spec)
    g = torch.Generator().manual_seed(3)
    k_cache = _fp8_cache_of(k_bf, g)
    v_cache = _fp8_cache_of(v_bf, g, k_cache if latent else None)
    if not cpu_kernels.supports_decode(q, k_cache, v_cache):
        assert cpu_kernels.load() is None
        return
    scale = spec["Dk"] ** -0.5
    sinks_H = torch.randn(spec["H"], generator=g)
    for window, sinks in ((None, None), (20, sinks_H)):
        out = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                                window, sinks, query_start=meta.query_start_loc)
        ref = paged_attention_reference(q.float(), k_cache, v_cache, meta, scale, window, sinks)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("codes", ["all", "small"])  # small: magnitudes under 2^-3, a third of them subnormal
@pytest.mark.parametrize("shape", ["gqa_2", "gqa_8", "group_7", "dim_not_16", "mla_latent", "group_4_d64"])
def test_decode_kernel_fp8_rows_of_scale_one_equal_their_values_cached_plain(shape, codes, dtype):
    # with every scale 1 an fp8 cache holds values the plain cache of q's dtype holds exactly: the kernel's
    # outputs over the two are bit-identical (each e4m3 code read as its value, on every score and V path)
    from kvcache import Fp8Cache

    spec = dict(SHAPES[shape])
    latent = spec.pop("latent", False)
    lens, qlens = [1, 9, 40, 150], [1, 5, 1, 2]
    meta, k_plain, v_plain, q = _decode_batch(lens, block_size=16, dtype=dtype, latent=latent, seed=5, qlens=qlens,
                                              **spec)
    g = torch.Generator().manual_seed(9)
    caches = []
    for plain in (k_plain,) if latent else (k_plain, v_plain):
        c = torch.randint(0, 256 if codes == "all" else 0x28, plain.shape, generator=g, dtype=torch.int32)
        if codes == "small":
            c |= torch.randint(0, 2, plain.shape, generator=g, dtype=torch.int32) << 7  # signs
        c[(c & 0x7F) == 0x7F] = 0
        caches.append(Fp8Cache(c.to(torch.uint8).view(torch.float8_e4m3fn), torch.ones(plain.shape[:3])))
    k8 = caches[0]
    v8 = k8.narrow(spec["Dv"]) if latent else caches[1]
    k_vals = k8.data.float().to(dtype)
    v_vals = k_vals[..., :spec["Dv"]] if latent else v8.data.float().to(dtype)
    if not cpu_kernels.supports_decode(q, k8, v8):
        return
    for window, sinks in ((None, None), (20, torch.randn(spec["H"], generator=g))):
        args = (meta.block_tables, meta.context_lens, 0.3, window, sinks)
        got = cpu_kernels.paged_decode_attention(q, k8, v8, *args, query_start=meta.query_start_loc)
        want = cpu_kernels.paged_decode_attention(q, k_vals, v_vals, *args, query_start=meta.query_start_loc)
        assert torch.equal(got, want)


def test_decode_kernel_reads_every_fp8_code_exactly():
    # one cached token: the output is its V row (weight 1) times its scale, exactly, for every e4m3 code
    from kvcache import Fp8Cache

    codes = torch.arange(256, dtype=torch.int32)
    codes[(codes & 0x7F) == 0x7F] = 0
    data = codes.to(torch.uint8).view(torch.float8_e4m3fn).view(1, 1, 1, 256)
    v = Fp8Cache(data.clone(), torch.full((1, 1, 1), 0.5))
    k = Fp8Cache(data[..., :32].clone(), torch.ones(1, 1, 1))
    q = torch.randn(1, 2, 32)
    if not cpu_kernels.supports_decode(q, k, v):
        return
    out = cpu_kernels.paged_decode_attention(q, k, v, torch.zeros(1, 1, dtype=torch.int32),
                                            torch.ones(1, dtype=torch.int32), 0.1)
    want = data.view(256).float() * 0.5
    assert torch.equal(out[0, 0], want) and torch.equal(out[0, 1], want)


def test_decode_kernel_rejects_rows_without_offsets():
    meta, k_cache, v_cache, q = _decode_batch([9, 4], 4, 2, 16, 16, 16, torch.float32, qlens=[3, 1])
    with pytest.raises(ValueError, match="query_start"):
        cpu_kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, 0.25)


def test_mixed_step_sends_short_queries_to_kernel_and_prefill_to_sdpa(monkeypatch):
    # prefill chunks, verify-sized rows and decode rows in one step, realistic head shapes; the
    # short queries' results are the kernel's (counted), the long ones SDPA's, all equal to the reference
    g = torch.Generator().manual_seed(5)
    q_lens, c_lens, bs, H, Hkv, D = [7, 1, 1, 30, 1], [7, 50, 17, 64, 200], 16, 16, 8, 64
    n = [-(-c // bs) for c in c_lens]
    perm = torch.randperm(sum(n) + 1, generator=g).tolist()
    tables = [perm[sum(n[:i]):sum(n[:i + 1])] for i in range(len(n))]
    meta = AttentionMetadata.build(q_lens, c_lens, tables, bs)
    k_cache = torch.randn(sum(n) + 1, bs, Hkv, D, generator=g)
    v_cache = torch.randn(sum(n) + 1, bs, Hkv, D, generator=g)
    T = sum(q_lens)
    write_kv(k_cache, v_cache, torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, D, generator=g),
             meta.slot_mapping)
    q = torch.randn(T, H, D, generator=g)
    calls = []
    real = cpu_kernels.paged_decode_attention
    monkeypatch.setattr(cpu_kernels, "paged_decode_attention",
                        lambda q, *a, **k: calls.append(q.shape[0]) or real(q, *a, **k))
    out = paged_attention_torch(q, k_cache, v_cache, meta, D ** -0.5)
    assert calls == [10]  # 7 + 1 + 1 + 1 rows; the 30-row chunk went to SDPA
    torch.testing.assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, D ** -0.5),
                               atol=1e-5, rtol=1e-5)


def _run(code: str, env: dict) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


def test_release_openmp_threads_frees_the_callers_workers():
    # a thread that ran a parallel region keeps its OpenMP workers (threads - 1 of them); releasing
    # them ends those threads (the server's loading thread does this when the engine thread takes
    # over), and the next region starts them again
    out = _run("""
        import os, time, torch
        from cpu_kernels.build import release_openmp_threads
        torch.set_num_threads(2)
        x = torch.randn(512, 512)
        tasks = lambda: len(os.listdir('/proc/self/task'))
        (x @ x).sum()
        before = tasks()
        assert release_openmp_threads()
        for _ in range(200):  # a released worker exits on its own time (seen late once under a loaded CI): 2 s at most
            if tasks() < before:
                break
            time.sleep(0.01)
        after = tasks()
        (x @ x).sum()
        print('TASKS', before, after, tasks())
    """, {"OMP_NUM_THREADS": "2"})
    before, after, again = map(int, out.split("TASKS")[1].split()[:3])
    assert after == before - 1 and again == before


def test_fresh_build_shares_torchs_openmp_runtime(tmp_path):
    # built from nothing into a new cache dir; afterwards exactly one OpenMP runtime is mapped
    out = _run("""
        import torch
        import cpu_kernels
        assert cpu_kernels.load() is not None
        libs = {l.split()[-1] for l in open('/proc/self/maps') if 'gomp' in l or 'iomp' in l or 'libomp' in l}
        print('RUNTIMES', len(libs))
    """, {"MOE_KERNEL_CACHE": str(tmp_path)})
    assert "RUNTIMES 1" in out
    assert len(list(tmp_path.glob("moe_cpu-*.so"))) == 1


def test_without_compiler_falls_back_with_a_warning(tmp_path):
    out = _run("""
        import torch
        import cpu_kernels
        from kvcache import paged_attention_torch, paged_attention_reference, AttentionMetadata
        assert cpu_kernels.load() is None
        meta = AttentionMetadata.build([1, 1], [3, 9], [[0], [1, 2]], 8)
        k, v, q = torch.randn(3, 8, 2, 16), torch.randn(3, 8, 2, 16), torch.randn(2, 4, 16)
        torch.testing.assert_close(paged_attention_torch(q, k, v, meta, 0.25),
                                   paged_attention_reference(q, k, v, meta, 0.25))
        print('FALLBACK OK')
    """, {"MOE_KERNEL_CACHE": str(tmp_path), "PATH": str(tmp_path), "CC": ""})
    assert "FALLBACK OK" in out
    assert "no C compiler found" in out and "Install a C compiler" in out


# ---- elementwise kernels vs the torch ops they replace -------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 40, 6])  # AVX-512 halves, a 16-wide part + scalar rest, scalar only
def test_rope_kernel_equals_torch_rotation(dim, dtype, interleaved, monkeypatch):
    from moe.models.rope import RotaryEmbedding

    rope = RotaryEmbedding(dim, 4096, {"rope_theta": 10000.0}, interleaved)
    g = torch.Generator().manual_seed(dim)
    qkv = torch.randn(300, 7 * dim + 5, generator=g).to(dtype)  # heads as strided views of a wider row
    x = qkv[:, 5:5 + 6 * dim].view(300, 6, dim)
    pos = torch.randint(0, 3000, (300,), generator=g)
    got = rope(pos, x)[0]
    monkeypatch.setattr(cpu_kernels, "rope_", lambda *a: False)  # the torch path
    want = rope(pos, x)[0]
    assert torch.equal(got, want) if dtype == torch.bfloat16 else torch.allclose(got, want, atol=1e-6, rtol=1e-6)
    # in place on a strided view: the rest of the row is untouched
    before = qkv.clone()
    monkeypatch.undo()
    rope.rotate_(pos, x)
    torch.testing.assert_close(x, want, atol=1e-6, rtol=0)
    assert torch.equal(qkv[:, :5], before[:, :5]) and torch.equal(qkv[:, 5 + 6 * dim:], before[:, 5 + 6 * dim:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["rows", "transposed", "batched", "transposed_large", "batched_large"])
def test_fused_swiglu_equals_silu_times_up(layout, dtype):
    # the large layouts' contiguous gate/up slabs are split into 64 rows each (work for every thread)
    from experts import fused_swiglu, swiglu

    g = torch.Generator().manual_seed(1)
    if layout.startswith("batched"):  # [n, 2F, m], gate/up along dim 1 (the batched decode experts)
        h = (torch.randn(*((3, 2 * 40, 9) if layout == "batched" else (2, 2 * 256, 64)), generator=g) * 4).to(dtype)
        got = fused_swiglu(h, dim=1)
        want = swiglu(h.transpose(1, 2)).transpose(1, 2)
    else:
        # 40 = 16-wide parts + a scalar rest
        h = (torch.randn(*((37, 2 * 40) if layout != "transposed_large" else (64, 2 * 512)), generator=g) * 4).to(dtype)
        if layout.startswith("transposed"):  # what w @ x.T returns for few rows
            h = h.t().contiguous().t()
        got = fused_swiglu(h)
        want = swiglu(h)
    assert got.shape == want.shape
    if dtype == torch.bfloat16:  # the same two roundings as F.silu(gate) * up, within one bf16 step
        torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=8e-3)
        assert (got != want).float().mean() < 0.02
    else:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    big = torch.tensor([[-200.0, 90.0, -0.0, 1e-30, 200.0, -90.0]], dtype=dtype)  # exp(-|g|) never overflows
    torch.testing.assert_close(fused_swiglu(big).float(), swiglu(big).float(), atol=1e-6, rtol=1e-2)


def test_silu_mul_float32_exp_over_its_whole_range():
    # the vector exp (polynomial, 2^n in two exact steps) against float64: within a few float32 ulps
    # where the result is a normal float32 (the float32 range reduction g * log2(e) adds up to
    # ~|g| * 2^-24 relative), within |g| subnormal steps below; every element the same
    # arithmetic wherever it sits (the row's last C % lanes included)
    g = torch.linspace(-104.0, 30.0, 4001).unsqueeze(0)
    got = cpu_kernels.silu_mul(g, torch.ones_like(g))
    exact = (g.double() * torch.sigmoid(g.double())).float()
    normal = exact.abs() >= torch.finfo(torch.float32).tiny
    small = g.abs() <= 8
    torch.testing.assert_close(got[small], exact[small], rtol=1e-6, atol=0)
    rel = ((got.double() - exact.double()) / exact.double()).abs()[normal]
    assert (rel <= 1e-6 + g.abs()[normal] * 2 ** -23).all()
    # below: exp(g) itself subnormal, its error (under a step of 2^-149: rounding and range reduction)
    # scaled by |g|, and the product's own rounding
    err = (got.double() - g.double() * torch.sigmoid(g.double())).abs()[~normal]
    assert (err <= (g.abs()[~normal] + 1) * 2 ** -149).all()
    for n in (1, 5, 8, 13):  # the same values at other offsets and row lengths
        torch.testing.assert_close(cpu_kernels.silu_mul(g[:, -n:], torch.ones(1, n)), got[:, -n:], rtol=0, atol=0)


@pytest.mark.parametrize("shape,strided",
                         [((300, 1024), False), ((37, 40), True), ((5, 3, 24), False), ((2, 7), False)])
def test_rms_norm_kernel_equals_the_torch_formula(shape, strided):
    from moe.models.layers import RMSNorm

    g = torch.Generator().manual_seed(shape[-1])
    base = (torch.randn(*shape[:-1], shape[-1] + 8, generator=g) * 3).to(torch.bfloat16)
    x = base[..., 4:4 + shape[-1]] if strided else base[..., :shape[-1]].contiguous()
    norm = RMSNorm(shape[-1], 1e-5, torch.bfloat16)
    norm.weight.data.copy_(torch.randn(shape[-1], generator=g))
    want = norm.weight * torch.nn.functional.rms_norm(x.float(), (shape[-1],), None, 1e-5).to(x.dtype)
    got = cpu_kernels.rms_norm(x, norm.weight, 1e-5)
    assert got is not None and got.shape == x.shape and got.dtype == torch.bfloat16
    # the statistics are summed in another order: at most one bf16 step apart, nearly always equal
    torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=8e-3)
    assert (got != want).float().mean() < 0.01
    torch.testing.assert_close(norm(x), got, atol=0, rtol=0)  # the module takes the kernel


@pytest.mark.parametrize("D,strided,weighted", [(1024, False, True), (40, True, True), (24, False, False),
                                                 (7, False, True), (2816, True, False)])
def test_rms_norm_sums_in_one_order_on_every_build(D, strided, weighted):
    # the AVX-512, AVX2 and scalar bodies all sum the squares in the AVX-512 lane order (16 lane
    # sums, its reduction tree, the tail one by one): bit-identical results on every CPU
    from cpu_kernels.elementwise import rms_norm_lane_order_reference

    g = torch.Generator().manual_seed(D)
    base = (torch.randn(33, D + 8, generator=g) * 3).to(torch.bfloat16)
    x = base[:, 3:3 + D] if strided else base[:, :D].contiguous()
    w = torch.randn(D, generator=g).to(torch.bfloat16) if weighted else None
    got = cpu_kernels.rms_norm(x, w, 1e-5)
    assert torch.equal(got, rms_norm_lane_order_reference(x, w, 1e-5))


def test_rms_norm_of_heads_in_a_wider_row_in_place_equals_it_on_a_copy():
    # Qwen3-style per-head q/k norms: the heads of q and k as [T, H, D] views of one qkv row (rows two
    # strides deep, no copy first), normed into a new tensor or in place, then rotated in place as one
    # [T, Hq + Hk, D] view: bit for bit what the contiguous copies, torch.cat and one rotation give
    from moe.models.layers import RMSNorm
    from moe.models.rope import RotaryEmbedding

    g = torch.Generator().manual_seed(3)
    T, Hq, Hk, D = 37, 4, 2, 64
    qkv = (torch.randn(T, (Hq + 2 * Hk) * D, generator=g) * 3).to(torch.bfloat16)
    norm = RMSNorm(D, 1e-6, torch.bfloat16)
    norm.weight.data.copy_(torch.randn(D, generator=g))
    q = qkv[:, :Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hk) * D].view(T, Hk, D)
    v_before = qkv[:, (Hq + Hk) * D:].clone()
    want_q, want_k = norm(q.contiguous()), norm(k.contiguous())
    assert torch.equal(norm(q), want_q)  # strided in, new out
    assert norm(q, out=q) is q and norm(k, out=k) is k  # in place
    assert torch.equal(q, want_q) and torch.equal(k, want_k) and torch.equal(qkv[:, (Hq + Hk) * D:], v_before)
    rope = RotaryEmbedding(D, 128, {"rope_theta": 10000.0})
    pos = torch.arange(5, 5 + T)
    want = rope.rotate_(pos, torch.cat([want_q, want_k], dim=1))
    rq, rk = rope.rotate_pair_(pos, q, k)
    assert rq is q and rk is k and torch.equal(torch.cat([q, k], dim=1), want)
    # q and k apart in memory (two tensors): each rotated on its own, the same values
    a, b = rope.rotate_pair_(pos, want_q.clone(), want_k.clone())
    assert torch.equal(torch.cat([a, b], dim=1), want)
    with pytest.raises(ValueError, match="must be x's shape"):
        norm(q, out=k)


@pytest.mark.parametrize("D,interleaved", [(128, False), (64, True), (40, False), (24, True)])
@pytest.mark.parametrize("joint", [True, False])
def test_qk_norms_in_the_rotations_pass_equal_norms_then_rotation(D, interleaved, joint):
    # the per-head q/k norms (each its own weight) and the rotation in one C pass over the heads of a qkv
    # row (or over q and k apart): bit for bit the norms into the rows, then the rotation; dims past the
    # vector width (40, 24) and GPT-J pairs included; q's and k's eps apart too
    from moe.models.layers import RMSNorm
    from moe.models.rope import RotaryEmbedding

    g = torch.Generator().manual_seed(D)
    T, Hq, Hk = 37, 4, 2
    qkv = (torch.randn(T, (Hq + 2 * Hk) * D, generator=g) * 3).to(torch.bfloat16)
    qn, kn = RMSNorm(D, 1e-6, torch.bfloat16), RMSNorm(D, 1e-6, torch.bfloat16)
    qn.weight.data.copy_(torch.randn(D, generator=g))
    kn.weight.data.copy_(torch.randn(D, generator=g))
    rope = RotaryEmbedding(D, 128, {"rope_theta": 10000.0}, interleaved)
    pos = torch.randint(0, 100, (T,), generator=g)

    def views(t):
        q, k = t[:, :Hq * D].view(T, Hq, D), t[:, Hq * D:(Hq + Hk) * D].view(T, Hk, D)
        return (q, k) if joint else (q.clone(), k.clone())

    want_q, want_k = views(qkv.clone())
    rope.rotate_pair_(pos, qn(want_q, out=want_q), kn(want_k, out=want_k))
    before = qkv.clone()
    if cpu_kernels.load() is not None:  # the kernel itself takes it (rotate_pair_ below may not fall back)
        q, k = views(before.clone())
        for x, hq in ([(q.as_strided((T, Hq + Hk, D), q.stride()), Hq)] if joint else [(q, Hq), (k, 0)]):
            assert cpu_kernels.rms_norm_rope_(x, qn.weight, 1e-6, kn.weight, 1e-6, hq, pos, rope.cos, rope.sin,
                                              interleaved)
        assert torch.equal(q, want_q) and torch.equal(k, want_k)
    q, k = views(qkv)
    rq, rk = rope.rotate_pair_(pos, q, k, (qn, kn))
    assert rq is q and rk is k and torch.equal(q, want_q) and torch.equal(k, want_k)
    if joint:  # (v untouched)
        assert torch.equal(qkv[:, (Hq + Hk) * D:], before[:, (Hq + Hk) * D:])
    kn.eps = 1e-5
    q, k = views(before.clone())
    rope.rotate_pair_(pos, q, k, (qn, kn))
    want_q, want_k = views(before.clone())
    rope.rotate_pair_(pos, qn(want_q, out=want_q), kn(want_k, out=want_k))
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    # float32: the kernel declines it (torch's rms_norm, then the rotation)
    assert not cpu_kernels.rms_norm_rope_(q.float(), qn.weight.float(), 1e-6, kn.weight.float(), 1e-6, Hq, pos,
                                          rope.cos, rope.sin, interleaved)


@pytest.mark.parametrize("shape", [(1, 1024), (300, 1024), (3, 40)])
def test_add_rms_norm_kernel_equals_add_then_norm(shape):
    # the residual add and the next norm in one pass: the sum as torch's bf16 add, the norm as the kernel's
    g = torch.Generator().manual_seed(shape[0])
    h, d = ((torch.randn(*shape, generator=g) * 3).bfloat16() for _ in range(2))
    w = torch.randn(shape[1], generator=g).bfloat16()
    s, x = cpu_kernels.add_rms_norm(h, d, w, 1e-6)
    assert torch.equal(s, h + d) and torch.equal(x, cpu_kernels.rms_norm(h + d, w, 1e-6))
    if shape[0] > 1:
        assert cpu_kernels.add_rms_norm(h, d.t().contiguous().t(), w, 1e-6) is None  # strided: torch
    assert cpu_kernels.add_rms_norm(h.float(), d.float(), w.float(), 1e-6) is None  # float32: torch's rms_norm


def test_ops_norms_take_the_kernel_for_a_few_row_gemms_transposed_view(monkeypatch):
    # ops.linear returns 65-128 rows as a transposed view (w @ x.T); the norms after it copy it to rows
    # for the C kernel (bit for bit the kernel's results) instead of torch's float32 path
    import ops
    from cpu_kernels.elementwise import rms_norm_lane_order_reference

    g = torch.Generator().manual_seed(5)
    h = (torch.randn(100, 256, generator=g) * 3).bfloat16()
    d = (torch.randn(256, 100, generator=g) * 3).bfloat16().t()  # rows with stride 1 between them
    w = torch.randn(256, generator=g).bfloat16()
    assert d.stride(-1) != 1
    monkeypatch.setattr("ops.norm.rms_norm_reference", lambda *a: pytest.fail("took torch's path"))
    assert torch.equal(ops.rms_norm(d, w, 1e-6), rms_norm_lane_order_reference(d.contiguous(), w, 1e-6))
    s_, x = ops.add_rms_norm(h, d, w, 1e-6)
    assert torch.equal(s_, h + d) and torch.equal(x, rms_norm_lane_order_reference(h + d, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("src", ["contiguous", "head_view", "transposed"])
def test_write_rows_equals_index_copy(src, dtype):
    g = torch.Generator().manual_seed(2)
    cache = torch.randn(6, 4, 3, 8, generator=g).to(dtype)
    want = cache.clone()
    if src == "contiguous":
        x = torch.randn(5, 3, 8, generator=g).to(dtype)
    elif src == "head_view":  # heads of a wider row, as k after the joint rope
        x = torch.randn(5, 7, 8, generator=g).to(dtype)[:, 2:5]
    else:  # what w @ x.T returns for few rows: element stride T
        x = torch.randn(24, 5, generator=g).to(dtype).t().reshape(5, 3, 8)
    slots = torch.tensor([22, 0, 7, 13, 3])
    want.view(24, 3, 8).index_copy_(0, slots, x)
    assert cpu_kernels.write_rows(cache, x, slots)
    assert torch.equal(cache, want)
    assert not cpu_kernels.write_rows(cache, x.to(torch.float16), slots)  # another dtype: the caller's path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,m,padded", [(32000, 64, 64), (1000, 9, 16), (63, 3, 3), (130, 1, 8)])
def test_transpose_to_float(n, m, padded, dtype):
    # a GEMM's [vocab, rows] output (a column slice of the padded rows' result) to row-major float32
    x = torch.randn(n, padded, generator=torch.Generator().manual_seed(n)).to(dtype)[:, :m]
    out = cpu_kernels.transpose_to_float(x)
    assert out.is_contiguous() and out.dtype == torch.float32
    assert torch.equal(out, x.t().float())


@pytest.mark.parametrize("n,k,ldw", [(5632, 1024, 1024), (1024, 2816, 2816), (7, 100, 100), (3, 37, 64), (130, 64, 96),
                                     (1, 1, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_mv(n, k, ldw, bias):
    # rows not a multiple of 4, K with tails of 32/64, rows strided past K (a column slice)
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, ldw, generator=g).to(torch.bfloat16)[:, :k]
    x = torch.randn(k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    got = cpu_kernels.gemv(w, x, b)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (n,)
    want = gemv_reference(w, x, b)  # linear's one-row path
    exact = w.double() @ x.double() + (b.double() if b is not None else 0)
    # float32 sums in another order than torch's: within a bf16 rounding step of torch's result
    # and as close to the exact product as torch's
    err, err_torch = (got.double() - exact).abs(), (want.double() - exact).abs()
    step = exact.abs().clamp_min(1e-3) * 2 ** -7
    assert (err <= err_torch + step + 1e-3).all()
    assert (got != want).float().mean() < 0.05


def test_gemv_declines_what_it_does_not_take():
    w, x = torch.randn(8, 16), torch.randn(16)
    assert cpu_kernels.gemv(w, x) is None  # float32: torch's mv
    assert cpu_kernels.gemv(w.bfloat16(), x.bfloat16()[:8]) is None  # shapes that do not fit


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("D,F", [(64, 96), (70, 37)])  # GEMV row blocks and K with and without tails
def test_moe_token_kernel_equals_the_op_by_op_path(n, D, F, monkeypatch):
    # one token through n experts in one C call: bit-identical to forward_token's ops (one GEMV per
    # projection, SwiGLU, weighting, the combine's sum: one bf16 addition for two, float32 for more),
    # and with a shared expert (another width) added in bf16 as SparseMoE adds it
    from experts.grouped import GroupedExperts

    g = torch.Generator().manual_seed(n * 100 + D)
    mod = GroupedExperts(6, D, F, dtype=torch.bfloat16)
    mod.w13.data.copy_(torch.randn(6, 2 * F, D, generator=g) / 4)
    mod.w2.data.copy_(torch.randn(6, D, F, generator=g) / 4)
    shared = GroupedExperts(1, D, 2 * F + 3, dtype=torch.bfloat16)
    shared.w13.data.copy_(torch.randn(1, 4 * F + 6, D, generator=g) / 4)
    shared.w2.data.copy_(torch.randn(1, D, 2 * F + 3, generator=g) / 4)
    x = torch.randn(1, D, generator=g).to(torch.bfloat16)
    ids = torch.randperm(6, generator=g)[:n]
    w = torch.softmax(torch.randn(n, generator=g), 0)
    calls = []
    real = cpu_kernels.MoeToken.__call__  # (forward_token calls its plan, the weights checked once)
    monkeypatch.setattr(cpu_kernels.MoeToken, "__call__", lambda *a: calls.append(1) or real(*a))
    fused = mod.forward_token(x, ids, w)
    fused_shared = mod.forward_token(x, ids, w, (shared.w13[0], shared.w2[0]))
    monkeypatch.setattr(cpu_kernels.MoeToken, "__call__", lambda *a: None)  # the op-by-op path
    ops = mod.forward_token(x, ids, w)
    assert len(calls) == 2 and torch.equal(fused, ops)
    assert torch.equal(fused_shared, ops + shared.forward_token(x, torch.tensor([0]), torch.ones(1)))
    assert mod.forward_token(x, ids, w, (shared.w13[0], shared.w2[0])) is None  # the shared expert: one call only
    monkeypatch.setattr(cpu_kernels.MoeToken, "__call__", real)
    # a gated shared expert (Qwen2-MoE's): its output times sigmoid(gate . x), as SparseMoE computes
    # it op by op (the gate's one-row linear, torch's bf16 sigmoid and product), for gates of either
    # sign and saturating ones
    from ops.linear import linear

    sh_out = shared.forward_token(x, torch.tensor([0]), torch.ones(1))
    for scale in (0.05, 1.0, 40.0):
        gate = (torch.randn(1, D, generator=g) * scale).bfloat16()
        gated = mod.forward_token(x, ids, w, (shared.w13[0], shared.w2[0], gate))
        assert torch.equal(gated, ops + torch.sigmoid(linear(x, gate)) * sh_out)
    assert cpu_kernels.moe_token(x, torch.tensor([0, 6]), torch.ones(2), mod.w13, mod.w2) is None  # id out of range
    # the residual tail: h + y and the next norm of it, as add_rms_norm computes them after the call
    h, nw = torch.randn(1, D, generator=g).bfloat16(), torch.randn(D, generator=g).bfloat16()
    got = cpu_kernels.moe_token(x, ids, w, mod.w13, mod.w2, (shared.w13[0], shared.w2[0]), residual=(h, nw, 1e-5))
    want = cpu_kernels.add_rms_norm(h, fused_shared, nw, 1e-5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("D,F", [(64, 96), (70, 37)])
def test_moe_token_kernel_with_biases_and_clamped_swiglu_equals_the_op_by_op_path(n, D, F, monkeypatch):
    # gpt-oss's experts in the one call: biases on both projections (added as linear adds them) and
    # the clamped SwiGLU (each torch bf16 op's rounding, the sigmoid from the table); gate/up values
    # past the clamp on both sides; bit-identical to forward_token's ops, at one row and, each row as
    # its one-row call, at several
    from experts.grouped import Activation, GroupedExperts

    g = torch.Generator().manual_seed(n * 10 + D)
    for act in (Activation(limit=7.0, alpha=1.702), Activation(alpha=1.702), Activation()):
        mod = GroupedExperts(6, D, F, bias=True, activation=act, dtype=torch.bfloat16)
        mod.w13.data.copy_(torch.randn(6, 2 * F, D, generator=g))  # (wide: |gate|, |up| pass the limit of 7)
        mod.w2.data.copy_(torch.randn(6, D, F, generator=g) / 4)
        mod.b13.data.copy_(torch.randn(6, 2 * F, generator=g))
        mod.b2.data.copy_(torch.randn(6, D, generator=g))
        x = torch.randn(1, D, generator=g).to(torch.bfloat16)
        ids = torch.randperm(6, generator=g)[:n]
        w = torch.softmax(torch.randn(n, generator=g), 0)
        plan = mod.token_plan()
        assert plan is not None and plan.ok
        fused = mod.forward_token(x, ids, w)
        with monkeypatch.context() as m:
            m.setattr(cpu_kernels.MoeToken, "__call__", lambda *a: None)  # the op-by-op path
            ops = mod.forward_token(x, ids, w)
        assert torch.equal(fused, ops), act
        T = 5
        xs = torch.randn(T, D, generator=g).bfloat16()
        ids_T = torch.stack([torch.randperm(6, generator=g)[:n] for _ in range(T)])
        w_T = torch.softmax(torch.randn(T, n, generator=g), -1)
        rows = plan(xs, ids_T, w_T)
        assert torch.equal(rows, torch.cat([plan(xs[t:t + 1].contiguous(), ids_T[t:t + 1], w_T[t:t + 1])
                                            for t in range(T)]))


@pytest.mark.parametrize("D,F,Fs", [(64, 96, 160), (70, 37, 45)])  # row blocks and K with and without tails
def test_moe_token_rows_read_once_equal_one_row_calls(D, F, Fs):
    # a verify step's T rows in one call read each expert once for the rows that chose it (and the
    # shared expert, plain or gated, once for all): each row's result and residual tail equal its own one-row call,
    # bit for bit, for any T (more than the plan's rows: taken a plan's rows at a time), K, overlap
    g = torch.Generator().manual_seed(D)
    E = 6
    w13, w2 = torch.randn(E, 2 * F, D, generator=g).bfloat16() / 4, torch.randn(E, D, F, generator=g).bfloat16() / 4
    shared = (torch.randn(2 * Fs, D, generator=g).bfloat16() / 4, torch.randn(D, Fs, generator=g).bfloat16() / 4)
    nw = torch.randn(D, generator=g).bfloat16()
    gated = (*shared, torch.randn(1, D, generator=g).bfloat16())  # (its gate: sigmoid(gate . x) per row)
    for sh in (None, shared, gated):
        plan = cpu_kernels.MoeToken(w13, w2, sh)
        for T in (2, 3, 5, 8, 11):
            for K in (1, 2, 3):
                x, h = torch.randn(T, D, generator=g).bfloat16(), torch.randn(T, D, generator=g).bfloat16()
                ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
                ids[1] = ids[0]  # rows sharing all their experts, and others some or none
                w = torch.softmax(torch.randn(T, K, generator=g), -1)
                got = plan(x, ids, w, (h, nw, 1e-5))
                rows = [plan(x[t:t + 1].contiguous(), ids[t:t + 1], w[t:t + 1], (h[t:t + 1].contiguous(), nw, 1e-5))
                        for t in range(T)]
                assert torch.equal(got[0], torch.cat([r[0] for r in rows]))
                assert torch.equal(got[1], torch.cat([r[1] for r in rows]))
    bad = torch.tensor([[0, 1], [2, E]])  # an id out of range in a later row: declined, nothing claimed
    assert cpu_kernels.MoeToken(w13, w2)(torch.randn(2, D).bfloat16(), bad, torch.ones(2, 2)) is None


def test_sigmoid_table_equals_torch_sigmoid_of_one_element():
    # the gated shared expert's sigmoid, looked up by the gate's bf16 bits, is torch.sigmoid of a
    # lone element (the op path's [1, 1] gate): every finite bf16 value, one element at a time over a
    # sample and the extremes, and the whole table against a fresh vector call
    from cpu_kernels.gemv import sigmoid_table

    table = sigmoid_table()
    bits = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.bfloat16)
    assert table.dtype == torch.bfloat16 and table.shape == (1 << 16,)
    fresh = torch.sigmoid(values.clone())
    assert ((table.view(torch.int16) == fresh.view(torch.int16)) | (table.isnan() & fresh.isnan())).all()
    g = torch.Generator().manual_seed(0)
    sample = torch.cat([torch.randint(0, 1 << 16, (3000,), generator=g),
                        torch.tensor([0, 0x8000, 0x3F80, 0xBF80, 0x42C8, 0xC2C8, 0x7F7F, 0xFF7F])])
    for i in sample.tolist():
        v = values[i:i + 1].view(1, 1).clone()
        if torch.isfinite(v.float()).all():
            assert table[i].view(torch.int16) == torch.sigmoid(v).view(torch.int16)[0, 0], hex(i)


def _rows_of_one_sequence(past: int, T: int, bs: int, rot_dim: int):
    """A sequence's blocks, the positions and slots of its T rows after ``past`` cached tokens, and
    rotary tables (float32, 64 positions) for ``rot_dim`` rotated dims."""
    table = torch.tensor([5, 2, 7, 0, 3], dtype=torch.int32)
    pos = torch.arange(past, past + T)
    slots = torch.stack([table[p // bs].long() * bs + p % bs for p in pos])
    ang = torch.outer(torch.arange(64).float(), 1.0 / 10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    return table, pos, slots, ang.cos().contiguous(), ang.sin().contiguous()


@pytest.mark.parametrize("qk_norm,bias", [(None, False), ("head", True)])
def test_gqa_token_rows_equal_one_row_calls(qk_norm, bias):
    # a verify step's T rows of one sequence in one call (more than the plan's rows: a plan's rows at
    # a time), projections reading their weights once for all rows: outputs, residual tails and the
    # K/V written equal those of T one-row calls made in turn, bit for bit
    g = torch.Generator().manual_seed(7)
    D, H, Hkv, hd, bs, T, past = 64, 4, 2, 16, 4, 11, 6
    w_qkv = torch.randn((H + 2 * Hkv) * hd, D, generator=g).bfloat16() / 8
    w_o = torch.randn(D, H * hd, generator=g).bfloat16() / 8
    b_qkv = torch.randn((H + 2 * Hkv) * hd, generator=g).bfloat16() if bias else None
    norms = (torch.rand(hd, generator=g).bfloat16() + 0.5, torch.rand(hd, generator=g).bfloat16() + 0.5) \
        if qk_norm else (None, None)
    caches = [torch.randn(8, bs, Hkv, hd, generator=g).bfloat16() for _ in range(2)]
    table, pos, slots, cos, sin = _rows_of_one_sequence(past, T, bs, hd)
    x, h = torch.randn(T, D, generator=g).bfloat16(), torch.randn(T, D, generator=g).bfloat16()
    nw = torch.rand(D, generator=g).bfloat16() + 0.5

    def run(kv):
        plan = cpu_kernels.GqaToken(w_qkv, b_qkv, H, Hkv, qk_norm, *norms, 1e-5, *kv, None, None, hd ** -0.5, w_o, None)
        assert plan.ok
        return plan

    kv_rows = [c.clone() for c in caches]
    got = run(kv_rows)(x, pos, cos, sin, False, table, past + T, slots, (h, nw, 1e-5))
    kv_one = [c.clone() for c in caches]
    plan = run(kv_one)
    one = [plan(x[t:t + 1].contiguous(), pos[t:t + 1], cos, sin, False, table, past + t + 1,
                slots[t:t + 1].contiguous(), (h[t:t + 1].contiguous(), nw, 1e-5)) for t in range(T)]
    assert torch.equal(got[0], torch.cat([o[0] for o in one])) and torch.equal(got[1], torch.cat([o[1] for o in one]))
    assert all(torch.equal(a, b) for a, b in zip(kv_rows, kv_one))


@pytest.mark.parametrize("q_lora", [0, 32])
def test_mla_token_rows_equal_one_row_calls(q_lora):
    # MLA's T rows of one sequence in one call (more than the plan's rows), projections reading their
    # weights once for all rows: outputs, residual tails and the latent rows written equal those of
    # T one-row calls made in turn, bit for bit
    g = torch.Generator().manual_seed(11)
    D, H, nope, rope, C, v, bs, T, past = 64, 4, 16, 8, 32, 16, 4, 11, 6

    def w(*shape):
        return torch.randn(*shape, generator=g).bfloat16() / 8

    w_qa, qa_norm = (w(q_lora, D), torch.rand(q_lora, generator=g).bfloat16() + 0.5) if q_lora else (None, None)
    w_qb, w_kva, w_kvb, w_o = w(H * (nope + rope), q_lora or D), w(C + rope, D), w(H * (nope + v), C), w(D, H * v)
    kva_norm = torch.rand(C, generator=g).bfloat16() + 0.5
    cache = torch.randn(8, bs, 1, C + rope, generator=g).bfloat16()
    table, pos, slots, cos, sin = _rows_of_one_sequence(past, T, bs, rope)
    x, h = torch.randn(T, D, generator=g).bfloat16(), torch.randn(T, D, generator=g).bfloat16()
    nw = torch.rand(D, generator=g).bfloat16() + 0.5

    def plan(c):
        p = cpu_kernels.MlaToken(w_qa, qa_norm, 1e-6, w_qb, w_kva, kva_norm, 1e-6, w_kvb, w_o, H, nope, rope, v, c,
                                 (nope + rope) ** -0.5)
        assert p.ok
        return p

    rows_cache, one_cache = cache.clone(), cache.clone()
    got = plan(rows_cache)(x, pos, cos, sin, False, table, past + T, slots, (h, nw, 1e-5))
    p1 = plan(one_cache)
    one = [p1(x[t:t + 1].contiguous(), pos[t:t + 1], cos, sin, False, table, past + t + 1, slots[t:t + 1].contiguous(),
              (h[t:t + 1].contiguous(), nw, 1e-5)) for t in range(T)]
    assert torch.equal(got[0], torch.cat([o[0] for o in one])) and torch.equal(got[1], torch.cat([o[1] for o in one]))
    assert torch.equal(rows_cache, one_cache)


@pytest.mark.parametrize("V,D", [(1000, 64), (333, 70)])
def test_logits_rows_read_the_head_once_and_equal_one_row_calls(V, D):
    # the LM head of a verify step's rows (more than the plan's rows: a plan's rows at a time): each
    # row's logits equal its one-row call's and the bf16 GEMV's rounding of torch's product
    g = torch.Generator().manual_seed(V)
    w, x = torch.randn(V, D, generator=g).bfloat16(), torch.randn(11, D, generator=g).bfloat16()
    plan = cpu_kernels.LogitsRows(w)
    got = plan(x)
    assert torch.equal(got, torch.cat([plan(x[t:t + 1]) for t in range(11)]))
    exact = (x.double() @ w.double().T)
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -7 + 1e-2).all()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def test_tile_kernels_in_use_where_the_cpu_has_amx_or_avx512_bf16():
    # the tile kernels must really run where they can, not fall back unnoticed: on AMX tiles on an
    # AMX-BF16 Xeon, on vdpbf16ps on an AVX512-BF16 CPU without AMX (Zen 4), nowhere else
    flags = _cpu_flags()
    if {"amx_bf16", "amx_tile"} <= flags:
        assert cpu_kernels.amx_available() and cpu_kernels.amx_tiles()
    elif {"avx512_bf16", "avx512bw"} <= flags:
        assert cpu_kernels.amx_available() and not cpu_kernels.amx_tiles()
    else:
        assert not cpu_kernels.amx_available()


@pytest.mark.parametrize("D,F,counts", [
    (64, 96, [3, 0, 17, 1, 64, 16, 33, 2]),  # ragged, empty, 1-4 token blocks, partial blocks
    (32, 32, [1, 1]),
    (256, 512, [8] * 32),  # DeepSeek-like: many experts, few rows each
    (64, 96, [300, 0, 65, 513, 256, 1]),  # prompt-sized: chunks of 256 rows, a partial last chunk
    (320, 288, [77, 300, 0, 40]),  # 2 x 2 tiles over k in segments of 256 and a rest, odd token blocks
    (64, 1120, [8, 7, 2, 12]),  # rows streamed a row at a time (1-8 without AMX, 1-3 with), k in segments (8 x 1120)
    (64, 2816, [3, 1, 0, 2]),  # 1-3 rows, the down rows' k in segments where AMX takes them too (3 x 2816)
])
def test_amx_experts_match_the_op_by_op_path(D, F, counts, monkeypatch):
    from experts.grouped import Activation, grouped_swiglu_torch

    g = torch.Generator().manual_seed(D + F)
    E = len(counts)
    w13 = (torch.randn(E, 2 * F, D, generator=g) / D ** 0.5).bfloat16()
    w2 = (torch.randn(E, D, F, generator=g) / F ** 0.5).bfloat16()
    x = torch.randn(sum(counts), D, generator=g).bfloat16()
    y = cpu_kernels.amx_experts(x, counts, w13, w2)
    if not cpu_kernels.amx_available():  # (not on CI's CPU: see the test above)
        assert y is None
        return
    calls = []
    real = cpu_kernels.amx_experts
    monkeypatch.setattr(cpu_kernels, "amx_experts", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(grouped_swiglu_torch(x, counts, w13, w2, None, None, Activation()), y) and calls
    monkeypatch.setattr(cpu_kernels, "amx_experts", lambda *a: None)
    ops = grouped_swiglu_torch(x, counts, w13, w2, None, None, Activation())  # bmm, silu_mul, bmm
    exact = swiglu_experts_reference(x, counts, w13, w2)
    tol = exact.abs().max() * 2 ** -7  # about one bf16 ulp of the largest output
    assert (y.float() - exact).abs().max() <= tol and (ops.float() - exact).abs().max() <= tol
    # the op-by-op path's result, up to the order of float32 sums (bit-identical in practice)
    assert (y == ops).float().mean() > 0.99 and (y.float() - ops.float()).abs().max() <= tol


@pytest.mark.parametrize("counts", [
    [520, 256, 0, 1, 33],  # chunks 256, 176, 176, 168: 2 threads split two, the rest whole; 3 split one
    [700, 0, 65, 1, 33],  # chunks 240, 240, 220, 65: split at 2 and at 3 threads
    [700, 0, 96, 96, 96, 1, 96, 96, 96, 33, 96, 96, 96],  # all whole, 700's three chunks on several threads
])
def test_amx_experts_are_the_same_at_any_thread_count(counts, monkeypatch):
    # experts of 64+ rows as chunks of up to 256 rows: the largest split over the threads block by
    # block where handing them out whole would leave the threads uneven, the others whole on one
    # thread each, in its own activation buffer (one per thread); every block computes alike wherever
    # it runs, so the result is bit-identical at 1, 2 and 3 threads (1-63-row experts beside them),
    # and the op-by-op path's up to the order of float32 sums
    from experts.grouped import Activation, grouped_swiglu_torch

    g = torch.Generator().manual_seed(len(counts))
    D, F = 64, 96
    E = len(counts)
    w13 = (torch.randn(E, 2 * F, D, generator=g) / D ** 0.5).bfloat16()
    w2 = (torch.randn(E, D, F, generator=g) / F ** 0.5).bfloat16()
    x = torch.randn(sum(counts), D, generator=g).bfloat16()
    if not cpu_kernels.amx_available():  # (see test_tile_kernels_in_use_where_the_cpu_has_amx_or_avx512_bf16)
        assert cpu_kernels.amx_experts(x, counts, w13, w2) is None
        return
    threads = torch.get_num_threads()
    try:
        ys = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            ys.append(cpu_kernels.amx_experts(x, counts, w13, w2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])
    exact = swiglu_experts_reference(x, counts, w13, w2)
    assert (ys[0].float() - exact).abs().max() <= exact.abs().max() * 2 ** -7
    monkeypatch.setattr(cpu_kernels, "amx_experts", lambda *a: None)
    ops = grouped_swiglu_torch(x, counts, w13, w2, None, None, Activation())  # bmm, silu_mul, bmm
    assert (ys[0] == ops).float().mean() > 0.99


@pytest.mark.parametrize("D,F,counts", [
    (64, 96, [3, 0, 17, 1, 64, 16, 33, 2]),  # the row path (1-8 rows; 1-3 with AMX), 1-4 token blocks, partial blocks
    (64, 96, [300, 0, 65, 513, 256, 1]),  # prompt-sized: chunks of 256 rows, the down blocks in pairs
])
@pytest.mark.parametrize("act", ["clamped", "alpha_only", "plain"])
def test_amx_experts_with_biases_and_clamped_swiglu_equal_the_op_by_op_path(D, F, counts, act, monkeypatch):
    # gpt-oss's experts in the tile kernels: the biases added to the gate/up and down results after
    # their rounding (bf16(bf16(W x) + b), as transformers' gpt-oss adds them to its bmm) and the
    # clamped SwiGLU with each torch bf16 op's rounding (the sigmoid from the table); gate/up values
    # past the clamp on both sides; against those torch ops up to the order of float32 sums, and
    # the op-by-op path within an ulp (its per-expert F.linear past 64 rows adds the bias before
    # rounding: the rows of the first case, 1-64 per expert, match it as the reference)
    from experts.grouped import Activation, fused_swiglu, grouped_swiglu_torch

    activation = {"clamped": Activation(limit=7.0, alpha=1.702), "alpha_only": Activation(alpha=1.702),
                  "plain": Activation()}[act]
    g = torch.Generator().manual_seed(D + F + len(act))
    E = len(counts)
    w13 = (torch.randn(E, 2 * F, D, generator=g) * 2 / D ** 0.5).bfloat16()  # (wide: |gate|, |up| pass 7)
    w2 = (torch.randn(E, D, F, generator=g) / F ** 0.5).bfloat16()
    b13, b2 = torch.randn(E, 2 * F, generator=g).bfloat16(), torch.randn(E, D, generator=g).bfloat16()
    x = torch.randn(sum(counts), D, generator=g).bfloat16()
    extras = cpu_kernels.StackedExtras(b13, b2, activation.alpha, activation.limit, E, F, D)
    assert extras.ok and extras.ref is not None
    y = cpu_kernels.amx_experts(x, counts, w13, w2, extras)
    if not cpu_kernels.amx_available():
        assert y is None
        return
    calls = []
    real = cpu_kernels.amx_experts
    monkeypatch.setattr(cpu_kernels, "amx_experts", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(grouped_swiglu_torch(x, counts, w13, w2, b13, b2, activation), y) and calls
    monkeypatch.setattr(cpu_kernels, "amx_experts", lambda *a: None)
    ops = grouped_swiglu_torch(x, counts, w13, w2, b13, b2, activation)
    h = torch.cat([x[sum(counts[:e]):sum(counts[:e + 1])].float() @ w13[e].float().T for e in range(E)])
    if act == "clamped":
        assert (h[:, :F].abs() > 7).any() and (h[:, F:] < -7).any() and (h[:, F:] > 7).any()  # the clamp bites
    ref, at = [], 0
    for e, n in enumerate(counts):
        he = (x[at:at + n].float() @ w13[e].float().T).bfloat16() + b13[e]
        ref.append((fused_swiglu(he, activation).float() @ w2[e].float().T).bfloat16() + b2[e])
        at += n
    ref = torch.cat(ref)
    tol = ref.float().abs().max() * 2 ** -7
    assert (y == ref).float().mean() > 0.99 and (y.float() - ref.float()).abs().max() <= tol
    if max(counts) <= 64:
        assert (y == ops).float().mean() > 0.99 and (y.float() - ops.float()).abs().max() <= tol
    else:  # (one rounding fewer in h moves later roundings: a few ulps of the output)
        assert (y.float() - ops.float()).abs().max() <= 4 * tol
    nobias = real(x, counts, w13, w2, cpu_kernels.StackedExtras(
        None, None, activation.alpha, activation.limit, E, F, D))
    assert (nobias.float() - ops.float()).abs().max() > 0.5  # (the biases count)


def test_amx_experts_decline_what_they_do_not_take():
    E, D, F = 2, 64, 96
    w13, w2 = torch.randn(E, 2 * F, D).bfloat16(), torch.randn(E, D, F).bfloat16()
    x = torch.randn(70, D).bfloat16()
    assert cpu_kernels.amx_experts(x.float(), [35, 35], w13.float(), w2.float()) is None  # float32
    w13_odd, w2_odd = torch.randn(E, 2 * 40, D).bfloat16(), torch.randn(E, D, 40).bfloat16()
    assert cpu_kernels.amx_experts(x, [35, 35], w13_odd, w2_odd) is None  # F not a multiple of 32
    # extras that do not fit: float32 biases beside bf16 weights, biases of other shapes, a limit without alpha
    for extras in (cpu_kernels.StackedExtras(torch.randn(E, 2 * F), None, None, None, E, F, D),
                   cpu_kernels.StackedExtras(None, torch.randn(E, D + 1).bfloat16(), None, None, E, F, D),
                   cpu_kernels.StackedExtras(None, None, None, 7.0, E, F, D)):
        assert not extras.ok and cpu_kernels.amx_experts(x, [35, 35], w13, w2, extras) is None


@pytest.mark.parametrize("m", [2, 7, 16, 17, 64])
@pytest.mark.parametrize("bias,out_float", [(False, False), (True, False), (False, True)])
def test_amx_linear_matches_mm(m, bias, out_float):
    g = torch.Generator().manual_seed(m)
    N, K = 96, 160
    w = torch.randn(N + 16, K + 32, generator=g).bfloat16()[:N, :K]  # rows strided as a weight slice
    x = torch.randn(m, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16() if bias else None
    y = cpu_kernels.amx_linear(x, w, b, out_float=out_float)
    if not cpu_kernels.amx_available():
        assert y is None
        return
    want = torch.mm(w, x.t()).t()  # what linear returned before: float32 sums rounded once
    want = want + b if bias else want
    exact = x.float() @ w.float().T + (b.float() if bias else 0)
    assert y.shape == (m, N) and y.dtype == (torch.float32 if out_float else torch.bfloat16)
    assert (y.float() - exact).abs().max() <= exact.abs().max() * 2 ** -7
    assert (y.float() == want.float()).float().mean() > 0.99
    if out_float:
        assert torch.equal(y, y.bfloat16().float())  # the bf16 values, as float32


@pytest.mark.parametrize("m,K,pad", [
    (1, 2080, 64), (3, 2080, 64),  # up to 8 rows: each weight row read once against all of them (rows strided)
    (8, 2080, 64),  # ... k in segments past 16 KB of x
    (12, 2048, 0), (24, 2048, 0), (32, 2048, 0),  # weight rows 4 KB apart: the tile emulation copies each
])  # k step's rows out of their shared L1 set (one token block; two + a last of 1-8 tokens; two)
def test_amx_linear_long_weight_rows(m, K, pad):
    g = torch.Generator().manual_seed(m)
    w = torch.randn(48, K, generator=g).bfloat16()
    x = torch.randn(m, K + pad, generator=g).bfloat16()[:, :K]
    y = cpu_kernels.amx_linear(x, w)
    if not cpu_kernels.amx_available():
        assert y is None
        return
    exact = x.float() @ w.float().T
    assert (y.float() - exact).abs().max() <= exact.abs().max() * 2 ** -7
    assert (y.float() == torch.mm(w, x.t()).t().float()).float().mean() > 0.97


def test_amx_linear_declines_what_it_does_not_take():
    w, x = torch.randn(96, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    assert cpu_kernels.amx_linear(x.float(), w.float()) is None  # float32
    assert cpu_kernels.amx_linear(x[:, :40], w[:, :40]) is None  # K not a multiple of 32
    assert cpu_kernels.amx_linear(x, w[:90]) is None  # N not a multiple of 16
    assert cpu_kernels.amx_linear(torch.randn(65, 64).bfloat16(), w) is None  # more than 64 rows


@pytest.mark.parametrize("T,K,E,D,F,gpt_oss", [(64, 2, 8, 64, 96, False), (5, 4, 16, 32, 64, False),
                                               (33, 8, 8, 64, 32, False),
                                               (700, 2, 4, 64, 96, False),  # prompt-sized: chunks of 256 rows
                                               (300, 2, 4, 320, 288, False),  # k in segments of 256 and a rest
                                               (5, 4, 8, 64, 96, True), (37, 4, 8, 64, 96, True),
                                               (700, 4, 8, 64, 96, True)])
def test_amx_moe_equals_dispatch_experts_combine(T, K, E, D, F, gpt_oss, monkeypatch):
    # the local MoE step in one call: bit-identical to LocalDispatcher -> experts -> combine; with
    # gpt-oss's experts (biases, clamped SwiGLU) too, and, where each expert has at most 64 rows,
    # equal to their op-by-op path up to float32 sum order (past 64 its F.linear adds the bias
    # before rounding: test_amx_experts_with_biases_and_clamped_swiglu_equal_the_op_by_op_path)
    from experts.grouped import Activation, GroupedExperts
    from parallel.dispatch import LocalDispatcher

    g = torch.Generator().manual_seed(T * K)
    extra = dict(bias=True, activation=Activation(limit=7.0, alpha=1.702)) if gpt_oss else {}
    mod = GroupedExperts(E, D, F, dtype=torch.bfloat16, **extra)
    mod.w13.data.copy_(torch.randn(E, 2 * F, D, generator=g) * (2 if gpt_oss else 1) / D ** 0.5)
    mod.w2.data.copy_(torch.randn(E, D, F, generator=g) / F ** 0.5)
    if gpt_oss:
        mod.b13.data.copy_(torch.randn(E, 2 * F, generator=g))
        mod.b2.data.copy_(torch.randn(E, D, generator=g))
    x = torch.randn(T, D, generator=g).bfloat16()
    w, ids = torch.softmax(torch.randn(T, E, generator=g), -1).topk(K, dim=-1)
    y = mod.forward_local(x, ids, w)
    if not cpu_kernels.amx_available():
        assert y is None
        return
    disp = LocalDispatcher(E)
    x_RD, counts, meta = disp.dispatch(x, ids, w)
    assert torch.equal(y, disp.combine(mod(x_RD, counts), meta))
    if gpt_oss and max(counts.tolist()) <= 64:
        monkeypatch.setattr(cpu_kernels, "amx_experts", lambda *a: None)
        want = disp.combine(mod(x_RD, counts), meta)
        tol = want.float().abs().max() * 2 ** -7
        assert (y == want).float().mean() > 0.99 and (y.float() - want.float()).abs().max() <= tol


def test_amx_moe_keeps_its_scratch_between_calls():
    # the packed tokens / per-row results live in a per-thread buffer grown once (fresh buffers past
    # glibc's 32 MiB mmap threshold were fresh pages every layer): a smaller call after a larger one,
    # then the larger again, each equal to dispatch -> experts -> combine, with no new buffer
    from experts.grouped import GroupedExperts
    from parallel.dispatch import LocalDispatcher

    import cpu_kernels.amx as amx

    E, D, F, K = 8, 64, 96, 2
    g = torch.Generator().manual_seed(3)
    mod = GroupedExperts(E, D, F, dtype=torch.bfloat16)
    mod.w13.data.copy_(torch.randn(E, 2 * F, D, generator=g) / D ** 0.5)
    mod.w2.data.copy_(torch.randn(E, D, F, generator=g) / F ** 0.5)
    disp, ptrs = LocalDispatcher(E), []
    for T in (700, 5, 700):
        x = torch.randn(T, D, generator=g).bfloat16()
        w, ids = torch.softmax(torch.randn(T, E, generator=g), -1).topk(K, dim=-1)
        y = cpu_kernels.amx_moe(x, ids, w, mod.w13, mod.w2)
        if not cpu_kernels.amx_available():
            assert y is None
            return
        x_RD, counts, meta = disp.dispatch(x, ids, w)
        assert torch.equal(y, disp.combine(mod(x_RD, counts), meta))
        ptrs.append({k: b.data_ptr() for k, b in amx._local.bufs.items()})
    assert ptrs[0] == ptrs[1] == ptrs[2] and {"xp", "ys", "rows"} <= ptrs[0].keys()


@pytest.mark.parametrize("T,K,E,D,F", [(2, 2, 8, 64, 96), (64, 4, 16, 64, 64), (70, 2, 4, 64, 96),
                                       (300, 4, 8, 320, 288)])  # a shared expert of 2-63, 64+ and 256+ rows
def test_amx_moe_with_a_shared_expert_equals_the_routed_sum_plus_the_shared_mlp(T, K, E, D, F):
    # the shared expert in the routed experts' call: bit-identical to the routed experts' call, the
    # shared expert's own call, and their bf16 sum (SparseMoE's path without it)
    from experts.grouped import GroupedExperts, swiglu_mlp_cpu

    g = torch.Generator().manual_seed(T * K + E)
    mod = GroupedExperts(E, D, F, dtype=torch.bfloat16)
    mod.w13.data.copy_(torch.randn(E, 2 * F, D, generator=g) / D ** 0.5)
    mod.w2.data.copy_(torch.randn(E, D, F, generator=g) / F ** 0.5)
    sw13 = (torch.randn(2 * F, D, generator=g) / D ** 0.5).bfloat16()
    sw2 = (torch.randn(D, F, generator=g) / F ** 0.5).bfloat16()
    x = torch.randn(T, D, generator=g).bfloat16()
    w, ids = torch.softmax(torch.randn(T, E, generator=g), -1).topk(K, dim=-1)
    y = mod.forward_local(x, ids, w, (sw13, sw2))
    if not cpu_kernels.amx_available():
        assert y is None
        return
    assert torch.equal(y, mod.forward_local(x, ids, w) + swiglu_mlp_cpu(x, sw13, sw2))
    # what it does not take: another F, strided rows, float32
    assert cpu_kernels.amx_moe(x, ids, w, mod.w13, mod.w2, shared=(sw13[:, :D - 32], sw2)) is None
    wide = torch.randn(2 * F, D + 32).bfloat16()[:, :D]
    assert cpu_kernels.amx_moe(x, ids, w, mod.w13, mod.w2, shared=(wide, sw2)) is None
    assert cpu_kernels.amx_moe(x, ids, w, mod.w13, mod.w2, shared=(sw13.float(), sw2.float())) is None


def test_amx_moe_declines_what_it_does_not_take():
    from experts.grouped import GroupedExperts

    E, D, F = 4, 64, 96
    mod = GroupedExperts(E, D, F, dtype=torch.bfloat16)
    x = torch.randn(70, D).bfloat16()
    ids = torch.tensor([[0, 1]] * 65 + [[2, 3]] * 5)
    w = torch.full((70, 2), 0.5)
    assert cpu_kernels.amx_moe(x, torch.full((70, 2), E), w, mod.w13, mod.w2) is None  # ids out of range
    sub = GroupedExperts(E, D, F, dtype=torch.bfloat16, num_local_experts=2)  # a rank's slice: not local
    assert sub.forward_local(x[:5], ids[-5:] - 2, w[:5]) is None


@pytest.mark.parametrize("T,nope", [(1, 64), (5, 64), (16, 64), (17, 64), (64, 64),
                                    (17, 544)])  # k past 512 (the AVX512-BF16 build's interleaved W in parts)
def test_amx_heads_match_the_per_head_einsums(T, nope, monkeypatch):
    # MLA's absorbed attention: q_nope [T, H, nope] (a strided view of q) times W_UK [H, nope, C],
    # and o_lat [T, H, C] times W_UV [H, v, C] transposed, both views of kv_b_proj's weight
    from ops import per_head

    g = torch.Generator().manual_seed(T)
    H, rope, v, C = 4, 32, 32, 96
    w_kv = (torch.randn(H * (nope + v), C, generator=g) / 8).bfloat16().view(H, nope + v, C)
    w_uk, w_uv = w_kv[:, :nope], w_kv[:, nope:]
    q_nope = torch.randn(T, H * (nope + rope), generator=g).bfloat16().view(T, H, nope + rope)[..., :nope]
    o_lat = torch.randn(T, H, C, generator=g).bfloat16()
    a = cpu_kernels.amx_heads(q_nope, w_uk, w_rows_n=False)
    b = cpu_kernels.amx_heads(o_lat, w_uv, w_rows_n=True)
    if not cpu_kernels.amx_available():
        assert a is None and b is None
        return
    monkeypatch.setattr(cpu_kernels, "amx_heads", lambda *a, **k: None)  # per_head's einsum path
    for got, want, exact in ((a, per_head(q_nope, w_uk, "thn,hnc->thc"),
                              torch.einsum("thn,hnc->thc", q_nope.float(), w_uk.float())),
                             (b, per_head(o_lat, w_uv, "thc,hvc->thv"),
                              torch.einsum("thc,hvc->thv", o_lat.float(), w_uv.float()))):
        assert got.shape == want.shape
        tol = exact.abs().max() * 2 ** -7
        assert (got.float() - exact).abs().max() <= tol  # float32 sums rounded once
        assert (got == want).float().mean() > 0.99 and (got.float() - want.float()).abs().max() <= tol


def test_amx_heads_decline_what_they_do_not_take():
    w = torch.randn(4, 64, 96).bfloat16()
    assert cpu_kernels.amx_heads(torch.randn(65, 4, 64).bfloat16(), w, w_rows_n=False) is None  # > 64 rows
    assert cpu_kernels.amx_heads(torch.randn(8, 4, 48).bfloat16(), w[:, :48], w_rows_n=False) is None  # K % 32
    assert cpu_kernels.amx_heads(torch.randn(8, 4, 64).float(), w.float(), w_rows_n=False) is None  # float32
    assert cpu_kernels.amx_heads(torch.randn(8, 3, 64).bfloat16(), w, w_rows_n=False) is None  # heads differ



PREFILL_SHAPES = {
    "qwen3_gqa_4": dict(H=8, Hkv=2, Dk=128, Dv=128),
    "mixtral_gqa_2": dict(H=16, Hkv=8, Dk=64, Dv=64),
    "mha_d32": dict(H=4, Hkv=4, Dk=32, Dv=32),
    "mla_latent": dict(H=8, Hkv=1, Dk=576, Dv=512, latent=True),  # DeepSeek-V3's 512 + 64: V is K's leading dims
}


@pytest.mark.parametrize("Q,L,block_size", [
    (17, 17, 16),  # the shortest prompt past the decode kernel: one query tile, mostly padding
    (100, 100, 5),  # query tiles of 32 + a rest, blocks smaller than a key tile
    (531, 531, 7),  # keys in two softmax passes of 512 (the second rescales the first's sums)
    (33, 700, 16),  # a chunk after a cached prefix (rows at positions 667..699)
    (600, 1100, 16),  # a long chunk after a prefix: three key passes
    (1, 45, 16),
])
@pytest.mark.parametrize("shape", list(PREFILL_SHAPES))
def test_amx_prefill_attention_matches_reference(shape, Q, L, block_size):
    from cpu_kernels.amx_attention import prefill_attention_reference
    from kvcache.attention import seq_kv

    spec = dict(PREFILL_SHAPES[shape])
    latent = spec.pop("latent", False)
    meta, k_cache, v_cache, q = _decode_batch([L], block_size=block_size, dtype=torch.bfloat16, latent=latent,
                                              seed=Q + L, qlens=[Q], **spec)
    q = (q.float() * 3).bfloat16()  # scores of spread ~3: a later key pass raises rows' maxima
    if not cpu_kernels.supports_prefill(q, k_cache, v_cache):
        assert not cpu_kernels.amx_available()  # (test_tile_kernels_in_use...)
        return
    scale = spec["Dk"] ** -0.5
    out = torch.full((Q + 3, spec["H"], spec["Dv"] + 32), 7.0, dtype=torch.bfloat16)
    got = cpu_kernels.prefill_attention(q, k_cache, v_cache, meta.block_tables[0], L, scale,
                                        out=out[1:Q + 1, :, 16:16 + spec["Dv"]])  # into a strided view
    assert got.data_ptr() == out[1, 0, 16:].data_ptr()
    k, v = seq_kv(k_cache, meta, 0, L, torch.bfloat16), seq_kv(v_cache, meta, 0, L, torch.bfloat16)
    ref = prefill_attention_reference(q, k, v, scale)
    # within one bf16 ulp: the output's rounding (half an ulp) moved across a midpoint at most by
    # float32 sum order and the exp polynomial
    assert ((got.float() - ref).abs() <= ref.abs().clamp(min=1) * 2 ** -7).all()
    exact = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), meta, scale)  # P unrounded
    torch.testing.assert_close(got.float(), exact, atol=2e-2, rtol=2e-2)
    assert (out[0] == 7).all() and (out[Q + 1:] == 7).all() and (out[..., :16] == 7).all()


@pytest.mark.parametrize("Q,L,block_size,window", [
    (100, 100, 5, 40),  # windows moving inside the query tiles, not a multiple of 32
    (531, 531, 7, 128),  # gpt-oss's window over two key passes
    (33, 700, 16, 128),  # a chunk after a prefix: keys before the first row's window never packed
    (600, 1100, 16, 700),  # a window across key passes
    (64, 64, 16, 1),  # each row its own key only
    (40, 40, 16, 4096),  # a window past the context: plain causal
    (200, 200, 16, None),  # sinks alone
])
@pytest.mark.parametrize("sink_scale", [0.0, 1.0, 8.0])  # none; logits' size; dominating some rows
@pytest.mark.parametrize("shape", ["gpt_oss", "qwen3_gqa_4"])
def test_amx_prefill_attention_takes_sliding_windows_and_sinks(shape, Q, L, block_size, window, sink_scale):
    from cpu_kernels.amx_attention import prefill_attention_reference
    from kvcache.attention import seq_kv

    spec = dict(H=16, Hkv=4, Dk=64, Dv=64) if shape == "gpt_oss" else PREFILL_SHAPES[shape]
    meta, k_cache, v_cache, q = _decode_batch([L], block_size=block_size, dtype=torch.bfloat16, seed=Q + L,
                                              qlens=[Q], **spec)
    q = (q.float() * 3).bfloat16()
    if not cpu_kernels.supports_prefill(q, k_cache, v_cache):
        assert not cpu_kernels.amx_available()
        return
    if window is None and sink_scale == 0:
        return  # (test_amx_prefill_attention_matches_reference)
    sinks = torch.randn(spec["H"], generator=torch.Generator().manual_seed(L)) * sink_scale if sink_scale else None
    scale = spec["Dk"] ** -0.5
    got = cpu_kernels.prefill_attention(q, k_cache, v_cache, meta.block_tables[0], L, scale, sliding_window=window,
                                        sinks_H=sinks)
    k, v = seq_kv(k_cache, meta, 0, L, torch.bfloat16), seq_kv(v_cache, meta, 0, L, torch.bfloat16)
    ref = prefill_attention_reference(q, k, v, scale, window, sinks)
    assert ((got.float() - ref).abs() <= ref.abs().clamp(min=1) * 2 ** -7).all()
    exact = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), meta, scale, window, sinks)
    torch.testing.assert_close(got.float(), exact, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("Q,L,window", [(100, 100, None), (33, 700, 128), (531, 531, None)])
@pytest.mark.parametrize("shape", ["qwen3_gqa_4", "mla_latent"])
def test_amx_prefill_attention_reads_fp8_caches_as_sdpa_sees_them(shape, Q, L, window):
    # fp8 caches: every row widened to bf16 as dequantize_fp8 widens it for SDPA, then the bf16 kernel:
    # bit-identical to the kernel over a bf16 cache holding those widened rows (MLA: V K's leading dims)
    from kvcache.fp8 import dequantize_fp8

    spec = dict(PREFILL_SHAPES[shape])
    latent = spec.pop("latent", False)
    meta, k_bf, v_bf, q = _decode_batch([L], block_size=16, dtype=torch.bfloat16, latent=latent, seed=L, qlens=[Q],
                                        **spec)
    g = torch.Generator().manual_seed(Q)
    k8 = _fp8_cache_of(k_bf, g)
    v8 = _fp8_cache_of(v_bf, g, k8 if latent else None)
    if not cpu_kernels.supports_prefill(q, k8, v8):
        assert not cpu_kernels.amx_available()
        return
    k_w = dequantize_fp8(k8.data, k8.scale, torch.bfloat16)
    v_w = k_w[..., :spec["Dv"]] if latent else dequantize_fp8(v8.data, v8.scale, torch.bfloat16)
    scale = spec["Dk"] ** -0.5
    got = cpu_kernels.prefill_attention(q, k8, v8, meta.block_tables[0], L, scale, sliding_window=window)
    want = cpu_kernels.prefill_attention(q, k_w, v_w, meta.block_tables[0], L, scale, sliding_window=window)
    assert torch.equal(got, want)


def test_amx_prefill_attention_declines_what_it_does_not_take():
    q, kc = torch.randn(40, 4, 64).bfloat16(), torch.randn(8, 16, 2, 64).bfloat16()
    assert not cpu_kernels.supports_prefill(q.float(), kc.float(), kc.float())  # float32
    assert not cpu_kernels.supports_prefill(q[..., :48], kc[..., :48], kc[..., :48])  # head dim % 32
    assert not cpu_kernels.supports_prefill(q[:, :3], kc, kc)  # 3 heads over 2 KV heads
    if cpu_kernels.supports_prefill(q, kc, kc):
        with pytest.raises(ValueError, match="context length"):
            cpu_kernels.prefill_attention(q, kc, kc, torch.arange(8), 39, 0.125)
        with pytest.raises(ValueError, match="cannot hold"):
            cpu_kernels.prefill_attention(q, kc, kc, torch.arange(2), 40, 0.125)
        with pytest.raises(ValueError, match="one logit per query head"):
            cpu_kernels.prefill_attention(q, kc, kc, torch.arange(8), 40, 0.125, sinks_H=torch.zeros(2))


def test_prompt_chunks_go_to_the_amx_prefill_kernel(monkeypatch):
    # bf16 prompt rows (whole prompts and a chunk after a prefix) beside decode rows: the short ones
    # to the decode kernel, the long ones to the prefill kernel, all equal to the reference, with sinks
    # and a sliding window too
    g = torch.Generator().manual_seed(11)
    q_lens, c_lens, bs, H, Hkv, D = [40, 1, 64, 3], [40, 50, 300, 9], 16, 8, 2, 64
    n = [-(-c // bs) for c in c_lens]
    perm = torch.randperm(sum(n) + 1, generator=g).tolist()
    tables = [perm[sum(n[:i]):sum(n[:i + 1])] for i in range(len(n))]
    meta = AttentionMetadata.build(q_lens, c_lens, tables, bs)
    k_cache = torch.randn(sum(n) + 1, bs, Hkv, D, generator=g).bfloat16()
    v_cache = torch.randn(sum(n) + 1, bs, Hkv, D, generator=g).bfloat16()
    q = torch.randn(sum(q_lens), H, D, generator=g).bfloat16()
    calls = []
    real = cpu_kernels.prefill_attention
    monkeypatch.setattr(cpu_kernels, "prefill_attention",
                        lambda q, *a, **k: calls.append(q.shape[0]) or real(q, *a, **k))
    out = paged_attention_torch(q, k_cache, v_cache, meta, D ** -0.5)
    ref = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), meta, D ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    assert calls == ([40, 64] if cpu_kernels.amx_available() else [])
    sinks = torch.randn(H, generator=g)
    for window, sinks_H in ((None, sinks), (20, None), (20, sinks)):
        calls.clear()
        out = paged_attention_torch(q, k_cache, v_cache, meta, D ** -0.5, window, sinks_H)
        ref = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), meta, D ** -0.5, window, sinks_H)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
        assert calls == ([40, 64] if cpu_kernels.amx_available() else [])


ROUTERS = {
    "softmax_top2": dict(num_experts=8, top_k=2),
    "softmax_top2_renorm": dict(num_experts=8, top_k=2, renormalize=True),
    "softmax_top1": dict(num_experts=16, top_k=1),
    "sigmoid_noaux_tc": dict(num_experts=32, top_k=4, scoring="sigmoid", renormalize=True, num_groups=4,
                             topk_groups=2, use_correction_bias=True, scaling_factor=2.5),
    "softmax_group_limited_greedy": dict(num_experts=24, top_k=6, num_groups=8, topk_groups=3, group_score="max",
                                         scaling_factor=16.0),
    "sigmoid_no_groups": dict(num_experts=10, top_k=3, scoring="sigmoid", renormalize=True),
    "topk_then_softmax": dict(num_experts=32, top_k=4, topk_before_softmax=True),  # gpt-oss
}


@pytest.mark.parametrize("name", list(ROUTERS))
def test_route_select_kernel_equals_the_torch_ops(name, monkeypatch):
    from routing import RouterConfig, route

    cfg = RouterConfig(**ROUTERS[name])
    g = torch.Generator().manual_seed(len(name))
    logits = torch.randn(37, cfg.num_experts, generator=g).bfloat16()
    bias = torch.randn(cfg.num_experts, generator=g) * 0.1 if cfg.use_correction_bias else None
    calls = []
    real = cpu_kernels.route_select
    monkeypatch.setattr(cpu_kernels, "route_select", lambda *a: calls.append(1) or real(*a))
    w, ids = route(logits, cfg, bias)
    monkeypatch.setattr(cpu_kernels, "route_select", lambda *a: None)  # the torch ops
    w_ref, ids_ref = route(logits, cfg, bias)
    assert calls and ids.dtype == ids_ref.dtype == torch.int64 and w.dtype == torch.float32
    # bf16 logits tie often (equal logits, equal scores): both take the lower index first, so the
    # choices are the same, in the same order (the kernel's expf and torch's vectorized exp may
    # differ in the last bit of a score)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kernel", [True, False])
def test_routing_breaks_ties_to_the_lower_index(kernel, monkeypatch):
    # torch.topk leaves the order of equal values to its algorithm; routing (and the C router) take
    # the lower index first, so a choice hanging on a tie is the same on every path
    from routing import RouterConfig, route, top_k_ids

    assert top_k_ids(torch.tensor([[0.3, 0.5, 0.5, 0.1, 0.5]]), 2).tolist() == [[1, 2]]
    if not kernel:
        monkeypatch.setattr(cpu_kernels, "route_select", lambda *a: None)  # the torch ops
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, -1.0, 1.0]])
    _, ids = route(logits, RouterConfig(num_experts=6, top_k=2))
    _, ids_before = route(logits, RouterConfig(num_experts=6, top_k=2, topk_before_softmax=True))
    assert ids.tolist() == ids_before.tolist() == [[1, 2]]
    # groups {0, 1} {2, 3} {4, 5} all score 1.0 at best: the first is kept
    _, ids = route(logits, RouterConfig(num_experts=6, top_k=2, scoring="sigmoid", num_groups=3, topk_groups=1,
                                        group_score="max"))
    assert ids.tolist() == [[1, 0]]


def test_route_select_scores_as_torch_and_leaves_nan_to_it():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 64, generator=g) * 4
    for scoring, ref in (("softmax", torch.softmax(logits, -1)), ("sigmoid", torch.sigmoid(logits))):
        w, ids, scores, tied = cpu_kernels.route_select(logits, scoring, 6)  # 300 x 64: threaded
        torch.testing.assert_close(scores, ref, rtol=1e-6, atol=1e-9)
        assert tied is None and torch.equal(ids, ref.topk(6).indices)
        assert torch.equal(w, scores.gather(1, ids))  # no renormalization, scale 1
    # gpt-oss's router: the top k of the logits, a softmax over those k (scaled)
    w, ids, scores, tied = cpu_kernels.route_select(logits, "topk_softmax", 4, scale=2.0)
    assert tied is None and torch.equal(scores, logits) and torch.equal(ids, logits.topk(4).indices)
    torch.testing.assert_close(w, 2.0 * torch.softmax(logits.gather(1, ids), -1), rtol=1e-6, atol=1e-9)
    logits[7, 3] = float("nan")
    assert cpu_kernels.route_select(logits, "topk_softmax", 4)[3].tolist() == [7]  # left to torch
    # experts 4 and 5 tie for the second place: the lower index is taken, no token is left to torch
    scores = torch.tensor([[0.1, 0.0, 0.0, 0.0, 0.3, 0.3, 0.5, 0.0], [0.1, 0.0, 0.0, 0.0, 0.2, 0.3, 0.5, 0.0]])
    w, ids, s, tied = cpu_kernels.route_select(scores.log(), "softmax", 2)
    assert tied is None and ids.tolist() == [[6, 4], [6, 5]]
    torch.testing.assert_close(w[1], torch.tensor([0.5, 0.3]) / scores[1].sum())
    # tied groups (group-limited selection): groups 1 and 2 have the same top-2 sum, group 1 is kept
    g = torch.tensor([[0.9, 0.1, 0.4, 0.3, 0.3, 0.4]]).logit()
    w, ids, s, tied = cpu_kernels.route_select(g, "sigmoid", 2, num_groups=3, topk_groups=2)
    assert tied is None and ids.tolist() == [[0, 2]]
    w, ids, s, tied = cpu_kernels.route_select(torch.tensor([[0.1, float("nan"), 0.2]]), "softmax", 1)
    assert tied.tolist() == [0] and s.isnan().all()  # NaN everywhere, as torch's softmax


@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("gate_bias", [False, True])
def test_route_token_plan_equals_the_gate_then_route(name, gate_bias):
    # the captured step's router: the gate's GEMV and routing.route's scoring and selection in one call
    from routing import RouterConfig, route
    from ops import linear

    cfg = RouterConfig(**ROUTERS[name])
    g = torch.Generator().manual_seed(len(name))
    E, D = cfg.num_experts, 96
    gate = (torch.randn(E, D, generator=g) / 8).bfloat16()
    b = (torch.randn(E, generator=g) / 8).bfloat16() if gate_bias else None
    bias = torch.randn(E, generator=g) * 0.1 if cfg.use_correction_bias else None
    scoring = "topk_softmax" if cfg.topk_before_softmax else cfg.scoring
    plan = cpu_kernels.RouteToken.make(gate, b, scoring, cfg.top_k, bias, cfg.num_groups, cfg.topk_groups,
                                       cfg.group_score == "top2_sum", cfg.renormalize,
                                       1e-20 if cfg.scoring == "sigmoid" else 0.0, cfg.scaling_factor)
    for _ in range(20):
        x = torch.randn(1, D, generator=g).bfloat16()
        w_ref, ids_ref = route(linear(x, gate, b), cfg, bias)
        out = plan(x)
        assert out is not None  # (ties included: the lower index, as route)
        assert torch.equal(out[1], ids_ref) and torch.equal(out[0], w_ref)
    # a verify step's rows (up to MAX_ROWS): each routed as one row is
    for _ in range(10):
        xs = torch.randn(4, D, generator=g).bfloat16()
        out = plan(xs)
        refs = [route(linear(xs[t:t + 1], gate, b), cfg, bias) for t in range(4)]
        assert torch.equal(out[1], torch.cat([ids for _, ids in refs]))
        assert torch.equal(out[0], torch.cat([w for w, _ in refs]))
    too_many = torch.randn(cpu_kernels.RouteToken.MAX_ROWS + 1, D).bfloat16()
    assert plan(x.float()) is None and plan(too_many) is None
    assert cpu_kernels.RouteToken.make(gate.float(), None, "softmax", 2) is None
    assert cpu_kernels.RouteToken.make(gate, None, "tanh", 2) is None


@pytest.mark.parametrize("T", [1, 5, 64])
def test_dense_mlp_fast_paths_equal_the_op_by_op_path(T, monkeypatch):
    # shared experts and dense MLP layers: one C call (GEMV kernel at one row, AMX at 2-64 rows)
    from moe.models.layers import DenseMLP
    from parallel import init_single_process

    init_single_process()
    g = torch.Generator().manual_seed(T)
    mlp = DenseMLP(64, 96, torch.bfloat16)
    mlp.gate_up_proj.weight.data.copy_(torch.randn(192, 64, generator=g) / 8)
    mlp.down_proj.weight.data.copy_(torch.randn(64, 96, generator=g) / 10)
    x = torch.randn(T, 64, generator=g).bfloat16()
    calls = []
    for name in ("expert_token", "amx_experts"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _r=real: calls.append(1) or _r(*a))
    fast = mlp(x)
    for name in ("expert_token", "amx_experts"):
        monkeypatch.setattr(cpu_kernels, name, lambda *a: None)
    assert calls and torch.equal(fast, mlp(x))


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("shape", ["gqa_8", "mqa_d128", "mla_latent", "mla_v3", "group_7"])
@pytest.mark.parametrize("ctx,window,block_size", [(133, None, 16), (1, None, 16), (40, None, 5), (133, 50, 16),
                                                    (1900, None, 16), (2001, None, 5), (2300, 1900, 16),
                                                    (3700, None, 16), (8200, None, 16)])
def test_one_sequence_one_kv_head_splits_its_work_over_threads(shape, ctx, window, block_size, two_threads):
    # batch 1 with a single KV head (MLA's latent cache): the threads split the query heads, or (bf16,
    # AVX512-BF16, from 2 MB of K rows: mla_v3 from 1821 rows, mla_latent from 3641, mqa_d128 (V apart
    # from K) from 8192) the cached rows for the scores and runs of 4 heads for the V sums; each head's
    # arithmetic is unchanged (bit-identical to one thread)
    spec = dict(SHAPES[shape])
    latent = spec.pop("latent", False)
    meta, k_cache, v_cache, q = _decode_batch([ctx], block_size=block_size, dtype=torch.bfloat16, latent=latent,
                                              seed=11, **spec)
    args = (meta.block_tables, meta.context_lens, spec["Dk"] ** -0.5, window)
    two = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, *args)
    torch.set_num_threads(1)
    one = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, *args)
    assert torch.equal(one, two)
    ref = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), meta, *args[2:])
    torch.testing.assert_close(two.float(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("C", [272, 512, 1040])  # 32-column chunks + a 16-column tail; MLA's latent; float32 rows
def test_heads_vec_matches_the_per_head_einsums(C):
    # MLA's per-head GEMMs at one row (batch-1 decode), both weight orientations, strided views
    g = torch.Generator().manual_seed(3)
    H, nope, rope, v = 4, 64, 32, 32
    w_kv = (torch.randn(H * (nope + v), C, generator=g) / 8).bfloat16().view(H, nope + v, C)
    w_uk, w_uv = w_kv[:, :nope], w_kv[:, nope:]
    q_nope = torch.randn(1, H * (nope + rope), generator=g).bfloat16().view(1, H, nope + rope)[..., :nope]
    o_lat = torch.randn(1, H, C, generator=g).bfloat16()
    if cpu_kernels.load() is None:
        pytest.skip("the C kernels are not built here (no compiler): the callers keep einsum")
    a = cpu_kernels.heads_vec(q_nope, w_uk, w_rows_n=False)
    b = cpu_kernels.heads_vec(o_lat, w_uv, w_rows_n=True)
    for got, exact in ((a, torch.einsum("thn,hnc->thc", q_nope.float(), w_uk.float())),
                       (b, torch.einsum("thc,hvc->thv", o_lat.float(), w_uv.float()))):
        assert got.shape == exact.shape
        assert (got.float() - exact).abs().max() <= exact.abs().max() * 2 ** -7  # float32 sums rounded once
        assert (got == exact.bfloat16()).float().mean() > 0.95
    assert cpu_kernels.heads_vec(q_nope, w_uk[..., :40], w_rows_n=False) is None  # N % 16
    assert cpu_kernels.heads_vec(o_lat.expand(2, H, C), w_uv, w_rows_n=True) is None  # two rows


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_decode_step_loop_equals_its_halves_run_one_by_one(family, checkpoint, monkeypatch, two_threads):
    # the captured step runs its one-call halves from one C loop (cpu_kernels.DecodeStep): greedy
    # tokens, log-probs and recorded expert counts equal those of the same plans called half by half
    # from Python, and of the loop handing every MoE half back (stopping and resuming around each)
    from cpu_kernels import step
    from moe import LLM, SamplingParams
    from moe.cpu_decode import _MoEToken

    if cpu_kernels.load() is None:
        pytest.skip("the C kernels are not built here (no compiler): no captured step")
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (1, 9, 40)]
    sp = SamplingParams(temperature=0, max_tokens=12, logprobs=3, ignore_eos=True)
    real = cpu_kernels.DecodeStep._run

    def run():
        spans = []  # (start, stop, halves) of each loop call

        def step_run(self, start, *a):
            out = real(self, start, *a)
            spans.append((start, out[0], self.n))
            return out

        monkeypatch.setattr(cpu_kernels.DecodeStep, "_run", step_run)
        llm = LLM(str(checkpoint(family)), dtype="bfloat16", block_size=16, record_expert_counts=True)
        outs = [llm.generate([p], sp)[0].outputs[0] for p in prompts]
        return [(o.token_ids, o.logprobs) for o in outs], llm.expert_counts(), spans, llm

    loop, counts, spans, llm = run()
    n = spans[0][2]
    assert all(span == (0, n, n) for span in spans)  # whole steps in one call
    monkeypatch.setattr(_MoEToken, "step_half", lambda self, rows: None)
    handed, handed_counts, spans, _ = run()
    moe_halves = {2 * i + 1 for i, layer in enumerate(llm.engine.model.layers) if hasattr(layer.mlp, "experts")}
    assert moe_halves and {stop for _, stop, _ in spans} - {n} == moe_halves  # the loop stops at each MoE half
    assert {start for start, _, _ in spans} == {0} | {i + 1 for i in moe_halves if i + 1 < n}  # resumes after it
    monkeypatch.undo()
    monkeypatch.setattr(step, "KINDS", {})  # no half runs from the loop: each plan called from Python
    python, python_counts, spans, _ = run()
    assert all(start == stop for start, stop, _ in spans)
    assert loop == handed == python
    assert torch.equal(counts, handed_counts) and torch.equal(counts, python_counts) and counts.sum() > 0


TOKEN_CALLS = 3 * 19 * 3  # 3 prompts x 19 decode steps x 3 layers
PREFILL_NORMS = 2 * 3 * 2  # the two prompts longer than a token: 3 layers x 2 residual adds


@pytest.mark.parametrize("family,kernel,min_calls", [
    ("deepseek_v2", "mla_token", TOKEN_CALLS), ("deepseek_v3", "mla_token", TOKEN_CALLS),
    ("mixtral", "gqa_token", TOKEN_CALLS), ("qwen2_moe", "gqa_token", TOKEN_CALLS),
    ("qwen3_moe", "gqa_token", TOKEN_CALLS), ("gpt_oss", "gqa_token", TOKEN_CALLS),
    ("olmoe_unclipped", "gqa_token", TOKEN_CALLS), ("olmoe", "gqa_token", TOKEN_CALLS),  # (clip_qkv 3: q/k/v clamped)
    ("deepseek_v3", "moe_token", TOKEN_CALLS), ("mixtral", "moe_token", TOKEN_CALLS),
    ("qwen3_moe", "moe_token", TOKEN_CALLS), ("qwen2_moe", "moe_token", TOKEN_CALLS),
    ("gpt_oss", "moe_token", TOKEN_CALLS),
    ("deepseek_v3", "add_rms_norm", PREFILL_NORMS), ("gpt_oss", "add_rms_norm", PREFILL_NORMS)])
def test_one_call_layers_equal_the_op_by_op_path(family, kernel, min_calls, checkpoint, monkeypatch, one_calls,
                                                 two_threads, tmp_path):
    # batch-1 decode runs a layer's attention as one C call (MLA; GQA with qkv biases, per-head and
    # full q/k norms, OLMoE's clamped q/k/v, sinks and sliding windows, o_proj bias) and its MLP or MoE block as another
    # (routed experts with the shared expert; a dense MLP as one expert), each with its residual add
    # and the next norm; elsewhere (prefill) each residual add and next norm are one pass. Greedy
    # tokens and log-probs (bf16, two threads) equal the op-by-op path's in a fresh engine, for
    # prompts of one token, within a block and across blocks (19 decode steps per prompt)
    from moe import LLM, SamplingParams
    from tiny_models import make_checkpoint

    if cpu_kernels.load() is None:
        pytest.skip("the C kernels are not built here (no compiler): both runs would take the op path")
    path = make_checkpoint("olmoe", tmp_path / "olmoe", clip_qkv=None) if family == "olmoe_unclipped" \
        else checkpoint(family)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (1, 9, 40)]
    sp = SamplingParams(temperature=0, max_tokens=20, logprobs=3, ignore_eos=True)
    # the captured step runs its plans (weights checked once; from its C loop), the other kernels directly
    plans = {"gqa_token": cpu_kernels.GqaToken, "mla_token": cpu_kernels.MlaToken, "moe_token": cpu_kernels.MoeToken}
    if kernel in plans:
        calls = one_calls(plans[kernel])
    else:
        real, calls = getattr(cpu_kernels, kernel), []
        monkeypatch.setattr(cpu_kernels, kernel, lambda *a, **k: calls.append(True) or real(*a, **k))
    llm = LLM(str(path), dtype="bfloat16", block_size=16)
    fast = [llm.generate([p], sp)[0].outputs[0] for p in prompts]
    assert sum(calls) >= min_calls
    monkeypatch.undo()
    if kernel in plans:
        one_calls(plans[kernel], off=True)
    else:
        monkeypatch.setattr(cpu_kernels, kernel, lambda *a, **k: None)
    llm = LLM(str(path), dtype="bfloat16", block_size=16)
    ops = [llm.generate([p], sp)[0].outputs[0] for p in prompts]
    for a, b in zip(fast, ops):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


def test_the_shared_expert_in_the_routed_experts_call_equals_its_own_call(checkpoint, monkeypatch, two_threads):
    # DeepSeek-V3's shared expert (the routed experts' F, ungated) runs in the routed experts' call
    # for prompt rows (cpu_kernels.amx_moe's shared expert): greedy tokens and log-probs (bf16, two
    # threads) equal a fresh engine's that calls it on its own and adds it, for prompts of 1-70 tokens
    from experts.grouped import GroupedExperts
    from moe import LLM, SamplingParams

    if not cpu_kernels.amx_available():
        pytest.skip("no AMX / AVX512-BF16 tiles here: neither run takes the experts' one call")
    path = checkpoint("deepseek_v3")
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (1, 9, 40, 70)]
    sp = SamplingParams(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True)
    real, fused = cpu_kernels.amx_moe, []
    monkeypatch.setattr(cpu_kernels, "amx_moe", lambda *a, **k: fused.append(
        k.get("shared", a[6] if len(a) > 6 else None) is not None) or real(*a, **k))
    llm = LLM(str(path), dtype="bfloat16", block_size=16)
    one = [llm.generate([p], sp)[0].outputs[0] for p in prompts]
    assert sum(fused) >= 3 * 2  # three prompts of 2+ rows, two MoE layers each
    monkeypatch.setattr(GroupedExperts, "fuses_shared", False)
    fused.clear()
    llm = LLM(str(path), dtype="bfloat16", block_size=16)
    own = [llm.generate([p], sp)[0].outputs[0] for p in prompts]
    assert not any(fused)
    for a, b in zip(one, own):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


@pytest.mark.parametrize("V", [1, 7, 16, 17, 48, 33, 32000])
def test_argmax_rows_equals_torch_max_indices(V):
    # the greedy choice in one C pass: the first largest value of each row, the first NaN where
    # there is one (as torch.max(dim=-1).indices), ties planted in the vector blocks and the tail,
    # rows of -inf and +inf, a strided view (the row stride another than V)
    if cpu_kernels.load() is None:
        pytest.skip("the C kernels are not built here (no compiler): torch's max is the path")
    g = torch.Generator().manual_seed(V)
    x = torch.randint(-3, 4, (12, V + 5), generator=g).float()[:, :V]  # many ties
    x[1] = float("-inf")
    x[2, V // 2] = float("inf")
    x[3, V - 1] = float("nan")
    x[4, V // 3] = float("nan")
    x[4, V - 1] = float("nan")
    x[5, -1] = 9.0  # the largest in the tail
    x[6, 0] = 9.0
    x[6, -1] = 9.0  # a tie of the first and the last
    x[7] = torch.randn(V, generator=g)
    got = cpu_kernels.argmax_rows(x)
    assert got == x.max(dim=-1).indices.tolist()
    assert cpu_kernels.argmax_rows(x.bfloat16()) is None and cpu_kernels.argmax_rows(x[0]) is None


def test_decode_step_hands_attention_back_for_rotary_tables_it_cannot_take(checkpoint):
    # rotary tables the one-call GQA kernel does not take (here over half the head) leave that half
    # to the caller, whose own path runs it: tokens as without the captured step
    from moe import LLM, SamplingParams

    if cpu_kernels.load() is None:
        pytest.skip("the C kernels are not built here (no compiler): no captured step")
    llm = LLM(str(checkpoint("qwen3_moe")), dtype="bfloat16", block_size=16)
    runner = llm.engine.runner
    step, rot = runner.captured.step, runner.model.layers[0].self_attn.rotary
    assert step.plans[0] is not None
    half = rot.cos[:, :rot.cos.shape[1] // 2].contiguous()
    step.rotary(0, half, half, rot.interleaved)
    assert step.plans[0] is None
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = [{"prompt_token_ids": list(range(3, 12))}]
    captured = llm.generate(prompt, sp)[0].outputs[0].token_ids
    runner.captured = None
    assert captured == llm.generate(prompt, sp)[0].outputs[0].token_ids


def _huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping of this process holding ``address`` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return 0


def test_weights_advised_before_they_are_written_fault_in_as_huge_pages(tmp_path):
    """advise_huge_pages: the 2 MiB-aligned interior of each CPU storage of 2 MiB or more (once per
    storage); written afterwards, it is backed by huge pages where THP is on (madvise or always);
    ``collapse`` leaves the values as they were. The engine advises its model's weights (a checkpoint
    whose embedding and LM head are 8 MiB each), and they hold the checkpoint's values."""
    from moe import LLM, SamplingParams
    from tiny_models import make_checkpoint

    mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    thp_on = "[never]" not in mode
    # fresh pages of our own mapping (malloc may hand out heap pages written before, even for 36 MiB)
    region = mmap.mmap(-1, 36 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    t = torch.frombuffer(region, dtype=torch.uint8)
    view, small = t[: 1 << 20], torch.empty(1 << 20, dtype=torch.uint8)
    advised = cpu_kernels.advise_huge_pages([t, view, small])
    start = t.untyped_storage().data_ptr()
    lo = (start + (2 << 20) - 1) & ~((2 << 20) - 1)
    assert advised == ((start + (36 << 20)) & ~((2 << 20) - 1)) - lo >= 34 << 20
    t.fill_(7)
    if thp_on:  # faulted in after the advice
        assert _huge_bytes_at(lo) >= 32 << 20, mode
    # written before the advice (4 KiB pages): collapsed into huge ones, values intact
    u = torch.empty(36 << 20, dtype=torch.uint8).random_(0, 256, generator=torch.Generator().manual_seed(0))
    before = u.clone()
    lo_u = (u.data_ptr() + (2 << 20) - 1) & ~((2 << 20) - 1)
    assert cpu_kernels.advise_huge_pages([u], collapse=True) >= 34 << 20
    assert torch.equal(u, before)
    if thp_on:
        assert _huge_bytes_at(lo_u) >= 32 << 20, mode
    path = make_checkpoint("qwen3_moe", tmp_path / "wide", vocab_size=32768)
    llm = LLM(str(path), dtype="float32")
    embed = llm.engine.model.embed_tokens.weight
    assert llm.engine.huge_page_bytes >= 2 * (4 << 20)
    if thp_on:
        assert _huge_bytes_at(embed.data_ptr() + (4 << 20)) >= 2 << 20
    from safetensors.torch import load_file
    want = {k: v for f in path.glob("*.safetensors") for k, v in load_file(f).items()}["model.embed_tokens.weight"]
    assert torch.equal(embed, want)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4))
    assert not out[0].error


def test_small_storages_gathered_into_one_arena_keep_values_views_and_huge_pages(tmp_path):
    """gather_small_storages: every storage of max_bytes or less moves into one arena (2 MiB-aligned,
    advised huge before it is written), each tensor given keeps its values, dtype, sizes, strides and
    offset, and tensors that shared a storage still do; larger storages stay where they were. The
    engine's weights go through it at load, so its small projections share one storage."""
    from moe import LLM
    from tiny_models import make_checkpoint

    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(512, 1024, generator=g).to(torch.bfloat16) for _ in range(6)]  # 1 MiB each
    wt = mats[0].t()  # a view of the first: transposed strides on the same storage
    rows = mats[1][100:200]  # and one at an offset
    f32, i64 = torch.randn(1000, generator=g), torch.arange(7)
    big = torch.empty(40 << 20, dtype=torch.uint8)
    given = [*mats, wt, rows, f32, i64, big, mats[2]]  # (a tensor twice: moved once)
    before = [t.clone() for t in given]
    big_at = big.data_ptr()
    gathered = cpu_kernels.gather_small_storages(given)
    assert gathered >= 6 * (1 << 20) + 4000 + 56
    assert big.data_ptr() == big_at
    arena = mats[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == arena for t in (*mats, wt, rows, f32, i64))
    for t, b in zip(given, before):
        assert t.dtype == b.dtype and t.shape == b.shape and torch.equal(t, b)
    assert wt.stride() == (1, 1024) and wt.data_ptr() == mats[0].data_ptr()
    assert rows.data_ptr() == mats[1].data_ptr() + 100 * 1024 * 2
    mats[0][3, 5] = 1.5  # still views of each other
    assert wt[5, 3].item() == 1.5
    assert mats[0].data_ptr() % (2 << 20) == 0  # the first storage given starts the arena, on a 2 MiB boundary
    if "[never]" not in open("/sys/kernel/mm/transparent_hugepage/enabled").read():
        assert _huge_bytes_at(mats[0].data_ptr()) >= 2 << 20

    llm = LLM(str(make_checkpoint("qwen3_moe", tmp_path / "m")), dtype="bfloat16")
    weights = list(llm.engine.model.layers[0].self_attn.parameters())
    assert len(weights) > 2 and len({p.untyped_storage().data_ptr() for p in weights}) == 1
