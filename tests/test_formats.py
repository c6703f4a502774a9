import json

import pytest
import torch

from experts.formats import (FORMATS, FP4_VALUES, Fp8BlockWeights, Int4Weights, Int8Weights, Mxfp4Weights,
                             WeightFormat, expected_nbytes, format_from_config, get_format, pack_int4, unpack_int4)

INT_FORMATS = [cls(group_size=g, symmetric=sym, scale_dtype=sd)
               for cls in (Int8Weights, Int4Weights) for g in (32, 64, 128) for sym in (True, False)
               for sd in (torch.bfloat16, torch.float32) if not (g == 64 and sd == torch.float32)]
ALL_FORMATS = INT_FORMATS + [Int4Weights(32, symmetric=False, activations="int8"), Fp8BlockWeights(),
                             Fp8BlockWeights(32, 64), Mxfp4Weights()]


def _ids(fmt: WeightFormat) -> str:
    return "-".join([fmt.name, *map(str, fmt.options().values())])


def _bf16_scales(shape, g: torch.Generator) -> torch.Tensor:
    """Positive scales with at most 8 significant bits, so that ``q * s`` is exact in fp32."""
    return (torch.rand(shape, generator=g) * 0.1 + 1e-3).bfloat16().float()


def _grid_packed(fmt: WeightFormat, shape: tuple[int, ...], g: torch.Generator) -> dict[str, torch.Tensor]:
    """Packed tensors whose dequantization lies on the format's grid and spans each group's range,
    so that quantizing it again must reproduce them exactly."""
    *lead, N, K = shape
    if isinstance(fmt, (Int8Weights, Int4Weights)):
        G, gs = -(-K // fmt.group_size), fmt.group_size
        if fmt.symmetric:
            q = torch.randint(-fmt.qmax, fmt.qmax + 1, shape, generator=g)
            q[..., ::gs] = fmt.qmax * (1 - 2 * torch.randint(0, 2, q[..., ::gs].shape, generator=g))  # amax hits qmax
            z = None
        else:
            q = torch.randint(0, fmt.qmax + 1, shape, generator=g)
            q[..., ::gs], q[..., 1::gs] = 0, fmt.qmax  # each group spans [0, qmax]
            z = torch.randint(0, fmt.qmax + 1, (*lead, N, G), generator=g).to(torch.uint8)
        if isinstance(fmt, Int8Weights):
            qweight = q.to(torch.int8 if fmt.symmetric else torch.uint8)
        else:
            qweight = pack_int4(q + 8 if fmt.symmetric else q)
        packed = {"qweight": qweight, "scales": _bf16_scales((*lead, N, G), g).to(fmt.scale_dtype)}
        if z is not None:
            packed["zeros"] = z
        return packed
    if isinstance(fmt, Fp8BlockWeights):
        codes = torch.randint(0, 256, shape, generator=g, dtype=torch.int32)
        codes = torch.where((codes & 0x7F) == 0x7F, 0, codes).to(torch.uint8)  # no NaN codes
        codes[..., ::fmt.block_n, ::fmt.block_k] = 0x7E  # 448 in every block: amax = 448 * scale
        NB, KB = -(-N // fmt.block_n), -(-K // fmt.block_k)
        return {"weight": codes.view(torch.float8_e4m3fn), "weight_scale_inv": _bf16_scales((*lead, NB, KB), g)}
    if isinstance(fmt, Mxfp4Weights):
        codes = torch.randint(0, 16, (*lead, N, K // 32, 32), generator=g)
        codes[..., 0] = 7 + 8 * torch.randint(0, 2, codes[..., 0].shape, generator=g)  # +-6 in every block
        blocks = (codes[..., 0::2] | codes[..., 1::2] << 4).to(torch.uint8)
        scales = torch.randint(100, 150, (*lead, N, K // 32), generator=g).to(torch.uint8)
        return {"blocks": blocks, "scales": scales}
    raise AssertionError(fmt)


def _assert_packed_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype == torch.float8_e4m3fn:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y), f"{name} differs"


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=_ids)
def test_grid_round_trip_is_exact(fmt: WeightFormat):
    g = torch.Generator().manual_seed(0)
    shape = (3, 130, 320) if isinstance(fmt, Mxfp4Weights) else (3, 130, 290)  # ragged last group/block
    packed = _grid_packed(fmt, shape, g)
    assert fmt.from_tensors(packed, shape) is not None
    w = fmt.dequantize(packed)
    assert w.shape == shape and w.dtype == torch.float32
    _assert_packed_equal(fmt.quantize(w), packed)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=_ids)
def test_random_weights_error_bound(fmt: WeightFormat):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 200, 320, generator=g) * 0.02
    w[0, 3, :64] *= 50  # an outlier row: groups/blocks must keep it local
    packed = fmt.quantize(w)
    fmt.from_tensors(packed, tuple(w.shape))
    dq = fmt.dequantize(packed)
    err = (dq - w).abs()
    if isinstance(fmt, (Int8Weights, Int4Weights)):
        step = packed["scales"].float().repeat_interleave(fmt.group_size, -1)[..., :320]
        assert (err <= step * 0.5 * (1 + 1e-3) + 1e-7).all()  # round to nearest, nothing clipped
        rel = {8: 0.01, 4: 0.15}[fmt.bits]
    elif isinstance(fmt, Fp8BlockWeights):
        scale = packed["weight_scale_inv"].repeat_interleave(fmt.block_n, -2)[..., :200, :]
        scale = scale.repeat_interleave(fmt.block_k, -1)[..., :320]
        assert (err <= w.abs() * 2 ** -4 + scale * 2 ** -10).all()  # half an e4m3 ulp (3 mantissa bits)
        rel = 0.04
    else:
        e = packed["scales"].int() - 127
        two_e = torch.ldexp(torch.ones(e.shape), e).repeat_interleave(32, -1)
        assert (err <= torch.maximum(0.25 * two_e, 0.25 * w.abs()) + 1e-9).all()  # half the FP4 spacing
        rel = 0.15
    assert (dq - w).norm() / w.norm() < rel


def test_mxfp4_decodes_hand_computed_bytes():
    # One row, K=64: two 32-element blocks. Low nibble is the earlier element.
    blocks = torch.zeros(1, 2, 16, dtype=torch.uint8)
    blocks[0, 0, :3] = torch.tensor([0x2F, 0x91, 0x7C])  # codes (lo, hi): (15, 2), (1, 9), (12, 7)
    blocks[0, 1, 0] = 0x53  # codes (3, 5)
    scales = torch.tensor([[126, 129]], dtype=torch.uint8)  # 2^-1 and 2^2
    w = Mxfp4Weights().dequantize({"blocks": blocks, "scales": scales})
    assert w.shape == (1, 64)
    # code 15 = -6, 2 = 1, 1 = 0.5, 9 = -0.5, 12 = -2, 7 = 6; block 0 is scaled by 1/2
    assert w[0, :6].tolist() == [-3.0, 0.5, 0.25, -0.25, -1.0, 3.0]
    assert (w[0, 6:32] == 0).all()
    # code 3 = 1.5, 5 = 3; block 1 is scaled by 4
    assert w[0, 32:34].tolist() == [6.0, 12.0] and (w[0, 34:] == 0).all()
    assert FP4_VALUES == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def test_mxfp4_quantize_rounds_half_to_even_and_picks_unclipped_scale():
    w = torch.zeros(1, 32)
    w[0, :6] = torch.tensor([6.0, 0.25, 0.75, 2.5, 5.0, -1.25])  # amax 6 -> scale 2^0
    packed = Mxfp4Weights().quantize(w)
    assert packed["scales"].tolist() == [[127]]
    # 6 -> code 7; ties to the even code: 0.25 -> 0 (code 0), 0.75 -> 1 (code 2), 2.5 -> 2 (code 4),
    # 5 -> 4 (code 6), -1.25 -> -1 (code 8 | 2); byte j = code(2j) | code(2j + 1) << 4
    assert packed["blocks"][0, 0, :3].tolist() == [0x07, 0x42, 0xA6]
    w[0, 0] = 6.5  # amax/6 > 1: the next power of two, so nothing clips
    assert Mxfp4Weights().quantize(w)["scales"].tolist() == [[128]]


def test_int4_nibble_order():
    packed = {"qweight": torch.tensor([[0x3A]], dtype=torch.uint8), "scales": torch.tensor([[0.5]])}
    w = Int4Weights(group_size=32, scale_dtype=torch.float32).dequantize(packed)
    assert w.tolist() == [[1.0, -2.5]]  # low nibble 0xA = 10 -> (10 - 8) / 2, high 0x3 -> (3 - 8) / 2
    codes = torch.randint(0, 16, (3, 10))
    assert torch.equal(unpack_int4(pack_int4(codes)), codes.to(torch.uint8))


def test_fp8_partial_blocks_use_their_own_scale():
    fmt = Fp8BlockWeights()
    scale = torch.arange(1, 7, dtype=torch.float32).view(2, 3)
    packed = {"weight": torch.ones(200, 300).to(torch.float8_e4m3fn), "weight_scale_inv": scale}
    fmt.from_tensors(packed, (200, 300))
    w = fmt.dequantize(packed)
    assert w[0, 0] == 1 and w[127, 255] == 2 and w[150, 290] == 6 and w[199, 128] == 5


@pytest.mark.parametrize("fmt", [Int4Weights(128), Int4Weights(128, symmetric=False), Mxfp4Weights()], ids=_ids)
def test_4bit_formats_are_under_0p3_of_bf16(fmt: WeightFormat):
    w = torch.randn(2, 256, 1024)
    packed = fmt.quantize(w)
    bf16_bytes = w.numel() * 2
    assert fmt.nbytes(packed) <= 0.3 * bf16_bytes
    assert expected_nbytes(fmt, (2, 256, 1024)) == fmt.nbytes(packed)
    assert expected_nbytes(fmt, (64, 5632, 2048)) <= 0.3 * 64 * 5632 * 2048 * 2  # no allocation


_U8, _BF16 = torch.uint8, torch.bfloat16


@pytest.mark.parametrize(
    "fmt,shape,bad,match",
    [
        (Int8Weights(64), (4, 256), {"scales": torch.ones(4, 2, dtype=_BF16)},
         r"'scales' has shape \[4, 2\].*needs \[4, 4\]"),
        (Int8Weights(64), (4, 256), {"scales": torch.ones(4, 4)}, r"'scales' has dtype float32, expected bfloat16"),
        (Int4Weights(32, symmetric=False), (4, 256), {"zeros": torch.ones(4, 7, dtype=_U8)}, r"'zeros' has shape"),
        (Fp8BlockWeights(), (200, 300), {"weight_scale_inv": torch.ones(2, 2)},
         r"'weight_scale_inv' has shape \[2, 2\].*\[2, 3\]"),
        (Mxfp4Weights(), (8, 64), {"scales": torch.ones(8, 3, dtype=_U8)}, r"'scales' has shape \[8, 3\].*\[8, 2\]"),
    ],
)
def test_mismatched_scales_are_clear_errors(fmt: WeightFormat, shape, bad, match):
    packed = {**fmt.quantize(torch.randn(shape)), **bad}
    with pytest.raises(ValueError, match=match):
        fmt.from_tensors(packed, shape)


def test_missing_tensor_and_wrong_shape_errors():
    fmt = Int4Weights(32)
    packed = fmt.quantize(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"missing \['scales'\]"):
        fmt.from_tensors({"qweight": packed["qweight"]})
    with pytest.raises(ValueError, match=r"shape \[8, 64\], expected \[8, 128\]"):
        fmt.from_tensors(packed, (8, 128))
    with pytest.raises(ValueError, match="multiple of 32"):
        Mxfp4Weights().quantize(torch.randn(4, 48))


def test_registry_and_config_round_trip():
    assert set(FORMATS) == {"int8", "int4", "fp8_block", "mxfp4"}
    with pytest.raises(ValueError, match=r"unknown weight format 'nf4'; valid formats: fp8_block, int4, int8, mxfp4"):
        get_format("nf4")
    with pytest.raises(ValueError, match="group_size=48 is not supported"):
        get_format("int8", group_size=48)
    with pytest.raises(ValueError, match="bad options"):
        get_format("mxfp4", group_size=32)
    with pytest.raises(ValueError, match="activations='fp8' is not supported; choose float or int8"):
        get_format("int4", activations="fp8")
    with pytest.raises(ValueError, match="bad options"):  # int8 weights meet float activations only
        get_format("int8", activations="int8")
    # checkpoints written before the option read as float activations
    assert format_from_config({"format": "int4", "group_size": 32}).activations == "float"
    for fmt in ALL_FORMATS:
        config = json.loads(json.dumps(fmt.to_config()))
        assert format_from_config(config) == fmt and config["format"] == fmt.name
