"""Writing a step's new K/V rows into a plain paged cache ``[blocks, block_size, H, D]``."""
from __future__ import annotations

import torch

import cpu_kernels
from cpu_kernels.elementwise import write_rows_reference


def write_rows(cache: torch.Tensor, x_THD: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """``cache.view(slots, H, D)[slot_mapping] = x``: one C pass on CPU (same dtype, any strides of
    ``x``), else ``index_copy_`` (converting to the cache's dtype)."""
    if not cpu_kernels.write_rows(cache, x_THD, slot_mapping):
        write_rows_reference(cache, x_THD, slot_mapping)
