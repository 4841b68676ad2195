"""MusicGen (T5 text encoder, transformer decoder over EnCodec tokens, EnCodec) on MLX.

Importing ``core`` before ``mlx`` lets it preload fast matmul kernels on Linux (a few-row kernel in front of
OpenBLAS or BLIS): see :mod:`core.blas`.
"""

from .blas import preload_blas

preload_blas()

from .encodec import EncodecModel  # noqa: E402
from .generation import Clip, GenerationRequest, GenerationStopped  # noqa: E402
from .loading import CheckpointError  # noqa: E402
from .musicgen import MusicGen  # noqa: E402

__all__ = ["CheckpointError", "Clip", "EncodecModel", "GenerationRequest", "GenerationStopped", "MusicGen"]
