"""Elementwise functions that MLX's CPU backend computes slowly, as compiled compositions of cheap ops.

On the CPU, MLX evaluates ``erf`` (so ``nn.gelu``) one element at a time, and ``mx.fast.layer_norm`` costs ~70 µs
for a (2, 1024) input. A decoder step calls GELU 24 times and layer norm 73 times on a few rows; with
``mx.compile`` both become one fused loop each. Measured on a 2-core x86-64 VM: GELU of (8, 4096) 0.87 → 0.12 ms,
layer norm of (2, 1024) 72 → 23 µs. :mod:`core.backend` hands them to the decoder on a CPU run only; other
devices (Metal) use the MLX built-ins as they are.

``mx.compile`` on the CPU builds its fused kernels with the system C++ compiler once per machine (cached in the
temporary directory); without one, MLX runs the same ops unfused and the results are the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

# erf(x) ≈ x · P(x²) / Q(x²) on [-4, 4] (|erf| rounds to 1 outside in float32): the rational approximation used
# by Eigen and XLA for float32, within a few ulp of the exact function.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def erf_rational(x: mx.array) -> mx.array:
    """``erf`` from multiplications, additions and one division (float32 accuracy)."""
    x = mx.clip(x, -4.0, 4.0)
    x2 = x * x
    p = x2 * _ERF_P[0] + _ERF_P[1]
    for c in _ERF_P[2:]:
        p = p * x2 + c
    q = x2 * _ERF_Q[0] + _ERF_Q[1]
    for c in _ERF_Q[2:]:
        q = q * x2 + c
    return x * p / q


def _gelu(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + erf_rational(x * 0.7071067811865476))


@functools.lru_cache(maxsize=8)
def _compiled_layer_norm(eps: float) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    def layer_norm(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
        mean = x.mean(axis=-1, keepdims=True)
        centred = x - mean
        variance = (centred * centred).mean(axis=-1, keepdims=True)
        return centred * mx.rsqrt(variance + eps) * weight + bias

    return mx.compile(layer_norm)


_compiled_gelu = mx.compile(_gelu, shapeless=True)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as ``nn.gelu``, fused (float32; other dtypes through ``nn.gelu``)."""
    if x.dtype != mx.float32:
        return nn.gelu(x)
    return _compiled_gelu(x)


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """Layer norm over the last axis, as ``mx.fast.layer_norm``, fused (float32; other dtypes through it)."""
    if x.dtype != mx.float32:
        return mx.fast.layer_norm(x, weight, bias, eps)
    return _compiled_layer_norm(float(eps))(x, weight, bias)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (with weight and bias) through :func:`layer_norm`."""

    def __call__(self, x: mx.array) -> mx.array:
        return layer_norm(x, self.weight, self.bias, self.eps)
