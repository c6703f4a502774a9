"""Keyed draws (ops.sample.draw_rows): the C kernel (cpu_kernels.sample_rows, which the captured step's
decode loop calls too) against its torch reference (draw_rows_torch), and both against the filtered
distribution they draw from."""
from __future__ import annotations

import random

import pytest
import torch

import cpu_kernels
from ops.sample import draw_rows_torch, filtered_probs, keyed_uniform, seed_key

needs_c = pytest.mark.skipif(cpu_kernels.load() is None, reason="the C kernels are not built here (no compiler)")
_P = [0.5, 0.2, 0.15, 0.1, 0.05]


def _c(logits, rows, positions):
    out = cpu_kernels.sample_rows(logits, rows, positions)
    assert out is not None
    return out


@needs_c
def test_the_c_uniforms_are_the_python_ones():
    rnd = random.Random(0)
    keys = [rnd.getrandbits(64) for _ in range(200)] + [0, 1, 2 ** 64 - 1, seed_key(0), seed_key(-5)]
    pos = [rnd.randrange(0, 1 << 20) for _ in range(200)] + [0, 0, 7, 3, 123456]
    got = cpu_kernels.keyed_uniforms(keys, pos)
    assert got == [keyed_uniform(k, p) for k, p in zip(keys, pos)]
    assert all(0.0 <= u < 1.0 for u in got)
    # neighbouring positions and keys are unrelated (a stream of SplitMix64, keys scrambled from seeds)
    us = torch.tensor([keyed_uniform(seed_key(7), p) for p in range(4000)], dtype=torch.float64)
    assert abs(us.mean().item() - 0.5) < 0.02 and abs(torch.corrcoef(torch.stack([us[1:], us[:-1]]))[0, 1]) < 0.05


CASES = [
    (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (2.0, 0, 1.0, 0.0),
    (1.0, 1, 1.0, 0.0), (1.0, 2, 1.0, 0.0), (1.0, 5, 1.0, 0.0),
    (1.0, 0, 0.3, 0.0), (1.0, 0, 0.55, 0.0), (1.0, 0, 0.75, 0.0), (1.0, 0, 0.9, 0.0),
    (1.0, 0, 1.0, 0.35), (1.0, 0, 1.0, 0.25), (1.0, 0, 1.0, 1.0),
    (1.0, 3, 0.8, 0.0), (1.0, 4, 1.0, 0.25), (0.5, 4, 0.9, 0.1),
]


@pytest.mark.parametrize("impl", ["c", "torch"])
@pytest.mark.parametrize("temperature, top_k, top_p, min_p", CASES)
def test_draw_frequencies_follow_the_filtered_distribution(impl, temperature, top_k, top_p, min_p):
    # N draws at N keys: every kept token at its filtered probability (within 5 sigma of a binomial
    # proportion), every dropped one never; the filters as ops.sample.apply_filters (hand-computed in
    # test_sampler.py) keeps them
    if impl == "c" and cpu_kernels.load() is None:
        pytest.skip("the C kernels are not built here")
    N = 20000
    logits = torch.tensor([_P]).log()
    rows = [(temperature, top_k, top_p, min_p, seed_key(i)) for i in range(N)]
    draw = _c if impl == "c" else draw_rows_torch
    tokens = draw(logits.repeat(N, 1), rows, [3] * N)
    freq = torch.bincount(torch.tensor(tokens), minlength=5).double() / N
    want = filtered_probs(logits, [temperature], [top_k], [top_p], [min_p])[0].double()
    sigma = (want * (1 - want) / N).sqrt()
    assert ((freq - want).abs() <= 5 * sigma + 1e-12).all(), (freq, want)
    assert (freq[want == 0] == 0).all()


@needs_c
@pytest.mark.parametrize("V", [7, 50, 1000, 32000])
def test_the_c_draws_are_the_reference_draws(V):
    # random rows and settings: the same token as the torch reference at the same uniform, but where
    # the uniform lies within rounding of the edge between two tokens (exp and sums round differently)
    g = torch.Generator().manual_seed(V)
    R = 64 if V < 32000 else 16
    logits = torch.randn(R, V, generator=g) * torch.rand(R, 1, generator=g) * 6
    rnd = random.Random(V)
    rows = [(rnd.choice([0.3, 0.8, 1.0, 1.7]), rnd.choice([0, 0, 1, 5, 40, V + 3]),
             rnd.choice([1.0, 1.0, 0.5, 0.9, 0.99]), rnd.choice([0.0, 0.0, 0.02, 0.3]), rnd.getrandbits(64))
            for _ in range(R)]
    positions = [rnd.randrange(0, 4096) for _ in range(R)]
    got, want = _c(logits, rows, positions), draw_rows_torch(logits, rows, positions)
    probs = filtered_probs(logits, *zip(*[r[:4] for r in rows])).double()
    near = 0
    for r in range(R):
        if got[r] != want[r]:
            cum = probs[r].cumsum(0)
            target = keyed_uniform(rows[r][4], positions[r]) * cum[-1].item()
            edge = cum[min(got[r], want[r])].item()
            assert abs(edge - target) < 1e-5, (r, rows[r], got[r], want[r])
            near += 1
        assert probs[r, got[r]] > 0
    assert near <= max(1, R // 16)


@pytest.mark.parametrize("impl", ["c", "torch"])
def test_draw_edge_cases(impl):
    if impl == "c" and cpu_kernels.load() is None:
        pytest.skip("the C kernels are not built here")
    draw = _c if impl == "c" else draw_rows_torch
    nan = float("nan")
    inf = float("inf")
    key = seed_key(1)
    row = (1.0, 0, 1.0, 0.0, key)
    logits = torch.tensor([[0.0, 1.0, nan, 2.0, nan],  # a NaN: the first NaN, as the greedy choice
                           [-inf, -inf, 3.0, -inf, -inf],  # one finite logit: that token
                           [-inf] * 5,  # nothing finite: the first largest (0)
                           [0.0, inf, 1.0, inf, 0.0],  # an infinite largest: the first of them
                           [5.0, 4.0, 3.0, 2.0, 1.0]])
    rows = [row] * 4 + [(0.0, 0, 1.0, 0.0, key)]  # temperature 0: greedy
    assert draw(logits, rows, [0] * 5) == [2, 2, 0, 1, 0]
    # a very low temperature: the largest token (the rest underflow), never a NaN
    assert {draw(torch.tensor([[0.0, 1.0, 0.999]]), [(1e-6, 0, 0.9, 0.0, seed_key(i))], [0])[0]
            for i in range(50)} == {1}
    if impl == "torch":
        return  # (ties at the edge of a filter: the C kernel keeps the first in token order, torch's sort any)
    # ties at the edge of top-k: the first in token order are kept (each draw one of them)
    tied = torch.tensor([[1.0, 3.0, 1.0, 3.0, 1.0, 1.0]])
    got = {_c(tied, [(1.0, 3, 1.0, 0.0, seed_key(i))], [0])[0] for i in range(400)}
    assert got == {0, 1, 3}
    # top-p over tied tokens: as many of them as reach the mass, first in token order
    flat = torch.zeros(1, 8)
    got = {_c(flat, [(1.0, 0, 0.3, 0.0, seed_key(i))], [0])[0] for i in range(400)}
    assert got == {0, 1, 2}  # 3 / 8 >= 0.3 > 2 / 8


# ---- log-probs (ops.sample.logprob_rows / top_logprobs: what a request's logprobs returns) ----------
@needs_c
@pytest.mark.parametrize("V", [7, 100, 1000, 32000])
@pytest.mark.parametrize("n", [0, 1, 5, 20, 64])
def test_the_c_logprobs_are_the_reference_ones(V, n):
    from ops.sample import logprob_rows_torch

    g = torch.Generator().manual_seed(V + n)
    x = torch.randn(6, V, generator=g) * torch.tensor([[0.1], [1.0], [3.0], [8.0], [30.0], [1.0]])
    x[5, : V // 2] = -torch.inf  # a row with most tokens banned
    chosen = torch.randint(0, V, (6,), generator=g).tolist()
    got = cpu_kernels.logprob_rows(x, chosen, n)
    assert got is not None
    ids, vals = got
    ref_ids, ref_vals = logprob_rows_torch(x, chosen, n)
    k = min(n, V) + 1
    assert torch.equal(ids[:, :k], ref_ids) and (ids[:, k:] == -1).all()
    finite = torch.isfinite(ref_vals)
    assert torch.equal(finite, torch.isfinite(vals[:, :k]))
    # within float32 rounding of the float64 log-softmax (closer than torch's float32 one at large V:
    # its sum runs long in float32 lanes, the kernel's goes into a double every 512 tokens)
    exact = torch.log_softmax(x.double(), -1).gather(1, ref_ids)
    torch.testing.assert_close(vals[:, :k][finite].double(), exact[finite], rtol=2e-7, atol=3e-6)
    torch.testing.assert_close(vals[:, :k][finite], ref_vals[finite], rtol=1e-6, atol=2e-5)
    # a strided view (rows of a wider tensor) reads the same
    wide = torch.cat([x, torch.zeros(6, 3)], dim=1)[:, :V]
    assert torch.equal(cpu_kernels.logprob_rows(wide, chosen, n)[0], ids)


@needs_c
def test_logprob_ties_edges_and_fallbacks():
    from ops.sample import logprob_rows_torch, top_logprobs

    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -1.0]])
    ids, _ = cpu_kernels.logprob_rows(x, [5], 2)
    assert ids.tolist() == [[5, 1, 2]] == logprob_rows_torch(x, [5], 2)[0].tolist()  # ties: token order
    assert cpu_kernels.logprob_rows(x, [5], 65) is None  # more than the kernel keeps: torch's
    # the dict a request gets: chosen first, then the top n without repeating it; n past the vocabulary
    lp = torch.log_softmax(x[0], -1)
    (entry,) = top_logprobs(x, [1], [3])
    assert list(entry) == [1, 2, 4] and entry[1] == pytest.approx(lp[1].item(), abs=1e-6)
    (entry,) = top_logprobs(x, [0], [10])
    assert sorted(entry) == list(range(6))
    # a NaN or an infinite largest logit: torch's log_softmax (all NaN there)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[0, 3] = bad
        assert cpu_kernels.logprob_rows(y, [0], 2) is None
        (entry,) = top_logprobs(y, [0], [2])
        assert 3 in entry and all(v != v for v in entry.values())
    assert top_logprobs(x[:0], [], []) == []


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@needs_c
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_avx2_and_scalar_builds_sample_as_this_build(march):
    # the sampling kernels' AVX2 (exp8, 8 lanes) and scalar (expf) paths, built for this CPU's
    # lesser instruction sets: the same tokens as this build's, but where a uniform lies within
    # rounding of an edge between two tokens; the same greedy tokens and top log-prob ids, values
    # within float32 rounding
    from cpu_kernels.build import _DIR, build_library, use_library

    need = {"x86-64-v3": {"avx2", "fma", "bmi2"}, "x86-64": {"sse2"}}[march]
    if not need <= _cpu_flags():
        pytest.skip(f"this CPU cannot run {march} code")
    native = cpu_kernels.load()
    variant = build_library(_DIR, march=march)
    g = torch.Generator().manual_seed(5)
    rnd = random.Random(5)
    cases = []
    for V in (7, 1000, 32000):
        R = 16
        logits = torch.randn(R, V, generator=g) * torch.rand(R, 1, generator=g) * 6
        rows = [(rnd.choice([0.0, 0.3, 1.0, 1.7]), rnd.choice([0, 0, 1, 5, 40]), rnd.choice([1.0, 0.5, 0.9, 0.99]),
                 rnd.choice([0.0, 0.02]), rnd.getrandbits(64)) for _ in range(R)]
        cases.append((logits, rows, [rnd.randrange(0, 4096) for _ in range(R)]))
    results = {}
    try:
        for name, lib in (("native", native), (march, variant)):
            use_library(lib)
            results[name] = [(_c(x, rows, pos), cpu_kernels.argmax_rows(x),
                              cpu_kernels.logprob_rows(x, [r % x.shape[1] for r in range(len(rows))], 8))
                             for x, rows, pos in cases]
    finally:
        use_library(native)
    for (x, rows, pos), a, b in zip(cases, results["native"], results[march]):
        assert a[1] == b[1]  # greedy
        assert torch.equal(a[2][0], b[2][0]) and torch.allclose(a[2][1], b[2][1], rtol=1e-6, atol=3e-6)
        probs = filtered_probs(x, *zip(*[r[:4] for r in rows])).double()
        for r in range(len(rows)):
            if a[0][r] != b[0][r]:
                cum = probs[r].cumsum(0)
                target = keyed_uniform(rows[r][4], pos[r]) * cum[-1].item()
                assert abs(cum[min(a[0][r], b[0][r])].item() - target) < 1e-5, (march, r, rows[r])
