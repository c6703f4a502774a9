"""Unit tests of moe/sampler.py against hand-computed expectations: greedy, filters, seeded draws."""
from __future__ import annotations

import pytest
import torch

from moe.sampler import Sampler
from ops import top_logprobs
from moe.sampling_params import SamplingParams
from ops.sample import apply_filters, seed_key


def _sample(logits, params, keys=None, banned=None, seed=0):
    B = logits.shape[0]
    return Sampler(seed)(logits.clone(), params, keys or [None] * B, [0] * B, banned or [[] for _ in range(B)])


def test_greedy_is_argmax_and_logprobs_are_the_raw_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    res = _sample(logits, [SamplingParams(temperature=0, logprobs=3)] * 6)
    assert res.token_ids == logits.argmax(-1).tolist()
    lp = torch.log_softmax(logits, -1)
    for i, d in enumerate(res.logprobs):
        top = lp[i].topk(3).indices.tolist()
        assert set(d) == set(top) | {res.token_ids[i]}
        for t, v in d.items():
            assert v == pytest.approx(lp[i, t].item(), abs=1e-6)


def test_logprobs_ignore_temperature_and_include_the_chosen_token():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    p = SamplingParams(temperature=2.0, logprobs=1, seed=3)
    res = _sample(logits, [p], keys=[seed_key(3)])
    lp = torch.log_softmax(logits[0], -1)
    d = res.logprobs[0]
    assert res.token_ids[0] in d and 0 in d and len(d) <= 2
    for t, v in d.items():
        assert v == pytest.approx(lp[t].item(), abs=1e-6)
    assert top_logprobs(logits, [5], [0]) == [{5: pytest.approx(lp[5].item(), abs=1e-6)}]


def test_banned_tokens_are_never_drawn():
    logits = torch.tensor([[10.0, 0.0, 0.0], [10.0, 9.0, 0.0]])
    res = _sample(logits, [SamplingParams(temperature=0), SamplingParams(temperature=1.0)], banned=[[0], [0, 1]])
    assert res.token_ids == [1, 2]


_P = [0.5, 0.2, 0.15, 0.1, 0.05]


def _kept(top_k=0, top_p=1.0, min_p=0.0, probs=_P) -> list[int]:
    logits = torch.tensor([probs]).log()
    out = apply_filters(logits, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))
    return torch.isfinite(out[0]).nonzero().flatten().tolist()


@pytest.mark.parametrize("kw, kept", [
    (dict(), [0, 1, 2, 3, 4]),
    (dict(top_k=1), [0]),
    (dict(top_k=2), [0, 1]),
    (dict(top_k=5), [0, 1, 2, 3, 4]),
    (dict(top_p=0.3), [0]),  # the first token always stays
    (dict(top_p=0.55), [0, 1]),  # 0.5 before token 1 < 0.55: kept; 0.7 before token 2: dropped
    (dict(top_p=0.75), [0, 1, 2]),
    (dict(top_p=0.9), [0, 1, 2, 3]),
    (dict(min_p=0.35), [0, 1]),  # threshold 0.175
    (dict(min_p=0.25), [0, 1, 2]),  # threshold 0.125
    (dict(min_p=1.0), [0]),
    # top-p over the top-k renormalized mass: [.5, .2, .15] / .85 -> mass before token 2 = .82 >= .8
    (dict(top_k=3, top_p=0.8), [0, 1]),
    (dict(top_k=4, min_p=0.25), [0, 1, 2]),
])
def test_apply_filters_hand_computed_masks(kw, kept):
    assert _kept(**kw) == kept


def test_apply_filters_works_on_unsorted_rows_independently():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [2.0, 1.0, 3.0, 0.0]])
    out = apply_filters(logits, torch.tensor([2, 0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
    assert torch.isfinite(out[0]).tolist() == [False, True, False, True]
    assert torch.isfinite(out[1]).tolist() == [True, True, True, True]
    # kept logits are unchanged
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])


def test_apply_filters_top_p_one_is_off_even_for_a_peaked_distribution():
    """``top_p`` 1 means no top-p filtering: every finite logit stays, however small its mass
    (a sampling row with top_p=1 must not depend on whether its batch neighbours filter)."""
    logits = torch.tensor([[0.0, -30.0, -31.0, -32.0, -40.0]])
    out = apply_filters(logits, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert torch.isfinite(out).all()


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, seed=7)

    def draws(seed: int) -> list[int]:
        s = Sampler(0)
        return [s(logits.clone(), [p], [seed_key(seed)], [pos], [[]]).token_ids[0] for pos in range(40)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert len(set(draws(7))) > 5  # each position its own draw
    # unseeded rows take keys from the engine-wide generator: seeded by Sampler(seed)
    a = [Sampler(5)(logits.repeat(8, 1), [SamplingParams()] * 8, [None] * 8, [0] * 8, [[]] * 8).token_ids
         for _ in range(2)]
    assert a[0] == a[1] and len(set(a[0])) > 1


def test_seeded_row_does_not_depend_on_its_batch_neighbours():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(temperature=0.8, seed=11)
    alone = Sampler(0)(logits[:1].clone(), [p], [seed_key(11)], [9], [[]]).token_ids[0]
    for _ in range(3):
        others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=5, top_p=0.9)]
        res = Sampler(123)(logits.clone(), [p] + others, [seed_key(11), None, None], [9, 3, 4], [[]] * 3)
        assert res.token_ids[0] == alone


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_temperature_sampling_frequencies_follow_the_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    N = 20000
    res = Sampler(1234)(logits.repeat(N, 1), [SamplingParams(temperature=temperature)] * N, [None] * N, [0] * N,
                        [[]] * N)
    freq = torch.bincount(torch.tensor(res.token_ids), minlength=5).float() / N
    expect = torch.softmax(logits / temperature, -1)
    # 5 sigma of a binomial proportion at N=20000 is < 0.018
    assert torch.allclose(freq, expect, atol=0.018), (freq, expect)


def test_top_k_sampling_draws_only_from_the_top_k():
    logits = torch.tensor([3.0, 2.9, 2.8, 2.7, 2.6, 2.5])
    N = 3000
    res = Sampler(9)(logits.repeat(N, 1), [SamplingParams(temperature=1.0, top_k=3)] * N, [None] * N, [0] * N,
                     [[]] * N)
    counts = torch.bincount(torch.tensor(res.token_ids), minlength=6)
    assert counts[3:].sum() == 0 and (counts[:3] > 700).all()
