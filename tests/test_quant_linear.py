"""ops.linear on a packed int4 / int8 weight (PackedLinearWeight): the C kernels against the torch
reference, and the reference against the format's own dequantization."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from experts.formats import get_format
from ops.linear import PackedLinearWeight, linear, packed_linear_reference

torch.set_num_threads(1)


def check_packed_linear(name: str, group_size: int, symmetric: bool, rows: int, dtype: torch.dtype,
                        seed: int) -> None:
    """``ops.linear`` on a packed weight against :func:`packed_linear_reference`, and the reference
    against a plain F.linear on the format's dequantized weight."""
    g = torch.Generator().manual_seed(seed)
    N, K = 96, 256
    w = torch.randn(N, K, generator=g) * 0.05
    b = torch.randn(N, generator=g).to(dtype)
    fmt = get_format(name, group_size=group_size, symmetric=symmetric, scale_dtype=torch.float32)
    packed = fmt.quantize(w)
    pw = PackedLinearWeight.from_packed(fmt, packed)
    assert pw.shape == (N, K) and pw.bits == (8 if name == "int8" else 4)
    if name == "int8":  # symmetric int8 codes carry no offset
        assert (pw.b_NG is None) == symmetric
    x = torch.randn(rows, K, generator=g).to(dtype)
    ref = packed_linear_reference(x, pw, b)
    # the reference is the format's dequantized weight in a plain F.linear (``code * s - zero * s``
    # against ``(code - zero) * s``: float32 rounding apart, one bf16 step at most)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(ref.float(), F.linear(x.float(), fmt.dequantize(packed), b.float()).to(dtype).float(),
                               **tol)
    got = linear(x, pw, b)
    assert got.shape == (rows, N) and got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol)


@pytest.mark.parametrize("group_size, symmetric", [(32, False), (64, True), (128, False)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_matches_reference(group_size, symmetric, rows, dtype):
    check_packed_linear("int4", group_size, symmetric, rows, dtype, seed=rows)


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_packed_linear_int8_activations(rows):
    # int4 with activations="int8": rows that stream the codes (up to STREAM_ROWS) meet them rounded
    # to 8 bits per 32 columns; more rows dequantize the weight and meet x as it is
    from cpu_kernels import round_x8

    g = torch.Generator().manual_seed(rows)
    N, K = 96, 256
    fmt = get_format("int4", group_size=64, symmetric=False, scale_dtype=torch.float32, activations="int8")
    pw = PackedLinearWeight.from_packed(fmt, fmt.quantize(torch.randn(N, K, generator=g) * 0.05))
    assert pw.x8 and pw.kernel_args()[-1] is True
    x = torch.randn(rows, K, generator=g)
    streamed = rows <= pw.STREAM_ROWS[4]
    want = packed_linear_reference(round_x8(x) if streamed else x, pw)
    torch.testing.assert_close(linear(x, pw), want, rtol=1e-5, atol=1e-5)
    if streamed:  # and it is not the float product
        assert not torch.allclose(linear(x, pw), packed_linear_reference(x, pw), rtol=1e-5, atol=1e-5)


def test_packed_linear_odd_width_uses_reference():
    """K not a multiple of 32: the kernels' 16-byte rows do not fit; the torch path answers."""
    fmt = get_format("int4", group_size=32)
    w = torch.randn(16, 48)
    pw = PackedLinearWeight.from_packed(fmt, fmt.quantize(w))
    x = torch.randn(2, 48)
    torch.testing.assert_close(linear(x, pw), x @ fmt.dequantize(fmt.quantize(w)).t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size, symmetric", [(32, False), (128, True)])
@pytest.mark.parametrize("rows", [1, 5, 12, 13, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_int8_linear_matches_reference(group_size, symmetric, rows, dtype):
    # int8 codes (asymmetric ones stored as code - 128 with their offset): q8_gemm up to 12 rows,
    # one dequantization beyond, against the format's own dequantized weight
    check_packed_linear("int8", group_size, symmetric, rows, dtype, seed=100 + rows)


def test_packed_lm_head_logits_are_float32():
    from ops import lm_head_logits

    fmt = get_format("int4", group_size=32, symmetric=False)
    w = torch.randn(300, 64) * 0.1
    pw = PackedLinearWeight.from_packed(fmt, fmt.quantize(w))
    for rows in (1, 4, 20):
        h = torch.randn(rows, 64).bfloat16()
        logits = lm_head_logits(h, pw)
        assert logits.dtype == torch.float32 and logits.shape == (rows, 300)
        torch.testing.assert_close(logits, h.float() @ fmt.dequantize(fmt.quantize(w)).t(), rtol=1e-4, atol=1e-4)
