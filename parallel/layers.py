"""Linear layers that know their tensor-parallel shard and load their own weights.

Each parameter carries a ``weight_loader(param, loaded, shard_id=None)`` so the checkpoint
loader needs no parallel knowledge: it hands over the full tensor from the file and the layer
keeps its slice. The only collective here is the all-reduce of :class:`RowParallelLinear`
(and the gather of the vocab-parallel head). The GEMMs themselves are :func:`ops.linear`.

A projection or the LM head may hold its weight packed (int4 / int8, ``moe quantize
--all-linear``): :meth:`PackableWeight.pack` swaps ``weight`` for the format's tensors
(``qweight``, ``scales``, ``zeros``) before loading, each filled by the layer's own loader (every
packed tensor keeps the weight's rows on dim 0 and splits its columns as the weight's), and
:meth:`PackableWeight.post_load` turns them into the :class:`ops.PackedLinearWeight` that
``ops.linear`` / ``ops.lm_head_logits`` compute with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ops import PackedLinearWeight, linear, lm_head_logits

from .state import get_tp_rank, get_tp_size, tp_all_gather_last_dim, tp_all_reduce


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel ({d})")
    return n // d


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def _param(*shape: int, dtype: torch.dtype, loader, device=None) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)
    p.weight_loader = loader
    return p


class PackableWeight:
    """The packed-weight state of a layer whose ``weight`` is ``[N, K]`` (module docstring)."""

    weight_format = None  # the packed format once :meth:`pack` ran
    packed_names: tuple[str, ...] = ()

    def pack(self, fmt) -> None:
        """Hold ``weight`` as ``fmt``'s packed tensors (int4 / int8), loaded by the weight's loader."""
        w = self.weight
        try:
            specs = fmt.packed_specs(tuple(w.shape))
        except ValueError as e:
            raise ValueError(f"{type(self).__name__} weight {list(w.shape)}: {e}") from e
        loader = w.weight_loader
        del self.weight
        for name, spec in specs.items():
            setattr(self, name, _param(*spec.shape, dtype=spec.dtype, loader=loader, device=w.device))
        self.weight_format, self.packed_names = fmt, tuple(specs)

    def post_load(self) -> None:
        """After loading: the packed tensors become the layer's ``weight`` (a PackedLinearWeight)."""
        if self.weight_format is None:
            return
        packed = {n: getattr(self, n).data for n in self.packed_names}
        for n in self.packed_names:
            delattr(self, n)
        self.weight = PackedLinearWeight.from_packed(self.weight_format, packed)


class ReplicatedLinear(PackableWeight, nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype, loader=default_weight_loader)
        self.bias = _param(out_features, dtype=dtype, loader=default_weight_loader) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(PackableWeight, nn.Module):
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


class RowParallelLinear(PackableWeight, nn.Module):
    """Input features split over TP ranks; partial outputs are summed with one all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32):
        super().__init__()
        self.in_per_rank = _divide(in_features, get_tp_size(), "input size")
        self.weight = _param(out_features, self.in_per_rank, dtype=dtype, loader=self.weight_loader)
        self.bias = _param(out_features, dtype=dtype, loader=default_weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        n = param.shape[1]  # in_per_rank, or a packed tensor's columns for them (codes, groups)
        param.data.copy_(loaded.narrow(1, get_tp_rank() * n, n))

    def pack(self, fmt) -> None:
        if self.split and self.in_per_rank % fmt.group_size:
            raise ValueError(f"RowParallelLinear: {self.in_per_rank} input features per rank are not a whole "
                             f"number of {fmt.group_size}-column groups: choose a group size dividing them, "
                             f"or a smaller tensor_parallel")
        super().pack(fmt)

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


class ParallelLMHead(PackableWeight, VocabParallelEmbedding):
    """Vocab-split output projection; logits are gathered to full vocab on every rank."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = self.local_logits(h)
        if get_tp_size() > 1:
            logits = tp_all_gather_last_dim(logits)
        return logits[..., : self.vocab]

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over this rank's vocab slice (no collective): :func:`ops.lm_head_logits`."""
        return lm_head_logits(h, self.weight)


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
