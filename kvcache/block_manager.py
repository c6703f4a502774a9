"""Fixed-size KV blocks: free list, reference counts, and prefix sharing by block hash.

A sequence owns a block table (list of block ids). A block that is full of computed tokens
gets a hash chained over every token before it, so another sequence whose prompt starts with
the same tokens can reuse it (its ref count goes up; nothing is recomputed). Freed blocks keep
their hash until they are handed out again, so a finished request's prefix can still be hit.

A second cache addressed by the same block ids (a draft model's, in speculative decoding) may
fill its side of a block later than the target, or never: ``Block.aux_written`` says that it
holds this block's K/V too (set by its owner, cleared whenever the block is handed out for new
tokens), so a sequence that hits a cached prefix knows how much of it the second cache can reuse.

Block keys are SHA-256 of the parent block's key and the block's token ids (int64 bytes), so a
client cannot craft tokens whose key collides with another prompt's block (Python's ``hash`` of
ints is unseeded and not collision-resistant). A sequence's ``cache_salt`` (one per tenant) is
hashed into its first block's parent key: sequences with different salts never share a block.

Placement: a new sequence is given a run of free blocks long enough for its expected length
(a soft reservation others avoid while they can), and grows into the next block when it is
free. A sequence whose blocks form one contiguous run can have its K/V read as a view of the
cache, with no gather; any other table still works, through the block table.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    aux_written: bool = False  # a second cache on these block ids (a drafter's) holds this block's K/V


@dataclass
class BlockTable:
    """One sequence's view: its blocks and how many of its tokens came from the prefix cache."""

    blocks: list[int] = field(default_factory=list)
    num_hashed: int = 0  # leading blocks already registered in the prefix cache
    reserved: tuple[int, int] | None = None  # soft-reserved block range [start, end)
    cache_salt: str | None = None  # the tenant's salt: only tables with the same salt share blocks

    @property
    def contiguous(self) -> bool:
        """Do the blocks form one run ``b, b+1, ...``? (then K/V are a view of the cache)"""
        b = self.blocks
        return bool(b) and b[-1] - b[0] == len(b) - 1 and (len(b) < 3 or b == list(range(b[0], b[0] + len(b))))


_UNSALTED_ROOT = bytes(32)


def root_key(cache_salt: str | None) -> bytes:
    """The parent key of a sequence's first block: 32 zero bytes, or the SHA-256 of its salt."""
    if cache_salt is None:
        return _UNSALTED_ROOT
    return hashlib.sha256(b"moe-cache-salt\0" + cache_salt.encode()).digest()


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """A block's key: SHA-256 over the parent's 32-byte key and the tokens as int64 (fixed-width
    fields, so no two different (parent, tokens) pairs feed the hash the same bytes)."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache holds {num_blocks} blocks: give it more memory (kv_cache_memory)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks in eviction order (least recently freed first); a dict keeps O(1) removal
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        # the free blocks holding no cached prefix, in the same order: found without walking past
        # the cached ones (once the cache is full of them, a walk of every free block per new
        # block cost 2 ms at 8192 blocks)
        self.free_clean: OrderedDict[int, None] = OrderedDict(self.free)
        self.hash_to_block: dict[bytes, int] = {}
        self.reserved_by: list[int] = [-1] * num_blocks  # id() of the table reserving each block
        # 1 per block that is free and unreserved (and, in the clean mask, holds no cached prefix):
        # a reservation's run found by bytes.find in C, not by a walk of every block in Python (once
        # the cache is full of cached prefixes the walk cost ~1 ms a new sequence at 16k blocks, ~4
        # ms at 64k); kept by _mark wherever a block's free, reserved or hashed state changes
        self._open_any = bytearray(b"\x01" * num_blocks)
        self._open_clean = bytearray(b"\x01" * num_blocks)
        # counted by the scheduler per admitted sequence (record_prefix_lookup), in tokens
        self.prefix_query_tokens = 0  # tokens of the sequences looked up in the prefix cache
        self.prefix_hit_tokens = 0  # tokens whose K/V a new sequence took from the prefix cache

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, table: BlockTable, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(table.blocks))

    def can_allocate(self, table: BlockTable, num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.num_free_blocks

    def _take_free(self, block_id: int | None = None) -> int:
        if block_id is None:
            block_id, _ = self.free.popitem(last=False)
        else:
            del self.free[block_id]
        self.free_clean.pop(block_id, None)
        blk = self.blocks[block_id]
        if blk.hash is not None and self.hash_to_block.get(blk.hash) == block_id:
            del self.hash_to_block[blk.hash]
        blk.hash = None
        blk.aux_written = False
        blk.ref_count = 1
        self._mark(block_id)
        return block_id

    def _mark(self, b: int) -> None:
        """Bring block ``b``'s bytes of the open masks up to date with its state."""
        is_open = b in self.free and self.reserved_by[b] == -1
        self._open_any[b] = is_open
        self._open_clean[b] = is_open and self.blocks[b].hash is None

    def match_prefix(self, table: BlockTable, token_ids: list[int], max_tokens: int) -> int:
        """Attach cached blocks for the longest hashed prefix of ``token_ids`` (at most
        ``max_tokens`` tokens, whole blocks only) to an empty table; returns tokens reused."""
        assert not table.blocks
        if not self.enable_prefix_caching:
            return 0
        h = root_key(table.cache_salt)
        bs = self.block_size
        for i in range(max_tokens // bs):
            h = chain_hash(h, token_ids[i * bs:(i + 1) * bs])
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            blk = self.blocks[block_id]
            if blk.ref_count == 0:
                del self.free[block_id]
                self.free_clean.pop(block_id, None)
                self._mark(block_id)
            blk.ref_count += 1
            table.blocks.append(block_id)
        table.num_hashed = len(table.blocks)
        return len(table.blocks) * bs

    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted sequence's prefix-cache lookup (a lookup whose admission failed and
        is retried later is not counted twice)."""
        self.prefix_query_tokens += num_query_tokens
        self.prefix_hit_tokens += num_hit_tokens

    def allocate(self, table: BlockTable, num_tokens: int, expected_tokens: int = 0) -> None:
        """Grow ``table`` to hold ``num_tokens`` tokens; the caller checked :meth:`can_allocate`.
        ``expected_tokens``: how long the sequence will probably grow (sizes its reservation)."""
        need = self.blocks_needed(table, num_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {need}, {self.num_free_blocks} free")
        if need and table.reserved is None:
            want = max(-(-max(expected_tokens, num_tokens) // self.block_size) - len(table.blocks), need)
            self._reserve(table, want)
        for _ in range(need):
            table.blocks.append(self._take_free(self._next_block(table)))

    def _usable(self, b: int, table: BlockTable, clean_only: bool) -> bool:
        owner = self.reserved_by[b]
        return (b in self.free and (owner == -1 or owner == id(table))
                and not (clean_only and self.blocks[b].hash is not None))

    def _next_block(self, table: BlockTable) -> int | None:
        """The block after the table's last one if it is free and nobody else reserved it;
        else the first free block of the table's reservation; else any free block. Blocks
        still holding a cached prefix are taken only when no clean block is left, oldest first."""
        for clean_only in (True, False):
            if table.blocks:
                nxt = table.blocks[-1] + 1
                if nxt < self.num_blocks and self._usable(nxt, table, clean_only):
                    return nxt
            if table.reserved is not None:
                for b in range(*table.reserved):
                    if self._usable(b, table, clean_only):
                        return b
            for b in self.free_clean if clean_only else self.free:  # oldest freed first (prefix-cache LRU),
                if self.reserved_by[b] == -1:                           # skipping others' reservations
                    return b
        return None

    def _reserve(self, table: BlockTable, want: int) -> None:
        """First fit: the first run of ``want`` free, unreserved blocks holding no cached prefix
        (else the longest such run; else the longest run that may evict cached blocks)."""
        for clean_only in (True, False):
            best_start, best_len = self._longest_run(want, clean_only)
            if best_len:
                break
        if best_len == 0:
            return
        end = best_start + min(best_len, want)
        for b in range(best_start, end):
            self.reserved_by[b] = id(table)
            self._mark(b)
        table.reserved = (best_start, end)

    def register_full_blocks(self, table: BlockTable, token_ids: list[int], num_computed: int) -> None:
        """Hash the blocks that are now completely computed so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(min(num_computed, len(token_ids)) // bs, len(table.blocks))  # only blocks whose tokens are known
        if table.num_hashed:
            h = self.blocks[table.blocks[table.num_hashed - 1]].hash
        else:
            h = root_key(table.cache_salt)
        for i in range(table.num_hashed, full):
            h = chain_hash(h, token_ids[i * bs:(i + 1) * bs])
            blk = self.blocks[table.blocks[i]]
            blk.hash = h
            self.hash_to_block.setdefault(h, blk.block_id)
            self._mark(blk.block_id)
        table.num_hashed = max(table.num_hashed, full)

    def mark_aux_written(self, table: BlockTable, num_tokens: int) -> None:
        """The second cache now holds the K/V of the table's first ``num_tokens`` tokens (whole
        blocks count; their tokens must be final)."""
        for b in table.blocks[:num_tokens // self.block_size]:
            self.blocks[b].aux_written = True

    def aux_written_prefix(self, table: BlockTable, max_tokens: int) -> int:
        """Tokens at the start of ``table`` (whole blocks, at most ``max_tokens``) whose K/V the
        second cache holds."""
        n = 0
        for b in table.blocks[:max_tokens // self.block_size]:
            if not self.blocks[b].aux_written:
                break
            n += 1
        return n * self.block_size

    def _longest_run(self, want: int, clean_only: bool) -> tuple[int, int]:
        """``(start, length)`` of the first run of ``want`` open blocks (free, unreserved; with
        ``clean_only`` also holding no cached prefix), else of the first longest shorter run;
        ``(-1, 0)`` when no block is open."""
        mask = self._open_clean if clean_only else self._open_any
        start = mask.find(b"\x01" * want)
        if start >= 0:
            return start, want
        best_start, best_len = -1, 0
        start = mask.find(1)
        while start >= 0:  # run by run, each end and next start found by find (in C)
            end = mask.find(0, start)
            end = len(mask) if end < 0 else end
            if end - start > best_len:
                best_start, best_len = start, end - start
            start = mask.find(1, end)
        return best_start, best_len

    def free_table(self, table: BlockTable) -> None:
        if table.reserved is not None:
            for b in range(*table.reserved):
                if self.reserved_by[b] == id(table):
                    self.reserved_by[b] = -1
                    self._mark(b)
            table.reserved = None
        # free in reverse so a sequence's tail blocks are evicted before its shared prefix
        for block_id in reversed(table.blocks):
            blk = self.blocks[block_id]
            blk.ref_count -= 1
            if blk.ref_count == 0:
                self.free[block_id] = None
                if blk.hash is None:
                    self.free_clean[block_id] = None
                self._mark(block_id)
        table.blocks.clear()
        table.num_hashed = 0
