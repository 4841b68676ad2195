"""Quantized linear layers on the Linux CPU through the CPU kernels' ``quantized_matmul`` (issue 14).

The weights stay in MLX's own quantized layout (``mx.quantize``: uint32-packed values, float32 scales and biases per
group), the very parameters of ``nn.QuantizedLinear``, so one quantized checkpoint serves Metal
(``nn.QuantizedLinear``) and this layer alike. MLX's own quantized product on the CPU is single-threaded and slower
than the fp32 one; a decoder step (at most 16 rows) goes to the kernel instead, which streams the packed weights
once on the kernels' threads and dequantizes them in registers. Larger inputs (the prefill), other dtypes, or a
process without the kernels go to ``mx.quantized_matmul``.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import blas

log = logging.getLogger(__name__)


class QuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` (affine mode) whose few-row products the CPU kernel computes."""

    def _host_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # NumPy views of the evaluated MLX arrays, made once per loaded weight: they share its memory
        host = self.__dict__.get("_host")
        if host is None or host[0] is not self.weight:
            mx.eval(self.weight, self.scales, self.biases)
            host = (self.weight, np.asarray(self.weight), np.asarray(self.scales), np.asarray(self.biases))
            self.__dict__["_host"] = host  # not a parameter: nn.Module keeps its parameters in its dict items
        return host[1], host[2], host[3]

    def __call__(self, x: mx.array) -> mx.array:
        kernel = blas.quantized_kernel()
        rows = x.size // x.shape[-1]
        if (kernel is None or rows > kernel.quantized_max_rows() or x.dtype != mx.float32
                or self.scales.dtype != mx.float32 or self.mode != "affine"):
            return super().__call__(x)
        w, scales, biases = self._host_arrays()
        (host,) = _host_rows(x, rows)
        out_features = w.shape[0]
        out = np.empty((rows, out_features), np.float32)
        blas.check(kernel.quantized_matmul(rows, out_features, host.shape[1], self.bits, self.group_size,
                                           host.ctypes.data, w.ctypes.data, scales.ctypes.data, biases.ctypes.data,
                                           out.ctypes.data), "quantized_matmul")
        y = mx.array(out).reshape(*x.shape[:-1], out_features)
        return y + self["bias"] if "bias" in self else y


def _host_rows(x: mx.array, rows: int) -> list[np.ndarray]:
    mx.eval(x)
    return [np.ascontiguousarray(np.asarray(x).reshape(rows, x.shape[-1]), dtype=np.float32)]
