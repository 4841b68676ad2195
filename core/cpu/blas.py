"""Give MLX's CPU matmuls fast kernels on Linux.

The ``mlx[cpu]`` wheel links the reference BLAS, ~30x slower for fp32 GEMM than an optimised one. MLX calls
``cblas_sgemm`` for every float32 product, so loading libraries into the global symbol scope *before* MLX is
imported makes those calls resolve to them. Two layers are loaded:

- the **CPU kernels** (``core/cpu/_cpu_kernels.c``, built at install). Their ``cblas_sgemm`` (the *skinny kernel*)
  takes products with at most 16 rows, which a decoder step is made of (2 rows per prompt with guidance). It
  streams each weight matrix once for all rows, on a small thread pool, and hands every other product to the BLAS
  below. Measured on a 2-core x86-64 VM, all of a musicgen-small step's weight products: 2 rows 48 ms and 8 rows
  70 ms at first (now 63 ms; 16 rows 102 ms), against 51 and 93 ms (MKL), 96 and 119 ms (BLIS), 121 and 144 ms
  (OpenBLAS). The same library has the decoder's step attention (``decode_attention``, ``cross_attention``, used
  by core.cpu.cache) on the same threads, and picks AVX-512, AVX2 or baseline code for the CPU at load.
- an optimised **BLAS** for everything else (T5, EnCodec, prefill): OpenBLAS (Debian ``libopenblas0-pthread``),
  else BLIS (``libblis4-pthread``). OpenBLAS decoded EnCodec fastest there (671 ms for 5 s, BLIS 939 ms).

OpenBLAS picks its kernels by the CPU's model, and a release older than the CPU falls back to generic ones: Debian
12's 0.3.21 runs its SSE3 ("Prescott") kernels on a Sapphire Rapids VM, where EnCodec decoding 4 rows took 2.77 s
against 1.49 s with its AVX-512 ("SkylakeX") kernels. So unless ``OPENBLAS_CORETYPE`` is set, it is set while
the library loads, from the instruction sets the CPU reports (:func:`openblas_core_type`); the backend line names
the kernels OpenBLAS took.

``MUSICGEN_BLAS`` chooses the BLAS: ``auto`` (default), ``openblas``, ``blis``, ``reference`` (opt out of both
layers), or a library path. ``MUSICGEN_SKINNY_GEMM=off`` keeps the BLAS alone (and MLX's attention).
``MUSICGEN_GEMM_THREADS`` sets the kernels' threads (default: the cores this process may run on less one, at least
one, so the event loop of a bot keeps a core); BLIS threads follow ``BLIS_NUM_THREADS``. The kernels' workers spin
for the next product only inside :func:`busy` (a generation), and sleep otherwise. :func:`kernel_counters` says how
many products and attention calls went through the kernels (DEBUG logs it after each generation).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # NumPy is imported only after the preload, as before
    import numpy as np

log = logging.getLogger(__name__)

LIBRARIES = {
    "openblas": ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
                 "/usr/lib64/libopenblas.so.0", "/usr/lib/libopenblas.so.0"),
    # the pthread build first: the OpenMP one spins and fights torch's OpenMP runtime for the cores
    "blis": ("/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4", "/usr/lib/aarch64-linux-gnu/blis-pthread/libblis.so.4",
             "/usr/lib/x86_64-linux-gnu/libblis.so.4", "/usr/lib/aarch64-linux-gnu/libblis.so.4",
             "/usr/lib64/libblis.so.4", "/usr/lib/libblis.so.4"),
}
AUTO_ORDER = ("openblas", "blis")
HINT = "apt-get install libopenblas0-pthread (or libblis4-pthread)"

active_blas = "not chosen yet"
active_library: str | None = None  # "openblas", "blis", a library's file name, or None for the reference BLAS
cpu_kernels: ctypes.CDLL | None = None  # the loaded CPU kernels (see few_row_product, core.cpu.cache.HostKVCache)

KERNEL_ABI = 8  # must equal KERNEL_ABI in _cpu_kernels.c: a stale build is refused

# cblas_sgemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc), pointers as addresses
SGEMM_ARGTYPES = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                       ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
# decode_attention(BH, L, D, scale, q, k_new, v_new, k_cache, v_cache, capacity, out); decode_attention_f16 the same
# with float16 caches
ATTENTION_ARGTYPES = [ctypes.c_int] * 3 + [ctypes.c_float] + [ctypes.c_void_p] * 5 + [ctypes.c_long, ctypes.c_void_p]
# cross_attention(B, H, S, D, scale, q, k, v, mask, out)
CROSS_ATTENTION_ARGTYPES = [ctypes.c_int] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 5
# quantized_matmul(M, K, bits, group, count, N[count], A, W_packed[count], scales[count], biases[count], C)
QUANTIZED_ARGTYPES = [ctypes.c_int] * 5 + [ctypes.c_void_p] * 6
# quantized_matmul_packed(M, K, bits, group, count, N[count], A, W[count], scales[count], biases[count], C)
PACKED_ARGTYPES = [ctypes.c_int] * 5 + [ctypes.c_void_p] * 6


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _load(path: str, mode: int = ctypes.RTLD_GLOBAL) -> ctypes.CDLL | None:
    if "blis" in os.path.basename(path).lower():
        # BLIS is single-threaded unless told otherwise; it reads this when first called.
        os.environ.setdefault("BLIS_NUM_THREADS", str(_cpu_count()))
    try:
        return ctypes.CDLL(path, mode=mode)
    except OSError as e:
        log.warning("could not load %s: %s", path, e)
        return None


class KernelError(RuntimeError):
    """The CPU kernels refused or failed a call (raised instead of stopping the process)."""


def cpu_kernels_path(folder: Path | None = None) -> Path | None:
    """The CPU kernels built for this interpreter next to this file (or in ``folder``), by its own extension
    suffix (e.g. ``.cpython-311-x86_64-linux-gnu.so``; another interpreter's build is never taken), if the install
    compiled them."""
    folder = Path(__file__).parent if folder is None else folder
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"_cpu_kernels{suffix}"
        if path.is_file():
            return path
    return None


def reference_blas_path() -> str | None:
    """The reference BLAS the ``mlx[cpu]`` wheel ships (what MLX uses when nothing is preloaded)."""
    spec = importlib.util.find_spec("mlx")
    for location in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(glob.glob(os.path.join(location, "..", "mlx_cpu.libs", "libblas*.so*")))
        if found:
            return os.path.realpath(found[0])
    return None


def _load_cpu_kernels(fallback: ctypes.CDLL | None) -> str | None:
    """Load the CPU kernels globally, their cblas_sgemm in front of ``fallback``'s ``cblas_sgemm``; a description, or None."""
    global cpu_kernels
    if os.environ.get("MUSICGEN_SKINNY_GEMM", "on").strip().lower() in ("off", "0", "false", "no"):
        return None
    path = cpu_kernels_path()
    if path is None:
        log.warning("the CPU kernels were not built (no C compiler at install?): using the BLAS alone")
        return None
    if fallback is None:
        reference = reference_blas_path()
        fallback = ctypes.CDLL(reference, mode=ctypes.RTLD_LOCAL) if reference else None
    if fallback is None:
        return None
    probe = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)  # checked before its cblas_sgemm is made global
    version = getattr(probe, "kernel_abi_version", None)
    found = version() if version is not None else None
    if found != KERNEL_ABI:
        log.warning("%s is a stale build of the CPU kernels (interface %s, this code needs %d): rebuild it "
                    "(python setup.py build_ext --inplace, or reinstall); using the BLAS alone", path, found,
                    KERNEL_ABI)
        return None
    kernel = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    kernel.cblas_sgemm.argtypes, kernel.cblas_sgemm.restype = SGEMM_ARGTYPES, None
    kernel.skinny_set_fallback(ctypes.cast(fallback.cblas_sgemm, ctypes.c_void_p))
    threads = os.environ.get("MUSICGEN_GEMM_THREADS", "").strip()
    threads = int(threads) if threads.isdigit() and int(threads) > 0 else max(1, _cpu_count() - 1)
    kernel.skinny_set_threads(threads)
    kernel.decode_attention.argtypes, kernel.decode_attention.restype = ATTENTION_ARGTYPES, ctypes.c_int
    kernel.decode_attention_f16.argtypes, kernel.decode_attention_f16.restype = ATTENTION_ARGTYPES, ctypes.c_int
    kernel.cross_attention.argtypes, kernel.cross_attention.restype = CROSS_ATTENTION_ARGTYPES, ctypes.c_int
    kernel.quantized_matmul.argtypes, kernel.quantized_matmul.restype = QUANTIZED_ARGTYPES, ctypes.c_int
    kernel.quantized_matmul_packed.argtypes = PACKED_ARGTYPES
    kernel.quantized_matmul_packed.restype = ctypes.c_int
    kernel.packed_fast.restype = ctypes.c_int
    kernel.gelu_inplace.argtypes, kernel.gelu_inplace.restype = [ctypes.c_long, ctypes.c_void_p], None
    kernel.elu_inplace.argtypes, kernel.elu_inplace.restype = [ctypes.c_long, ctypes.c_void_p], None
    kernel.layer_norm_rows.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_float,
                                                                                              ctypes.c_void_p]
    kernel.layer_norm_rows.restype = None
    kernel.kernel_select.argtypes, kernel.kernel_select.restype = [ctypes.c_char_p], ctypes.c_int
    kernel.kernel_instruction_set.restype = ctypes.c_char_p
    kernel.kernel_counters.argtypes, kernel.kernel_counters.restype = [ctypes.POINTER(ctypes.c_ulonglong)], None
    kernel.kernel_take_error.restype = ctypes.c_int
    cpu_kernels = kernel
    isa = kernel.kernel_instruction_set().decode() + {2: " VNNI", 1: " int8"}.get(kernel.packed_fast(), "")
    return f"skinny kernel ({threads} threads, up to {kernel.skinny_max_rows()} rows, {isa}) + "


# OpenBLAS's kernels for x86-64 instruction sets, widest first: every listed flag must be in /proc/cpuinfo
OPENBLAS_CORES = (("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
                  ("Haswell", {"avx2", "fma"}))


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags the kernel reports for the first CPU (empty where there is no such file)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.startswith(("flags", "Features")):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def openblas_core_type(flags: set[str], machine: str) -> str | None:
    """The ``OPENBLAS_CORETYPE`` for an x86-64 CPU with these flags (None: leave OpenBLAS its own choice)."""
    if machine not in ("x86_64", "AMD64"):
        return None
    return next((core for core, needs in OPENBLAS_CORES if needs <= flags), None)


def preload_blas() -> str:
    """Load the fast kernels globally, before MLX; return a short description of what MLX will use.

    Idempotent. Does nothing off Linux (macOS MLX uses Accelerate and Metal).
    """
    global active_blas, active_library
    if active_blas != "not chosen yet":
        return active_blas
    choice = os.environ.get("MUSICGEN_BLAS", "auto").strip() or "auto"
    if not sys.platform.startswith("linux"):
        active_blas = "platform default (Accelerate/Metal)"
        return active_blas
    if choice == "reference":
        active_blas = "reference BLAS (MUSICGEN_BLAS=reference)"
        return active_blas
    if "mlx.core" in sys.modules:
        active_blas = "reference BLAS (mlx was imported before core, too late to preload a faster one)"
        return active_blas
    if choice == "auto":
        candidates = [(name, p) for name in AUTO_ORDER for p in LIBRARIES[name]]
    elif choice in LIBRARIES:
        candidates = [(choice, p) for p in LIBRARIES[choice]]
    else:
        candidates = [(os.path.basename(choice), choice)]
    # Which library is loaded globally first decides whose cblas_sgemm MLX binds to: the skinny kernel must come
    # before the BLAS. So the BLAS is opened privately to find it, the kernel globally, then the BLAS globally
    # (for the other symbols MLX needs from it).
    core = None if "OPENBLAS_CORETYPE" in os.environ else openblas_core_type(cpu_flags(), os.uname().machine)
    for name, path in candidates:
        if not os.path.exists(path):
            continue
        if core is not None:  # read by OpenBLAS as it loads, and only then: other libraries (NumPy's) choose alone
            os.environ["OPENBLAS_CORETYPE"] = core
        try:
            private = _load(path, ctypes.RTLD_LOCAL)
        finally:
            if core is not None:
                del os.environ["OPENBLAS_CORETYPE"]
        if private is None:
            continue
        kernel = _load_cpu_kernels(private)
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # already open: this only makes its symbols global
        details = f", {os.environ['BLIS_NUM_THREADS']} threads" if name == "blis" else ""
        if name == "openblas":
            private.openblas_get_corename.restype = ctypes.c_char_p
            details = f", {private.openblas_get_corename().decode(errors='replace')} kernels"
        active_blas, active_library = f"{kernel or ''}{name} ({path}{details})", name
        return active_blas
    kernel = _load_cpu_kernels(None)
    active_blas = f"{kernel or ''}reference BLAS (no faster BLAS found for MUSICGEN_BLAS={choice}: {HINT})"
    return active_blas


def few_row_product(a: np.ndarray, w: np.ndarray, out: np.ndarray) -> Callable[[], None] | None:
    """A call that writes ``a @ wᵀ`` into ``out`` (C-contiguous float32 arrays that stay alive) through the skinny
    kernel, for NumPy code that repeats one product (the EnCodec LSTM); None when the kernel is not loaded or
    ``a`` has more rows than it takes."""
    if cpu_kernels is None or a.shape[0] > cpu_kernels.skinny_max_rows():
        return None
    for array in (a, w, out):
        if array.dtype != "float32" or not array.flags.c_contiguous:
            raise ValueError("few_row_product needs C-contiguous float32 arrays")
    (rows, inner), outer = a.shape, w.shape[0]
    args = (ROW_MAJOR, NO_TRANS, TRANS, rows, outer, inner, 1.0, a.ctypes.data, inner, w.ctypes.data, inner, 0.0,
            out.ctypes.data, outer)
    sgemm = cpu_kernels.cblas_sgemm
    return lambda: sgemm(*args)


def kernel_counters() -> dict[str, int]:
    """Calls that went through the CPU kernels since load: ``products`` (few-row products the skinny kernel took,
    MLX's included), ``handed_on`` (products passed to the BLAS behind it), ``attention`` (step attention calls),
    ``quantized`` (few-row products of quantized weights); all 0 when the kernels are not loaded."""
    if cpu_kernels is None:
        return {"products": 0, "handed_on": 0, "attention": 0, "quantized": 0}
    out = (ctypes.c_ulonglong * 4)()
    cpu_kernels.kernel_counters(out)
    return {"products": out[0], "handed_on": out[1], "attention": out[2], "quantized": out[3]}


def check(status: int, what: str) -> None:
    """Raise :class:`KernelError` for a kernel's nonzero ``status`` (or an error a void call left behind)."""
    left = cpu_kernels.kernel_take_error() if cpu_kernels is not None else 0
    if status != 0 or left != 0:
        reason = {-1: "refused its arguments", -2: "ran out of memory"}.get(status, f"failed ({status})")
        if left == 2:
            reason = "had no BLAS to hand products to"
        raise KernelError(f"the CPU kernel's {what} {reason}")


@contextmanager
def busy() -> Iterator[None]:
    """Bracket one generation: the kernels' workers spin for the next product only inside (sleep outside), and
    an error a product left behind is raised at the end; DEBUG logs what went through the kernels."""
    if cpu_kernels is None:
        yield
        return
    before = kernel_counters()
    cpu_kernels.kernel_begin()
    try:
        yield
    finally:
        cpu_kernels.kernel_end()
    check(0, "products")
    if log.isEnabledFor(logging.DEBUG):
        after = kernel_counters()
        log.debug("CPU kernels during the generation: %s", {k: after[k] - before[k] for k in after})
