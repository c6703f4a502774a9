"""Building and loading the kernel library: compiler detection, compilation, the ctypes handle.

The library is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) for
this CPU (``-march=native``, AVX-512 and AMX paths where present) into ``$MOE_KERNEL_CACHE``
(default ``~/.cache/moe/kernels``), keyed by the sources, flags and OpenMP runtime, and linked
against the OpenMP runtime torch has loaded so both share one thread pool (two runtimes would
fight over the cores). Without a compiler the torch paths are used (one warning says so);
``MOE_CPU_KERNELS=0`` turns the kernels off; ``MOE_KERNEL_MARCH`` (gcc's ``-march``, e.g.
``x86-64-v3``) builds for another instruction set than this CPU's (one library for a mixed cluster,
or the AVX2 paths tested on an AVX-512 machine).

Each binding module declares the C signatures of its own file with :func:`declare`; they are set
on the library when it loads (or at once, when it is loaded already).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("cpu_kernels")

_DIR = Path(__file__).parent
_SOURCES = [_DIR / "paged_decode.c", _DIR / "elementwise.c", _DIR / "gemv.c", _DIR / "amx.c", _DIR / "amx_attention.c",
            _DIR / "fused.c", _DIR / "quant.c", _DIR / "gemm.c", _DIR / "step.c",
            _DIR / "sample.c"]
_HEADERS = ["simd.h", "kernels.h", "amx.h"]
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernels' dtype codes
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_signatures: dict[str, list] = {}  # C function -> argtypes (every kernel returns int)


def declare(signatures: dict[str, list]) -> None:
    """Record the argument types of C functions (each returns ``int``): set on the library when it
    loads, or at once when it is loaded already."""
    _signatures.update(signatures)
    if _lib is not None:
        _apply(_lib, signatures)


def address(obj: torch.Tensor | ctypes.Structure | None) -> int | None:
    """What a C call takes for a tensor (its data pointer) or a ctypes struct (its address); None for None."""
    if obj is None:
        return None
    return obj.data_ptr() if isinstance(obj, torch.Tensor) else ctypes.addressof(obj)


def c_struct(name: str, fields: str) -> type[ctypes.Structure]:
    """A ctypes mirror of the C struct ``name`` of ``kernels.h``, from its fields in order:
    ``"D H: i64; w b: ptr; eps: f32"`` (C's alignment rules are ctypes' own)."""
    types = {"i64": ctypes.c_int64, "ptr": ctypes.c_void_p, "f32": ctypes.c_float}
    spec = [(f, types[t.strip()]) for part in fields.split(";") for names, t in [part.split(":")]
            for f in names.split()]
    return type(name, (ctypes.Structure,), {"_fields_": spec, "__doc__": f"kernels.h's {name}."})


def _apply(lib: ctypes.CDLL, signatures: dict[str, list]) -> None:
    for name, argtypes in signatures.items():
        f = getattr(lib, name, None)
        if f is None:  # a build from an older copy of the sources (bench_kernel_ab.py)
            continue
        f.argtypes = argtypes
        f.restype = ctypes.c_int


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


def build_library(src_dir: str | Path, march: str = "native") -> ctypes.CDLL:
    """Compile (or find in the cache) the library from the kernel sources in ``src_dir`` (this
    package's directory, or a copy of it with an edited kernel) and load it with every declared
    signature applied. ``benchmarks/bench_kernel_ab.py`` loads two builds side by side this way;
    ``march`` (gcc's ``-march``) builds another instruction set's paths, e.g. ``x86-64-v3`` (AVX2)
    or ``x86-64`` (scalar), for tests on a CPU that has more."""
    src_dir = Path(src_dir)
    # an older copy may lack a later file: build what it has (its bindings then find no symbol)
    sources = [src_dir / p.name for p in _SOURCES if (src_dir / p.name).exists()]
    if not sources:
        raise FileNotFoundError(f"no kernel sources in {src_dir} (looked for {', '.join(p.name for p in _SOURCES)})")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc)")
    omp = _openmp_runtime()
    flags = [f if f != "-march=native" else f"-march={march}" for f in _FLAGS] + (["-fopenmp"] if omp else [])
    blob = b"".join(p.read_bytes() for p in [*sources, *(src_dir / h for h in _HEADERS if (src_dir / h).exists())])
    key = hashlib.sha256(blob + " ".join([cc, *flags, omp or ""]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MOE_KERNEL_CACHE", Path.home() / ".cache" / "moe" / "kernels"))
    lib_path = cache / f"moe_cpu-{key}.so"
    if not lib_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            objs = [Path(tmp) / f"{src.stem}.o" for src in sources]
            out = Path(tmp) / "k.so"
            # compile with -fopenmp, but link the runtime torch uses (not the compiler's own copy)
            cmds = [[cc, *[f for f in flags if f != "-shared"], "-c", str(src), "-o", str(obj)]
                    for src, obj in zip(sources, objs)]
            cmds.append([cc, "-shared", *map(str, objs), "-o", str(out)]
                        + ([omp, f"-Wl,-rpath,{os.path.dirname(omp)}"] if omp else []))
            for cmd in cmds:
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr.strip()}")
            os.replace(out, lib_path)  # atomic: ranks building at once each publish a whole file
    lib = ctypes.CDLL(str(lib_path))
    _apply(lib, _signatures)
    return lib


def use_library(lib: ctypes.CDLL | None) -> None:
    """Make ``lib`` (from :func:`build_library`) the library every binding calls from now on:
    benchmarks alternating two builds of a kernel in one process."""
    global _lib, _tried
    with _lock:
        _lib, _tried = lib, True


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it is turned off or cannot be built (warned once)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("MOE_CPU_KERNELS", "1") != "0":
                try:
                    _lib = build_library(_DIR, os.environ.get("MOE_KERNEL_MARCH", "native"))
                except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
                    log.warning("CPU kernels unavailable, using torch's ops instead (decode attention as one SDPA "
                                "call per sequence: slower at large batches): %s. Install a C compiler (gcc) to "
                                "enable them, or set MOE_CPU_KERNELS=0 to silence this.", e)
            _tried = True
    return _lib


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size in bytes (Linux sysfs; 0 where it cannot be read)."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            best = max(best, int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1))
        except (OSError, ValueError):
            continue
    return best


def kernel_dtype(*ts: torch.Tensor) -> int | None:
    """The kernels' dtype code when every tensor is a CPU float32/bfloat16 tensor of one dtype and
    the library is built, else None (the caller takes its torch path)."""
    d = ts[0].dtype
    if d not in DTYPES or any(t.is_cuda or t.dtype != d or t.stride(-1) != 1 for t in ts) or load() is None:
        return None
    return DTYPES[d]


def release_openmp_threads() -> bool:
    """Free the calling thread's OpenMP worker threads (``omp_pause_resource_all(omp_pause_soft)``
    on the runtime torch loaded); the next parallel region on this thread starts them again. For a
    thread that hands its compute to another one (the server's engine thread): GNU OpenMP keeps a
    team of workers per thread that ever ran a parallel region, and once the process holds more
    OpenMP threads than CPUs every team's workers stop spinning between regions and sleep, so each
    region pays a futex wake-up (batch-1 decode ran ~1.5x slower on the engine thread than on the
    thread that loaded the model). False when there is no such runtime or call."""
    path = _openmp_runtime()
    try:
        return path is not None and ctypes.CDLL(path).omp_pause_resource_all(1) == 0
    except (OSError, AttributeError):  # an OpenMP runtime without OpenMP 5.0's pause
        return False


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25


def advise_huge_pages(tensors, collapse: bool = False) -> int:
    """Ask Linux to back the tensors' memory (each storage's 2 MiB-aligned interior, storages of 2 MiB
    or more) with transparent huge pages: ``MADV_HUGEPAGE`` (pages faulted in afterwards come huge, with
    THP in ``madvise`` or ``always`` mode), and with ``collapse`` ``MADV_COLLAPSE`` too (Linux 6.1+:
    pages already there are copied into huge ones now). A weight streamed from memory then crosses a
    4 KiB page boundary no more often than a 2 MiB one: no TLB miss, and no hardware prefetch stopping,
    every 4 KiB. Returns the bytes advised (0 off Linux / glibc or with THP off)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done, seen = 0, set()
    for t in tensors:
        if t.device.type != "cpu":
            continue
        storage = t.untyped_storage()
        start = storage.data_ptr()
        if start in seen:
            continue
        seen.add(start)
        lo = (start + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        hi = (start + storage.nbytes()) & ~(_HUGE_PAGE - 1)
        if hi <= lo or madvise(lo, hi - lo, _MADV_HUGEPAGE) != 0:
            continue
        if collapse:
            madvise(lo, hi - lo, _MADV_COLLAPSE)  # (refused where unsupported: the advice above still holds)
        done += hi - lo
    return done


def gather_small_storages(tensors, max_bytes: int = 32 << 20) -> int:
    """Copy the storages of ``max_bytes`` or less that the tensors use (CPU) into one 2 MiB-aligned
    arena and point every given tensor on them at its copy in place (``Tensor.set_``: same offset,
    sizes and strides; tensors not given keep the old memory). :func:`advise_huge_pages` covers only a
    storage's 2 MiB-aligned interior, so a weight of a few MB (attention projections, a shared expert:
    a third of the bytes a DeepSeek-V3-shaped decode step reads) stays on 4 KiB pages unless it is
    gathered with others (a 2-thread bf16 GEMV streamed 9% faster from huge pages than from 4 KiB ones,
    a plain sum 15%, on a Zen 4 EPYC). Storages up to 32 MiB miss up to an eighth of their bytes that way.
    Call it before :func:`advise_huge_pages` and before anything keeps a tensor's address. Returns the
    bytes gathered."""
    groups: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
    seen: set[int] = set()
    for t in tensors:
        if t.device.type != "cpu" or t.is_sparse or id(t) in seen:
            continue
        seen.add(id(t))
        st = t.untyped_storage()
        if 0 < st.nbytes() <= max_bytes:
            groups.setdefault(st.data_ptr(), (st, []))[1].append(t)
    if not groups:
        return 0
    def placed(nbytes: int) -> int:  # a storage's room in the arena: whole 256-byte units (a cache line,
        return -(-nbytes // 256) * 256  # and a multiple of every element size)

    # fresh pages of its own mapping (the heap may hand out pages already faulted in, small), advised
    # before the copies write them: they fault in huge
    total = sum(placed(st.nbytes()) for st, _ in groups.values())
    arena = torch.frombuffer(mmap.mmap(-1, total + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
                             dtype=torch.uint8)
    advise_huge_pages([arena])
    base = (-arena.data_ptr()) % _HUGE_PAGE  # the arena's first 2 MiB boundary
    storage, at, freed = arena.untyped_storage(), base, 0
    with torch.no_grad():
        while groups:
            st, ts = groups.pop(next(iter(groups)))
            n = st.nbytes()
            arena[at:at + n].copy_(torch.empty(0, dtype=torch.uint8).set_(st, 0, (n,), (1,)))
            for t in ts:
                t.set_(storage, at // t.element_size() + t.storage_offset(), t.size(), t.stride())
            at += placed(n)
            del st, ts  # (the old storage freed, unless something not given holds it)
            freed += n
            if freed >= 64 << 20 or not groups:  # the freed memory back to the OS as the copies go: the
                _trim_heap()                     # process never holds the gathered bytes twice over
                freed = 0
    return at - base


def _trim_heap() -> None:
    """Hand the heap's free memory back to the OS (glibc's malloc_trim; nothing elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
