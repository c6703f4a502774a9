import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import pytest
import torch

from experts.reference import moe_reference
from experts.triton_moe import fused_moe_triton, moe_align_block_size

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}


def _i32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def test_align_docstring_example():
    ids_TK = torch.tensor([[2, 0], [0, 2], [3, 2]])
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids_TK, 4, 4)
    assert torch.equal(sorted_ids, _i32([1, 2, 6, 6, 0, 3, 5, 6, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6]))
    assert torch.equal(expert_ids, _i32([0, 2, 3, -1, -1]))
    assert torch.equal(num_post, _i32([12]))
    # This rank owns global experts 2 and 3: they become local 0 and 1, expert 0's block is foreign.
    sorted_ep, expert_ids_ep, num_post_ep = moe_align_block_size(ids_TK, 4, 4, expert_start=2, num_local_experts=2)
    assert torch.equal(sorted_ep, sorted_ids) and torch.equal(num_post_ep, num_post)
    assert torch.equal(expert_ids_ep, _i32([-1, 0, 1, -1, -1]))


def test_align_single_token_and_full_block():
    # T=1, K=1 -> one assignment, padded to a whole block; empty experts 0 and 2 get no block.
    sorted_ids, expert_ids, num_post = moe_align_block_size(torch.tensor([[1]]), 4, 3)
    assert torch.equal(sorted_ids, _i32([0, 1, 1, 1, 1, 1, 1, 1, 1, 1]))  # 1 + 3*3 entries, sentinel 1
    assert torch.equal(expert_ids, _i32([1, -1, -1]))
    assert torch.equal(num_post, _i32([4]))
    # Exactly block_size assignments of one expert need no padding; the later expert starts a new block.
    ids_TK = torch.tensor([[0, 1], [0, 1], [0, 0]])  # n = 0..5 -> experts [0, 1, 0, 1, 0, 0]
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids_TK, 2, 2)
    assert torch.equal(sorted_ids, _i32([0, 2, 4, 5, 1, 3, 6, 6]))
    assert torch.equal(expert_ids, _i32([0, 0, 1, -1]))
    assert torch.equal(num_post, _i32([6]))


def _make_moe(T: int, D: int, F: int, E: int, K: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, D, generator=g)
    w13_E2FD = torch.randn(E, 2 * F, D, generator=g) * D ** -0.5
    w2_EDF = torch.randn(E, D, F, generator=g) * F ** -0.5
    logits_TE = torch.randn(T, E, generator=g)
    if E > K + 1:  # ragged routing with guaranteed-empty experts
        logits_TE[:, 1::3] = float("-inf")
    topk_weights_TK, topk_ids_TK = logits_TE.softmax(-1).topk(K, dim=-1)
    b13 = torch.randn(E, 2 * F, generator=g) * 0.1 if bias else None
    b2 = torch.randn(E, D, generator=g) * 0.1 if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x_TD), cast(w13_E2FD), cast(w2_EDF), cast(topk_weights_TK), topk_ids_TK, cast(b13), cast(b2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 40])
@pytest.mark.parametrize("E,K,gpt_oss", [(1, 1, False), (4, 2, False), (8, 4, False), (8, 2, True)])
def test_fused_moe_matches_reference(dtype: torch.dtype, T: int, E: int, K: int, gpt_oss: bool):
    D, F = 40, 72  # not multiples of the 32/64 tiles: masked tails and several K-loop steps
    x, w13, w2, weights, ids, b13, b2 = _make_moe(T, D, F, E, K, dtype, bias=gpt_oss)
    act = dict(swiglu_limit=1.0, swiglu_alpha=1.702) if gpt_oss else {}  # small limit so clamps bite
    if E > K + 1:
        assert ids.unique().numel() < E  # the empty-expert case is really exercised
    y = fused_moe_triton(x, w13, w2, weights, ids, b13_E2F=b13, b2_ED=b2, **act)
    ref = moe_reference(x, w13, w2, weights, ids, b13, b2, **act)
    assert y.dtype == dtype and y.shape == (T, D)
    torch.testing.assert_close(y, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_m", [16, 64])
def test_fused_moe_expert_parallel(dtype: torch.dtype, block_m: int):
    T, D, F, E, K = 12, 32, 48, 8, 2
    x, w13, w2, weights, ids, b13, b2 = _make_moe(T, D, F, E, K, dtype, bias=True, seed=1)
    ids[0] = torch.tensor([0, 7])  # token 0 only uses experts foreign to the middle rank
    x_strided = torch.cat([x, x], dim=1)[:, :D]  # non-contiguous rows: kernels must use strides
    act = dict(swiglu_limit=1.0, swiglu_alpha=1.702)
    ranks = [(0, 3), (3, 6), (6, 8)]  # [expert_start, end) held by each of three ranks
    total = torch.zeros(T, D, dtype=torch.float32)
    for start, end in ranks:
        y = fused_moe_triton(x_strided, w13[start:end], w2[start:end], weights, ids, b13_E2F=b13[start:end],
                             b2_ED=b2[start:end], expert_start=start, block_m=block_m, **act)
        local = (ids >= start) & (ids < end)
        ref = moe_reference(x, w13, w2, weights * local, ids, b13, b2, **act)  # foreign weights zeroed
        torch.testing.assert_close(y, ref, **TOL[dtype])
        if start == 3:
            assert torch.all(y[0] == 0)
        total += y.float()
    full = moe_reference(x, w13, w2, weights, ids, b13, b2, **act)
    torch.testing.assert_close(total.to(dtype), full, **TOL[dtype])


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_experts_triton_backend_matches_torch_backend(bias):
    """The engine's expert layer gives the same rows through the Triton kernel as through torch."""
    from experts import Activation, GroupedExperts
    from parallel import LocalDispatcher, init_single_process

    init_single_process()
    torch.manual_seed(3)
    E, D, F, T, K = 4, 32, 48, 9, 2
    act = Activation(limit=7.0, alpha=1.702) if bias else Activation()
    layers = {b: GroupedExperts(E, D, F, bias=bias, activation=act, backend=b) for b in ("torch", "triton")}
    for p_t, p_tr in zip(layers["torch"].parameters(), layers["triton"].parameters()):
        p_t.data.normal_(0, 0.2)
        p_tr.data.copy_(p_t.data)
    x = torch.randn(T, D)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    ids[:, 0] = ids[:, 0].clamp(max=E - 2)  # some expert may get no rows
    w = torch.rand(T, K)
    disp = LocalDispatcher(E)
    x_RD, counts, meta = disp.dispatch(x, ids, w)
    y = {b: disp.combine(layer(x_RD, counts), meta) for b, layer in layers.items()}
    torch.testing.assert_close(y["triton"], y["torch"], **TOL[torch.float32])
