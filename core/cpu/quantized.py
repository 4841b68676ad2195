"""Quantized linear layers on the Linux CPU through the CPU kernels' ``quantized_matmul`` (issue 14, a sketch not
yet wired into the model).

The weights stay in MLX's own quantized layout (``mx.quantize``: uint32-packed values, float32 scales and biases per
group), the same arrays ``nn.QuantizedLinear`` holds, so a checkpoint quantized once serves Metal (``nn.QuantizedLinear``)
and this layer alike. A call with at most 16 rows (a decoder step) evaluates its input, hands it to the kernel as a
NumPy view and wraps the result in an MLX array; anything larger, or a process without the kernels, goes to
``mx.quantized_matmul``. :func:`quantize_weights` quantizes a loaded weight dictionary one tensor at a time, so the
float32 weights and their quantized copies are never all held at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from core.cpu import blas

log = logging.getLogger(__name__)

GROUP_SIZE = 64
BITS = (4, 8)


class QuantizedLinear(nn.Module):
    """``y = x · dequantize(weight)ᵀ (+ bias)`` with the parameters of ``nn.QuantizedLinear`` (``weight`` packed,
    ``scales``, ``biases``, optional ``bias``), computed by the CPU kernel for a few rows."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool = False, group_size: int = GROUP_SIZE,
                 bits: int = 8):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
        if input_dims % group_size:
            raise ValueError(f"input_dims {input_dims} is not a multiple of the group size {group_size}")
        self.group_size, self.bits = group_size, bits
        self.input_dims, self.output_dims = input_dims, output_dims
        self.weight, self.scales, self.biases = mx.quantize(mx.zeros((output_dims, input_dims)), group_size, bits)
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()
        self._set_host(None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = GROUP_SIZE, bits: int = 8) -> QuantizedLinear:
        """The quantized form of ``linear`` (evaluated, so the float32 weight can be dropped right after)."""
        output_dims, input_dims = linear.weight.shape
        layer = cls(input_dims, output_dims, "bias" in linear, group_size, bits)
        layer.weight, layer.scales, layer.biases = mx.quantize(linear.weight, group_size, bits)
        if "bias" in linear:
            layer.bias = linear.bias
        mx.eval(layer.parameters())
        return layer

    def _set_host(self, host: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> None:
        object.__setattr__(self, "_host", host)  # a plain attribute, not one of the module's parameters

    def _host_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # NumPy views of the (evaluated) MLX arrays, made once: they share the memory, nothing is copied
        if self._host is None or self._host[0].ctypes.data != np.asarray(self.weight).ctypes.data:
            mx.eval(self.weight, self.scales, self.biases)
            self._set_host((np.asarray(self.weight), np.asarray(self.scales), np.asarray(self.biases)))
        return self._host

    def __call__(self, x: mx.array) -> mx.array:
        kernel = blas.quantized_kernel()
        rows = x.size // self.input_dims
        if kernel is None or rows > kernel.quantized_max_rows() or x.dtype != mx.float32 or self.scales.dtype != mx.float32:
            y = mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True,
                                    group_size=self.group_size, bits=self.bits)
        else:
            w, scales, biases = self._host_arrays()
            mx.eval(x)
            host = np.ascontiguousarray(np.asarray(x).reshape(rows, self.input_dims))
            out = np.empty((rows, self.output_dims), np.float32)
            status = kernel.quantized_matmul(rows, self.output_dims, self.input_dims, self.bits, self.group_size,
                                             host.ctypes.data, w.ctypes.data, scales.ctypes.data, biases.ctypes.data,
                                             out.ctypes.data)
            if status != 0:
                raise RuntimeError(f"quantized_matmul refused a {rows}x{self.input_dims} product (status {status})")
            y = mx.array(out).reshape(*x.shape[:-1], self.output_dims)
        return y + self.bias if "bias" in self else y


def quantize_weights(weights: MutableMapping[str, mx.array], predicate: Callable[[str, mx.array], bool],
                     group_size: int = GROUP_SIZE, bits: int = 8) -> MutableMapping[str, mx.array]:
    """Quantize, in place, every ``<name>.weight`` of ``weights`` that ``predicate(name, weight)`` accepts into
    ``<name>.weight`` (packed), ``<name>.scales`` and ``<name>.biases``, the parameters of :class:`QuantizedLinear`
    and ``nn.QuantizedLinear``. One tensor at a time: each quantized copy is evaluated and its float32 source dropped
    before the next, so at most one float32 matrix is held beside the quantized ones (the rest of the float32
    weights stay as loaded: mapped lazily from the file by ``mx.load`` until used)."""
    for key in [k for k in weights if k.endswith(".weight")]:
        name = key[: -len(".weight")]
        weight = weights[key]
        if weight.ndim != 2 or not predicate(name, weight):
            continue
        q, scales, biases = mx.quantize(weight.astype(mx.float32), group_size, bits)
        mx.eval(q, scales, biases)
        del weight
        weights[key], weights[f"{name}.scales"], weights[f"{name}.biases"] = q, scales, biases
    return weights
