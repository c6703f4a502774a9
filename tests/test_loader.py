"""Unit tests of moe/loader.py: a sharded checkpoint loads the same as a single file."""
from __future__ import annotations

import json
import shutil

import torch


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
