"""The grouped bf16 GEMM (cpu_kernels/gemm.c) against its torch reference, and the ops/experts
paths that choose it (CPUs without a fast bf16 GEMM) against the paths they replace."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from cpu_kernels.gemm import grouped_gemm, grouped_gemm_reference
from experts.grouped import Activation, grouped_swiglu_torch

linear_mod = importlib.import_module("ops.linear")  # (``ops.linear`` is the function)

pytestmark = pytest.mark.skipif(
    grouped_gemm(torch.zeros(1, 8, dtype=torch.bfloat16), torch.zeros(1, 8, 8, dtype=torch.bfloat16), [1]) is None,
    reason="the grouped GEMM kernel needs a C compiler and AVX2 + FMA")


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of b's bf16 spacing (2^-7 of its magnitude)."""
    scale = b.float().abs().clamp_min(1e-3) * 2.0 ** -7
    return float(((a.float() - b.float()).abs() / scale).max())


@pytest.mark.parametrize("E, N, K, counts", [(1, 37, 45, [5]), (3, 64, 1024, [1, 0, 7]), (4, 130, 200, [2, 3, 1, 4]),
                                             (2, 16, 8, [0, 3]), (8, 96, 264, [9, 7, 0, 8, 10, 6, 1, 2])])
def test_grouped_gemm_equals_reference(E, N, K, counts):
    g = torch.Generator().manual_seed(E * 1000 + N)
    w = torch.randn(E, N, K, generator=g).bfloat16()
    x = torch.randn(sum(counts), K, generator=g).bfloat16()
    ref = grouped_gemm_reference(x, w, counts, out_float=True)
    got = grouped_gemm(x, w, counts, out_float=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4 * K ** 0.5)  # float32 sums in another order
    y = grouped_gemm(x, w, counts)
    assert y.dtype == torch.bfloat16 and _bf16_ulps(y, ref) <= 1.0  # rounded once from the float32 sum


def test_grouped_gemm_strided_weight_rows_and_input():
    w_big = torch.randn(2, 40, 72).bfloat16()
    w = w_big[:, :, :64]  # rows of stride 72
    x = torch.randn(64, 10).bfloat16().t()  # [10, 64], a transposed view
    got = grouped_gemm(x, w, [4, 6], out_float=True)
    torch.testing.assert_close(got, grouped_gemm_reference(x, w, [4, 6], out_float=True), rtol=1e-5, atol=1e-3)


def test_grouped_gemm_declines_and_rejects():
    w = torch.randn(2, 8, 16)
    assert grouped_gemm(torch.randn(3, 16), w, [1, 2]) is None  # float32: the caller's torch path
    with pytest.raises(ValueError, match="counts sum to 2"):
        grouped_gemm(torch.randn(3, 16).bfloat16(), w.bfloat16(), [1, 1])
    with pytest.raises(ValueError, match="x has 12 columns"):
        grouped_gemm(torch.randn(3, 12).bfloat16(), w.bfloat16(), [1, 2])


@pytest.mark.parametrize("m", [2, 7, 64, 200])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_on_cpus_without_bf16_gemm(monkeypatch, m, bias):
    monkeypatch.setattr(linear_mod, "BF16_GEMM_IN_FLOAT32", True)
    monkeypatch.setattr("cpu_kernels.AMX_MAX_ROWS", 0)  # the AMX tier off, as on such CPUs
    w = torch.randn(96, 128).bfloat16()
    b = torch.randn(96).bfloat16() if bias else None
    x = torch.randn(m, 128).bfloat16()
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = linear_mod.linear(x, w, b)
    assert got.shape == (m, 96) and got.dtype == torch.bfloat16
    # one rounding of the product, and one of the bias add in bf16: half a bf16 spacing each
    bound = 2.0 ** -8 * ((x.float() @ w.float().t()).abs() + ref.abs()) + 1e-6
    assert bool(((got.float() - ref).abs() <= bound).all())
    logits = linear_mod.lm_head_logits(x, w)
    assert logits.dtype == torch.float32
    exact = x.float() @ w.float().t()  # rounded to bf16 once, as the bf16 GEMM of other CPUs
    assert bool(((logits - exact).abs() <= 2.0 ** -8 * exact.abs() + 1e-5 * float(exact.abs().max())).all())


@pytest.mark.parametrize("bias", [False, True])
def test_experts_in_one_call_equal_the_per_expert_gemms(monkeypatch, bias):
    E, D, Fi = 6, 64, 48
    g = torch.Generator().manual_seed(1)
    w13 = (torch.randn(E, 2 * Fi, D, generator=g) / D ** 0.5).bfloat16()
    w2 = (torch.randn(E, D, Fi, generator=g) / Fi ** 0.5).bfloat16()
    b13 = torch.randn(E, 2 * Fi, generator=g).bfloat16() if bias else None
    b2 = torch.randn(E, D, generator=g).bfloat16() if bias else None
    counts = [3, 0, 5, 1, 9, 2]
    x = torch.randn(sum(counts), D, generator=g).bfloat16()
    monkeypatch.setattr("cpu_kernels.AMX_MAX_ROWS", 0)
    monkeypatch.setattr("cpu_kernels.amx.AMX_MAX_ROWS", 0)  # the AMX kernels decline, as on such CPUs
    monkeypatch.setattr(linear_mod, "BF16_GEMM_IN_FLOAT32", False)  # the per-expert path (float32 reference)
    ref = grouped_swiglu_torch(x.float(), counts, w13.float(), w2.float(), None if b13 is None else b13.float(),
                               None if b2 is None else b2.float(), Activation())
    monkeypatch.setattr(linear_mod, "BF16_GEMM_IN_FLOAT32", True)
    got = grouped_swiglu_torch(x, counts, w13, w2, b13, b2, Activation())
    assert got.dtype == torch.bfloat16
    # bf16 roundings at the hidden activation and the output: a few bf16 ulps of the output scale
    assert float((got.float() - ref).abs().max()) <= 4 * 2.0 ** -7 * float(ref.abs().max())
