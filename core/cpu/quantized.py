"""The decoder's quantized projections on the CPU: few-row products of MLX's 4- and 8-bit layout in the C kernels.

MLX's CPU ``quantized_matmul`` is single-threaded and slower than the float32 product it replaces (FACTS.md: q4
5.5 ms vs fp32 1.0 ms for a 4096×1024 matrix), so a quantized decoder on MLX alone is slower than fp32. A decoder
step multiplies a few rows (2 per prompt with guidance) by every matrix; ``quantized_matmul`` in
core/cpu/_cpu_kernels.c streams the packed weights once, dequantises them in registers and meets every row there,
on the kernels' threads. Its result is the same as MLX's to float32 rounding (tests/test_quantized_kernel.py).
Every call crosses from Python (evaluates its input, ~20 µs), so projections of one input go in one call
(:func:`project`: q, k and v; the heads of logits).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import blas
from .cache import host_float32

MAX_ROWS = 16  # SKINNY_MAX_ROWS of the kernels
MAX_MATRICES = 8  # QUANT_MAX_MATRICES


class _Host:
    """A layer's packed weights, scales and biases as NumPy views (no copy) and their addresses, for the kernel;
    rebuilt when the layer's weight array is replaced (``load_weights``)."""

    def __init__(self, layer: nn.QuantizedLinear):
        self.weight = layer.weight
        self.arrays = [np.ascontiguousarray(np.asarray(a)) for a in (layer.weight, layer.scales, layer.biases)]
        self.addresses = [a.ctypes.data for a in self.arrays]
        self.outputs = layer.weight.shape[0]


class FewRowQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` (affine, no bias) whose few-row products run in the C kernels; MLX's
    ``quantized_matmul`` for anything else (the prefill, float16 scales, more than 16 rows)."""

    def _host(self) -> _Host | None:
        if (blas.cpu_kernels is None or self.mode != "affine" or "bias" in self or self.scales.dtype != mx.float32
                or self.group_size % 32 or mx.default_device() != mx.cpu):
            return None
        host = self.__dict__.get("_host_arrays")
        if host is None or host.weight is not self.weight:
            mx.eval(self.weight, self.scales, self.biases)
            host = _Host(self)
            object.__setattr__(self, "_host_arrays", host)  # a plain attribute: not a parameter
        return host

    def __call__(self, x: mx.array) -> mx.array:
        return project(x, [self])[0]


def project(x: mx.array, layers: Sequence[nn.Module]) -> list[mx.array]:
    """``[layer(x) for layer in layers]``, in one kernel call when every layer is a :class:`FewRowQuantizedLinear`
    of the same kind and ``x`` has few rows."""
    rows, inner = x.size // x.shape[-1], x.shape[-1]
    hosts = [layer._host() if isinstance(layer, FewRowQuantizedLinear) else None for layer in layers]
    first = layers[0]
    if (rows > MAX_ROWS or len(layers) > MAX_MATRICES or any(h is None for h in hosts)
            or any(layer.bits != first.bits or layer.group_size != first.group_size for layer in layers)):
        return [nn.QuantizedLinear.__call__(layer, x) if isinstance(layer, FewRowQuantizedLinear) else layer(x)
                for layer in layers]
    (a,) = host_float32(x.reshape(rows, inner))
    widths = [h.outputs for h in hosts]
    y = mx.array(project_host(a, layers, hosts))
    lead = x.shape[:-1]
    if len(layers) == 1:
        return [y.reshape(*lead, widths[0])]
    parts, start = [], 0
    for width in widths:
        parts.append(y[:, start:start + width].reshape(*lead, width))
        start += width
    return parts


def project_host(a: np.ndarray, layers: Sequence[FewRowQuantizedLinear], hosts: Sequence[_Host] | None = None
                 ) -> np.ndarray:
    """``a`` ``(rows, K)`` C-contiguous float32 times every layer's weights, side by side in one ``(rows, ΣN)``
    array, in one kernel call (rows <= 16; layers of one kind whose ``_host()`` is not None)."""
    return Product(layers, hosts)(a)


class Product:
    """One kernel call's fixed arguments for some layers of one input, built once (a decoder step makes ~150
    calls: rebuilding the ctypes arguments each time cost ~10 µs apiece)."""

    def __init__(self, layers: Sequence[FewRowQuantizedLinear], hosts: Sequence[_Host] | None = None):
        self.hosts = list(hosts or [layer._host() for layer in layers])
        count, first = len(layers), layers[0]
        widths = [h.outputs for h in self.hosts]
        self.width = sum(widths)
        pointers = ctypes.c_void_p * count
        self.args = (first.bits, first.group_size, count, (ctypes.c_int * count)(*widths),
                     pointers(*(h.addresses[0] for h in self.hosts)), pointers(*(h.addresses[1] for h in self.hosts)),
                     pointers(*(h.addresses[2] for h in self.hosts)))

    def __call__(self, a: np.ndarray) -> np.ndarray:
        out = np.empty((a.shape[0], self.width), dtype=np.float32)
        bits, group, count, widths, weights, scales, biases = self.args
        status = blas.cpu_kernels.quantized_matmul(a.shape[0], a.shape[1], bits, group, count, widths, a.ctypes.data,
                                                   weights, scales, biases, out.ctypes.data)
        if status:
            blas.check(status, "quantized_matmul")
        return out
