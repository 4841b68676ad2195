"""Give MLX's CPU matmuls a fast BLAS on Linux.

The ``mlx[cpu]`` wheel links the reference BLAS, ~30x slower for fp32 GEMM than an optimised one. Loading an
optimised CBLAS into the global symbol scope *before* MLX is imported makes MLX's ``cblas_sgemm`` calls resolve to
it. Measured on a 2-core x86-64 machine (bench/README figures): for the decoder's batch-2 matrix-vector products,
BLIS (Debian ``libblis4-pthread``) read weights about 2x faster than OpenBLAS 0.3.21 (``libopenblas0-pthread``), and
both are far ahead of the reference BLAS, so BLIS is preferred, then OpenBLAS.

``MUSICGEN_BLAS`` chooses: ``auto`` (default), ``blis``, ``openblas``, ``reference`` (opt out), or a library path.
BLIS threads default to the number of cores (``BLIS_NUM_THREADS`` overrides).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

LIBRARIES = {
    # the pthread build first: the OpenMP one spins and fights torch's OpenMP runtime for the cores
    "blis": ("/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4", "/usr/lib/aarch64-linux-gnu/blis-pthread/libblis.so.4",
             "/usr/lib/x86_64-linux-gnu/libblis.so.4", "/usr/lib/aarch64-linux-gnu/libblis.so.4",
             "/usr/lib64/libblis.so.4", "/usr/lib/libblis.so.4"),
    "openblas": ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
                 "/usr/lib64/libopenblas.so.0", "/usr/lib/libopenblas.so.0"),
}
HINT = "apt-get install libblis4-pthread (or libopenblas0-pthread)"

active_blas = "not chosen yet"


def _load(path: str) -> bool:
    if "blis" in os.path.basename(path).lower():
        # BLIS is single-threaded unless told otherwise; it reads this when first called.
        os.environ.setdefault("BLIS_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        log.warning("could not load %s: %s", path, e)
        return False
    return True


def preload_blas() -> str:
    """Load the fastest CBLAS available globally, before MLX; return a short description of what MLX will use.

    Idempotent. Does nothing off Linux (macOS MLX uses Accelerate and Metal).
    """
    global active_blas
    if active_blas != "not chosen yet":
        return active_blas
    choice = os.environ.get("MUSICGEN_BLAS", "auto").strip() or "auto"
    if not sys.platform.startswith("linux"):
        active_blas = "platform default (Accelerate/Metal)"
    elif choice == "reference":
        active_blas = "reference BLAS (MUSICGEN_BLAS=reference)"
    elif "mlx.core" in sys.modules:
        active_blas = "reference BLAS (mlx was imported before core, too late to preload a faster one)"
    else:
        if choice == "auto":
            candidates = [(name, p) for name in ("blis", "openblas") for p in LIBRARIES[name]]
        elif choice in LIBRARIES:
            candidates = [(choice, p) for p in LIBRARIES[choice]]
        else:
            candidates = [(os.path.basename(choice), choice)]
        for name, path in candidates:
            if os.path.exists(path) and _load(path):
                threads = f", {os.environ['BLIS_NUM_THREADS']} threads" if name == "blis" else ""
                active_blas = f"{name} ({path}{threads})"
                break
        else:
            active_blas = f"reference BLAS (no faster BLAS found for MUSICGEN_BLAS={choice}: {HINT})"
    return active_blas
