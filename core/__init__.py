"""MusicGen (T5 text encoder, transformer decoder over EnCodec tokens, EnCodec) on MLX.

``import core`` has no side effects: it loads no shared library and imports no MLX until a name below is used.
On Linux, call :func:`preload_backend` *before* anything imports MLX to give MLX's CPU products the package's fast
kernels and an optimised BLAS (``python -m core``, ``python -m bot`` and the benchmark do); without it MLX runs on
the reference BLAS the ``mlx[cpu]`` wheel links, and a warning says so once a model loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .encodec import EncodecModel
    from .generation import Clip, GenerationRequest, GenerationStopped
    from .loading import CheckpointError
    from .pipeline import MusicGen

# public name -> module that defines it; imported on first use (PEP 562), so `import core` imports no MLX
_EXPORTS = {
    "CheckpointError": ".loading",
    "Clip": ".generation",
    "EncodecModel": ".encodec",
    "GenerationRequest": ".generation",
    "GenerationStopped": ".generation",
    "MusicGen": ".pipeline",
}


def preload_backend() -> str:
    """Choose the CPU backend before MLX is imported (idempotent); return a one-line description of it.

    On Linux this loads the package's CPU kernels and OpenBLAS/BLIS into the global symbol scope so that MLX's
    ``cblas_sgemm`` calls resolve to them; elsewhere it does nothing. Settings: ``MUSICGEN_BLAS``,
    ``MUSICGEN_SKINNY_GEMM``, ``MUSICGEN_GEMM_THREADS`` (see README).
    """
    from .cpu.blas import preload_blas

    return preload_blas()


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = ["CheckpointError", "Clip", "EncodecModel", "GenerationRequest", "GenerationStopped", "MusicGen",
           "preload_backend"]
