"""The decoder's projections on the CPU: ``(W @ xᵀ)ᵀ`` for a few rows where the BLAS streams weights faster so."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import blas


class FewRowLinear(nn.Linear):
    """``nn.Linear`` without bias that, on the CPU with BLIS for a few rows, multiplies as ``(W @ xᵀ)ᵀ``.

    A decoder step multiplies 2 × prompts rows by every weight matrix, so it is bound by streaming the weights.
    Up to 16 rows the skinny kernel (:mod:`core.cpu.blas`) streams them once in ``x @ Wᵀ``. Past it (or from 4 rows
    without it) BLIS streams them faster as ``W @ xᵀ`` (all of a musicgen-small step's products at 16 rows: 152
    vs 160 ms; before the kernel, 8 rows: 104 vs 114 ms), OpenBLAS slower (16 rows: 180 vs 147 ms), so
    ``transposed_rows`` (the row range that takes ``W @ xᵀ``, or None) follows the BLAS in use.
    """

    transposed_rows: tuple[int, int] | None = None  # set below, from the BLAS that core.cpu.blas loaded

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        span = self.transposed_rows
        if span is None or not span[0] <= rows <= span[1] or "bias" in self or mx.default_device() != mx.cpu:
            return super().__call__(x)
        out = self.weight @ x.reshape(rows, x.shape[-1]).T  # (out, rows)
        return out.T.reshape(*x.shape[:-1], out.shape[0])


if blas.active_library == "blis":
    FewRowLinear.transposed_rows = (blas.cpu_kernels.skinny_max_rows() + 1 if blas.cpu_kernels else 4, 64)
