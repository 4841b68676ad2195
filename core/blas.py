"""Use OpenBLAS for MLX's CPU matmuls on Linux when it is installed.

The ``mlx[cpu]`` wheel links the reference BLAS, about 30x slower for fp32 GEMM than OpenBLAS. Loading OpenBLAS
into the global symbol scope *before* MLX is imported makes MLX's BLAS calls resolve to it. Set
``MUSICGEN_BLAS=reference`` to opt out, or ``MUSICGEN_BLAS=/path/to/libopenblas.so`` to pick a library.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

active_blas = "default"


def preload_openblas() -> str:
    """Load OpenBLAS globally if possible; return a short description of the BLAS MLX will use."""
    global active_blas
    choice = os.environ.get("MUSICGEN_BLAS", "auto")
    if not sys.platform.startswith("linux"):
        active_blas = "platform default (Accelerate/Metal on macOS)"
    elif choice == "reference":
        active_blas = "reference BLAS (MUSICGEN_BLAS=reference)"
    elif "mlx.core" in sys.modules and active_blas == "default":
        active_blas = "reference BLAS (mlx was imported before core; OpenBLAS not preloaded)"
    elif active_blas.startswith("OpenBLAS"):
        pass
    else:
        candidates = OPENBLAS_CANDIDATES if choice == "auto" else (choice,)
        for path in candidates:
            if os.path.exists(path):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError as e:
                    log.warning("could not load %s: %s", path, e)
                    continue
                active_blas = f"OpenBLAS ({path})"
                break
        else:
            active_blas = "reference BLAS (OpenBLAS not found: apt-get install libopenblas0-pthread)"
    return active_blas
