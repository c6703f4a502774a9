"""Unit tests of routing/: every routing scheme against hand-computed weights and ids."""
from __future__ import annotations

import math

import pytest
import torch

from routing import RouterConfig, route


def test_route_softmax_then_topk_with_renormalization():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 5.0, 4.0]])
    res = route(logits, RouterConfig(4, 2, renormalize=True))
    assert res.ids_TK.tolist() == [[2, 1], [2, 3]]
    e = math.e
    torch.testing.assert_close(res.weights_TK, torch.tensor([[e / (e + 1), 1 / (e + 1)]] * 2))
    assert res.weights_TK.dtype == torch.float32 and res.ids_TK.dtype == torch.int64


def test_route_softmax_without_renormalization_keeps_full_softmax_weights():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    res = route(logits, RouterConfig(4, 2, scaling_factor=2.0))
    full = torch.softmax(logits[0], -1)
    assert res.ids_TK.tolist() == [[2, 1]]
    torch.testing.assert_close(res.weights_TK, 2.0 * full[[2, 1]].unsqueeze(0))


def test_route_top1_softmax():
    logits = torch.tensor([[0.0, 1.0, -1.0]])
    res = route(logits, RouterConfig(3, 1))
    assert res.ids_TK.tolist() == [[1]]
    torch.testing.assert_close(res.weights_TK, torch.softmax(logits, -1)[:, 1:2])


def test_route_topk_before_softmax_softmaxes_only_the_selected_logits():
    logits = torch.tensor([[0.5, 4.0, -2.0, 3.0, 1.0]])
    res = route(logits, RouterConfig(5, 3, topk_before_softmax=True))
    assert res.ids_TK.tolist() == [[1, 3, 4]]
    torch.testing.assert_close(res.weights_TK, torch.softmax(torch.tensor([[4.0, 3.0, 1.0]]), -1))


def test_route_sigmoid_correction_bias_changes_selection_but_not_weights():
    # 8 experts in 4 groups of 2; noaux_tc: groups ranked by the sum of their two best biased scores
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.9, -1.0, -2.0, 0.0, -0.5]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0])
    cfg = RouterConfig(8, 2, scoring="sigmoid", renormalize=True, num_groups=4, topk_groups=2,
                       group_score="top2_sum", use_correction_bias=True, scaling_factor=2.5)
    res = route(logits, cfg, bias)
    s = torch.sigmoid(logits[0])
    # biased group sums: g0 = s0+s1, g1 = s2+s3, g2 = s4+s5+4 (best), g3 = s6+s7; g0 is second
    # within groups 2 and 0 the biased best two are experts 4 and 5 (both +2)
    assert sorted(res.ids_TK[0].tolist()) == [4, 5]
    w = s[[4, 5]] / s[[4, 5]].sum() * 2.5  # the unbiased scores, renormalized, scaled
    got = dict(zip(res.ids_TK[0].tolist(), res.weights_TK[0].tolist()))
    assert got[4] == pytest.approx(w[0].item(), rel=1e-5) and got[5] == pytest.approx(w[1].item(), rel=1e-5)
    # without the bias the selection is experts 0 and 1
    plain = route(logits, RouterConfig(8, 2, scoring="sigmoid", renormalize=True, num_groups=4, topk_groups=2))
    assert sorted(plain.ids_TK[0].tolist()) == [0, 1]


def test_route_correction_bias_required_when_configured():
    cfg = RouterConfig(4, 2, scoring="sigmoid", use_correction_bias=True)
    with pytest.raises(ValueError, match="correction bias"):
        route(torch.zeros(1, 4), cfg)


def test_route_group_limited_greedy_picks_from_the_best_groups_by_max():
    # groups [0,1] [2,3] [4,5] [6,7]; group maxima 5, 1, 4, 3.8 -> groups 0 and 2 by max, but groups
    # 0 and 3 by the sum of their two best softmax scores (e^3.8 + e^3.7 = 85 > e^4 + e^-5 = 55)
    logits = torch.tensor([[5.0, 4.9, 1.0, 0.0, 4.0, -5.0, 3.8, 3.7]])
    greedy = route(logits, RouterConfig(8, 3, num_groups=4, topk_groups=2, group_score="max"))
    assert greedy.ids_TK[0].tolist() == [0, 1, 4]
    full = torch.softmax(logits[0], -1)
    torch.testing.assert_close(greedy.weights_TK[0], full[[0, 1, 4]])  # no renormalization
    top2 = route(logits, RouterConfig(8, 3, num_groups=4, topk_groups=2, group_score="top2_sum"))
    assert top2.ids_TK[0].tolist() == [0, 1, 6]
    ungrouped = route(logits, RouterConfig(8, 3))
    assert ungrouped.ids_TK[0].tolist() == [0, 1, 4]
    ungrouped4 = route(logits, RouterConfig(8, 4))
    grouped4 = route(logits, RouterConfig(8, 4, num_groups=4, topk_groups=2, group_score="max"))
    assert ungrouped4.ids_TK[0].tolist() == [0, 1, 4, 6] and grouped4.ids_TK[0].tolist() == [0, 1, 4, 5]


def test_router_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="top_k"):
        RouterConfig(4, 5)
    with pytest.raises(ValueError, match="n_group"):
        RouterConfig(6, 2, num_groups=4)
    with pytest.raises(ValueError, match="topk_group"):
        RouterConfig(8, 2, num_groups=4, topk_groups=5)
