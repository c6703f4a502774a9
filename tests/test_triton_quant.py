import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import pytest
import torch

from experts.formats import Fp8BlockWeights, Int4Weights, Int8Weights, Mxfp4Weights, WeightFormat
from experts.grouped import Activation
from experts.quant_grouped import (DequantWeights, Fp8BitsWeights, Int4TinyGemmWeights, Int8PackWeights, Q4RowWeights,
                                   Q8RowWeights, grouped_swiglu_quant_torch, prepare_cpu)
from experts.reference import moe_reference
from experts.triton_quant import fused_moe_quant_triton

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}

# (format, D, F): D and F are not multiples of the 32/64 tiles; int groups and fp8 blocks end
# short; mxfp4 needs multiples of 32.
CASES = [
    (Int8Weights(32), 40, 72),
    (Int8Weights(64, symmetric=False, scale_dtype=torch.float32), 40, 72),
    (Int4Weights(32), 40, 72),
    (Int4Weights(64, symmetric=False), 40, 72),
    (Int4Weights(32), 64, 96),  # K a multiple of 32: the C kernels' 4-bit layout
    (Int4Weights(128, symmetric=False), 64, 96),
    (Fp8BlockWeights(32, 32), 40, 72),
    (Mxfp4Weights(), 64, 96),
]


def _name(case) -> str:
    fmt = case[0] if isinstance(case, tuple) else case
    return "-".join([fmt.name, *map(str, fmt.options().values())])


def _make_moe(fmt: WeightFormat, T: int, D: int, F: int, E: int, K: int, dtype: torch.dtype, bias: bool,
              seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, D, generator=g).to(dtype)
    w13 = fmt.quantize(torch.randn(E, 2 * F, D, generator=g) * D ** -0.5)
    w2 = fmt.quantize(torch.randn(E, D, F, generator=g) * F ** -0.5)
    logits_TE = torch.randn(T, E, generator=g)
    if E > K + 1:  # ragged routing with guaranteed-empty experts
        logits_TE[:, 1::3] = float("-inf")
    topk_weights_TK, topk_ids_TK = logits_TE.softmax(-1).topk(K, dim=-1)
    b13 = (torch.randn(E, 2 * F, generator=g) * 0.1).to(dtype) if bias else None
    b2 = (torch.randn(E, D, generator=g) * 0.1).to(dtype) if bias else None
    return x_TD, w13, w2, topk_weights_TK.to(dtype), topk_ids_TK, b13, b2


def _reference(fmt, x, w13, w2, weights, ids, b13=None, b2=None, **act):
    return moe_reference(x, fmt.dequantize(w13), fmt.dequantize(w2), weights, ids, b13, b2, **act)


def _torch_path(fmt, x_TD, w13, w2, weights_TK, ids_TK, E, b13=None, b2=None, act=Activation()):
    """Dispatch by hand (sort assignments by expert), run the grouped torch path, combine."""
    T, K = ids_TK.shape
    order_N = torch.argsort(ids_TK.reshape(-1), stable=True)
    counts = torch.bincount(ids_TK.reshape(-1), minlength=E).tolist()
    y_RD = grouped_swiglu_quant_torch(x_TD[order_N // K], counts, w13, w2, fmt, b13, b2, act)
    y_ND = torch.empty_like(y_RD)
    y_ND[order_N] = y_RD
    return (y_ND.float().view(T, K, -1) * weights_TK.float()[..., None]).sum(1).to(x_TD.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=_name)
def test_triton_matches_reference(case, K: int, dtype: torch.dtype):
    fmt, D, F = case
    T, E = 9, 5
    x, w13, w2, weights, ids, _, _ = _make_moe(fmt, T, D, F, E, K, dtype, bias=False)
    assert ids.unique().numel() < E  # the empty-expert case is really exercised
    y = fused_moe_quant_triton(x, w13, w2, fmt, weights, ids)
    assert y.dtype == dtype and y.shape == (T, D)
    torch.testing.assert_close(y, _reference(fmt, x, w13, w2, weights, ids), **TOL[dtype])


@pytest.mark.parametrize("case", [CASES[3], CASES[5]], ids=_name)
def test_triton_gpt_oss_bias_and_expert_parallel(case):
    fmt, D, F = case
    T, E, K = 6, 4, 2
    x, w13, w2, weights, ids, b13, b2 = _make_moe(fmt, T, D, F, E, K, torch.float32, bias=True, seed=1)
    act = dict(swiglu_limit=1.0, swiglu_alpha=1.702)  # small limit so clamps bite
    ids[0] = torch.tensor([0, 3])  # token 0 only uses experts foreign to the middle rank
    local = lambda p: {k: v[1:3] for k, v in p.items()}  # noqa: E731  (this rank holds experts 1, 2)
    y = fused_moe_quant_triton(x, local(w13), local(w2), fmt, weights, ids, b13_E2F=b13[1:3], b2_ED=b2[1:3],
                               expert_start=1, **act)
    mask = ((ids >= 1) & (ids < 3)).float()
    ref = _reference(fmt, x, w13, w2, weights * mask, ids, b13, b2, **act)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])
    assert torch.equal(y[0], torch.zeros(D))


@pytest.mark.parametrize("q8_kernels", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=_name)
def test_torch_path_matches_reference(case, dtype: torch.dtype, q8_kernels, monkeypatch):
    # int8/fp8 and int4/mxfp4 take the C kernels' layouts where they are built (up to 64 or 8 rows per
    # expert streamed, more dequantized once: 40 and 200 tokens give experts more), torch's ops otherwise
    import cpu_kernels

    if not q8_kernels:
        monkeypatch.setattr(cpu_kernels, "q8_available", lambda: False)
    fmt, D, F = case
    E = 5
    for T, K, prepared in ((11, 1, False), (11, 2, True), (40, 2, True), (200, 2, True)):
        x, w13, w2, weights, ids, _, _ = _make_moe(fmt, T, D, F, E, K, dtype, bias=False, seed=K)
        ref = _reference(fmt, x, w13, w2, weights, ids)
        if prepared:  # the compute layout built once, as an engine would
            w13, w2 = prepare_cpu(fmt, w13), prepare_cpu(fmt, w2)
        y = _torch_path(fmt, x, w13, w2, weights, ids, E)
        torch.testing.assert_close(y, ref, **TOL[dtype])


def test_torch_path_bias_clamp_and_layout_choice(monkeypatch):
    import cpu_kernels

    fmt, D, F = Mxfp4Weights(), 64, 96
    x, w13, w2, weights, ids, b13, b2 = _make_moe(fmt, 7, D, F, 4, 2, torch.float32, bias=True, seed=3)
    act = Activation(limit=1.0, alpha=1.702)
    y = _torch_path(fmt, x, w13, w2, weights, ids, 4, b13, b2, act)
    ref = _reference(fmt, x, w13, w2, weights, ids, b13, b2, swiglu_limit=1.0, swiglu_alpha=1.702)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])
    # Which compute layout each format gets; w2 of D=40 rows is no multiple of 16 -> tinygemm can't pack it.
    shapes = {"w13": (3, 144, 40), "w2": (3, 40, 72)}
    q8 = cpu_kernels.q8_available()  # int8 and fp8 take the C kernels' layout where the library builds
    expected = {
        Int8Weights(32): (Q8RowWeights, Q8RowWeights) if q8 else (Int8PackWeights, Int8PackWeights),
        Int4Weights(32): (Int4TinyGemmWeights, DequantWeights),
        Fp8BlockWeights(): (Q8RowWeights, Q8RowWeights) if q8 else (Fp8BitsWeights, Fp8BitsWeights),
    }
    for fmt, classes in expected.items():
        got = tuple(type(prepare_cpu(fmt, fmt.quantize(torch.randn(s)))) for s in shapes.values())
        assert got == classes, fmt.name
    for fmt in (Int4Weights(32), Mxfp4Weights()):  # 4-bit with K a multiple of 32
        assert type(prepare_cpu(fmt, fmt.quantize(torch.randn(2, 32, 64)))) is (Q4RowWeights if q8 else
                                                                                 Int4TinyGemmWeights), fmt.name
    monkeypatch.setattr(cpu_kernels, "q8_available", lambda: False)
    assert type(prepare_cpu(Int8Weights(32), Int8Weights(32).quantize(torch.randn(2, 64, 64)))) is Int8PackWeights
    assert type(prepare_cpu(Fp8BlockWeights(), Fp8BlockWeights().quantize(torch.randn(2, 64, 64)))) is Fp8BitsWeights
    assert isinstance(prepare_cpu(Mxfp4Weights(), Mxfp4Weights().quantize(torch.randn(2, 32, 64))),
                      Int4TinyGemmWeights)


@pytest.mark.parametrize("M", [1, 2, 3, 8, 9, 20, 64])
def test_packed_gemm_kernels_match_their_dequantized_weights(M):
    # the C kernels' row blocks (eight x rows at a time against each weight row, unrolled per count)
    # against x @ w.T with the weight they dequantize; int8 with offsets, fp8 blocks, int4 and mxfp4
    import cpu_kernels

    if not cpu_kernels.q8_available():
        pytest.skip("the C kernels are not built here (no compiler)")
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 256, generator=g)
    for fmt in (Int8Weights(64, symmetric=False), Fp8BlockWeights(), Int4Weights(32), Mxfp4Weights()):
        packed = fmt.quantize(torch.randn(1, 128, 256, generator=g))
        w = prepare_cpu(fmt, packed)
        assert isinstance(w, (Q8RowWeights, Q4RowWeights)), fmt.name
        if isinstance(w, Q8RowWeights):
            b = None if w.b_eBG is None else w.b_eBG[0]
            y = cpu_kernels.q8_gemm(x, w.q_eNK[0], w.code, w.s_eBG[0], b, w.gs, w.bn)
            dense = cpu_kernels.q8_dequant(w.q_eNK[0], w.code, w.s_eBG[0], b, w.gs, w.bn, torch.float32)
        else:
            b = None if w.b_eBG is None else w.b_eBG[0]
            y = cpu_kernels.q4_gemm(x, w.q_eNK2[0], w.lut, w.s_eBG[0], b, w.gs)
            dense = cpu_kernels.q4_dequant(w.q_eNK2[0], w.lut, w.s_eBG[0], b, w.gs, torch.float32)
        torch.testing.assert_close(dense, fmt.dequantize({k: v[0] for k, v in packed.items()}), msg=fmt.name)
        torch.testing.assert_close(y, x @ dense.T, atol=1e-4, rtol=1e-4, msg=fmt.name)


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9])
def test_q4x8_gemm_is_the_weight_times_x_rounded_to_8_bits(M):
    # int4 codes times x rounded to 8 bits per 32 columns (round_x8): integer products summed per
    # block, scaled once per block, against float64 products of the same rounded x and the weight the
    # format dequantizes; K with a last short step of each vector body (96, 160: 48 / 80 bytes a row),
    # groups of 32 / 64 / 128 with and without zero points, a block of zeros, one of a lone large value
    import cpu_kernels
    from cpu_kernels import round_x8

    if not cpu_kernels.q8_available():
        pytest.skip("the C kernels are not built here (no compiler)")
    g = torch.Generator().manual_seed(M)
    for K, gs, sym in ((96, 32, False), (160, 32, True), (256, 64, False), (384, 128, True), (1024, 128, False)):
        fmt = Int4Weights(gs, symmetric=sym, activations="int8")
        packed = fmt.quantize(torch.randn(1, 42, K, generator=g))  # 42 rows: decode takes them four at a time
        w = prepare_cpu(fmt, packed)
        assert isinstance(w, Q4RowWeights) and w.x8 and w.kernel[0] == cpu_kernels.Q_INT4_X8
        x = torch.randn(M, K, generator=g)
        x[0, 32:64] = 0
        x[-1, :32] = 0.01
        x[-1, 5] = 30.0
        xr = round_x8(x)
        a = x.unflatten(-1, (-1, 32)).abs().amax(-1, keepdim=True)
        # x * 127 / a rounded: half a step at most
        assert ((xr - x).unflatten(-1, (-1, 32)).abs() <= a / 127 * (0.5 + 1e-4)).all()
        assert torch.equal(round_x8(xr), xr)  # rounded x is its own rounding
        dense = fmt.dequantize({k: v[0] for k, v in packed.items()}).double()
        b = None if w.b_eBG is None else w.b_eBG[0]
        y = cpu_kernels.q4x8_gemm(x, w.q_eNK2[0], w.s_eBG[0], b, w.gs)
        ref = xr.double() @ dense.T
        torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5, msg=f"K={K} gs={gs}")
        # the experts' layout streams up to stream_rows rows through it, dequantizes for more
        if M <= w.stream_rows:
            torch.testing.assert_close(w.matmul(x, 0).double(), ref, atol=1e-4, rtol=1e-5)
        xl = torch.randn(w.stream_rows + 1, K, generator=g)
        torch.testing.assert_close(w.matmul(xl, 0).double(), xl.double() @ dense.T, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="groups of 32, 64 or 128"):
        cpu_kernels.q4x8_gemm(torch.randn(1, 64), torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 1), None, 256)
