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

import itertools
from dataclasses import dataclass

import torch


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
            n = -(-c // block_size)
            first = blocks[0] if blocks else None
            # contiguous: the used blocks run first, first + 1, ... (checked in full only when the ends agree)
            starts.append(first if n and blocks[n - 1] - first == n - 1 and blocks[:n] == list(range(first, first + n))
                          else None)
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
