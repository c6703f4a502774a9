"""KV cache: block manager (paged blocks, prefix sharing) and attention that reads through block tables."""
from .attention import causal_attention, paged_attention, paged_attention_torch, seq_kv, write_kv
from .block_manager import BlockManager, BlockTable
from .fp8 import KV_CACHE_DTYPES, Fp8Cache, check_kv_cache_dtype
from .metadata import AttentionMetadata, OneRowMetadata
from .reference import paged_attention_reference

__all__ = ["KV_CACHE_DTYPES", "AttentionMetadata", "BlockManager", "BlockTable", "Fp8Cache", "OneRowMetadata",
           "check_kv_cache_dtype", "causal_attention", "paged_attention", "paged_attention_torch",
           "paged_attention_reference", "seq_kv", "write_kv"]
