"""Unit tests of parallel/ in one process: the local dispatcher, the CPU linear shortcuts and the
LM head."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallel import LocalDispatcher


def test_local_dispatcher_worked_example_from_its_docstring():
    x = torch.arange(3 * 2, dtype=torch.float32).view(3, 2)
    ids = torch.tensor([[2, 0], [1, 2], [0, 3]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])
    d = LocalDispatcher(4)
    x_RD, counts, meta = d.dispatch(x, ids, w)
    assert counts.tolist() == [2, 1, 2, 1]
    assert meta.token_R.tolist() == [0, 2, 1, 0, 1, 2]
    assert torch.equal(x_RD, x[[0, 2, 1, 0, 1, 2]])
    torch.testing.assert_close(meta.weights_R, torch.tensor([0.4, 0.9, 0.7, 0.6, 0.3, 0.1]))
    # identity experts: combine gives back each token weighted by the sum of its weights
    y = d.combine(x_RD, meta)
    torch.testing.assert_close(y, x * w.sum(1, keepdim=True))
    # expert e multiplies by (e + 1)
    scale_R = torch.repeat_interleave(torch.arange(1, 5, dtype=torch.float32), counts).unsqueeze(1)
    y = d.combine(x_RD * scale_R, meta)
    expect = torch.stack([x[t] * sum(w[t, k] * (ids[t, k] + 1) for k in range(2)) for t in range(3)])
    torch.testing.assert_close(y, expect)


def test_local_dispatcher_zero_tokens():
    d = LocalDispatcher(4)
    x_RD, counts, meta = d.dispatch(torch.zeros(0, 8), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert x_RD.shape == (0, 8) and counts.tolist() == [0, 0, 0, 0]
    assert d.combine(x_RD, meta).shape == (0, 8)


def test_local_dispatcher_one_expert():
    d = LocalDispatcher(1)
    x = torch.randn(5, 3)
    x_RD, counts, meta = d.dispatch(x, torch.zeros(5, 1, dtype=torch.long), torch.full((5, 1), 0.5))
    assert counts.tolist() == [5] and torch.equal(x_RD, x)
    torch.testing.assert_close(d.combine(x_RD, meta), 0.5 * x)


def test_local_dispatcher_keeps_dtype_and_accumulates_in_float32():
    d = LocalDispatcher(3)
    x = torch.randn(4, 16).to(torch.bfloat16)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]])
    w = torch.rand(4, 2)
    x_RD, counts, meta = d.dispatch(x, ids, w)
    y = d.combine(x_RD, meta)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float() * w.sum(1, keepdim=True), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("transposed", [False, True])  # a row-major input, or a transposed view (padded as such)
@pytest.mark.parametrize("m", [1, 5, 128, 129, 192, 250])
def test_linear_cpu_shortcuts_equal_f_linear(m, transposed):
    from ops import linear

    g = torch.Generator().manual_seed(m)
    x, w, b = torch.randn(m, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    if transposed:
        x = x.t().contiguous().t()
    y = linear(x, w, b)
    assert y.shape == (m, 24)
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("m", [1, 5, 9, 16, 64, 65, 200])
@pytest.mark.parametrize("vocab", [96, 100])
def test_lm_head_paths_equal_f_linear(m, vocab):
    from parallel import init_single_process
    from parallel.layers import ParallelLMHead

    init_single_process()
    head = ParallelLMHead(vocab, 24, dtype=torch.float32)
    g = torch.Generator().manual_seed(m)
    head.weight.data.copy_(torch.randn(vocab, 24, generator=g))
    h = torch.randn(m, 24, generator=g)
    out = head(h)
    assert out.shape == (m, vocab)
    torch.testing.assert_close(out.float(), F.linear(h, head.weight), atol=1e-5, rtol=1e-5)
