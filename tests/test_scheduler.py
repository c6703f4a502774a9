"""Unit tests of moe/scheduler.py: token budget, chunked prefill, admission order, preemption."""
from __future__ import annotations

from kvcache import BlockManager
from moe.outputs import RequestMetrics
from moe.sampling_params import SamplingParams
from moe.scheduler import Scheduler
from moe.sequence import Sequence, Status


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
