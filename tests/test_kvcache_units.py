"""Unit tests of kvcache/: the block manager (allocation, reference counts, prefix cache) and
paged attention against its reference."""
from __future__ import annotations

import pytest
import torch

import cpu_kernels
from kvcache import (AttentionMetadata, BlockManager, BlockTable, OneRowMetadata, paged_attention_reference,
                     paged_attention_torch, write_kv)


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


def test_free_clean_blocks_are_tracked_through_hits_evictions_and_frees():
    """``free_clean`` (the free blocks holding no cached prefix, in free order) stays exactly that
    through many admissions, prefix hits, growth and frees on a cache full of cached prefixes, and
    blocks are still handed out clean ones first, then cached ones oldest first."""
    import random

    rng = random.Random(0)
    bm = BlockManager(64, 4)
    live: list[tuple[BlockTable, list[int]]] = []
    prompts = [[rng.randrange(50) for _ in range(rng.randint(4, 20))] for _ in range(6)]  # shared prefixes
    for _ in range(400):
        if live and (rng.random() < 0.4 or not bm.can_allocate(BlockTable(), 24)):
            table, toks = live.pop(rng.randrange(len(live)))
            bm.register_full_blocks(table, toks, len(toks))
            bm.free_table(table)
        else:
            table, toks = BlockTable(), list(rng.choice(prompts))
            bm.match_prefix(table, toks, len(toks) - 1)
            toks += [rng.randrange(50) for _ in range(rng.randint(0, 4))]
            bm.allocate(table, len(toks), len(toks) + 4)
            live.append((table, toks))
        assert list(bm.free_clean) == [b for b in bm.free if bm.blocks[b].hash is None]
    for table, _ in live:
        bm.free_table(table)
    assert bm.num_free_blocks == 64 and any(bm.blocks[b].hash is not None for b in bm.free)
    clean = list(bm.free_clean)
    cached = [b for b in bm.free if bm.blocks[b].hash is not None]
    t = BlockTable()
    bm.allocate(t, 4 * (len(clean) + 1))  # the clean ones, then a cached one
    assert set(t.blocks[:len(clean)]) == set(clean) and t.blocks[-1] in cached
    assert list(bm.free_clean) == [] and bm.num_free_blocks == 64 - len(clean) - 1


def _walked_run(bm: BlockManager, want: int, clean_only: bool) -> tuple[int, int]:
    """What ``_longest_run`` returns, by walking every block's state."""
    best_start, best_len, start, run = -1, 0, 0, 0
    for b in range(bm.num_blocks):
        if b in bm.free and bm.reserved_by[b] == -1 and not (clean_only and bm.blocks[b].hash is not None):
            start = b if run == 0 else start
            run += 1
            if run > best_len:
                best_start, best_len = start, run
            if run >= want:
                break
        else:
            run = 0
    return best_start, best_len


def test_reservation_runs_are_found_as_a_walk_of_every_block_finds_them():
    """The open-block masks a reservation's run is searched in follow every block's free,
    reserved and cached state through admissions with reservations, prefix hits, growth and frees,
    and the run found is the first long enough one (else the first longest) a walk finds."""
    import random

    rng = random.Random(1)
    bm = BlockManager(96, 4)
    live: list[tuple[BlockTable, list[int]]] = []
    prompts = [[rng.randrange(50) for _ in range(rng.randint(4, 24))] for _ in range(6)]
    for _ in range(500):
        if live and (rng.random() < 0.45 or not bm.can_allocate(BlockTable(), 40)):
            table, toks = live.pop(rng.randrange(len(live)))
            bm.register_full_blocks(table, toks, len(toks))
            bm.free_table(table)
        elif live and rng.random() < 0.3:  # grow a live table (into its reservation or past it)
            table, toks = rng.choice(live)
            toks += [rng.randrange(50) for _ in range(rng.randint(1, 8))]
            bm.allocate(table, len(toks), len(toks))
            bm.register_full_blocks(table, toks, len(toks) - 1)
        else:
            table, toks = BlockTable(), list(rng.choice(prompts))
            bm.match_prefix(table, toks, len(toks) - 1)
            toks += [rng.randrange(50) for _ in range(rng.randint(0, 6))]
            bm.allocate(table, len(toks), len(toks) + rng.randint(0, 24))
            live.append((table, toks))
        for b in range(bm.num_blocks):
            is_open = b in bm.free and bm.reserved_by[b] == -1
            assert bm._open_any[b] == is_open
            assert bm._open_clean[b] == (is_open and bm.blocks[b].hash is None)
        for want in (1, 3, 7, 40):
            for clean_only in (True, False):
                assert bm._longest_run(want, clean_only) == _walked_run(bm, want, clean_only)


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


def test_attention_metadata_matches_its_definition_on_random_batches():
    """Every field of ``build`` against the definition, row by row: padded block tables, slots of
    the new rows, cumulative query rows, and the first block of each sequence whose used blocks
    are one contiguous run (tables may hold reserved blocks past the context)."""
    import random

    rng = random.Random(3)
    for _ in range(200):
        bs = rng.choice([1, 4, 16])
        qlens, clens, tables = [], [], []
        for _ in range(rng.randrange(0, 6)):
            c = rng.randrange(1, 70)
            q = rng.randrange(1, c + 1)
            n = -(-c // bs) + rng.randrange(3)
            first = rng.randrange(50)
            table = list(range(first, first + n)) if rng.random() < 0.5 else rng.sample(range(300), n)
            if rng.random() < 0.2 and n > 1:  # contiguous except past the used blocks
                table[-1] = 999
            qlens.append(q), clens.append(c), tables.append(table)
        meta = AttentionMetadata.build(qlens, clens, tables, bs)
        width = max([len(t) for t in tables] + [1])
        assert meta.block_tables.tolist() == [t + [0] * (width - len(t)) for t in tables]
        assert meta.block_tables.shape == (len(tables), width) and meta.block_tables.dtype == torch.int32
        assert meta.slot_mapping.tolist() == [t[p // bs] * bs + p % bs for q, c, t in zip(qlens, clens, tables)
                                              for p in range(c - q, c)]
        assert meta.query_start_loc.tolist() == [sum(qlens[:i]) for i in range(len(qlens) + 1)]
        assert meta.query_start_loc.dtype == meta.context_lens.dtype == torch.int32
        used = [t[:-(-c // bs)] for c, t in zip(clens, tables)]
        assert meta.contiguous_starts == tuple(u[0] if u == list(range(u[0], u[0] + len(u))) else None for u in used)


def test_attention_metadata_worked_example_slots():
    # block_size 4: 5 cached tokens + 2 new (context 7) in blocks [9, 3] -> slots 13, 14
    meta = AttentionMetadata.build([2], [7], [[9, 3]], 4)
    assert meta.slot_mapping.tolist() == [13, 14]
    assert meta.contiguous_starts == (None,)
    meta = AttentionMetadata.build([1, 3], [6, 3], [[2, 3], [7]], 4)
    assert meta.slot_mapping.tolist() == [13, 28, 29, 30]
    assert meta.contiguous_starts == (2, 7)
    assert meta.query_start_loc.tolist() == [0, 1, 4]


def test_one_row_metadata_equals_build_step_after_step():
    # a batch-1 decode step's metadata in tensors kept from step to step: the same as build's, for a
    # sequence growing past its blocks (and the kept table's capacity), and for another sequence
    one = OneRowMetadata(block_size=4, capacity=2)
    steps = [(7, [9, 3]), (8, [9, 3]), (9, [9, 3, 5]), (12, [9, 3, 5]), (13, [9, 3, 5, 6]), (3, [4]),
             (6, [4, 5]), (10, [4, 5, 6])]
    for context_len, blocks in steps:
        meta = one.build(42, context_len, blocks)
        ref = AttentionMetadata.build([1], [context_len], [blocks], 4)
        for field in ("query_start_loc", "context_lens", "block_tables", "slot_mapping"):
            got, want = getattr(meta, field), getattr(ref, field)
            assert got.dtype == want.dtype and torch.equal(got, want), field
        assert (meta.query_lens_list, meta.context_lens_list, meta.contiguous_starts, meta.block_size) == \
            (ref.query_lens_list, ref.context_lens_list, ref.contiguous_starts, ref.block_size)
        assert one.ids.tolist() == [42] and one.positions.tolist() == [context_len - 1]
