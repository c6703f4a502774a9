"""Prefix-cache block keys: SHA-256 over (parent key, token bytes), and per-tenant cache_salt."""
import hashlib
from array import array

import pytest

from kvcache import BlockManager, BlockTable
from kvcache.block_manager import chain_hash, root_key
from moe import LLM, SamplingParams


def _toks(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def test_block_keys_are_sha256_of_the_parent_key_and_the_token_bytes():
    bm = BlockManager(8, 4)
    t = BlockTable()
    bm.allocate(t, 8)
    toks = _toks(8)
    bm.register_full_blocks(t, toks, 8)
    k0 = hashlib.sha256(bytes(32) + array("q", toks[:4]).tobytes()).digest()
    k1 = hashlib.sha256(k0 + array("q", toks[4:]).tobytes()).digest()
    assert [bm.blocks[b].hash for b in t.blocks] == [k0, k1]
    assert chain_hash(root_key(None), toks[:4]) == k0
    # the key depends on every token and on the whole prefix before it
    assert chain_hash(k0, [*toks[4:7], toks[7] + 1]) != k1 and chain_hash(root_key("x"), toks[:4]) != k0


def _cached_table(bm: BlockManager, toks: list[int], salt: str | None) -> BlockTable:
    t = BlockTable(cache_salt=salt)
    bm.allocate(t, len(toks))
    bm.register_full_blocks(t, toks, len(toks))
    return t


@pytest.mark.parametrize("salt_a, salt_b, shared", [
    (None, None, 8), ("tenant-a", "tenant-a", 8), ("tenant-a", "tenant-b", 0), ("tenant-a", None, 0),
    (None, "tenant-b", 0),
])
def test_blocks_are_shared_only_under_the_same_salt(salt_a, salt_b, shared):
    bm = BlockManager(16, 4)
    toks = _toks(12)
    a = _cached_table(bm, toks, salt_a)
    b = BlockTable(cache_salt=salt_b)
    assert bm.match_prefix(b, toks, 11) == shared
    assert b.blocks == a.blocks[:shared // 4]
    bm.free_table(a)
    bm.free_table(b)
    # a freed table keeps its salt: the cached blocks stay reachable only with it
    again = BlockTable(cache_salt=salt_a)
    assert bm.match_prefix(again, toks, 11) == 8


def test_engine_isolates_tenants_by_cache_salt():
    llm = LLM(dtype="float32")
    bm = llm.engine.block_manager
    text = "The history of the city begins with a small village by the river, where farmers and fishermen"
    params = SamplingParams(temperature=0, max_tokens=4)
    first = llm.generate({"prompt": text, "cache_salt": "tenant-a"}, params)[0]
    n_full = (len(first.prompt_token_ids) - 1) // bm.block_size * bm.block_size
    assert n_full >= 16

    def hits(prompt) -> tuple[int, list[int]]:
        before = bm.prefix_hit_tokens
        out = llm.generate(prompt, params)[0]
        return bm.prefix_hit_tokens - before, out.outputs[0].token_ids

    assert hits({"prompt": text, "cache_salt": "tenant-b"}) == (0, first.outputs[0].token_ids)
    assert hits(text) == (0, first.outputs[0].token_ids)  # unsalted requests do not see salted blocks
    assert hits({"prompt": text, "cache_salt": "tenant-a"}) == (n_full, first.outputs[0].token_ids)
    ids = first.prompt_token_ids
    assert hits({"prompt_token_ids": ids, "cache_salt": "tenant-a"})[0] == n_full
    for bad in ("", 5):
        with pytest.raises(ValueError, match="cache_salt"):
            llm.engine.add_request({"prompt": text, "cache_salt": bad}, params)
    assert not llm.engine.has_unfinished_requests()
