"""Unit tests of the engine's parts, each against hand-computed expectations or a plain reference:
block manager, scheduler, sampler, routing, local dispatcher, grouped experts, paged attention,
YaRN rope and the safetensors loader."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import cpu_kernels
from experts import Activation, GroupedExperts, grouped_swiglu_torch, moe_reference
from kvcache import (AttentionMetadata, BlockManager, BlockTable, paged_attention_reference,
                     paged_attention_torch, write_kv)
from moe.outputs import RequestMetrics
from moe.sampler import Sampler, apply_filters, top_logprobs
from moe.sampling_params import SamplingParams
from moe.scheduler import Scheduler
from moe.sequence import Sequence, Status
from parallel import LocalDispatcher
from routing import RouterConfig, route


# =====================================================================================
# BlockManager
# =====================================================================================


def _toks(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def test_block_manager_allocate_and_free_return_every_block():
    bm = BlockManager(8, 4)
    t = BlockTable()
    assert bm.can_allocate(t, 10)
    bm.allocate(t, 10)
    assert len(t.blocks) == 3 and len(set(t.blocks)) == 3
    assert bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in t.blocks)
    # growing within the last block needs nothing; crossing into a new block takes exactly one
    bm.allocate(t, 12)
    assert len(t.blocks) == 3 and bm.num_free_blocks == 5
    bm.allocate(t, 13)
    assert len(t.blocks) == 4 and bm.num_free_blocks == 4
    bm.free_table(t)
    assert t.blocks == [] and bm.num_free_blocks == 8
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert all(r == -1 for r in bm.reserved_by)


def test_block_manager_can_allocate_counts_blocks_not_tokens():
    bm = BlockManager(4, 4)
    a = BlockTable()
    assert bm.can_allocate(a, 16) and not bm.can_allocate(a, 17)
    bm.allocate(a, 9)  # 3 blocks
    b = BlockTable()
    assert bm.can_allocate(b, 4) and not bm.can_allocate(b, 5)
    assert bm.can_allocate(a, 12) and not bm.can_allocate(a, 17) and bm.can_allocate(a, 16)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(b, 8)


def test_block_manager_two_tables_never_share_unhashed_blocks():
    bm = BlockManager(12, 4)
    tables = [BlockTable() for _ in range(3)]
    for i, t in enumerate(tables):
        bm.allocate(t, 6 + i, expected_tokens=20)
    for t in tables:  # grow interleaved, past their reservations
        bm.allocate(t, 16)
    used = [b for t in tables for b in t.blocks]
    assert len(used) == 12 and len(set(used)) == 12
    assert bm.num_free_blocks == 0


def test_prefix_cache_hits_full_blocks_only_and_counts_references():
    bm = BlockManager(16, 4)
    toks = _toks(10)
    a = BlockTable()
    bm.allocate(a, 10)
    bm.register_full_blocks(a, toks, 10)
    assert a.num_hashed == 2  # the third block holds 2 tokens: never hashed
    assert bm.blocks[a.blocks[2]].hash is None

    b = BlockTable()
    assert bm.match_prefix(b, toks + [7, 8], 11) == 8
    assert b.blocks == a.blocks[:2]
    assert [bm.blocks[x].ref_count for x in a.blocks] == [2, 2, 1]

    # at most max_tokens tokens, whole blocks only
    c = BlockTable()
    assert bm.match_prefix(c, toks, 7) == 4 and c.blocks == a.blocks[:1]
    assert bm.blocks[a.blocks[0]].ref_count == 3

    # a different first block misses everything (hashes chain over all earlier tokens)
    d = BlockTable()
    assert bm.match_prefix(d, [999] + toks[1:], 10) == 0 and d.blocks == []
    # same second block after a different first one: still a miss
    e = BlockTable()
    assert bm.match_prefix(e, [999, 998, 997, 996] + toks[4:], 10) == 0

    bm.free_table(b)
    bm.free_table(c)
    assert [bm.blocks[x].ref_count for x in a.blocks] == [1, 1, 1]
    bm.free_table(a)
    assert bm.num_free_blocks == 16


def test_prefix_cache_disabled_never_matches():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a = BlockTable()
    bm.allocate(a, 8)
    bm.register_full_blocks(a, _toks(8), 8)
    bm.free_table(a)
    assert bm.match_prefix(BlockTable(), _toks(8), 8) == 0


def test_freed_cached_blocks_are_hit_until_evicted():
    bm = BlockManager(4, 4)
    toks = _toks(8)
    a = BlockTable()
    bm.allocate(a, 8)
    bm.register_full_blocks(a, toks, 8)
    bm.free_table(a)
    assert bm.num_free_blocks == 4
    # still cached after its owner finished: a hit takes the block back out of the free list
    b = BlockTable()
    assert bm.match_prefix(b, toks, 8) == 8
    assert bm.num_free_blocks == 2 and all(bm.blocks[x].ref_count == 1 for x in b.blocks)
    bm.free_table(b)
    # a request that needs every block evicts the cached ones: no stale hit afterwards
    c = BlockTable()
    bm.allocate(c, 16)
    assert bm.num_free_blocks == 0
    bm.free_table(c)
    assert bm.match_prefix(BlockTable(), toks, 8) == 0
    assert not bm.hash_to_block


def test_cached_prefix_survives_an_unrelated_allocation_when_free_blocks_abound():
    """Eviction is meant to be LRU over freed blocks ("oldest freed first"): a finished request's
    cached prefix must not be the first thing handed out while never-used blocks are free."""
    bm = BlockManager(16, 4)
    toks = _toks(8)
    a = BlockTable()
    bm.allocate(a, 8, expected_tokens=8)
    bm.register_full_blocks(a, toks, 8)
    bm.free_table(a)
    other = BlockTable()
    bm.allocate(other, 8, expected_tokens=8)  # 14 never-used blocks are free
    assert bm.match_prefix(BlockTable(), toks, 8) == 8


# =====================================================================================
# Scheduler
# =====================================================================================


def _seq(rid: str, n_prompt: int, start: int = 10, **params) -> Sequence:
    p = SamplingParams(temperature=0, max_tokens=params.pop("max_tokens", 8), **params)
    s = Sequence(rid, None, list(range(start, start + n_prompt)), p, RequestMetrics(0.0))
    s.expected_len = n_prompt + p.max_tokens
    return s


def _advance(sched: Scheduler, batch, token: int = 5) -> None:
    """What the engine does after running a step: count computed tokens, hash full blocks,
    append the sampled token of every sequence whose chunk reached its end."""
    for s in batch.seqs:
        seq = s.seq
        samples = s.samples
        seq.num_computed_tokens += s.num_new_tokens
        sched.bm.register_full_blocks(seq.block_table, seq.token_ids, seq.num_computed_tokens)
        if samples:
            seq.token_ids.append(token)


def test_scheduler_respects_token_budget_and_chunks_the_prompt_in_order():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b, c = _seq("a", 6, 10), _seq("b", 6, 30), _seq("c", 6, 50)
    for s in (a, b, c):
        sched.add(s)
    b1 = sched.schedule()
    assert [(s.seq.request_id, s.start, s.num_new_tokens) for s in b1.seqs] == [("a", 0, 6), ("b", 0, 4)]
    assert b1.num_tokens == 10
    assert [s.samples for s in b1.seqs] == [True, False]
    assert list(sched.waiting) == [c]
    _advance(sched, b1)
    # running first: a decodes one token, b finishes its prompt, then c is admitted with what is left
    b2 = sched.schedule()
    assert [(s.seq.request_id, s.start, s.num_new_tokens) for s in b2.seqs] == [("a", 6, 1), ("b", 4, 2), ("c", 0, 6)]
    assert [s.samples for s in b2.seqs] == [True, True, True]
    assert b2.num_tokens == 9


def test_scheduler_running_sequences_go_before_waiting_ones():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=4)
    a = _seq("a", 3)
    sched.add(a)
    _advance(sched, sched.schedule())
    late = _seq("late", 3, 40)
    sched.add(late)
    batch = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in batch.seqs] == [("a", 1), ("late", 3)]
    _advance(sched, batch)
    # with the budget used up by running decodes nothing new is admitted
    sched.max_num_batched_tokens = 2
    sched.add(_seq("third", 3, 70))
    batch = sched.schedule()
    assert [s.seq.request_id for s in batch.seqs] == ["a", "late"]
    assert [s.request_id for s in sched.waiting] == ["third"]


def test_scheduler_caps_running_sequences_at_max_num_seqs():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [_seq(str(i), 3, 10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    b = sched.schedule()
    assert [s.seq.request_id for s in b.seqs] == ["0", "1"]
    _advance(sched, b)
    assert [s.seq.request_id for s in sched.schedule().seqs] == ["0", "1"]
    sched.finish(seqs[0])
    assert seqs[0].status is Status.FINISHED
    b = sched.schedule()
    assert [s.seq.request_id for s in b.seqs] == ["1", "2"]


def test_scheduler_preempts_the_newest_running_sequence_when_blocks_run_out():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = _seq("a", 7, 10), _seq("b", 7, 30)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()
    assert [s.seq.request_id for s in first.seqs] == ["a", "b"] and bm.num_free_blocks == 0
    _advance(sched, first)  # 8 tokens each: the next token of each still fits in 2 blocks
    second = sched.schedule()
    assert second.num_preempted == 0 and [s.num_new_tokens for s in second.seqs] == [1, 1]
    _advance(sched, second)  # 9 tokens each: a third block is needed
    third = sched.schedule()
    assert third.num_preempted == 1
    assert [s.seq.request_id for s in third.seqs] == ["a"]
    assert b.status is Status.WAITING and b.num_preemptions == 1 and b.num_computed_tokens == 0
    assert b.block_table.blocks == [] and sched.waiting[0] is b and sched.running == [a]
    assert len(b.token_ids) == 9  # its tokens are kept for recomputation
    assert len(a.block_table.blocks) == 3
    # once a finishes, b is recomputed from scratch: its whole sequence in one chunk
    _advance(sched, third)
    sched.finish(a)
    again = sched.schedule()
    assert [s.seq.request_id for s in again.seqs] == ["b"]
    s0 = again.seqs[0]
    assert s0.start + s0.num_new_tokens == 9 and s0.samples


def test_scheduler_admission_reuses_cached_prefix_but_computes_at_least_one_token():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a = _seq("a", 8, 10)
    sched.add(a)
    _advance(sched, sched.schedule())
    sched.finish(a)
    same = _seq("same", 8, 10)  # identical prompt: all but the last block can be reused
    sched.add(same)
    b = sched.schedule()
    assert [(s.start, s.num_new_tokens) for s in b.seqs] == [(4, 4)]
    _advance(sched, b)
    longer = _seq("longer", 11, 10)
    sched.add(longer)
    b = sched.schedule()
    got = {s.seq.request_id: (s.start, s.num_new_tokens) for s in b.seqs}
    assert got["longer"] == (8, 3)
    # a request that wants prompt log-probs computes its whole prompt
    lp = _seq("lp", 11, 10, prompt_logprobs=1)
    sched.add(lp)
    got = {s.seq.request_id: (s.start, s.num_new_tokens) for s in sched.schedule().seqs}
    assert got["lp"] == (0, 11)


# =====================================================================================
# Sampler
# =====================================================================================


def _sample(logits, params, gens=None, banned=None, seed=0):
    B = logits.shape[0]
    return Sampler(seed)(logits.clone(), params, gens or [None] * B, banned or [[] for _ in range(B)])


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
    res = _sample(logits, [p], gens=[torch.Generator().manual_seed(3)])
    lp = torch.log_softmax(logits[0], -1)
    d = res.logprobs[0]
    assert res.token_ids[0] in d and 0 in d and len(d) <= 2
    for t, v in d.items():
        assert v == pytest.approx(lp[t].item(), abs=1e-6)
    assert top_logprobs(lp, 5, 0) == {5: pytest.approx(lp[5].item())}


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
        gen = torch.Generator().manual_seed(seed)
        s = Sampler(0)
        return [s(logits.clone(), [p], [gen], [[]]).token_ids[0] for _ in range(40)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    # the engine-wide generator is used for unseeded rows: seeded by Sampler(seed)
    a = [Sampler(5)(logits.repeat(8, 1), [SamplingParams()] * 8, [None] * 8, [[]] * 8).token_ids for _ in range(2)]
    assert a[0] == a[1]


def test_seeded_row_does_not_depend_on_its_batch_neighbours():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(temperature=0.8, seed=11)
    alone = Sampler(0)(logits[:1].clone(), [p], [torch.Generator().manual_seed(11)], [[]]).token_ids[0]
    for _ in range(3):
        others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=5, top_p=0.9)]
        res = Sampler(123)(logits.clone(), [p] + others, [torch.Generator().manual_seed(11), None, None], [[]] * 3)
        assert res.token_ids[0] == alone


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_temperature_sampling_frequencies_follow_the_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    N = 20000
    res = Sampler(1234)(logits.repeat(N, 1), [SamplingParams(temperature=temperature)] * N, [None] * N, [[]] * N)
    freq = torch.bincount(torch.tensor(res.token_ids), minlength=5).float() / N
    expect = torch.softmax(logits / temperature, -1)
    # 5 sigma of a binomial proportion at N=20000 is < 0.018
    assert torch.allclose(freq, expect, atol=0.018), (freq, expect)


def test_top_k_sampling_draws_only_from_the_top_k():
    logits = torch.tensor([3.0, 2.9, 2.8, 2.7, 2.6, 2.5])
    N = 3000
    res = Sampler(9)(logits.repeat(N, 1), [SamplingParams(temperature=1.0, top_k=3)] * N, [None] * N, [[]] * N)
    counts = torch.bincount(torch.tensor(res.token_ids), minlength=6)
    assert counts[3:].sum() == 0 and (counts[:3] > 700).all()


# =====================================================================================
# Routing
# =====================================================================================


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


# =====================================================================================
# LocalDispatcher
# =====================================================================================


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


# =====================================================================================
# Grouped experts vs the einsum reference
# =====================================================================================


def _moe_inputs(T, E, K, D, F, dtype, seed=0, ids=None, bias=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, D, generator=g) * scale).to(dtype)
    w13 = (torch.randn(E, 2 * F, D, generator=g) / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, D, F, generator=g) / F ** 0.5).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
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


def test_grouped_experts_weight_loader_places_gate_up_down():
    mod = GroupedExperts(3, 4, 2, dtype=torch.float32)
    gate, up, down = torch.randn(2, 4), torch.randn(2, 4), torch.randn(4, 2)
    mod.weight_loader(mod.w13, gate, "gate", 1)
    mod.weight_loader(mod.w13, up, "up", 1)
    mod.weight_loader(mod.w2, down, "down", 1)
    assert torch.equal(mod.w13[1, :2], gate) and torch.equal(mod.w13[1, 2:], up) and torch.equal(mod.w2[1], down)
    with pytest.raises(ValueError, match="expert 1"):
        mod.weight_loader(mod.w2, torch.randn(4, 3), "down", 1)


# =====================================================================================
# Paged attention: torch path vs reference
# =====================================================================================


def _attn_batch(q_lens, c_lens, H, H_kv, Dk, Dv, block_size, latent=False, contiguous=(), seed=0,
                dtype=torch.float32):
    """Caches with old context, block tables (contiguous for the listed sequences, shuffled for the
    rest), and the step's new q/k/v written through write_kv."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = [-(-c // block_size) for c in c_lens]
    total = sum(n_blocks) + 3
    tables: list[list[int] | None] = [None] * len(n_blocks)
    top = total
    for i in contiguous:  # runs taken from the top of the id space
        tables[i] = list(range(top - n_blocks[i], top))
        top -= n_blocks[i]
    rest = [b for b in torch.randperm(top, generator=g).tolist()]
    for i, n in enumerate(n_blocks):
        if tables[i] is None:
            tables[i], rest = rest[:n], rest[n:]
    assert len({b for t in tables for b in t}) == sum(n_blocks)
    meta = AttentionMetadata.build(q_lens, c_lens, tables, block_size)
    k_cache = torch.randn(total, block_size, H_kv, Dk, generator=g).to(dtype)
    v_cache = k_cache[..., :Dv] if latent else torch.randn(total, block_size, H_kv, Dv, generator=g).to(dtype)
    T = sum(q_lens)
    q = torch.randn(T, H, Dk, generator=g).to(dtype)
    k = torch.randn(T, H_kv, Dk, generator=g).to(dtype)
    v = None if latent else torch.randn(T, H_kv, Dv, generator=g).to(dtype)
    write_kv(k_cache, None if latent else v_cache, k, v, meta.slot_mapping)
    return meta, k_cache, v_cache, q


_ATTN_CASES = {
    # prefill chunks, a full prompt, decodes and a long context; GQA 2:1
    "mixed_gqa": dict(q=[5, 1, 17, 3, 1], c=[9, 7, 17, 40, 1], H=4, H_kv=2, Dk=16, Dv=16),
    "decode_only": dict(q=[1, 1, 1], c=[1, 13, 33], H=4, H_kv=1, Dk=16, Dv=16),
    "latent_dk_ne_dv": dict(q=[3, 1, 6, 2], c=[3, 20, 11, 2], H=4, H_kv=1, Dk=24, Dv=16, latent=True),
    "window": dict(q=[6, 1, 9, 12], c=[6, 30, 21, 12], H=4, H_kv=4, Dk=16, Dv=16, window=5),
    "window_longer_than_context": dict(q=[3, 1], c=[3, 4], H=2, H_kv=2, Dk=8, Dv=8, window=64),
    "sinks": dict(q=[1, 1, 4], c=[10, 5, 4], H=4, H_kv=1, Dk=16, Dv=16, sinks=True),
    "sinks_window": dict(q=[7, 1, 2, 9], c=[7, 26, 19, 9], H=6, H_kv=2, Dk=20, Dv=20, window=8, sinks=True),
    # queries longer than the C kernel takes: a chunk after cached tokens, a whole prompt
    "long_chunks": dict(q=[20, 18, 1], c=[45, 18, 30], H=4, H_kv=2, Dk=16, Dv=16),
    "latent_long": dict(q=[20, 17, 1], c=[33, 17, 5], H=4, H_kv=1, Dk=24, Dv=16, latent=True),
    "sinks_long": dict(q=[18, 20], c=[18, 50], H=4, H_kv=2, Dk=16, Dv=16, sinks=True),
    "window_long": dict(q=[24, 19], c=[24, 40], H=4, H_kv=4, Dk=16, Dv=16, window=7),
}


@pytest.mark.parametrize("decode_kernel", [True, False], ids=["c_kernel", "sdpa_only"])
@pytest.mark.parametrize("layout", ["shuffled", "contiguous", "mixed"])
@pytest.mark.parametrize("block_size", [4, 8])
@pytest.mark.parametrize("case", list(_ATTN_CASES))
def test_paged_attention_torch_matches_reference(case, block_size, layout, decode_kernel, monkeypatch):
    if not decode_kernel:  # decode rows through SDPA too (the path without a C compiler)
        monkeypatch.setattr(cpu_kernels, "supports_decode", lambda *a: False)
    spec = _ATTN_CASES[case]
    n = len(spec["q"])
    contiguous = {"shuffled": (), "contiguous": tuple(range(n)), "mixed": tuple(range(0, n, 2))}[layout]
    meta, k_cache, v_cache, q = _attn_batch(spec["q"], spec["c"], spec["H"], spec["H_kv"], spec["Dk"], spec["Dv"],
                                            block_size, spec.get("latent", False), contiguous)
    if layout == "contiguous":
        assert all(s is not None for s in meta.contiguous_starts)
    sinks = torch.randn(spec["H"], generator=torch.Generator().manual_seed(9)) * 2 if spec.get("sinks") else None
    scale = spec["Dk"] ** -0.5
    out = paged_attention_torch(q, k_cache, v_cache, meta, scale, spec.get("window"), sinks)
    ref = paged_attention_reference(q, k_cache, v_cache, meta, scale, spec.get("window"), sinks)
    assert out.shape == (q.shape[0], spec["H"], spec["Dv"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_paged_attention_torch_bfloat16_close_to_reference():
    spec = _ATTN_CASES["mixed_gqa"]
    meta, k_cache, v_cache, q = _attn_batch(spec["q"], spec["c"], spec["H"], spec["H_kv"], spec["Dk"], spec["Dv"], 4,
                                            dtype=torch.bfloat16, contiguous=(1,))
    out = paged_attention_torch(q, k_cache, v_cache, meta, 0.25)
    ref = paged_attention_reference(q, k_cache, v_cache, meta, 0.25)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_attention_metadata_worked_example_slots():
    # block_size 4: 5 cached tokens + 2 new (context 7) in blocks [9, 3] -> slots 13, 14
    meta = AttentionMetadata.build([2], [7], [[9, 3]], 4)
    assert meta.slot_mapping.tolist() == [13, 14]
    assert meta.contiguous_starts == (None,)
    meta = AttentionMetadata.build([1, 3], [6, 3], [[2, 3], [7]], 4)
    assert meta.slot_mapping.tolist() == [13, 28, 29, 30]
    assert meta.contiguous_starts == (2, 7)
    assert meta.query_start_loc.tolist() == [0, 1, 4]


# =====================================================================================
# Rope: YaRN vs transformers
# =====================================================================================


def _hf_yarn_configs():
    from transformers import DeepseekV3Config, GptOssConfig, Qwen3MoeConfig

    return {
        "gpt_oss_no_truncate": GptOssConfig(
            hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=256,
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64}),
        "deepseek_mscale": DeepseekV3Config(
            hidden_size=64, num_attention_heads=4, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                             "mscale": 0.707, "mscale_all_dim": 1.0}),
        "qwen_yarn_defaults": Qwen3MoeConfig(
            hidden_size=128, num_attention_heads=4, head_dim=32, max_position_embeddings=4096,
            rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 8.0,
                             "original_max_position_embeddings": 512}),
        "explicit_attention_factor": Qwen3MoeConfig(
            hidden_size=128, num_attention_heads=4, head_dim=64, max_position_embeddings=4096,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "attention_factor": 1.3,
                             "beta_fast": 16, "beta_slow": 2, "original_max_position_embeddings": 2048}),
    }


@pytest.mark.parametrize("name", ["gpt_oss_no_truncate", "deepseek_mscale", "qwen_yarn_defaults",
                                  "explicit_attention_factor"])
def test_yarn_inverse_frequencies_match_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moe.config import rope_parameters
    from moe.models.rope import rope_inv_freq

    cfg = _hf_yarn_configs()[name]
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    hf = cfg.to_dict()
    dim = hf.get("qk_rope_head_dim") or hf["head_dim"]
    inv, factor = rope_inv_freq(dim, rope_parameters(hf), hf["max_position_embeddings"])
    assert inv.shape == hf_inv.shape
    torch.testing.assert_close(inv, hf_inv.float(), atol=0, rtol=1e-6)
    assert factor == pytest.approx(float(hf_factor), rel=1e-6)


def test_default_and_linear_rope_and_unknown_type():
    from moe.models.rope import rope_inv_freq

    inv, f = rope_inv_freq(8, {"rope_theta": 10000.0}, 128)
    torch.testing.assert_close(inv, torch.tensor([1.0, 0.1, 0.01, 0.001]))
    assert f == 1.0
    inv2, _ = rope_inv_freq(8, {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}, 128)
    torch.testing.assert_close(inv2, inv / 4)
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        rope_inv_freq(8, {"rope_type": "dynamic", "factor": 2.0}, 128)


# =====================================================================================
# Safetensors loader: sharded == single file
# =====================================================================================


def test_sharded_checkpoint_with_index_loads_the_same_as_single_file(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from moe import LLM

    src = checkpoint("qwen2_moe")
    sharded = tmp_path / "sharded"
    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    hf.save_pretrained(sharded, max_shard_size="60KB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) >= 3 and (sharded / "model.safetensors.index.json").is_file()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)

    one = LLM(str(src), dtype="float32", block_size=4, kv_cache_memory="1MiB").engine.model.state_dict()
    many = LLM(str(sharded), dtype="float32", block_size=4, kv_cache_memory="1MiB").engine.model.state_dict()
    assert one.keys() == many.keys()
    for name in one:
        assert torch.equal(one[name], many[name]), name

    # a stray extra *.safetensors next to an index is not read: only the shards the index names
    shutil.copy(src / "model.safetensors", sharded / "stray.safetensors")
    from moe.loader import checkpoint_files

    assert sorted(p.name for p in checkpoint_files(sharded)) == shards


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
