"""Paged decode attention for CPUs, from C (``csrc/paged_decode.c``) built on first use.

``scaled_dot_product_attention`` called once per sequence costs ~90 µs for a decode row over a
few hundred cached tokens — mostly per-call and tiny-GEMM overhead — and a 64-sequence decode step
makes 64 such calls per layer. This kernel runs every decode row of the step in one call: each
cached K/V row is read once, in place through the block table, with the GQA query heads of its KV
head (and, when there are enough sequences, all heads of one token as one contiguous read),
spread over the OpenMP threads torch already runs. Results equal :mod:`kvcache.reference`
(tests/test_cpu_decode.py).

The library is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``) for this CPU
(``-march=native``, AVX-512 paths where present) into ``$MOE_KERNEL_CACHE`` (default
``~/.cache/moe/kernels``), keyed by the source, flags and OpenMP runtime, and linked against the
OpenMP runtime torch has loaded so both share one thread pool. Without a compiler the torch path
is used (one warning says so); ``MOE_CPU_KERNELS=0`` turns the kernel off.
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

_SRC = Path(__file__).parent / "csrc" / "paged_decode.c"
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared"]
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
    key = hashlib.sha256(_SRC.read_bytes() + " ".join([cc, *flags, omp or ""]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MOE_KERNEL_CACHE", Path.home() / ".cache" / "moe" / "kernels"))
    lib_path = cache / f"paged_decode-{key}.so"
    if not lib_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            obj, out = Path(tmp) / "k.o", Path(tmp) / "k.so"
            # compile with -fopenmp, but link the runtime torch uses (not the compiler's own copy):
            # two OpenMP runtimes in one process would fight over the two cores
            cmd_c = [cc, *[f for f in flags if f != "-shared"], "-c", str(_SRC), "-o", str(obj)]
            cmd_l = [cc, "-shared", str(obj), "-o", str(out)] + ([omp, f"-Wl,-rpath,{os.path.dirname(omp)}"] if omp else [])
            for cmd in (cmd_c, cmd_l):
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr.strip()}")
            os.replace(out, lib_path)  # atomic: ranks building at once each publish a whole file
    lib = ctypes.CDLL(str(lib_path))
    f = lib.moe_paged_decode
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    f.argtypes = [ptr, ptr, ptr, ptr, ctypes.c_int, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64,
                  i64, ptr, i64, ptr, i64, ptr, ctypes.c_float, ctypes.c_int]
    f.restype = ctypes.c_int
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
                    log.warning("CPU decode-attention kernel unavailable, using torch's SDPA per sequence "
                                "(slower at large batches): %s. Install a C compiler (gcc) to enable it, or set "
                                "MOE_CPU_KERNELS=0 to silence this.", e)
            _tried = True
    return _lib


def supports(q: torch.Tensor, k_cache: object, v_cache: object) -> bool:
    """Whether the kernel handles these tensors: CPU, float32 or bfloat16 throughout (not fp8),
    rows with unit stride."""
    return (isinstance(k_cache, torch.Tensor) and isinstance(v_cache, torch.Tensor) and not q.is_cuda
            and q.dtype in _DTYPES and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and load() is not None)


def paged_decode_attention(q_BHD: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, sinks_H: torch.Tensor | None = None) -> torch.Tensor:
    """One query row per sequence: ``q_BHD[b]`` attends to the ``context_lens[b]`` tokens cached in
    ``block_tables[b]`` (its own included). Returns ``[B, H, Dv]`` in q's dtype. Check
    :func:`supports` first."""
    lib = load()
    assert lib is not None, "check kvcache.cpu_decode.supports() first"
    B, H, Dk = q_BHD.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[-1]
    if H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} KV heads")
    q = q_BHD.contiguous()
    bt = block_tables.to(torch.int32).contiguous()
    cl = context_lens.to(torch.int32).contiguous()
    sinks = sinks_H.float().contiguous() if sinks_H is not None else None
    out = torch.empty(B, H, Dv, dtype=q.dtype)
    if B == 0:
        return out
    lib.moe_paged_decode(q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _DTYPES[q.dtype],
                         B, H, Hkv, Dk, Dv, *k_cache.stride()[:3], *v_cache.stride()[:3], k_cache.shape[1],
                         bt.data_ptr(), bt.shape[1], cl.data_ptr(), sliding_window or 0,
                         sinks.data_ptr() if sinks is not None else None, scale, torch.get_num_threads())
    return out
