"""Continuous batching: decide which tokens of which sequences run in the next step.

Each step has a token budget. Running sequences go first (a decode is one token; a prompt
still being prefilled continues with its next chunk); waiting sequences are admitted in
arrival order while budget, ``max_num_seqs`` and KV blocks allow. When a running sequence
needs a block and none is free, the most recently admitted sequence is preempted: its blocks
are freed and it goes back to the front of the queue, to be recomputed later (its tokens so
far are kept, so its output is unchanged).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvcache import BlockManager

from .sequence import Sequence, Status


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Does this chunk reach the sequence's last token, so the step yields a new token?"""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class ScheduledBatch:
    seqs: list[ScheduledSeq]
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_table(seq.block_table)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        preempted = 0
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.can_allocate(seq.block_table, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.bm.allocate(seq.block_table, seq.num_computed_tokens + n, seq.expected_len)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        if preempted:
            return ScheduledBatch(out, preempted)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.wants_prompt_logprobs and seq.num_computed_tokens == 0:
                # at least one token must be computed to produce logits
                seq.num_computed_tokens = self.bm.match_prefix(seq.block_table, seq.token_ids, seq.num_tokens - 1)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.bm.can_allocate(seq.block_table, seq.num_computed_tokens + n):
                self.bm.free_table(seq.block_table)
                seq.num_computed_tokens = 0
                break
            self.bm.allocate(seq.block_table, seq.num_computed_tokens + n, seq.expected_len)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        return ScheduledBatch(out)

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.bm.free_table(seq.block_table)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
