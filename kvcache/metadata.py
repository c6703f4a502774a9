"""What attention needs to know about one engine step's flattened batch.

A step runs ``B`` sequences whose new tokens are concatenated into ``T`` query rows:
sequence ``i`` contributes ``query_lens[i]`` rows (a prefill chunk, or 1 for decode) and after
the step holds ``context_lens[i]`` tokens in the cache, the new ones last. Its K/V live in the
blocks ``block_tables[i, :ceil(context_lens[i] / block_size)]``; the new tokens are written to
``slot_mapping`` (slot = block * block_size + offset) before attention reads them.

Worked example, block_size 4: a sequence with 5 cached tokens gets 2 more (context 7) and owns
blocks [9, 3]. Its new tokens sit at offsets 5 and 6, i.e. slots 3*4+1 = 13 and 3*4+2 = 14.
"""
from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass

import torch


def _contiguous_start(blocks: list[int], context_len: int, block_size: int) -> int | None:
    """The first block when the blocks holding ``context_len`` tokens run first, first + 1, ...
    (checked in full only when the ends agree), else None."""
    n = -(-context_len // block_size)
    first = blocks[0] if blocks else None
    return first if n and blocks[n - 1] - first == n - 1 and blocks[:n] == list(range(first, first + n)) else None


@dataclass(frozen=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B+1] int32, cumulative query rows
    context_lens: torch.Tensor  # [B] int32, tokens in cache after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64
    query_lens_list: tuple[int, ...]
    context_lens_list: tuple[int, ...]
    block_size: int
    # first block of each sequence whose blocks are one contiguous run (K/V readable as a view), else None
    contiguous_starts: tuple[int | None, ...] = ()

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_list)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_list, default=0)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens_list, default=0)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens_list)

    @staticmethod
    def build(
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> "AttentionMetadata":
        """Build tensors from per-sequence python lists (the scheduler's view). (Once per step for
        every running sequence: the block table is one tensor made from padded lists, not a row
        assignment per sequence.)"""
        max_blocks = max(max((len(b) for b in block_tables), default=0), 1)
        bt = torch.tensor([b + [0] * (max_blocks - len(b)) for b in block_tables], dtype=torch.int32)
        bt = bt.view(len(block_tables), max_blocks)  # (no sequences: [0, 1])
        slots: list[int] = []
        starts: list[int | None] = []
        for q, c, blocks in zip(query_lens, context_lens, block_tables):
            starts.append(_contiguous_start(blocks, c, block_size))
            if q == 1:
                slots.append(blocks[(c - 1) // block_size] * block_size + (c - 1) % block_size)
                continue
            for pos in range(c - q, c):
                slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        qsl = torch.tensor(list(itertools.accumulate(query_lens, initial=0)), dtype=torch.int32)
        return AttentionMetadata(
            query_start_loc=qsl.to(device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            block_tables=bt.to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_lens_list=tuple(query_lens),
            context_lens_list=tuple(context_lens),
            block_size=block_size,
            contiguous_starts=tuple(starts),
        )

    def select(self, seqs: list[int]) -> tuple["AttentionMetadata", torch.Tensor]:
        """The metadata of sequences ``seqs`` alone (in that order) and the indices of their rows
        among this step's rows."""
        starts = self.query_start_loc.tolist()
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in seqs]).to(self.slot_mapping.device)
        qlens = [self.query_lens_list[i] for i in seqs]
        qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(torch.tensor(qlens, dtype=torch.int32), 0)
        idx = torch.tensor(seqs, device=self.context_lens.device)
        return AttentionMetadata(
            query_start_loc=qsl.to(self.query_start_loc.device),
            context_lens=self.context_lens[idx],
            block_tables=self.block_tables[idx],
            slot_mapping=self.slot_mapping[rows],
            query_lens_list=tuple(qlens),
            context_lens_list=tuple(self.context_lens_list[i] for i in seqs),
            block_size=self.block_size,
            contiguous_starts=tuple(self.contiguous_starts[i] for i in seqs) if self.contiguous_starts else (),
        ), rows


class OneRowMetadata:
    """:meth:`AttentionMetadata.build` for a step of one sequence and one new token (batch-1 decode)
    on CPU, into tensors kept from step to step: ``build``'s four new tensors and its Python cost
    ~20 us, 7% of the default model's whole step. The step's token id and position get two more
    (:attr:`ids`, :attr:`positions`). Each :meth:`build` overwrites the previous step's values: one
    step's metadata is used up before the next is built (as the engine's steps are)."""

    def __init__(self, block_size: int, capacity: int = 256):
        self.block_size = block_size
        self._i64 = (ctypes.c_int64 * 3)()  # slot, token id, position
        i64 = torch.frombuffer(self._i64, dtype=torch.int64)
        self.slot, self.ids, self.positions = i64[0:1], i64[1:2], i64[2:3]
        self._blocks: list[int] = []
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        self._i32 = (ctypes.c_int32 * (3 + capacity))()  # query_start_loc [0, 1], context length, block table
        i32 = torch.frombuffer(self._i32, dtype=torch.int32)
        self._qsl, self._ctx, self._table = i32[0:2], i32[2:3], i32[3:].view(1, capacity)
        self._i32[1] = 1
        self._blocks = []

    def build(self, token_id: int, context_len: int, blocks: list[int]) -> AttentionMetadata:
        """The metadata of the step whose one new token ``token_id`` ends a sequence of
        ``context_len`` tokens held in ``blocks``; :attr:`ids` / :attr:`positions` hold the token."""
        bs, n = self.block_size, len(blocks)
        if n > self._table.shape[1]:
            self._grow(2 * n)
        if blocks != self._blocks:  # (a new block, or another sequence)
            for i, b in enumerate(blocks):
                self._i32[3 + i] = b
            self._blocks = list(blocks)
        self._i32[2] = context_len
        pos = context_len - 1
        self._i64[0] = blocks[pos // bs] * bs + pos % bs
        self._i64[1] = token_id
        self._i64[2] = pos
        return AttentionMetadata(query_start_loc=self._qsl, context_lens=self._ctx,
                                 block_tables=self._table[:, :max(n, 1)], slot_mapping=self.slot,
                                 query_lens_list=(1,), context_lens_list=(context_len,), block_size=bs,
                                 contiguous_starts=(_contiguous_start(blocks, context_len, bs),))
