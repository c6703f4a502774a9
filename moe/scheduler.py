"""Continuous batching: decide which tokens of which sequences run in the next step.

Each step has a token budget. Running sequences go first (a decode is one token; a prompt
still being prefilled continues with its next chunk); waiting sequences are admitted in
arrival order while budget, ``max_num_seqs`` and KV blocks allow. When a running sequence
needs a block and none is free, the most recently admitted sequence is preempted: its blocks
are freed and it goes back to the front of the queue, to be recomputed later (its tokens so
far are kept, so its output is unchanged).

Speculative decoding (moe.spec_decode): a decoding sequence may reserve budget and KV blocks
for the draft its proposer will make (``proposer.room``); once every running sequence is placed,
the proposer drafts for all the reserving ones in one call (a draft model runs its steps
batched over them, writing its K/V into the blocks just allocated).

A request with ``n`` > 1 samples is ``n`` sequences; samples 1..n-1 are admitted once sample 0
has computed its prompt, so that they take its full prompt blocks from the prefix cache (shared,
ref-counted) and compute only the prompt's last partial block.

Data parallelism (``data_parallel`` > 1, DP attention): every rank runs this same scheduler. A
sequence is bound to one DP group when it is queued (:func:`least_loaded_group`) and stays
there, because its K/V live only in that group's caches. Each group has its own
:class:`BlockManager` over its own caches (block ids and the prefix cache are per group), so a
group that runs out of blocks preempts its own newest sequence, and a waiting sequence whose
group is full does not hold back the other groups' ones (arrival order is kept within a group).
The token budget (``max_num_batched_tokens``) and ``max_num_seqs`` apply to each group, as if
each were its own engine: a step runs up to ``data_parallel`` times as many tokens.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from kvcache import BlockManager

from .sequence import Sequence, Status
from .spec_decode import Proposer


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # rows this step runs, draft tokens included
    draft: tuple[int, ...] = ()  # speculative tokens after the sequence's last one (see moe.spec_decode)
    # [len(draft), V] the drafter's distribution of each draft token (sampled requests); None: point masses
    draft_probs: torch.Tensor | None = None
    draft_source: str = ""  # "lookup" or "model" (moe.spec_decode.Draft.source)
    # decode steps run back to back (Scheduler.max_steps): its rows are the first step's; the
    # KV blocks of all of them are allocated
    steps: int = 1

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Does this chunk reach the sequence's last token, so the step yields a new token?"""
        return self.start + self.num_new_tokens - len(self.draft) == self.seq.num_tokens


@dataclass(frozen=True)
class ScheduledBatch:
    seqs: list[ScheduledSeq]
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    def __bool__(self) -> bool:
        return bool(self.seqs)


def least_loaded_group(loads: list[int], counts: list[int]) -> int:
    """The DP group a new sequence joins: the least outstanding tokens (prompt + expected output
    of its unfinished sequences), then the fewest sequences, then the lowest index."""
    return min(range(len(loads)), key=lambda d: (loads[d], counts[d], d))


def partition_batch(batch: ScheduledBatch, dp_size: int) -> list[list[int]]:
    """Batch indices of each DP group's sequences, in batch order (a group may have none)."""
    groups: list[list[int]] = [[] for _ in range(dp_size)]
    for b, s in enumerate(batch.seqs):
        groups[s.seq.dp_rank].append(b)
    return groups


class Scheduler:
    def __init__(self, block_manager: BlockManager | list[BlockManager], max_num_seqs: int,
                 max_num_batched_tokens: int):
        """``block_manager``: one, or one per data-parallel group."""
        self.bms = list(block_manager) if isinstance(block_manager, (list, tuple)) else [block_manager]
        self.bm = self.bms[0]
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        # speculative decoding: drafts for decoding sequences (moe.spec_decode.Proposer), or None
        self.proposer: Proposer | None = None
        self.running: list[Sequence] = []
        # multi-step decoding: up to this many decode steps in one engine step for up to
        # max_step_rows decoding sequences when nothing waits (the engine sets both where its runner
        # can: ModelRunner.runs_steps)
        self.max_steps = 1
        self.max_step_rows = 1

    @property
    def dp_size(self) -> int:
        return len(self.bms)

    def block_manager_of(self, seq: Sequence) -> BlockManager:
        return self.bms[seq.dp_rank]

    def add(self, seq: Sequence) -> None:
        if seq.leader is not None:
            seq.dp_rank = seq.leader.dp_rank  # samples of one request share its prompt's blocks: same group
        elif self.dp_size > 1:
            loads, counts = [0] * self.dp_size, [0] * self.dp_size
            for q in (*self.running, *self.waiting):
                loads[q.dp_rank] += max(q.expected_len, q.num_tokens)
                counts[q.dp_rank] += 1
            seq.dp_rank = least_loaded_group(loads, counts)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager_of(seq).free_table(seq.block_table)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        budget = [self.max_num_batched_tokens] * self.dp_size  # per data-parallel group
        out: list[ScheduledSeq] = []
        speculating: list[tuple[int, int]] = []  # (index in out, draft tokens reserved)
        preempted = 0
        for seq in list(self.running):
            if budget[seq.dp_rank] == 0:
                continue
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            bm = self.block_manager_of(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget[seq.dp_rank])
            while not bm.can_allocate(seq.block_table, seq.num_computed_tokens + n):
                victim = [q for q in self.running if q.dp_rank == seq.dp_rank][-1]  # the newest of its group
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            room = 0
            # (a request that processes logits is not drafted: its draft rows would be verified
            # against unprocessed logits)
            if (self.proposer is not None and n == 1 and budget[seq.dp_rank] > 1
                    and seq.num_tokens - seq.num_computed_tokens == 1 and not seq.params.processes_logits):
                room = self.proposer.room(seq, budget[seq.dp_rank] - 1)
                if room and not bm.can_allocate(seq.block_table, seq.num_computed_tokens + 1 + room):
                    room = 0  # no room for the speculative rows: an ordinary decode step
            n += room
            bm.allocate(seq.block_table, seq.num_computed_tokens + n, seq.expected_len)
            if room:
                speculating.append((len(out), room))
            out.append(ScheduledSeq(seq, n))
            budget[seq.dp_rank] -= n
        if speculating:
            # one call for all: a draft model drafts for every speculating sequence in batched steps
            drafts = self.proposer.propose([out[i].seq for i, _ in speculating], [r for _, r in speculating])
            for (i, _), d in zip(speculating, drafts):
                out[i] = ScheduledSeq(out[i].seq, 1 + len(d.tokens), d.tokens, d.probs, d.source)
        if preempted:
            return ScheduledBatch(out, preempted)
        if self.max_steps > 1 and 0 < len(out) <= self.max_step_rows and not self.waiting and not speculating:
            out = self._multi_step(out)
        num_running = [0] * self.dp_size
        for seq in self.running:
            num_running[seq.dp_rank] += 1
        blocked: set[int] = set()  # groups that admit nothing more this step (arrival order within a group)
        i = 0
        while i < len(self.waiting) and len(blocked) < self.dp_size:
            seq = self.waiting[i]
            d = seq.dp_rank
            if d in blocked or budget[d] == 0 or num_running[d] >= self.max_num_seqs:
                blocked.add(d)
                i += 1
                continue
            if seq.waits_for_leader and self.block_manager_of(seq).enable_prefix_caching:
                i += 1  # not blocking: its leader, ahead of it, is admitted or running
                continue
            bm = self.block_manager_of(seq)
            looked_up = not seq.wants_prompt_logprobs and seq.num_computed_tokens == 0 and bm.enable_prefix_caching
            if looked_up:
                # at least one token must be computed to produce logits
                seq.num_computed_tokens = bm.match_prefix(seq.block_table, seq.token_ids, seq.num_tokens - 1)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget[d])
            if not bm.can_allocate(seq.block_table, seq.num_computed_tokens + n):
                bm.free_table(seq.block_table)
                seq.num_computed_tokens = 0
                blocked.add(d)
                i += 1
                continue
            bm.allocate(seq.block_table, seq.num_computed_tokens + n, seq.expected_len)
            if looked_up:
                bm.record_prefix_lookup(seq.num_tokens, seq.num_computed_tokens)
            del self.waiting[i]
            seq.status = Status.RUNNING
            self.running.append(seq)
            num_running[d] += 1
            out.append(ScheduledSeq(seq, n))
            budget[d] -= n
        return ScheduledBatch(out)

    def _multi_step(self, out: list[ScheduledSeq]) -> list[ScheduledSeq]:
        """The step's sequences as up to :attr:`max_steps` decode steps where every one's request
        allows them: one decode token each, no prompt log-probs (biases, penalties and a pending
        ``min_tokens``' ban are applied in the loop, log-probs made from its raw logits, grammars fed
        and masked by it: not with ``ignore_eos`` or a pending ``min_tokens``, where the grammar may
        end before a stop token or meet the ban), and KV blocks free for the steps after (none is
        preempted for them). Each step's tokens are the sampler's (greedy, or drawn at the sequence's
        key and the token's position), so the outputs are one-step decoding's; the steps stop at the
        requests' stop tokens, the shortest ``max_tokens`` and the model's length (``expected_len``),
        and stop strings cut the text after."""
        for s in out:
            seq, p = s.seq, s.seq.params
            grammar_alone = p.structured_outputs is not None and (p.ignore_eos or seq.num_output_tokens < p.min_tokens)
            if s.num_new_tokens != 1 or not s.samples or grammar_alone or seq.wants_prompt_logprobs:
                return out
        steps = min(self.max_steps, *(s.seq.expected_len - s.seq.num_tokens for s in out))
        bm = self.bm  # (one data-parallel group: the runner's multi-step runs in one process)
        while steps > 1 and sum(bm.blocks_needed(s.seq.block_table, s.start + steps) for s in out) > bm.num_free_blocks:
            steps //= 2
        if steps <= 1:
            return out
        for s in out:
            bm.allocate(s.seq.block_table, s.start + steps, s.seq.expected_len)
        return [ScheduledSeq(s.seq, 1, steps=steps) for s in out]

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.block_manager_of(seq).free_table(seq.block_table)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
