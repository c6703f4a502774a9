"""Unit tests of experts/: grouped experts against the einsum reference, the weight loader and the
one-token path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from experts import Activation, GroupedExperts, grouped_swiglu_torch, moe_reference
from parallel import LocalDispatcher


def _moe_inputs(T, E, K, D, F, dtype, seed=0, ids=None, bias=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, D, generator=g) * scale).to(dtype)
    w13 = (torch.randn(E, 2 * F, D, generator=g) / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, D, F, generator=g) / F ** 0.5).to(dtype)
    if ids is None:
        ids = (torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T
               else torch.zeros(0, K, dtype=torch.long))
    w = torch.softmax(torch.randn(T, K, generator=g), -1)
    b13 = (torch.randn(E, 2 * F, generator=g)).to(dtype) if bias else None
    b2 = (torch.randn(E, D, generator=g) * 0.1).to(dtype) if bias else None
    return x, w13, w2, ids, w, b13, b2


def _grouped_moe(x, w13, w2, ids, w, b13=None, b2=None, act=Activation()):
    E = w13.shape[0]
    mod = GroupedExperts(E, x.shape[1], w2.shape[2], bias=b13 is not None, activation=act, dtype=x.dtype,
                         backend="torch")
    mod.w13.data.copy_(w13)
    mod.w2.data.copy_(w2)
    if b13 is not None:
        mod.b13.data.copy_(b13)
        mod.b2.data.copy_(b2)
    d = LocalDispatcher(E)
    x_RD, counts, meta = d.dispatch(x, ids, w)
    return d.combine(mod(x_RD, counts), meta), counts


_MOE_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_grouped_experts_match_reference(top_k, dtype):
    x, w13, w2, ids, w, _, _ = _moe_inputs(37, 6, top_k, 32, 24, dtype, seed=top_k)
    got, counts = _grouped_moe(x, w13, w2, ids, w)
    ref = moe_reference(x, w13, w2, w, ids)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), ref.float(), **_MOE_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_ragged_with_empty_experts(dtype):
    # experts 0, 3 and 5 get nothing; expert 2 gets most tokens
    ids = torch.tensor([[2, 1], [2, 4], [1, 2], [4, 2], [2, 1], [6, 2], [2, 6]])
    x, w13, w2, _, w, _, _ = _moe_inputs(7, 7, 2, 16, 8, dtype, seed=5)
    got, counts = _grouped_moe(x, w13, w2, ids, w)
    assert counts.tolist() == [0, 3, 7, 0, 2, 0, 2]
    torch.testing.assert_close(got.float(), moe_reference(x, w13, w2, w, ids).float(), **_MOE_TOL[dtype])


def test_grouped_experts_single_expert():
    x, w13, w2, ids, w, _, _ = _moe_inputs(9, 1, 1, 16, 8, torch.float32)
    assert ids.unique().tolist() == [0]
    got, _ = _grouped_moe(x, w13, w2, ids, w)
    torch.testing.assert_close(got, moe_reference(x, w13, w2, w, ids), atol=1e-5, rtol=1e-5)


def test_grouped_experts_zero_tokens():
    x, w13, w2, ids, w, _, _ = _moe_inputs(0, 4, 2, 16, 8, torch.float32)
    got, counts = _grouped_moe(x, w13, w2, ids, w)
    assert got.shape == (0, 16) and counts.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_gpt_oss_clamped_swiglu_with_biases(dtype):
    limit, alpha = 7.0, 1.702
    x, w13, w2, ids, w, b13, b2 = _moe_inputs(21, 4, 2, 32, 16, dtype, seed=3, bias=True, scale=6.0)
    # the clamp must actually bite, or this would test plain SwiGLU
    h = torch.einsum("td,efd->tef", x.float(), w13.float()) + b13.float()
    assert (h[..., :16] > limit).any() and (h[..., 16:].abs() > limit).any()
    act = Activation(limit=limit, alpha=alpha)
    got, _ = _grouped_moe(x, w13, w2, ids, w, b13, b2, act)
    ref = moe_reference(x, w13, w2, w, ids, b13, b2, swiglu_limit=limit, swiglu_alpha=alpha)
    tol = _MOE_TOL[dtype] if dtype == torch.float32 else dict(atol=1e-1, rtol=3e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol)
    # the same rows straight through grouped_swiglu_torch
    d = LocalDispatcher(4)
    x_RD, counts, meta = d.dispatch(x, ids, w)
    y = grouped_swiglu_torch(x_RD, counts.tolist(), w13, w2, b13, b2, act)
    torch.testing.assert_close(d.combine(y, meta).float(), ref.float(), **tol)


@pytest.mark.parametrize("counts", [
    [130, 0, 200, 64, 129, 3, 150],  # > 128 rows: padded to multiples of 64 (else 8), the last past the end
    [3, 0, 5, 5, 0, 0, 1, 7],  # decode-sized: batched runs [0], [2, 3], [6, 7] around empty experts
    [2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 0, 1],  # a run of 14: pieces of 8, 4 and 2
    [0, 0, 4],  # one lone expert at the end
    [40, 70, 2],  # one group above BATCHED_MAX_ROWS: per-expert GEMMs
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_row_group_paths(dtype, counts):
    # every CPU path of grouped_swiglu_torch against per-expert float32 math, biases included
    from experts.grouped import grouped_swiglu_torch
    from ops import padded_rows

    if counts[0] == 130:
        assert [padded_rows(n) for n in counts] == [192, 0, 256, 64, 192, 8, 192]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 32, generator=g).to(dtype)
    w13 = (torch.randn(len(counts), 48, 32, generator=g) / 6).to(dtype)
    w2 = (torch.randn(len(counts), 32, 24, generator=g) / 5).to(dtype)
    b13, b2 = torch.randn(len(counts), 48, generator=g).to(dtype), torch.randn(len(counts), 32, generator=g).to(dtype)
    y = grouped_swiglu_torch(x, counts, w13, w2, b13, b2, Activation())
    ends = torch.tensor(counts).cumsum(0).tolist()
    for e, (n, end) in enumerate(zip(counts, ends)):
        xe = x[end - n:end].float()
        he = xe @ w13[e].float().T + b13[e].float()
        ref = (F.silu(he[:, :24]) * he[:, 24:]) @ w2[e].float().T + b2[e].float()
        torch.testing.assert_close(y[end - n:end].float(), ref, **_MOE_TOL[dtype])


def test_grouped_experts_weight_loader_places_gate_up_down():
    mod = GroupedExperts(3, 4, 2, dtype=torch.float32)
    gate, up, down = torch.randn(2, 4), torch.randn(2, 4), torch.randn(4, 2)
    mod.weight_loader(mod.w13, gate, "gate", 1)
    mod.weight_loader(mod.w13, up, "up", 1)
    mod.weight_loader(mod.w2, down, "down", 1)
    assert torch.equal(mod.w13[1, :2], gate) and torch.equal(mod.w13[1, 2:], up) and torch.equal(mod.w2[1], down)
    with pytest.raises(ValueError, match="expert 1"):
        mod.weight_loader(mod.w2, torch.randn(4, 3), "down", 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_single_token_expert_path_equals_dispatch_and_combine(dtype, bias):
    """Decode at batch 1 skips the permutation: bit-identical to dispatch -> experts -> combine."""
    from experts import GroupedExperts
    from parallel.dispatch import LocalDispatcher

    g = torch.Generator().manual_seed(3)
    E, D, F_ = 6, 32, 48
    experts = GroupedExperts(E, D, F_, bias=bias, dtype=dtype)
    for p in experts.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g).to(dtype) * 0.2)
    x = torch.randn(1, D, generator=g).to(dtype)
    for ids in ([4, 1], [0, 5, 2]):  # unsorted top-k, as routers return them
        ids_TK = torch.tensor([ids])
        weights_TK = torch.softmax(torch.randn(1, len(ids), generator=g), -1)
        disp = LocalDispatcher(E)
        x_RD, counts, meta = disp.dispatch(x, ids_TK, weights_TK)
        want = disp.combine(experts(x_RD, counts), meta)
        got = experts.forward_token(x, ids_TK[0], weights_TK[0])
        assert got.dtype == dtype and torch.equal(got, want)
