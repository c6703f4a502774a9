"""Binding of ``amx.c``: bf16 GEMMs on AMX tiles (or, on CPUs with AVX512-BF16 but no AMX, the
same tile products on vdpbf16ps), weights read in place.

Batched decode, verify rows and short prompts (2-64 rows), and the SwiGLU experts (bf16 or packed;
with biases and gpt-oss's clamped SwiGLU through :class:`StackedExtras`) at any number of rows
(prompt chunks too: an expert's rows in chunks of 256, each 16-row weight block read once per chunk
and met by the chunk's packed tokens from cache): 16 weight rows are a tile; the tokens are packed
as the other operand. :func:`amx_moe` and :func:`amx_moe_packed` run a local MoE layer's dispatch,
experts and combine in one call (bf16 or packed experts), :func:`amx_experts` the experts over rows
grouped by expert, :func:`amx_linear` plain projections and the LM head, :func:`amx_heads` MLA's
per-head GEMMs. oneDNN's ``bmm``/``mm`` at decode sizes read the weights at 85-90% of the rate and
need the permutation, SwiGLU and combine as separate ops; at prompt-sized chunks (2048 tokens,
Mixtral shape) the experts kernel took 4x2048-token prompts from 1197-1740 to 1566-2015 tok/s in
paired runs against per-expert oneDNN GEMMs (the plain linear kernel at such sizes did not beat
``F.linear``: 430-530 vs 525-770 GFLOP/s, so projections keep oneDNN past 64 rows). Without AMX, on
AVX512-BF16 (Zen 4): 1.1-1.4x oneDNN's bf16 GEMMs at 2-256 rows on the Mixtral shape, and the fused
dispatch/SwiGLU/combine besides (Qwen3-MoE's 64-token prompt 1.43x, 32 requests 1.4x in the engine).
Where the CPU has neither (or Linux refuses the tile state) they return None.
:func:`swiglu_experts_reference` is the experts kernels' float32 reference.
"""
from __future__ import annotations

import ctypes
import threading

import torch
import torch.nn.functional as F

from .build import DTYPES, address, c_struct, declare, kernel_dtype, load
from .gemv import expert_extras, sigmoid_table
from .quant import packed_dims

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
declare({
    "moe_amx_init": [],
    "moe_amx_experts": [_ptr, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _ptr,
                        _int],
    "moe_amx_moe": [_ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr,
                    _ptr, _ptr, _ptr, _ptr, _ptr, _int],
    "moe_amx_moe_packed": [_ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _int, _ptr, _i64, _i64,
                           _ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _i64, _i64,
                           _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _int],
    "moe_amx_heads": [_ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _int, _ptr, _i64, _i64, _ptr, _int],
    "moe_amx_linear": [_ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _int, _ptr, _int],
})

StackedExtrasC = c_struct("StackedExtras", "b13 b2: ptr; sb13 sb2 act clamp: i64; alpha limit: f32; sig: ptr")


class StackedExtras:
    """What the experts kernels take for experts with biases (bf16 ``[E, 2F]`` / ``[E, D]``) and
    gpt-oss's clamped SwiGLU (``alpha``, ``limit``), checked once: ``ref`` the C struct's address (None
    for plain SwiGLU experts); ``ok`` False where they do not fit (then the kernels do not apply)."""

    def __init__(self, b13_e2F: torch.Tensor | None = None, b2_eD: torch.Tensor | None = None,
                 alpha: float | None = None, limit: float | None = None, E: int = 0, F: int = 0, D: int = 0):
        fields = expert_extras(b13_e2F, b2_eD, alpha, limit, E, F, D)
        self.ok, self.ref, self.c = fields is not None, None, None
        if fields is not None and (b13_e2F is not None or b2_eD is not None or alpha is not None):
            self.c = StackedExtrasC(*fields, address(sigmoid_table()) if alpha is not None else None)
            self.ref = address(self.c)
        self._keep = (b13_e2F, b2_eD)  # the pointers above stay valid while this lives


PLAIN = StackedExtras()  # plain SwiGLU experts
_tiles: int | None = None  # moe_amx_init: 0 AMX tiles granted, 1 the tile products on AVX512-BF16, -1 neither
AMX_MAX_ROWS = 64  # rows the linear and per-head kernels take (four blocks of 16 tokens)
AMX_CHUNK = 256  # the bf16 experts kernels take any rows, an expert's rows in chunks of this many


def _tile_kind() -> int:
    global _tiles
    if _tiles is None:
        lib = load()
        _tiles = lib.moe_amx_init() if lib is not None else -1
    return _tiles


def amx_available() -> bool:
    """Whether the tile kernels of this module run on this machine: the library built for AMX-BF16
    and Linux granting this process the tile state, or built for AVX512-BF16 without AMX (AMD Zen 4
    and later, Intel Cooper Lake), where vdpbf16ps does each tile product (same layouts, same
    kernels around them)."""
    return _tile_kind() >= 0


def amx_tiles() -> bool:
    """Whether the kernels run on real AMX tiles (:func:`amx_available` on an AMX CPU): what
    :mod:`.amx_attention` needs."""
    return _tile_kind() == 0


def _amx_swiglu_dims(x: torch.Tensor, w13_e2FD: torch.Tensor, w2_eDF: torch.Tensor) -> tuple[int, int, int] | None:
    """``(E, D, F)`` when the AMX expert kernels take these bf16 rows and stacked expert weights
    (dims multiples of 32, rows of unit stride within each expert), else None."""
    if x.dtype != torch.bfloat16 or x.dim() != 2 or w13_e2FD.dim() != 3 or not amx_available():
        return None
    if kernel_dtype(x, w13_e2FD, w2_eDF) is None:
        return None
    E, F2, D = w13_e2FD.shape
    F = F2 // 2
    if D % 32 or F % 32 or w2_eDF.shape != (E, D, F) or x.shape[1] != D:
        return None
    if w13_e2FD.stride(1) != D or w2_eDF.stride(1) != F:
        return None
    return E, D, F


def amx_experts(x_RD: torch.Tensor, counts: list[int], w13_e2FD: torch.Tensor, w2_eDF: torch.Tensor,
                extras: StackedExtras = PLAIN) -> torch.Tensor | None:
    """SwiGLU experts over rows grouped by expert (``counts[e]`` rows for expert ``e``, in order):
    ``W2_e @ (silu(g) * u)`` with ``[g | u] = W13_e @ x``, bf16, rounded as the op-by-op path
    (``bmm``, :func:`silu_mul`, ``bmm``) rounds, on AMX tiles; with ``extras``, the biases added to
    the rounded products (``bmm``, then ``+ b``, as transformers' gpt-oss adds them) and gpt-oss's
    clamped SwiGLU. None when the kernel does not apply (no AMX,
    other dtypes, a dim not a multiple of 32): then use the torch path."""
    dims = _amx_swiglu_dims(x_RD, w13_e2FD, w2_eDF)
    if dims is None or len(counts) != dims[0] or not extras.ok:
        return None
    E, D, F = dims
    R = x_RD.shape[0]
    y = torch.empty(R, D, dtype=torch.bfloat16)
    xp = _scratch("xp", sum((n + 15) // 16 for n in counts) * D * 16)
    ap = _scratch("ap", _ap_rows(E, R) * F)
    n = torch.tensor(counts, dtype=torch.int64)
    if load().moe_amx_experts(x_RD.data_ptr(), x_RD.stride(0), n.data_ptr(), E, D, F, w13_e2FD.data_ptr(),
                              w13_e2FD.stride(0), w2_eDF.data_ptr(), w2_eDF.stride(0), extras.ref, y.data_ptr(), D,
                              xp.data_ptr(), ap.data_ptr(), torch.get_num_threads()) != 0:
        return None
    return y


_local = threading.local()  # each thread's scratch of the experts kernels, kept between calls


def _scratch(name: str, numel: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``numel`` elements of this thread's scratch buffer ``name``, grown when a call needs more and kept
    between calls. A fresh buffer past glibc's 32 MiB mmap threshold (``moe.engine._reuse_freed_memory``)
    is fresh pages, faulted in at every layer: a 4096-token prompt step's packed tokens and per-row
    results on the Qwen3-MoE shape (16384 rows x 1024) are 34 MB each, ~2 GB of page faults a 16 x
    2048-token burst."""
    bufs = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = bufs[name] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _ap_rows(E: int, R: int) -> int:
    """Rows of activations the experts kernels keep: a chunk's for each thread (at least two), and
    those of every expert of 1-63 rows (run together), each rounded up to 16."""
    return max(2, torch.get_num_threads()) * AMX_CHUNK + min(R + 15 * E, 64 * E)


def _amx_moe_buffers(ids_TK: torch.Tensor, weights_TK: torch.Tensor, E: int, D: int, F: int,
                     K: int | None = None) -> tuple:
    """ids int64 and weights float32 (contiguous), then the output and the scratch the AMX MoE
    calls take for ``E`` experts and ``K`` rows a token (``ids_TK``'s columns unless given: a shared
    expert adds one of each): packed tokens, activations, each row's result (bf16, in expert
    order), the sort's rows; the scratch is this thread's (:func:`_scratch`), the output fresh."""
    T = ids_TK.shape[0]
    K = ids_TK.shape[1] if K is None else K
    return (ids_TK.to(torch.int64).contiguous(), weights_TK.to(torch.float32).contiguous(),
            torch.empty(T, D, dtype=torch.bfloat16), _scratch("xp", (T * K + 16 * E) * D),
            _scratch("ap", _ap_rows(E, T * K) * F), _scratch("ys", T * K * D),
            _scratch("rows", 3 * T * K, torch.int64))


def amx_moe(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, w13_e2FD: torch.Tensor,
            w2_eDF: torch.Tensor, extras: StackedExtras = PLAIN,
            shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
    """Dispatch, SwiGLU experts and combine of a local MoE layer in one call (bf16, AMX): token t
    through experts ``ids_TK[t]`` (ids index the stacked weights), summed with ``weights_TK[t]``
    as :class:`parallel.dispatch.LocalDispatcher` does (weights rounded to bf16, products rounded,
    float32 sum in ascending expert order rounded once); ``extras`` as :func:`amx_experts`. With
    ``shared`` (``(w13 [2F, D], w2 [D, F])`` of a plain SwiGLU shared expert, the routed experts' F,
    bf16 rows of unit stride): every token through it too, added to that sum as a bf16 tensor
    adds (:class:`moe.models.layers.SparseMoE` adds its shared expert so), its weights read in the
    same loops as the routed experts'. None when the kernel does not apply (as :func:`amx_experts`;
    or a shared expert of other dims, or with biases or another activation): then dispatch."""
    dims = _amx_swiglu_dims(x_TD, w13_e2FD, w2_eDF)
    T, K = ids_TK.shape
    if dims is None or weights_TK.shape != (T, K) or not extras.ok:
        return None
    E, D, F = dims
    sw13 = sw2 = None
    if shared is not None:
        sw13, sw2 = shared
        if (extras.ref is not None or sw13.shape != (2 * F, D) or sw2.shape != (D, F) or sw13.stride() != (D, 1)
                or sw2.stride() != (F, 1) or kernel_dtype(x_TD, sw13, sw2) is None):
            return None
    n = int(shared is not None)  # the shared expert: one more expert, one more row a token
    ids, wts, out, xp, ap, ys, rows = _amx_moe_buffers(ids_TK, weights_TK, E + n, D, F, K + n)
    rc = load().moe_amx_moe(x_TD.data_ptr(), x_TD.stride(0), T, ids.data_ptr(), wts.data_ptr(), K, E, D, F,
                            w13_e2FD.data_ptr(), w13_e2FD.stride(0), w2_eDF.data_ptr(), w2_eDF.stride(0),
                            None if sw13 is None else sw13.data_ptr(), None if sw2 is None else sw2.data_ptr(),
                            extras.ref, out.data_ptr(), xp.data_ptr(), ap.data_ptr(), ys.data_ptr(), rows.data_ptr(),
                            torch.get_num_threads())
    return out if rc == 0 else None


def amx_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, b_N: torch.Tensor | None = None,
               out_float: bool = False) -> torch.Tensor | None:
    """``x @ w.T (+ b)`` for 2-64 bf16 rows on AMX tiles, row-major ``[M, N]``: bf16 summed in
    float32 and rounded once (the bias added after, as ``mm`` then ``+ b``), or with
    ``out_float`` the rounded values as float32 (logits). None when the kernel does not apply (no
    AMX, other dtypes, ``K % 32`` or ``N % 16`` nonzero, more rows): then use torch's GEMM."""
    if x_MK.dtype != torch.bfloat16 or x_MK.dim() != 2 or w_NK.dim() != 2 or not amx_available():
        return None
    M, K = x_MK.shape
    N = w_NK.shape[0]
    if not 0 < M <= AMX_MAX_ROWS or K % 32 or N % 16 or w_NK.shape[1] != K:
        return None
    if kernel_dtype(x_MK, w_NK, *([] if b_N is None else [b_N])) is None:
        return None
    y = torch.empty(M, N, dtype=torch.float32 if out_float else torch.bfloat16)
    xp = torch.empty((M + 15) // 16 * K * 16, dtype=torch.bfloat16)
    if load().moe_amx_linear(x_MK.data_ptr(), x_MK.stride(0), M, w_NK.data_ptr(), w_NK.stride(0), N, K,
                             b_N.data_ptr() if b_N is not None else None, y.data_ptr(), N,
                             DTYPES[torch.float32 if out_float else torch.bfloat16], xp.data_ptr(),
                             torch.get_num_threads()) != 0:
        return None
    return y


def amx_heads(x_THK: torch.Tensor, w_H: torch.Tensor, w_rows_n: bool) -> torch.Tensor | None:
    """One GEMM per head for 1-64 bf16 rows (MLA's absorbed attention) on AMX tiles:
    ``y[t, h] = x[t, h] @ w_H[h].T`` for ``w_H [H, N, K]`` (``w_rows_n``) or ``x[t, h] @ w_H[h]``
    for ``w_H [H, K, N]``; ``[T, H, N]`` bf16, float32 sums rounded once as ``bmm``. Any strides
    over T, H and the weight's heads and rows (unit within a row). None when the kernel does not
    apply (then ``einsum``)."""
    if x_THK.dtype != torch.bfloat16 or x_THK.dim() != 3 or w_H.dim() != 3 or not amx_available():
        return None
    T, H, K = x_THK.shape
    N = w_H.shape[1] if w_rows_n else w_H.shape[2]
    if not 0 < T <= AMX_MAX_ROWS or K % 32 or N % 16 or w_H.shape[0] != H:
        return None
    if w_H.shape[2 if w_rows_n else 1] != K or kernel_dtype(x_THK, w_H) is None:
        return None
    y = torch.empty(T, H, N, dtype=torch.bfloat16)
    scratch = torch.empty(H * ((T + 15) // 16) * 16 * K, dtype=torch.bfloat16)
    if load().moe_amx_heads(x_THK.data_ptr(), x_THK.stride(0), x_THK.stride(1), T, w_H.data_ptr(), w_H.stride(1),
                            w_H.stride(0), N, K, H, int(w_rows_n), y.data_ptr(), y.stride(0), y.stride(1),
                            scratch.data_ptr(), torch.get_num_threads()) != 0:
        return None
    return y


def amx_moe_packed(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, fmt: int,
                   lut: torch.Tensor | None, gs: int, bn: int,
                   w13: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                   w2: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                   extras: StackedExtras = PLAIN) -> torch.Tensor | None:
    """:func:`amx_moe` on packed experts (``(codes, scales, offsets)`` stacked over experts as
    :func:`quant_moe_token` takes them): every 16-row weight block dequantized to bf16 into a
    buffer the AMX tiles read, so the packed bytes are what streams; any number of rows (an
    expert's rows in chunks of :data:`AMX_CHUNK`, each weight block dequantized once per chunk).
    Results equal dequantize -> GEMM -> combine up to the order of float32 sums; ``extras`` as
    :func:`amx_experts`. None when the kernel does not apply (no AMX, a dim not a multiple of 32)."""
    if (x_TD.dtype != torch.bfloat16 or x_TD.dim() != 2 or not amx_available() or x_TD.stride(-1) != 1
            or not extras.ok):
        return None
    (q13, s13, b13), (q2, s2, b2) = w13, w2
    dims = packed_dims(w13, w2, lut, gs, bn)
    T, K = ids_TK.shape
    if dims is None:
        return None
    E, D, F = dims
    if D % 32 or F % 32 or x_TD.shape[1] != D or weights_TK.shape != (T, K):
        return None
    ids, wts, out, xp, ap, ys, rows = _amx_moe_buffers(ids_TK, weights_TK, E, D, F)
    rc = load().moe_amx_moe_packed(
          x_TD.data_ptr(), x_TD.stride(0), T, ids.data_ptr(), wts.data_ptr(), K, E, D, F, fmt,
          lut.data_ptr() if lut is not None else None, gs, bn,
          q13.data_ptr(), q13.stride(0), q13.stride(1), s13.data_ptr(), b13.data_ptr() if b13 is not None else None,
          s13.stride(0), s13.shape[-1], q2.data_ptr(), q2.stride(0), q2.stride(1), s2.data_ptr(),
          b2.data_ptr() if b2 is not None else None, s2.stride(0), s2.shape[-1], extras.ref,
          out.data_ptr(), xp.data_ptr(), ap.data_ptr(), ys.data_ptr(), rows.data_ptr(), torch.get_num_threads())
    return out if rc == 0 else None


def swiglu_experts_reference(x_RD: torch.Tensor, counts: list[int], w13_e2FD: torch.Tensor,
                             w2_eDF: torch.Tensor) -> torch.Tensor:
    """What :func:`amx_experts` computes, in float32 with the op-by-op path's bf16 roundings (``h``,
    ``silu``, the product), the output unrounded: the bound both the kernel and ``bmm`` meet."""
    F_, out, s = w2_eDF.shape[2], [], 0
    for e, n in enumerate(counts):
        h = (x_RD[s:s + n].float() @ w13_e2FD[e].float().T).bfloat16().float()
        a = (F.silu(h[:, :F_]).bfloat16().float() * h[:, F_:]).bfloat16().float()
        out.append(a @ w2_eDF[e].float().T)
        s += n
    return torch.cat(out)
