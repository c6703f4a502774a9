"""Linear layers that know their tensor-parallel shard and load their own weights.

Each parameter carries a ``weight_loader(param, loaded, shard_id=None)`` so the checkpoint
loader needs no parallel knowledge: it hands over the full tensor from the file and the layer
keeps its slice. The only collective here is the all-reduce of :class:`RowParallelLinear`
(and the gather of the vocab-parallel head).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import cpu_kernels

from .state import get_tp_rank, get_tp_size, tp_all_gather_last_dim, tp_all_reduce


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with CPU shortcuts.

    One row goes through ``mv`` (bf16: :func:`cpu_kernels.gemv`); 2-64 bf16 rows through
    :func:`cpu_kernels.amx_linear` where the CPU has AMX; otherwise up to ``SMALL_M`` rows through
    ``w @ x.T`` (returned as a transposed view). All stream the weight once and, on the CPUs measured (oneDNN bf16),
    run 1.3-1.7x faster than ``F.linear`` at these shapes, which are memory-bound.
    Rows run padded to :func:`padded_rows` (few distinct shapes).
    """
    if x.device.type == "cpu" and x.dim() == 2:
        m = x.shape[0]
        if 1 < m <= cpu_kernels.AMX_MAX_ROWS and x.dtype == torch.bfloat16:
            y = cpu_kernels.amx_linear(x if x.stride(-1) == 1 else x.contiguous(), w, b)  # AMX tiles, row-major
            if y is not None:
                return y
        mp = padded_rows(m)
        if mp != m:  # padded in x's own layout (oneDNN builds a kernel per shape *and* layout)
            if x.stride(0) == 1 and m > 1:  # a transposed view (what the few-row GEMMs return)
                xp = x.new_zeros(x.shape[1], mp)
                xp[:, :m] = x.t()
                x = xp.t()
            else:
                xp = x.new_zeros(mp, x.shape[1])
                xp[:m] = x
                x = xp
        if m > SMALL_M:
            y = F.linear(x, w, b)
            return y[:m] if mp != m else y
        if m == 1:
            y = cpu_kernels.gemv(w, x[0], b)  # bf16: the weight streamed with prefetch, ~10% over mv
            if y is not None:
                return y.unsqueeze(0)
            y = torch.mv(w, x[0]).unsqueeze(0)
        else:
            y = torch.mm(w, x.t()).t()[:m]
        return y + b if b is not None else y
    return F.linear(x, w, b)


SMALL_M = 128
ROW_BUCKET = 64


def padded_rows(m: int) -> int:
    """The row count a CPU GEMM of ``m`` rows runs with. oneDNN builds (JIT-compiles) a kernel for
    every new shape, ~5-14 ms each at these sizes, and its cache holds 1024 of them; prefill chunks
    and expert groups bring a new row count nearly every call. Rounding up to a multiple of 8
    (2-128 rows, memory-bound: the extra rows cost next to nothing) or of ``ROW_BUCKET`` (more
    rows, at most 63 extra) keeps the shapes few and their kernels cached."""
    if m <= 1:
        return m
    return -(-m // 8) * 8 if m <= SMALL_M else -(-m // ROW_BUCKET) * ROW_BUCKET


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel ({d})")
    return n // d


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def _param(*shape: int, dtype: torch.dtype, loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader
    return p


class ReplicatedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype, loader=default_weight_loader)
        self.bias = _param(out_features, dtype=dtype, loader=default_weight_loader) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """Output features split over TP ranks. ``output_sizes`` lists fused sub-matrices
    (e.g. gate and up) each split separately; ``shard_id`` indexes into it."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, dtype=torch.float32,
                 gather_output: bool = False):
        super().__init__()
        tp = get_tp_size()
        self.output_sizes = [_divide(s, tp, "output size") for s in output_sizes]
        self.gather_output = gather_output
        out = sum(self.output_sizes)
        self.weight = _param(out, in_features, dtype=dtype, loader=self.weight_loader)
        self.bias = _param(out, dtype=dtype, loader=self.weight_loader) if bias else None

    def _shard_range(self, shard_id) -> tuple[int, int]:
        idx = 0 if shard_id is None else int(shard_id)
        start = sum(self.output_sizes[:idx])
        return start, self.output_sizes[idx]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        start, size = self._shard_range(shard_id)
        if shard_id is None and len(self.output_sizes) > 1:
            raise ValueError("a fused column layer needs a shard_id for each sub-matrix")
        piece = loaded.narrow(0, get_tp_rank() * size, size)
        param.data.narrow(0, start, size).copy_(piece)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        return tp_all_gather_last_dim(y) if self.gather_output else y


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection; KV heads are replicated when TP exceeds their count."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 dtype=torch.float32, v_head_dim: int | None = None):
        tp = get_tp_size()
        self.num_heads = _divide(num_heads, tp, "num_attention_heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = _divide(num_kv_heads, tp, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = _divide(tp, num_kv_heads, "tensor_parallel over num_key_value_heads")
        v_head_dim = v_head_dim or head_dim
        sizes = [self.num_heads * head_dim * tp, self.num_kv_heads * head_dim * tp, self.num_kv_heads * v_head_dim * tp]
        super().__init__(hidden, sizes, bias=bias, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        idx = {"q": 0, "k": 1, "v": 2}[shard_id]
        start, size = self._shard_range(idx)
        rank = get_tp_rank() if idx == 0 else get_tp_rank() // self.kv_replicas
        param.data.narrow(0, start, size).copy_(loaded.narrow(0, rank * size, size))


class RowParallelLinear(nn.Module):
    """Input features split over TP ranks; partial outputs are summed with one all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32):
        super().__init__()
        self.in_per_rank = _divide(in_features, get_tp_size(), "input size")
        self.weight = _param(out_features, self.in_per_rank, dtype=dtype, loader=self.weight_loader)
        self.bias = _param(out_features, dtype=dtype, loader=default_weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(loaded.narrow(1, get_tp_rank() * self.in_per_rank, self.in_per_rank))

    @property
    def split(self) -> bool:
        """Whether the input features are split over several ranks (the output is all-reduced)."""
        return get_tp_size() > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tp_all_reduce(linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over TP ranks; each rank embeds its own vocab range."""

    def __init__(self, vocab: int, dim: int, dtype=torch.float32):
        super().__init__()
        tp = get_tp_size()
        self.per_rank = (vocab + tp - 1) // tp
        self.start = get_tp_rank() * self.per_rank
        self.vocab = vocab
        self.weight = _param(self.per_rank, dim, dtype=dtype, loader=self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        rows = loaded[self.start:self.start + self.per_rank]
        param.data.zero_()
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if get_tp_size() == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local < 0) | (local >= self.per_rank)
        y = F.embedding(local.clamp(0, self.per_rank - 1), self.weight)
        y = y.masked_fill(mask.unsqueeze(-1), 0)
        return tp_all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-split output projection; logits are gathered to full vocab on every rank."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = self.local_logits(h)
        if get_tp_size() > 1:
            logits = tp_all_gather_last_dim(logits)
        return logits[..., : self.vocab]

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over this rank's vocab slice (no collective)."""
        # several rows on CPU: ``W @ h.T`` (the weight streamed once, as in `linear`), then one C pass to
        # row-major float32, what the sampler's row-wise ops want. Measured, 32000 x 1024 bf16, cold
        # weights: 4.0 vs 11.2 ms at 64 rows (a batched GEMM over vocab slices, then a transposing
        # copy), 2.8 vs 4.5 at 16; 21 vs 22 ms at 320 rows (F.linear)
        M = h.shape[0]
        logits = None
        if h.device.type == "cpu" and h.dim() == 2 and 1 < M <= cpu_kernels.AMX_MAX_ROWS:
            logits = cpu_kernels.amx_linear(h, self.weight, out_float=True)
        if logits is None and h.device.type == "cpu" and h.dim() == 2 and M > 1:
            mp = padded_rows(M)
            hp = torch.cat([h, h.new_zeros(mp - M, h.shape[1])]) if mp != M else h
            logits = cpu_kernels.transpose_to_float(torch.mm(self.weight, hp.t())[:, :M])
        if logits is None:
            logits = linear(h, self.weight)
        return logits


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a vector of ``full`` dims of which this tensor-parallel rank holds slice
    ``index`` of ``local`` dims (OLMoE's q/k norm spans all heads, and the heads are split over
    the ranks). ``replicas`` ranks hold each slice (KV heads replicated past their count). The
    sum of squares is completed by one all-reduce (:meth:`apply_pair` does q and k in one)."""

    def __init__(self, full: int, local: int, index: int, replicas: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.full, self.local, self.index, self.replicas, self.eps = full, local, index, replicas, eps
        self.weight = nn.Parameter(torch.ones(local, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape != (self.full,):
            raise ValueError(f"norm weight {tuple(loaded.shape)} in the checkpoint, expected ({self.full},)")
        param.data.copy_(loaded.narrow(0, self.index * self.local, self.local))

    def _scale(self, x: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
        xf = x.float() * torch.rsqrt(sumsq / (self.replicas * self.full) + self.eps)
        return self.weight * xf.to(x.dtype)

    @staticmethod
    def apply_pair(qn: "ShardedRMSNorm", q: torch.Tensor, kn: "ShardedRMSNorm", k: torch.Tensor):
        sums = torch.stack([q.float().pow(2).sum(-1), k.float().pow(2).sum(-1)], dim=-1)  # [T, 2]
        sums = tp_all_reduce(sums)  # each slice counted ``replicas`` times: divided out in _scale
        return qn._scale(q, sums[:, :1]), kn._scale(k, sums[:, 1:])
