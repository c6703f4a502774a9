"""CPU kernels in C, built on first use: where torch's op-by-op path leaves most of the time on the table.

- :func:`paged_decode_attention` (``paged_decode.c``): ``scaled_dot_product_attention`` called
  once per sequence costs ~90 µs for a decode row over a few hundred cached tokens — mostly
  per-call and tiny-GEMM overhead — and a 64-sequence decode step makes 64 such calls per layer.
  This kernel runs every decode row of the step in one call: each cached K/V row is read once, in
  place through the block table, with the GQA query heads of its KV head (and, when there are
  enough sequences, all heads of one token as one contiguous read). Results equal
  :mod:`kvcache.reference`.
- :func:`rope_`, :func:`silu_mul` and :func:`rms_norm` (``elementwise.c``): rotary embedding in
  place, SwiGLU's ``silu(gate) * up`` and RMSNorm of bf16 activations, one pass each instead of a
  chain of torch ops (the rotary chain alone was ~10 ops), with the roundings of the torch code
  they replace; :func:`transpose_to_float`: a GEMM's transposed logits to row-major float32.
- :func:`gemv` (``gemv.c``): bf16 matrix-vector product for one-row decode, the weight streamed by
  both threads in contiguous halves with AVX512-BF16 dot products; :func:`expert_token`: one token
  through its routed experts in one call.
- :func:`amx_moe`, :func:`amx_experts`, :func:`amx_linear`, :func:`amx_heads` (``amx.c``): the
  GEMMs of decode-sized steps (2-64 rows: batched decode, verify rows, short prompts) on AMX
  tiles, each weight read once and in place (16 weight rows are a tile; the few tokens are packed
  as the other operand): a local MoE layer's dispatch, experts and combine in one call; plain
  projections and the LM head; MLA's per-head GEMMs. oneDNN's ``bmm``/``mm`` at these shapes
  read the weights at 85-90% of the rate and need the permutation, SwiGLU and combine as separate
  ops. Where the CPU lacks AMX (or Linux refuses its tile state) they return None.

Every kernel has the torch path it replaces as its reference (tests/test_cpu_kernels.py) and the
callers fall back to that path when :func:`load` returns None.

The library is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``) for this CPU
(``-march=native``, AVX-512 and AMX paths where present) into ``$MOE_KERNEL_CACHE`` (default
``~/.cache/moe/kernels``), keyed by the sources, flags and OpenMP runtime, and linked against the
OpenMP runtime torch has loaded so both share one thread pool (two runtimes would fight over the
cores). Without a compiler the torch paths are used (one warning says so); ``MOE_CPU_KERNELS=0``
turns the kernels off.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_DIR = Path(__file__).parent
_SOURCES = [_DIR / "paged_decode.c", _DIR / "elementwise.c", _DIR / "gemv.c", _DIR / "amx.c", _DIR / "fused.c",
            _DIR / "quant.c"]
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _openmp_runtime() -> str | None:
    """Path of the OpenMP runtime loaded into this process (torch's), if any."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        name = os.path.basename(path)
        if name.startswith(("libgomp", "libiomp5", "libomp")) and ".so" in name:
            return path
    return None


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc)")
    omp = _openmp_runtime()
    flags = _FLAGS + (["-fopenmp"] if omp else [])
    blob = b"".join(p.read_bytes() for p in [*_SOURCES, _DIR / "simd.h", _DIR / "kernels.h"])
    key = hashlib.sha256(blob + " ".join([cc, *flags, omp or ""]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MOE_KERNEL_CACHE", Path.home() / ".cache" / "moe" / "kernels"))
    lib_path = cache / f"moe_cpu-{key}.so"
    if not lib_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            objs = [Path(tmp) / f"{src.stem}.o" for src in _SOURCES]
            out = Path(tmp) / "k.so"
            # compile with -fopenmp, but link the runtime torch uses (not the compiler's own copy)
            cmds = [[cc, *[f for f in flags if f != "-shared"], "-c", str(src), "-o", str(obj)]
                    for src, obj in zip(_SOURCES, objs)]
            cmds.append([cc, "-shared", *map(str, objs), "-o", str(out)]
                        + ([omp, f"-Wl,-rpath,{os.path.dirname(omp)}"] if omp else []))
            for cmd in cmds:
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr.strip()}")
            os.replace(out, lib_path)  # atomic: ranks building at once each publish a whole file
    lib = ctypes.CDLL(str(lib_path))
    f = lib.moe_paged_decode
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    f.argtypes = [ptr, ptr, ptr, ptr, ctypes.c_int, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64,
                  i64, ptr, i64, ptr, ptr, i64, ptr, ctypes.c_float, ctypes.c_int]
    f.restype = ctypes.c_int
    lib.moe_rope.argtypes = [ptr, ctypes.c_int, i64, i64, i64, i64, i64, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int]
    lib.moe_rope.restype = ctypes.c_int
    lib.moe_silu_mul.argtypes = [ptr, ptr, ptr, ctypes.c_int, i64, i64, i64, i64, i64, i64, i64, i64, i64, ctypes.c_int]
    lib.moe_silu_mul.restype = ctypes.c_int
    lib.moe_rms_norm.argtypes = [ptr, ptr, ptr, ctypes.c_int, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int]
    lib.moe_rms_norm.restype = ctypes.c_int
    lib.moe_add_rms_norm.argtypes = [ptr, ptr, ptr, ptr, ptr, ctypes.c_int, i64, i64, ctypes.c_float, ctypes.c_int]
    lib.moe_add_rms_norm.restype = ctypes.c_int
    lib.moe_write_rows.argtypes = [ptr, ptr, ctypes.c_int, i64, i64, i64, i64, i64, i64, ptr, i64, i64, ctypes.c_int]
    lib.moe_write_rows.restype = ctypes.c_int
    lib.moe_transpose_to_f32.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, ctypes.c_int]
    lib.moe_transpose_to_f32.restype = ctypes.c_int
    lib.moe_gemv_bf16.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.moe_gemv_bf16.restype = ctypes.c_int
    lib.moe_expert_token.argtypes = [ptr, i64, i64, ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.moe_expert_token.restype = ctypes.c_int
    lib.moe_route_select.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int, ctypes.c_float,
                                     ctypes.c_float, ptr, ptr, ptr]
    lib.moe_route_select.restype = ctypes.c_int
    lib.moe_amx_init.argtypes = []
    lib.moe_amx_init.restype = ctypes.c_int
    lib.moe_amx_experts.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ctypes.c_int]
    lib.moe_amx_experts.restype = ctypes.c_int
    lib.moe_amx_moe.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr,
                                ctypes.c_int]
    lib.moe_amx_moe.restype = ctypes.c_int
    lib.moe_amx_moe_packed.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ptr, i64, i64,
                                       ptr, i64, i64, ptr, ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, i64,
                                       ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.moe_amx_moe_packed.restype = ctypes.c_int
    lib.moe_amx_heads.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, i64, i64, i64, ctypes.c_int, ptr, i64, i64, ptr,
                                  ctypes.c_int]
    lib.moe_amx_heads.restype = ctypes.c_int
    lib.moe_amx_linear.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, ptr, i64, ctypes.c_int, ptr, ctypes.c_int]
    lib.moe_amx_linear.restype = ctypes.c_int
    lib.moe_heads_vec.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, i64, ctypes.c_int, ptr, i64, ctypes.c_int]
    lib.moe_heads_vec.restype = ctypes.c_int
    f32 = ctypes.c_float
    lib.moe_mla_token.argtypes = [ptr, i64, ptr, ptr, i64, f32, ptr, ptr, ptr, f32, ptr, ptr, i64, i64, i64, i64, i64,
                                  ptr, ptr, ptr, ctypes.c_int, ptr, i64, i64, i64, ptr, ctypes.c_int32, ptr, f32, ptr,
                                  ptr, ptr, ptr, f32, ptr, ctypes.c_int]
    lib.moe_mla_token.restype = ctypes.c_int
    lib.moe_gqa_token.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, ptr, f32, ptr, ptr, ptr,
                                  ctypes.c_int, ptr, i64, i64, i64, ptr, i64, i64, i64, i64, ptr, ctypes.c_int32, ptr,
                                  i64, ptr, f32, ptr, ptr, ptr, ptr, ptr, ptr, f32, ptr, ctypes.c_int]
    lib.moe_gqa_token.restype = ctypes.c_int
    lib.moe_moe_token.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, ptr,
                                  ptr, ptr, f32, ptr, ctypes.c_int]
    lib.moe_moe_token.restype = ctypes.c_int
    lib.moe_q8_gemm.argtypes = [ptr, i64, i64, ptr, i64, ctypes.c_int, ptr, ptr, i64, i64, i64, i64, ptr, ctypes.c_int,
                                ctypes.c_int]
    lib.moe_q8_gemm.restype = ctypes.c_int
    lib.moe_q8_dequant.argtypes = [ptr, i64, ctypes.c_int, ptr, ptr, i64, i64, i64, i64, i64, ptr, ctypes.c_int,
                                   ctypes.c_int]
    lib.moe_q8_dequant.restype = ctypes.c_int
    lib.moe_q4_gemm.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, ptr, ctypes.c_int, ctypes.c_int]
    lib.moe_q4_gemm.restype = ctypes.c_int
    lib.moe_q4_dequant.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, ptr, ctypes.c_int, ctypes.c_int]
    lib.moe_q4_dequant.restype = ctypes.c_int
    lib.moe_qx_moe_token.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, ptr,
                                     i64, i64, ptr, i64, ptr, ptr, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, f32,
                                     ptr, ctypes.c_int]
    lib.moe_qx_moe_token.restype = ctypes.c_int
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it is turned off or cannot be built (warned once)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("MOE_CPU_KERNELS", "1") != "0":
                try:
                    _lib = _build()
                except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
                    log.warning("CPU kernels unavailable, using torch's ops instead (decode attention as one SDPA "
                                "call per sequence: slower at large batches): %s. Install a C compiler (gcc) to "
                                "enable them, or set MOE_CPU_KERNELS=0 to silence this.", e)
            _tried = True
    return _lib


def supports_decode(q: torch.Tensor, k_cache: object, v_cache: object) -> bool:
    """Whether the kernel handles these tensors: CPU, float32 or bfloat16 throughout (not fp8),
    rows with unit stride."""
    return (isinstance(k_cache, torch.Tensor) and isinstance(v_cache, torch.Tensor)
            and _kernel_dtype(q, k_cache, v_cache) is not None)


def paged_decode_attention(q_THD: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, sinks_H: torch.Tensor | None = None,
                           query_start: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a few newest rows per sequence over its cache. Sequence ``b`` attends with
    query rows ``query_start[b] .. query_start[b+1]-1`` (default: row ``b`` alone) to the
    ``context_lens[b]`` tokens cached in ``block_tables[b]`` (its rows' own included), causally:
    of ``Q`` rows, row ``i`` sees the first ``context_lens[b] - (Q - 1 - i)`` tokens. Returns
    ``[T, H, Dv]`` in q's dtype. Check :func:`supports_decode` first."""
    lib = load()
    assert lib is not None, "check cpu_kernels.supports_decode() first"
    T, H, Dk = q_THD.shape
    B = block_tables.shape[0]
    Hkv, Dv = k_cache.shape[2], v_cache.shape[-1]
    if H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} KV heads")
    qs = None
    if query_start is not None:
        qs = query_start.to(torch.int32).contiguous()
        if qs.shape[0] != B + 1 or int(qs[-1]) != T:
            raise ValueError(f"query_start must hold {B + 1} offsets ending at {T} rows, got {qs.tolist()}")
    elif T != B:
        raise ValueError(f"{T} query rows for {B} sequences: pass query_start")
    q = q_THD.contiguous()
    bt = block_tables.to(torch.int32).contiguous()
    cl = context_lens.to(torch.int32).contiguous()
    sinks = sinks_H.float().contiguous() if sinks_H is not None else None
    out = torch.empty(T, H, Dv, dtype=q.dtype)
    if B == 0:
        return out
    lib.moe_paged_decode(q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _DTYPES[q.dtype],
                         B, H, Hkv, Dk, Dv, *k_cache.stride()[:3], *v_cache.stride()[:3], k_cache.shape[1],
                         bt.data_ptr(), bt.shape[1], cl.data_ptr(), qs.data_ptr() if qs is not None else None,
                         sliding_window or 0, sinks.data_ptr() if sinks is not None else None, scale,
                         torch.get_num_threads())
    return out


def set_malloc_thresholds(mmap_threshold: int, trim_threshold: int | None = None) -> None:
    """Set glibc's mmap threshold (and heap-top trim threshold) for this process: which freed
    blocks go back to the OS and which stay for reuse. Nothing happens off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        if trim_threshold is not None:
            libc.mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _kernel_dtype(*ts: torch.Tensor) -> int | None:
    """The kernels' dtype code when every tensor is a CPU float32/bfloat16 tensor of one dtype and
    the library is built, else None (the caller takes its torch path)."""
    d = ts[0].dtype
    if d not in _DTYPES or any(t.is_cuda or t.dtype != d or t.stride(-1) != 1 for t in ts) or load() is None:
        return None
    return _DTYPES[d]


def rope_(x_THD: torch.Tensor, positions_T: torch.Tensor, cos_PH: torch.Tensor, sin_PH: torch.Tensor,
          interleaved: bool) -> bool:
    """Rotate ``x_THD`` in place (any strides over T and H, unit stride within a head) by the
    float32 tables ``cos/sin [max_pos, D/2]`` at ``positions_T``. Returns False, leaving ``x``
    untouched, when the kernel does not apply (then use the torch path)."""
    dtype = _kernel_dtype(x_THD)
    if dtype is None or x_THD.dim() != 3 or x_THD.shape[-1] % 2 or cos_PH.dtype != torch.float32:
        return False
    T, H, D = x_THD.shape
    pos = positions_T.to(torch.int64).contiguous()
    cos_PH, sin_PH = cos_PH.contiguous(), sin_PH.contiguous()
    _lib.moe_rope(x_THD.data_ptr(), dtype, T, H, D, x_THD.stride(0), x_THD.stride(1), pos.data_ptr(),
                  cos_PH.data_ptr(), sin_PH.data_ptr(), int(interleaved), torch.get_num_threads())
    return True


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``F.silu(gate) * up`` for 2-D or 3-D tensors of one shape (unit stride over the last dim),
    as a new contiguous tensor; None when the kernel does not apply (then use the torch path)."""
    dtype = _kernel_dtype(gate, up)
    if dtype is None or gate.shape != up.shape or gate.dim() not in (2, 3):
        return None
    g, u = (gate, up) if gate.dim() == 3 else (gate.unsqueeze(0), up.unsqueeze(0))
    out = torch.empty(g.shape, dtype=gate.dtype)
    o = out
    A, B, C = g.shape
    if g.stride(1) == u.stride(1) == C:  # [B, C] slabs contiguous: long rows (C may be tiny), 64 per slab
        rows = 64 if (B * C) % 64 == 0 and B * C >= 64 * 256 else 1  # (work for every thread)
        g, u, o = (t.view(A, rows, B * C // rows) for t in (g, u, out))
    _lib.moe_silu_mul(g.data_ptr(), u.data_ptr(), o.data_ptr(), dtype, *o.shape, g.stride(0), g.stride(1),
                      u.stride(0), u.stride(1), o.stride(0), o.stride(1), torch.get_num_threads())
    return out.view(gate.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor | None:
    """RMSNorm over the last dim of a bfloat16 ``x`` (rows of any stride, unit stride within a
    row) the way the reference implementations treat low-precision activations:
    ``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)``. None when the kernel does not
    apply (float32 keeps torch's fused ``rms_norm``)."""
    if x.dtype != torch.bfloat16:
        return None
    dtype = _kernel_dtype(x, *([] if weight is None else [weight]))
    if dtype is None or x.dim() < 2:
        return None
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x  # a view when rows are evenly strided
    if x2.dim() != 2 or x2.stride(-1) != 1:
        return None
    out = torch.empty(x2.shape, dtype=x.dtype)
    w = weight.contiguous() if weight is not None else None
    _lib.moe_rms_norm(x2.data_ptr(), w.data_ptr() if w is not None else None, out.data_ptr(), dtype, x2.shape[0],
                      x2.shape[1], x2.stride(0), out.stride(0), eps, torch.get_num_threads())
    return out.view(x.shape)


def add_rms_norm(h: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``h + d`` (a residual add, rounded as torch's add) and :func:`rms_norm` of the sum, in one
    pass: ``(sum, normed)`` for contiguous bfloat16 ``[R, D]`` tensors, or None when the kernel does
    not apply (then add and norm with torch)."""
    if h.dtype != torch.bfloat16 or h.dim() != 2 or d.shape != h.shape or not (h.is_contiguous() and d.is_contiguous()):
        return None
    if _kernel_dtype(h, d, weight) is None or not weight.is_contiguous() or weight.shape != (h.shape[1],):
        return None
    s, out = torch.empty_like(h), torch.empty_like(h)
    _lib.moe_add_rms_norm(h.data_ptr(), d.data_ptr(), weight.data_ptr(), s.data_ptr(), out.data_ptr(), _DTYPES[h.dtype],
                          h.shape[0], h.shape[1], eps, torch.get_num_threads())
    return s, out


def write_rows(cache: torch.Tensor, x_THD: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """``cache.view(slots, H, D)[slot_mapping] = x_THD`` for a plain CPU cache ``[blocks,
    block_size, H, D]`` (unit stride within a head) and ``x`` of the cache's dtype with any
    strides. False, writing nothing, when the kernel does not apply (then use ``index_copy_``)."""
    if x_THD.dim() != 3 or x_THD.shape[1:] != cache.shape[2:] or cache.stride(0) != cache.shape[1] * cache.stride(1):
        return False
    dtype = _kernel_dtype(cache, x_THD) if x_THD.stride(-1) == 1 else _kernel_dtype(cache)
    if dtype is None or x_THD.dtype != cache.dtype:
        return False
    slots = slot_mapping.to(torch.int64).contiguous()
    T, H, D = x_THD.shape
    _lib.moe_write_rows(x_THD.data_ptr(), cache.data_ptr(), dtype, T, H, D, *x_THD.stride(), slots.data_ptr(),
                        cache.stride(1), cache.stride(2), torch.get_num_threads())
    return True


def transpose_to_float(x_NM: torch.Tensor) -> torch.Tensor | None:
    """``x_NM.t().float().contiguous()`` in one pass for a 2-D CPU float32/bfloat16 tensor with unit
    stride over its columns (a GEMM's ``W @ h.T`` output); None when the kernel does not apply."""
    if x_NM.dim() != 2 or _kernel_dtype(x_NM) is None:
        return None
    N, M = x_NM.shape
    out = torch.empty(M, N, dtype=torch.float32)
    _lib.moe_transpose_to_f32(x_NM.data_ptr(), _DTYPES[x_NM.dtype], N, M, x_NM.stride(0), out.data_ptr(),
                              torch.get_num_threads())
    return out


def route_select(scores_TE: torch.Tensor, top_k: int, bias_E: torch.Tensor | None = None, num_groups: int = 1,
                 topk_groups: int = 1, group_top2: bool = True, renormalize: bool = False, eps: float = 0.0,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """:func:`routing.route` after the scoring, in one pass over float32 ``scores [T, E]``:
    selection = scores (+ bias), group-limited when ``num_groups`` > 1, the ``top_k`` best in
    descending order, their unbiased scores renormalized (``w / (sum + eps)``) and scaled.
    Returns ``(weights [T, K] float32, ids [T, K] int64, tied)``: ``tied`` is None, or the indices
    of the tokens whose choice hangs on equal values (or NaN), left for the caller to route with
    torch (whose sort decides ties its own way); None when the kernel does not apply."""
    if scores_TE.dtype != torch.float32 or scores_TE.dim() != 2 or scores_TE.is_cuda or load() is None:
        return None
    T, E = scores_TE.shape
    if E % num_groups or not 1 <= top_k <= E or not 1 <= topk_groups <= num_groups:
        return None
    s = scores_TE.contiguous()
    b = bias_E.float().contiguous() if bias_E is not None else None
    w = torch.empty(T, top_k, dtype=torch.float32)
    ids = torch.empty(T, top_k, dtype=torch.int64)
    ties = torch.empty(T, dtype=torch.uint8)
    n = _lib.moe_route_select(s.data_ptr(), b.data_ptr() if b is not None else None, T, E, top_k, num_groups,
                              topk_groups, int(group_top2), int(renormalize), eps, scale, w.data_ptr(), ids.data_ptr(),
                              ties.data_ptr())
    return w, ids, (ties.nonzero().flatten() if n else None)


_gemv_built = True  # False once the library says it was built without AVX512-BF16


def gemv(w_NK: torch.Tensor, x_K: torch.Tensor, b_N: torch.Tensor | None = None) -> torch.Tensor | None:
    """``torch.mv(w, x) (+ b)`` for bfloat16 CPU tensors (rows of ``w`` with unit stride), summed
    in float32 and rounded once, as torch's mv; None when the kernel does not apply (other dtypes,
    no AVX512-BF16): then use ``torch.mv``."""
    global _gemv_built
    if not _gemv_built or w_NK.dtype != torch.bfloat16 or w_NK.dim() != 2 or x_K.dim() != 1:
        return None
    if _kernel_dtype(w_NK, x_K, *([] if b_N is None else [b_N])) is None or x_K.shape[0] != w_NK.shape[1]:
        return None
    N, K = w_NK.shape  # x and b have unit stride (checked): no copies
    y = torch.empty(N, dtype=torch.bfloat16)
    if _lib.moe_gemv_bf16(w_NK.data_ptr(), N, K, w_NK.stride(0), x_K.data_ptr(), b_N.data_ptr() if b_N is not None else None,
                          y.data_ptr(), torch.get_num_threads()) != 0:
        _gemv_built = False
        return None
    return y


def expert_token(x_D: torch.Tensor, w13s: list[torch.Tensor], w2s: list[torch.Tensor],
                 weights: list[float]) -> torch.Tensor | None:
    """``sum_i weights[i] * (w2s[i] @ (silu(g) * u))`` with ``[g | u] = w13s[i] @ x`` for one bf16
    token, rounded step by step as :meth:`experts.GroupedExperts.forward_token` does op by op
    (bit-identical to it with :func:`gemv`); None when the kernel does not apply."""
    global _gemv_built
    if not _gemv_built or x_D.dtype != torch.bfloat16 or _kernel_dtype(x_D, *w13s, *w2s) is None:
        return None
    if any(not w.is_contiguous() for w in (*w13s, *w2s)):
        return None
    n, D, F = len(w13s), x_D.shape[0], w2s[0].shape[1]
    out = torch.empty(D, dtype=torch.bfloat16)
    h = torch.empty(3 * F, dtype=torch.bfloat16)
    acc = torch.empty(D, dtype=torch.float32)
    ptrs = ctypes.c_void_p * n
    if _lib.moe_expert_token(x_D.data_ptr(), D, F, n, ptrs(*[w.data_ptr() for w in w13s]),
                             ptrs(*[w.data_ptr() for w in w2s]), (ctypes.c_float * n)(*weights), out.data_ptr(),
                             h.data_ptr(), acc.data_ptr(), torch.get_num_threads()) != 0:
        _gemv_built = False
        return None
    return out


def moe_token(x_1D: torch.Tensor, ids_K: torch.Tensor, weights_K: torch.Tensor, w13_e2FD: torch.Tensor,
              w2_eDF: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor] | None = None,
              residual: Residual | None = None):
    """One bf16 token through experts ``ids_K`` of the stacked weights, summed with ``weights_K`` as
    :meth:`experts.GroupedExperts.forward_token` does (ascending ids, weights rounded to bf16), plus
    the output of a ``shared`` SwiGLU expert ``(w13 [2Fs, D], w2 [D, Fs])`` added in bf16; one call
    (:func:`expert_token`'s kernel). ``[1, D]`` (with ``residual``: ``(h + y, norm(h + y))``, see
    :func:`_residual_args`), or None when the kernel does not apply."""
    global _gemv_built
    if not _gemv_built or x_1D.dtype != torch.bfloat16 or x_1D.dim() != 2 or x_1D.shape[0] != 1:
        return None
    ws = [x_1D, w13_e2FD, w2_eDF]
    if _kernel_dtype(*ws) is None or any(not w.is_contiguous() for w in ws) or w13_e2FD.dim() != 3:
        return None
    E, F2, D = w13_e2FD.shape
    F = F2 // 2
    args = _moe_token_args(ids_K, weights_K, D, shared, residual)
    if w2_eDF.shape != (E, D, F) or x_1D.shape[1] != D or args is None:
        return None
    ids, wts, Fs, sh, tail = args
    out = torch.empty(1, D, dtype=torch.bfloat16)
    h = torch.empty(3 * max(F, Fs) + D, dtype=torch.bfloat16)
    acc = torch.empty(D, dtype=torch.float32)
    rc = _lib.moe_moe_token(x_1D.data_ptr(), D, F, ids.shape[0], ids.data_ptr(), wts.data_ptr(), E, w13_e2FD.data_ptr(),
                            w13_e2FD.stride(0), w2_eDF.data_ptr(), w2_eDF.stride(0), *sh, Fs,
                            out.data_ptr(), h.data_ptr(), acc.data_ptr(), *tail[0], torch.get_num_threads())
    if rc == -1:
        _gemv_built = False
    if rc != 0:
        return None
    return (tail[1], out) if residual is not None else out


Residual = tuple[torch.Tensor, torch.Tensor, float]  # (h [1, D], norm weight [D], eps): see _residual_args


def _residual_args(residual: Residual | None, D: int) -> tuple[list, torch.Tensor | None] | None:
    """The C calls' residual tail: with ``(h, w, eps)`` they also return ``h + out`` and write
    ``rms_norm(h + out, w, eps)`` over ``out`` (the decoder's add and next norm, bit-identical).
    ``([resid, nw, eps, h_out], h_out)``, ``([None] * 4, None)`` without one, or None when it does
    not fit (then the caller takes its op-by-op path)."""
    if residual is None:
        return [None, None, 0.0, None], None
    h, w, eps = residual
    if (h.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or h.shape != (1, D) or w.shape != (D,)
            or not h.is_contiguous() or not w.is_contiguous() or h.is_cuda or w.is_cuda):
        return None
    h_out = torch.empty(1, D, dtype=torch.bfloat16)
    return [h.data_ptr(), w.data_ptr(), eps, h_out.data_ptr()], h_out


def _moe_token_args(ids_K: torch.Tensor, weights_K: torch.Tensor, D: int,
                    shared: tuple[torch.Tensor, torch.Tensor] | None, residual: Residual | None) -> tuple | None:
    """What both one-token MoE calls take besides the experts: ``(ids int64, weights float32, the
    shared expert's width, its two pointers, the residual tail)``, or None when one does not fit."""
    if ids_K.dim() != 1 or not 0 < ids_K.shape[0] <= 64:
        return None
    Fs, sh = 0, [None, None]
    if shared is not None:
        Fs = shared[1].shape[1]
        if (_kernel_dtype(*shared) is None or any(not t.is_contiguous() for t in shared)
                or shared[0].shape != (2 * Fs, D) or shared[1].shape != (D, Fs)):
            return None
        sh = [shared[0].data_ptr(), shared[1].data_ptr()]
    tail = _residual_args(residual, D)
    if tail is None:
        return None
    return ids_K.to(torch.int64).contiguous(), weights_K.to(torch.float32).contiguous(), Fs, sh, tail


_amx: bool | None = None  # whether the AMX kernels run here (built for AMX, tile state granted)
AMX_MAX_ROWS = 64  # rows the AMX kernels take per expert or GEMM (four blocks of 16 tokens)


def amx_available() -> bool:
    """Whether :func:`amx_experts` runs on this machine: the library built for AMX-BF16 and Linux
    granting this process the tile state."""
    global _amx
    if _amx is None:
        _amx = load() is not None and _lib.moe_amx_init() == 0
    return _amx


def _amx_swiglu_dims(x: torch.Tensor, w13_e2FD: torch.Tensor, w2_eDF: torch.Tensor) -> tuple[int, int, int] | None:
    """``(E, D, F)`` when the AMX expert kernels take these bf16 rows and stacked expert weights
    (dims multiples of 32, rows of unit stride within each expert), else None."""
    if x.dtype != torch.bfloat16 or x.dim() != 2 or w13_e2FD.dim() != 3 or not amx_available():
        return None
    if _kernel_dtype(x, w13_e2FD, w2_eDF) is None:
        return None
    E, F2, D = w13_e2FD.shape
    F = F2 // 2
    if D % 32 or F % 32 or w2_eDF.shape != (E, D, F) or x.shape[1] != D:
        return None
    if w13_e2FD.stride(1) != D or w2_eDF.stride(1) != F:
        return None
    return E, D, F


def amx_experts(x_RD: torch.Tensor, counts: list[int], w13_e2FD: torch.Tensor, w2_eDF: torch.Tensor) -> torch.Tensor | None:
    """SwiGLU experts over rows grouped by expert (``counts[e]`` rows for expert ``e``, in order):
    ``W2_e @ (silu(g) * u)`` with ``[g | u] = W13_e @ x``, bf16, rounded as the op-by-op path
    (``bmm``, :func:`silu_mul`, ``bmm``) rounds, on AMX tiles. None when the kernel does not apply
    (no AMX, other dtypes, a dim not a multiple of 32, an expert with more than
    :data:`AMX_MAX_ROWS` rows): then use the torch path."""
    dims = _amx_swiglu_dims(x_RD, w13_e2FD, w2_eDF)
    if dims is None or len(counts) != dims[0] or max(counts, default=0) > AMX_MAX_ROWS:
        return None
    E, D, F = dims
    R = x_RD.shape[0]
    y = torch.empty(R, D, dtype=torch.bfloat16)
    xp = torch.empty(sum((n + 15) // 16 for n in counts) * D * 16, dtype=torch.bfloat16)
    ap = torch.empty(2 * 4 * F * 16, dtype=torch.bfloat16)
    n = torch.tensor(counts, dtype=torch.int64)
    if _lib.moe_amx_experts(x_RD.data_ptr(), x_RD.stride(0), n.data_ptr(), E, D, F, w13_e2FD.data_ptr(),
                            w13_e2FD.stride(0), w2_eDF.data_ptr(), w2_eDF.stride(0), y.data_ptr(), D, xp.data_ptr(),
                            ap.data_ptr(), torch.get_num_threads()) != 0:
        return None
    return y


def _amx_moe_buffers(ids_TK: torch.Tensor, weights_TK: torch.Tensor, E: int, D: int, F: int) -> tuple:
    """ids int64 and weights float32 (contiguous), then the output and the scratch the AMX MoE
    calls take: packed tokens, activations, float32 sums, the sort's rows."""
    T, K = ids_TK.shape
    return (ids_TK.to(torch.int64).contiguous(), weights_TK.to(torch.float32).contiguous(),
            torch.empty(T, D, dtype=torch.bfloat16), torch.empty((T * K + 16 * E) * D, dtype=torch.bfloat16),
            torch.empty(2 * 4 * F * 16, dtype=torch.bfloat16), torch.empty(T * D, dtype=torch.float32),
            torch.empty(2 * T * K, dtype=torch.int64))


def amx_moe(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, w13_e2FD: torch.Tensor,
            w2_eDF: torch.Tensor) -> torch.Tensor | None:
    """Dispatch, SwiGLU experts and combine of a local MoE layer in one call (bf16, AMX): token t
    through experts ``ids_TK[t]`` (ids index the stacked weights), summed with ``weights_TK[t]``
    as :class:`parallel.dispatch.LocalDispatcher` does (weights rounded to bf16, products rounded,
    float32 sum in ascending expert order rounded once). None when the kernel does not apply (as
    :func:`amx_experts`, or an expert given more than :data:`AMX_MAX_ROWS` rows): then dispatch."""
    dims = _amx_swiglu_dims(x_TD, w13_e2FD, w2_eDF)
    T, K = ids_TK.shape
    if dims is None or weights_TK.shape != (T, K) or T * K > dims[0] * AMX_MAX_ROWS:  # (prefill: surely too many)
        return None
    E, D, F = dims
    ids, wts, out, xp, ap, acc, rows = _amx_moe_buffers(ids_TK, weights_TK, E, D, F)
    rc = _lib.moe_amx_moe(x_TD.data_ptr(), x_TD.stride(0), T, ids.data_ptr(), wts.data_ptr(), K, E, D, F,
                          w13_e2FD.data_ptr(), w13_e2FD.stride(0), w2_eDF.data_ptr(), w2_eDF.stride(0), out.data_ptr(),
                          xp.data_ptr(), ap.data_ptr(), acc.data_ptr(), rows.data_ptr(), torch.get_num_threads())
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
    if _kernel_dtype(x_MK, w_NK, *([] if b_N is None else [b_N])) is None:
        return None
    y = torch.empty(M, N, dtype=torch.float32 if out_float else torch.bfloat16)
    xp = torch.empty((M + 15) // 16 * K * 16, dtype=torch.bfloat16)
    if _lib.moe_amx_linear(x_MK.data_ptr(), x_MK.stride(0), M, w_NK.data_ptr(), w_NK.stride(0), N, K,
                           b_N.data_ptr() if b_N is not None else None, y.data_ptr(), N,
                           _DTYPES[torch.float32 if out_float else torch.bfloat16], xp.data_ptr(),
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
    if w_H.shape[2 if w_rows_n else 1] != K or _kernel_dtype(x_THK, w_H) is None:
        return None
    y = torch.empty(T, H, N, dtype=torch.bfloat16)
    scratch = torch.empty(H * ((T + 15) // 16) * 16 * K, dtype=torch.bfloat16)
    if _lib.moe_amx_heads(x_THK.data_ptr(), x_THK.stride(0), x_THK.stride(1), T, w_H.data_ptr(), w_H.stride(1),
                          w_H.stride(0), N, K, H, int(w_rows_n), y.data_ptr(), y.stride(0), y.stride(1),
                          scratch.data_ptr(), torch.get_num_threads()) != 0:
        return None
    return y


def heads_vec(x_1HK: torch.Tensor, w_H: torch.Tensor, w_rows_n: bool) -> torch.Tensor | None:
    """:func:`amx_heads` for one row (batch-1 decode) as a GEMV per head with AVX512-BF16: ``[1, H, N]``
    bf16, float32 sums rounded once (their order is not ``bmm``'s: results may differ by one bf16
    ulp). ``w_H [H, K, N]`` (not ``w_rows_n``) needs ``N % 16 == 0``. None when the kernel does not
    apply (then :func:`amx_heads` or ``einsum``)."""
    global _gemv_built
    if not _gemv_built or x_1HK.dtype != torch.bfloat16 or x_1HK.dim() != 3 or x_1HK.shape[0] != 1 or w_H.dim() != 3:
        return None
    _, H, K = x_1HK.shape
    N = w_H.shape[1] if w_rows_n else w_H.shape[2]
    if w_H.shape[0] != H or w_H.shape[2 if w_rows_n else 1] != K or (not w_rows_n and N % 16):
        return None
    if _kernel_dtype(x_1HK, w_H) is None:
        return None
    y = torch.empty(1, H, N, dtype=torch.bfloat16)
    if _lib.moe_heads_vec(x_1HK.data_ptr(), x_1HK.stride(1), w_H.data_ptr(), w_H.stride(0), w_H.stride(1),
                          N, K, H, int(w_rows_n), y.data_ptr(), N, torch.get_num_threads()) != 0:
        _gemv_built = False
        return None
    return y


def mla_token(x_1D: torch.Tensor, w_qa: torch.Tensor | None, qa_norm: torch.Tensor | None, q_eps: float,
              w_qb: torch.Tensor, w_kva: torch.Tensor, kva_norm: torch.Tensor, kv_eps: float, w_kvb: torch.Tensor,
              w_o: torch.Tensor, heads: int, nope: int, rope: int, v: int, positions_1: torch.Tensor,
              cos_PH: torch.Tensor, sin_PH: torch.Tensor, interleaved: bool, cache: torch.Tensor,
              block_table: torch.Tensor, context_len: int, slot_mapping_1: torch.Tensor,
              scale: float, residual: Residual | None = None):
    """DeepSeek's MLA for one decode token in one call (``fused.c``): projections, norms, rotary,
    the latent row written to ``cache`` ``[blocks, block_size, 1, C + rope]`` at the slot, the
    absorbed attention over the sequence's ``context_len`` cached tokens (``block_table``: its
    blocks, int32) and ``o_proj``; bit-identical to :class:`moe.models.mla.MLAttention`'s op-by-op
    path at one token. ``w_qa=None``: ``w_qb`` is ``q_proj``. Returns ``[1, D]`` bf16 (with
    ``residual``: ``(h + y, norm(h + y))``, see :func:`_residual_args`), or None when the kernel
    does not apply (then nothing was written)."""
    global _gemv_built
    if not _gemv_built or x_1D.dtype != torch.bfloat16 or x_1D.shape[0] != 1 or not x_1D.is_contiguous():
        return None
    ws = [w for w in (w_qa, qa_norm, w_qb, w_kva, kva_norm, w_kvb, w_o) if w is not None]
    if any(w.dtype != torch.bfloat16 or w.is_cuda or not w.is_contiguous() for w in ws) or load() is None:
        return None
    C = kva_norm.shape[0]
    L = C + rope
    if (cache.dtype != torch.bfloat16 or cache.dim() != 4 or cache.shape[2:] != (1, L) or cache.stride(-1) != 1
            or cache.stride(1) != L or cache.stride(0) != cache.shape[1] * L or rope % 2):
        return None
    if (block_table.dtype != torch.int32 or not block_table.is_contiguous() or slot_mapping_1.dtype != torch.int64
            or positions_1.dtype != torch.int64 or cos_PH.dtype != torch.float32 or not cos_PH.is_contiguous()
            or not sin_PH.is_contiguous()):
        return None
    D = x_1D.shape[1]
    q_lora = w_qa.shape[0] if w_qa is not None else 0
    if (w_qb.shape != (heads * (nope + rope), q_lora or D) or w_kva.shape != (L, D) or C % 16
            or w_kvb.shape != (heads * (nope + v), C) or w_o.shape != (D, heads * v)):
        return None
    if w_qa is not None and (w_qa.shape[1] != D or qa_norm is None or qa_norm.shape != (q_lora,)):
        return None
    tail = _residual_args(residual, D)
    if tail is None:
        return None
    out = torch.empty(1, D, dtype=torch.bfloat16)
    scratch = torch.empty(q_lora + heads * (nope + rope) + L + heads * L + heads * C + heads * v, dtype=torch.bfloat16)
    if _lib.moe_mla_token(x_1D.data_ptr(), D, w_qa.data_ptr() if w_qa is not None else None,
                          qa_norm.data_ptr() if qa_norm is not None else None, q_lora, q_eps, w_qb.data_ptr(),
                          w_kva.data_ptr(), kva_norm.data_ptr(), kv_eps, w_kvb.data_ptr(), w_o.data_ptr(), heads, nope,
                          rope, C, v, positions_1.data_ptr(), cos_PH.data_ptr(), sin_PH.data_ptr(), int(interleaved),
                          cache.data_ptr(), cache.stride(0), cache.stride(1), cache.shape[1], block_table.data_ptr(),
                          context_len, slot_mapping_1.data_ptr(), scale, scratch.data_ptr(), out.data_ptr(),
                          *tail[0], torch.get_num_threads()) != 0:
        _gemv_built = False
        return None
    return (tail[1], out) if residual is not None else out


_QK_NORMS = {None: 0, "head": 1, "full": 2}


def gqa_token(x_1D: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None, heads: int, kv_heads: int,
              qk_norm: str | None, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
              positions_1: torch.Tensor, cos_PH: torch.Tensor, sin_PH: torch.Tensor, interleaved: bool,
              k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, context_len: int,
              slot_mapping_1: torch.Tensor, sliding_window: int | None, sinks_H: torch.Tensor | None, scale: float,
              w_o: torch.Tensor, b_o: torch.Tensor | None, residual: Residual | None = None):
    """Grouped-query attention for one decode token in one call (``fused.c``): qkv projection, q/k
    norms (``qk_norm`` None, "head" or "full"), rotary over whole heads, K/V written at the slot,
    attention over the sequence's ``context_len`` cached tokens (window, sinks) and ``o_proj``;
    bit-identical to :class:`moe.models.layers.Attention`'s op-by-op path at one token. Returns
    ``[1, D]`` bf16 (with ``residual``: ``(h + y, norm(h + y))``, see :func:`_residual_args`), or
    None when the kernel does not apply (then nothing was written)."""
    global _gemv_built
    if not _gemv_built or x_1D.dtype != torch.bfloat16 or x_1D.shape[0] != 1 or not x_1D.is_contiguous():
        return None
    ws = [w for w in (w_qkv, b_qkv, q_norm, k_norm, w_o, b_o) if w is not None]
    if any(w.dtype != torch.bfloat16 or w.is_cuda or not w.is_contiguous() for w in ws) or load() is None:
        return None
    D, hd = x_1D.shape[1], k_cache.shape[-1]
    if w_qkv.shape != ((heads + 2 * kv_heads) * hd, D) or w_o.shape != (D, heads * hd) or hd % 2:
        return None
    for c in (k_cache, v_cache):
        if (c.dtype != torch.bfloat16 or c.dim() != 4 or c.shape[2:] != (kv_heads, hd) or c.stride(-1) != 1
                or c.stride(0) != c.shape[1] * c.stride(1)):
            return None
    if (block_table.dtype != torch.int32 or not block_table.is_contiguous() or slot_mapping_1.dtype != torch.int64
            or positions_1.dtype != torch.int64 or cos_PH.dtype != torch.float32 or not cos_PH.is_contiguous()
            or not sin_PH.is_contiguous() or cos_PH.shape[-1] * 2 != hd or qk_norm not in _QK_NORMS):
        return None
    tail = _residual_args(residual, D)
    if tail is None:
        return None
    sinks = sinks_H.float().contiguous() if sinks_H is not None else None
    out = torch.empty(1, D, dtype=torch.bfloat16)
    scratch = torch.empty((2 * heads + 2 * kv_heads) * hd, dtype=torch.bfloat16)
    if _lib.moe_gqa_token(x_1D.data_ptr(), D, w_qkv.data_ptr(), b_qkv.data_ptr() if b_qkv is not None else None, heads,
                          kv_heads, hd, _QK_NORMS[qk_norm], q_norm.data_ptr() if q_norm is not None else None,
                          k_norm.data_ptr() if k_norm is not None else None, eps, positions_1.data_ptr(),
                          cos_PH.data_ptr(), sin_PH.data_ptr(), int(interleaved), k_cache.data_ptr(),
                          *k_cache.stride()[:3], v_cache.data_ptr(), *v_cache.stride()[:3], k_cache.shape[1],
                          block_table.data_ptr(), context_len, slot_mapping_1.data_ptr(), sliding_window or 0,
                          sinks.data_ptr() if sinks is not None else None, scale, w_o.data_ptr(),
                          b_o.data_ptr() if b_o is not None else None, scratch.data_ptr(), out.data_ptr(),
                          *tail[0], torch.get_num_threads()) != 0:
        _gemv_built = False
        return None
    return (tail[1], out) if residual is not None else out


Q_INT8, Q_FP8 = 0, 1  # 8-bit weight codes: int8, or fp8 e4m3 bits (value * 2^-8; see quant.c)
Q8_GEMM_MAX_ROWS = 64  # rows q8_gemm / q4_gemm take (eight at a time against each weight row)


def q8_available() -> bool:
    """Whether :func:`q8_gemm` and :func:`q8_dequant` run here (the library is built)."""
    return load() is not None


def _q8_args(q_NK: torch.Tensor, s_BG: torch.Tensor, b_BG: torch.Tensor | None, gs: int, bn: int) -> tuple:
    N, K = q_NK.shape
    G = s_BG.shape[-1]
    if (q_NK.dtype != torch.int8 or q_NK.stride(-1) != 1 or s_BG.dtype != torch.float32 or not s_BG.is_contiguous()
            or s_BG.shape != (-(-N // bn), G) or G != -(-K // gs) or (b_BG is not None and (
                b_BG.shape != s_BG.shape or b_BG.dtype != torch.float32 or not b_BG.is_contiguous()))):
        raise ValueError(f"8-bit weight layout: codes {tuple(q_NK.shape)} {q_NK.dtype}, scales {tuple(s_BG.shape)} "
                         f"{s_BG.dtype}, group {gs}, row block {bn}")
    return (q_NK.data_ptr(), q_NK.stride(0), s_BG.data_ptr(), b_BG.data_ptr() if b_BG is not None else None, G, gs, bn)


def q8_gemm(x_MK: torch.Tensor, q_NK: torch.Tensor, fmt: int, s_BG: torch.Tensor, b_BG: torch.Tensor | None,
            gs: int, bn: int) -> torch.Tensor:
    """``x @ w.T`` for up to :data:`Q8_GEMM_MAX_ROWS` rows and 8-bit codes ``q`` (``fmt``:
    :data:`Q_INT8` / :data:`Q_FP8`) with ``w[n, k] = s[n // bn, k // gs] * q[n, k] (+ b[...])``,
    float32 sums, ``[M, N]`` in x's dtype (float32 or bfloat16). Check :func:`q8_available` first."""
    M, K = x_MK.shape
    if not 0 < M <= Q8_GEMM_MAX_ROWS or q_NK.shape[1] != K or x_MK.dtype not in _DTYPES:
        raise ValueError(f"q8_gemm takes 1-{Q8_GEMM_MAX_ROWS} float32/bfloat16 rows of {q_NK.shape[1]}, "
                         f"got {tuple(x_MK.shape)} {x_MK.dtype}")
    args = _q8_args(q_NK, s_BG, b_BG, gs, bn)
    x = x_MK.float().contiguous()
    N = q_NK.shape[0]
    y = torch.empty(M, N, dtype=x_MK.dtype)
    if load().moe_q8_gemm(x.data_ptr(), M, K, args[0], args[1], fmt, *args[2:], N, y.data_ptr(), _DTYPES[x_MK.dtype],
                          torch.get_num_threads()) != 0:
        raise MemoryError("q8_gemm: no memory for its scratch")
    return y


def q8_dequant(q_NK: torch.Tensor, fmt: int, s_BG: torch.Tensor, b_BG: torch.Tensor | None, gs: int, bn: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The weight ``w [N, K]`` of :func:`q8_gemm` in ``dtype`` (float32 or bfloat16), rounded once."""
    args = _q8_args(q_NK, s_BG, b_BG, gs, bn)
    N, K = q_NK.shape
    w = torch.empty(N, K, dtype=dtype)
    load().moe_q8_dequant(args[0], args[1], fmt, *args[2:], N, K, w.data_ptr(), _DTYPES[dtype], torch.get_num_threads())
    return w


def _q4_args(q_NK2: torch.Tensor, lut: torch.Tensor, s_NG: torch.Tensor, b_NG: torch.Tensor | None, gs: int) -> tuple:
    N, K2 = q_NK2.shape
    G = s_NG.shape[-1]
    if (q_NK2.dtype != torch.uint8 or q_NK2.stride(-1) != 1 or lut.shape != (16,) or lut.dtype != torch.float32
            or not lut.is_contiguous() or s_NG.dtype != torch.float32 or not s_NG.is_contiguous()
            or s_NG.shape != (N, G) or G != -(-2 * K2 // gs) or (b_NG is not None and (
                b_NG.shape != s_NG.shape or b_NG.dtype != torch.float32 or not b_NG.is_contiguous()))):
        raise ValueError(f"4-bit weight layout: codes {tuple(q_NK2.shape)} {q_NK2.dtype}, scales {tuple(s_NG.shape)} "
                         f"{s_NG.dtype}, group {gs}")
    return q_NK2.data_ptr(), q_NK2.stride(0), lut.data_ptr(), s_NG.data_ptr(), \
        b_NG.data_ptr() if b_NG is not None else None, G, gs


def q4_gemm(x_MK: torch.Tensor, q_NK2: torch.Tensor, lut: torch.Tensor, s_NG: torch.Tensor, b_NG: torch.Tensor | None,
            gs: int) -> torch.Tensor:
    """:func:`q8_gemm` for 4-bit codes, two per byte (``q [N, K/2]`` uint8, the low nibble the even
    column): ``w[n, k] = s[n, k // gs] * lut[code] (+ b[n, k // gs])``, ``lut`` the 16 code values
    (int4: 0..15 with offsets ``-zero * scale``; MXFP4: the FP4 e2m1 values)."""
    M, K = x_MK.shape
    if not 0 < M <= Q8_GEMM_MAX_ROWS or q_NK2.shape[1] * 2 != K or x_MK.dtype not in _DTYPES:
        raise ValueError(f"q4_gemm takes 1-{Q8_GEMM_MAX_ROWS} float32/bfloat16 rows of {q_NK2.shape[1] * 2}, "
                         f"got {tuple(x_MK.shape)} {x_MK.dtype}")
    args = _q4_args(q_NK2, lut, s_NG, b_NG, gs)
    x = x_MK.float().contiguous()
    N = q_NK2.shape[0]
    y = torch.empty(M, N, dtype=x_MK.dtype)
    if load().moe_q4_gemm(x.data_ptr(), M, K, *args, N, y.data_ptr(), _DTYPES[x_MK.dtype],
                          torch.get_num_threads()) != 0:
        raise MemoryError("q4_gemm: no memory for its scratch")
    return y


def q4_dequant(q_NK2: torch.Tensor, lut: torch.Tensor, s_NG: torch.Tensor, b_NG: torch.Tensor | None, gs: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The weight ``w [N, K]`` of :func:`q4_gemm` in ``dtype`` (float32 or bfloat16)."""
    args = _q4_args(q_NK2, lut, s_NG, b_NG, gs)
    N, K = q_NK2.shape[0], q_NK2.shape[1] * 2
    w = torch.empty(N, K, dtype=dtype)
    load().moe_q4_dequant(*args, N, K, w.data_ptr(), _DTYPES[dtype], torch.get_num_threads())
    return w


def _packed_dims(w13: tuple, w2: tuple, lut: torch.Tensor | None, gs: int, bn: int) -> tuple[int, int, int] | None:
    """``(E, D, F)`` of packed experts ``w13``/``w2`` (``(codes, scales, offsets)`` each, stacked
    over experts) when both are contiguous and each expert's slice is the 8-bit (``lut`` None) or
    4-bit kernels' layout (that check raises on a malformed layout), else None."""
    pack = 2 if lut is not None else 1
    E, F2, D = w13[0].shape[0], w13[0].shape[1], w13[0].shape[2] * pack
    F = F2 // 2
    if w2[0].shape != (E, D, F // pack):
        return None
    for q, sc, off in (w13, w2):
        if not q.is_contiguous() or not sc.is_contiguous() or (off is not None and not off.is_contiguous()):
            return None
        if lut is None:
            _q8_args(q[0], sc[0], None if off is None else off[0], gs, bn)
        else:
            _q4_args(q[0], lut, sc[0], None if off is None else off[0], gs)
    return E, D, F


def quant_moe_token(x_1D: torch.Tensor, ids_K: torch.Tensor, weights_K: torch.Tensor, fmt: int,
                    lut: torch.Tensor | None, gs: int, bn: int,
                    w13: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                    w2: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                    shared: tuple[torch.Tensor, torch.Tensor] | None = None, residual: Residual | None = None):
    """:func:`moe_token` on packed experts: ``w13``/``w2`` are ``(codes, scales, offsets or None)``
    stacked over experts, as :func:`q8_gemm` (``lut`` None; codes ``[E, N, K]`` int8) or
    :func:`q4_gemm` (codes ``[E, N, K/2]`` uint8) take them per expert. One C call with the
    roundings of dispatch -> experts (the GEMV, ``silu_mul``) -> combine. ``[1, D]`` bf16 (with
    ``residual``: ``(h + y, norm(h + y))``), or None when the kernel does not apply."""
    if x_1D.dtype != torch.bfloat16 or x_1D.dim() != 2 or x_1D.shape[0] != 1 or not x_1D.is_contiguous():
        return None
    if load() is None:
        return None
    (q13, s13, b13), (q2, s2, b2) = w13, w2
    dims = _packed_dims(w13, w2, lut, gs, bn)
    if dims is None or x_1D.shape[1] != dims[1]:
        return None
    E, D, F = dims
    args = _moe_token_args(ids_K, weights_K, D, shared, residual)
    if args is None:
        return None
    ids, wts, Fs, sh, tail = args
    out = torch.empty(1, D, dtype=torch.bfloat16)
    fs = torch.empty(2 * max(D, F) + D, dtype=torch.float32)
    hs = torch.empty(3 * max(F, Fs) + 2 * D, dtype=torch.bfloat16)
    rc = _lib.moe_qx_moe_token(
        x_1D.data_ptr(), D, F, ids.shape[0], ids.data_ptr(), wts.data_ptr(), E, fmt,
        lut.data_ptr() if lut is not None else None, gs, bn,
        q13.data_ptr(), q13.stride(0), s13.data_ptr(), b13.data_ptr() if b13 is not None else None, s13.stride(0),
        s13.shape[-1], q2.data_ptr(), q2.stride(0), s2.data_ptr(), b2.data_ptr() if b2 is not None else None,
        s2.stride(0), s2.shape[-1], *sh, Fs, out.data_ptr(), fs.data_ptr(), hs.data_ptr(), *tail[0],
        torch.get_num_threads())
    if rc != 0:
        return None
    return (tail[1], out) if residual is not None else out


def amx_moe_packed(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, fmt: int,
                   lut: torch.Tensor | None, gs: int, bn: int,
                   w13: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                   w2: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]) -> torch.Tensor | None:
    """:func:`amx_moe` on packed experts (``(codes, scales, offsets)`` stacked over experts as
    :func:`quant_moe_token` takes them): every 16-row weight block dequantized to bf16 into a
    buffer the AMX tiles read, so the packed bytes are what streams. Results equal dequantize ->
    GEMM -> combine up to the order of float32 sums. None when the kernel does not apply (no AMX,
    a dim not a multiple of 32, an expert given more than :data:`AMX_MAX_ROWS` rows)."""
    if x_TD.dtype != torch.bfloat16 or x_TD.dim() != 2 or not amx_available() or x_TD.stride(-1) != 1:
        return None
    (q13, s13, b13), (q2, s2, b2) = w13, w2
    dims = _packed_dims(w13, w2, lut, gs, bn)
    T, K = ids_TK.shape
    if dims is None:
        return None
    E, D, F = dims
    if D % 32 or F % 32 or x_TD.shape[1] != D or weights_TK.shape != (T, K) or T * K > E * AMX_MAX_ROWS:
        return None
    ids, wts, out, xp, ap, acc, rows = _amx_moe_buffers(ids_TK, weights_TK, E, D, F)
    rc = _lib.moe_amx_moe_packed(
        x_TD.data_ptr(), x_TD.stride(0), T, ids.data_ptr(), wts.data_ptr(), K, E, D, F, fmt,
        lut.data_ptr() if lut is not None else None, gs, bn,
        q13.data_ptr(), q13.stride(0), q13.stride(1), s13.data_ptr(), b13.data_ptr() if b13 is not None else None,
        s13.stride(0), s13.shape[-1], q2.data_ptr(), q2.stride(0), q2.stride(1), s2.data_ptr(),
        b2.data_ptr() if b2 is not None else None, s2.stride(0), s2.shape[-1],
        out.data_ptr(), xp.data_ptr(), ap.data_ptr(), acc.data_ptr(), rows.data_ptr(), torch.get_num_threads())
    return out if rc == 0 else None
