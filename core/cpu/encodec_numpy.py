"""EnCodec's CPU paths in NumPy (chosen by :func:`core.backend.cpu_paths` on a CPU run only): the ELU and the
LSTM recurrence, each with a plain MLX version in :mod:`core.encodec` that tests compare it with."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import blas

log = logging.getLogger(__name__)


def elu_numpy(x: mx.array) -> mx.array:
    """``torch.nn.ELU()`` (alpha 1) computed on the host: evaluates ``x``.

    MLX's CPU ``expm1`` is a scalar loop (~40x slower than an add) and ``where`` ~15x. With the C kernels loaded
    (:func:`core.preload_backend`) one vectorised pass on their threads (``elu_inplace``, within a few float32 ulp of
    ``expm1``); else NumPy, whose ``expm1`` is vectorised only on AVX-512 CPUs (a libm call per value elsewhere).
    """
    if blas.cpu_kernels is not None and x.dtype == mx.float32:
        out = np.array(x, dtype=np.float32, order="C")
        blas.cpu_kernels.elu_inplace(out.size, out.ctypes.data)
        return mx.array(out)
    a = np.asarray(x)
    out = np.minimum(a, 0.0)
    np.expm1(out, out=out)
    out += np.maximum(a, 0.0)
    return mx.array(out)


def lstm_recurrence_numpy(gates_x: np.ndarray, w_hh: np.ndarray, *, kernel: bool = True) -> np.ndarray:
    """:meth:`LSTM.recurrence_plain` in NumPy, float32: gates_x (B, T, 4D), w_hh (4D, D) -> (B, T, D).

    Each step is dominated by reading ``w_hh`` (16 MB for D = 1024). MLX's CPU matmul sends a single row to
    ``sgemm``, which repacks the whole matrix every step; here every row's product goes straight to the skinny
    kernel (:mod:`core.cpu.blas`), which streams the matrix once for all rows on its threads (measured on 2 cores,
    250 steps of D = 1024: 86 ms for one row, 99 ms for four), or, without it (``kernel=False``), to one
    ``sgemv`` of NumPy's bundled BLAS per row (159 ms for one row, 596 ms for four). NumPy's ``tanh`` is
    vectorised. Sigmoids are ``0.5 * tanh(x / 2) + 0.5`` so nothing can overflow.
    """
    batch, steps, four_dim = gates_x.shape
    dim = four_dim // 4
    out = np.empty((batch, steps, dim), dtype=np.float32)
    h = np.zeros((batch, dim), dtype=np.float32)
    c = np.zeros((batch, dim), dtype=np.float32)
    gates = np.empty((batch, four_dim), dtype=np.float32)
    half = np.full(four_dim, 0.5, dtype=np.float32)
    half[2 * dim: 3 * dim] = 1.0  # i, f, o go through sigmoids, g through tanh
    i_f, g, o = gates[:, : 2 * dim], gates[:, 2 * dim: 3 * dim], gates[:, 3 * dim:]
    w_hh = np.ascontiguousarray(w_hh, dtype=np.float32)
    product = blas.few_row_product(h, w_hh, gates) if kernel else None
    for t in range(steps):
        if product is not None:
            product()  # gates = h @ w_hhᵀ
        else:
            for b in range(batch):  # one matrix-vector product per row: OpenBLAS's few-row sgemm is ~3x slower
                np.matmul(w_hh, h[b], out=gates[b])
        gates += gates_x[:, t]
        gates *= half
        np.tanh(gates, out=gates)
        for part in (i_f, o):
            part *= 0.5
            part += 0.5
        c *= i_f[:, dim:]  # forget
        c += i_f[:, :dim] * g
        np.multiply(o, np.tanh(c), out=h)
        out[:, t] = h
    return out


@contextlib.contextmanager
def numpy_blas_threads(count: int) -> Iterator[None]:
    """Run the block with NumPy's bundled OpenBLAS limited to ``count`` threads (a no-op when not found).

    The LSTM alternates a 0.1 ms matrix-vector product with small elementwise steps; on a busy 2-core machine a
    second BLAS thread is often descheduled between steps and each step then waits milliseconds for it
    (measured: 1.5 s instead of 0.07 s for 250 steps), while one thread is never slower than ~2x.
    """
    functions = _openblas_thread_functions()
    if functions is None:
        yield
        return
    get, set_ = functions
    before = get()
    set_(count)
    try:
        yield
    finally:
        set_(before)


@functools.cache
def _openblas_thread_functions() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for path in sorted(libs.glob("*openblas*")):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", "_64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.restype, set_.restype, set_.argtypes = ctypes.c_int, None, [ctypes.c_int]
                    return get, set_
    log.debug("NumPy's OpenBLAS not found in %s; its thread count stays as it is", libs)
    return None
