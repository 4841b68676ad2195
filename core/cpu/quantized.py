"""The decoder's quantized projections on the CPU: few-row products of MLX's 4- and 8-bit layout in the C kernels.

MLX's CPU ``quantized_matmul`` is single-threaded and slower than the float32 product it replaces (FACTS.md: q4
5.5 ms vs fp32 1.0 ms for a 4096×1024 matrix), so a quantized decoder on MLX alone is slower than fp32. A decoder
step multiplies a few rows (2 per prompt with guidance) by every matrix; ``quantized_matmul`` in
core/cpu/_cpu_kernels.c streams the packed weights once, dequantises them in registers and meets every row there,
on the kernels' threads. Its result is the same as MLX's to float32 rounding (tests/test_quantized_kernel.py).
Every call crosses from Python (evaluates its input, ~20 µs), so projections of one input go in one call
(:func:`project`: q, k and v; the heads of logits).

On an x86-64 CPU with AVX2, 8- and 4-bit layers take a second kernel, ``quantized_matmul_packed``: the activations
are rounded to int8 per row and group of inputs and meet the weights in integer multiply-adds, with no float
dequantisation. With VNNI (AVX-512), ``vpdpbusd`` multiplies 4 inputs by 16 weights at once (8 bits: 3.5× the float
kernel at 8 rows; 4 bits: two per word, its low and high nibbles); with AVX2 alone ``vpmaddubsw`` takes the weights
as nibbles (a full byte would overflow its int16 sums), the same integer sums (8 bits on a 2-core AMD EPYC: 1.6× the
float kernel at 8 rows, 1.1× at 2 where both stream the weights at memory speed). It
reads the weights in blocks of 16 outputs, so on first use a layer's own ``weight``, ``scales`` and
``biases`` are rearranged into that order, in place of MLX's (:func:`pack`; same shapes and bytes, no second copy
of the decoder): from then on every product of the layer runs in the kernels, the long ones 16 rows at a time, and
:meth:`FewRowQuantizedLinear.mlx_layout` gives MLX's arrays back (for saving). Set :data:`int8_activations` to False
before the first step to keep float activations (MLX's exact product).
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
PACK_COLUMNS = 16  # output columns per block of the int8-activation layout (_cpu_kernels_int8.h)


int8_activations = True  # quantized layers take the int8-activation kernel where it is the fast one (AVX2, VNNI)


def pack(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MLX's 8- or 4-bit layout (``weight`` (N, K · bits / 32) uint32, ``scales`` and ``biases`` (N, K / group))
    rearranged for ``quantized_matmul_packed``, keeping each array's shape and dtype: per block of 16 outputs, the
    32-bit word of each output for the first 4 (or 8) inputs, then the next word; the scales and biases of a block's
    group side by side. N must be a multiple of 16."""
    return tuple(_blocks(a, forward=True) for a in (weight, scales, biases))


def unpack(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`pack` undone: MLX's layout again."""
    return tuple(_blocks(a, forward=False) for a in (weight, scales, biases))


def _blocks(a: np.ndarray, forward: bool) -> np.ndarray:
    """Within each block of 16 rows, rows and columns swapped (a (16, C) block stored as (C, 16)), or back."""
    rows, columns = a.shape
    blocked = a.reshape(rows // PACK_COLUMNS, PACK_COLUMNS, columns) if forward else \
        a.reshape(rows // PACK_COLUMNS, columns, PACK_COLUMNS)
    return np.ascontiguousarray(blocked.transpose(0, 2, 1)).reshape(rows, columns)


def packable(layer: nn.QuantizedLinear) -> bool:
    """Whether this layer's products take the int8-activation kernel: 8 or 4 bits, outputs in whole blocks, and a
    CPU with AVX2 (elsewhere the float kernel is the faster one), unless :data:`int8_activations` is off."""
    return (int8_activations and layer.bits in (8, 4) and layer.weight.shape[0] % PACK_COLUMNS == 0
            and layer.group_size % (32 // layer.bits) == 0 and bool(blas.cpu_kernels.packed_fast()))


class _Host:
    """A layer's weights, scales and biases for the kernel, and their addresses: NumPy views of the layer's own MLX
    arrays (no copy). For the int8-activation kernel (``packed``) the layer's arrays are first replaced by their
    :func:`pack` order (one layer's worth of memory in flight). Rebuilt when the layer's weight array is replaced
    (``load_weights``)."""

    def __init__(self, layer: FewRowQuantizedLinear, packed_already: bool):
        self.packed = packed_already or packable(layer)
        if self.packed and not packed_already:
            arrays = pack(*(np.asarray(a) for a in (layer.weight, layer.scales, layer.biases)))
            layer.weight, layer.scales, layer.biases = (mx.array(a) for a in arrays)
            del arrays
            mx.eval(layer.weight, layer.scales, layer.biases)
            mx.clear_cache()  # MLX's arrays just dropped: give their memory back rather than keep it cached
        self.weight = layer.weight
        self.arrays = [np.ascontiguousarray(np.asarray(a)) for a in (layer.weight, layer.scales, layer.biases)]
        self.addresses = [a.ctypes.data for a in self.arrays]
        self.outputs = layer.weight.shape[0]


class FewRowQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` (affine, no bias) whose few-row products run in the C kernels; MLX's
    ``quantized_matmul`` for anything else (the prefill, float16 scales, more than 16 rows), except for layers
    rearranged for the int8-activation kernel, whose every product runs there."""

    def _host(self) -> _Host | None:
        host = self.__dict__.get("_host_arrays")
        packed = self.packed
        if not packed and (blas.cpu_kernels is None or self.mode != "affine" or "bias" in self
                           or self.scales.dtype != mx.float32 or self.group_size % 32 or mx.default_device() != mx.cpu):
            return None
        if host is None or host.weight is not self.weight:
            mx.eval(self.weight, self.scales, self.biases)
            host = _Host(self, packed)
            object.__setattr__(self, "_host_arrays", host)  # a plain attribute: not a parameter
        return host

    @property
    def packed(self) -> bool:
        """Whether the layer's arrays are in :func:`pack`'s order (not MLX's) now."""
        host = self.__dict__.get("_host_arrays")
        return host is not None and host.packed and host.weight is self.weight

    def mlx_layout(self) -> dict[str, mx.array]:
        """``weight``, ``scales`` and ``biases`` in MLX's layout (what a checkpoint holds), whatever the kernels
        made of them."""
        arrays = (self.weight, self.scales, self.biases)
        if self.packed:
            arrays = tuple(mx.array(a) for a in unpack(*(np.asarray(a) for a in arrays)))
        return dict(zip(("weight", "scales", "biases"), arrays, strict=True))

    def __call__(self, x: mx.array) -> mx.array:
        return project(x, [self])[0]


def project(x: mx.array, layers: Sequence[nn.Module]) -> list[mx.array]:
    """``[layer(x) for layer in layers]``, in one kernel call when every layer is a :class:`FewRowQuantizedLinear`
    of the same kind and ``x`` has few rows (many rows: 16 at a time for the int8-activation kernel's layers)."""
    rows, inner = x.size // x.shape[-1], x.shape[-1]
    hosts = [layer._host() if isinstance(layer, FewRowQuantizedLinear) else None for layer in layers]
    first = layers[0]
    if len(layers) > 1 and (len(layers) > MAX_MATRICES or any(h is None for h in hosts)
                            or any(layer.bits != first.bits or layer.group_size != first.group_size for layer in layers)
                            or len({h.packed for h in hosts}) != 1):
        return [project(x, [layer])[0] for layer in layers]
    if hosts[0] is None:  # not the kernels' (or not on a CPU run): MLX's own product
        return [nn.QuantizedLinear.__call__(first, x) if isinstance(first, FewRowQuantizedLinear) else first(x)]
    if rows > MAX_ROWS and not hosts[0].packed:
        return [nn.QuantizedLinear.__call__(layer, x) for layer in layers]
    (a,) = host_float32(x.reshape(rows, inner))
    widths = [h.outputs for h in hosts]
    product = Product(layers, hosts)
    if rows <= MAX_ROWS:
        y = mx.array(product(a))
    else:
        y = mx.array(np.concatenate([product(a[start:start + MAX_ROWS]) for start in range(0, rows, MAX_ROWS)]))
    lead = x.shape[:-1]
    if len(layers) == 1:
        return [y.reshape(*lead, widths[0])]
    parts, start = [], 0
    for width in widths:
        parts.append(y[:, start:start + width].reshape(*lead, width))
        start += width
    return parts


class Product:
    """One kernel call's fixed arguments for some layers of one input, built once (a decoder step makes ~150
    calls: rebuilding the ctypes arguments each time cost ~10 µs apiece)."""

    def __init__(self, layers: Sequence[FewRowQuantizedLinear], hosts: Sequence[_Host] | None = None):
        self.hosts = list(hosts or [layer._host() for layer in layers])
        count, first = len(layers), layers[0]
        widths = [h.outputs for h in self.hosts]
        self.width = sum(widths)
        self.packed = self.hosts[0].packed
        if any(h.packed != self.packed for h in self.hosts):
            raise ValueError("layers of one product must all be packed for the int8-activation kernel, or none")
        pointers = ctypes.c_void_p * count
        self.args = (first.bits, first.group_size, count, (ctypes.c_int * count)(*widths),
                     pointers(*(h.addresses[0] for h in self.hosts)), pointers(*(h.addresses[1] for h in self.hosts)),
                     pointers(*(h.addresses[2] for h in self.hosts)))

    def __call__(self, a: np.ndarray) -> np.ndarray:
        out = np.empty((a.shape[0], self.width), dtype=np.float32)
        bits, group, count, widths, weights, scales, biases = self.args
        if self.packed:
            status = blas.cpu_kernels.quantized_matmul_packed(a.shape[0], a.shape[1], bits, group, count, widths,
                                                              a.ctypes.data, weights, scales, biases, out.ctypes.data)
        else:
            status = blas.cpu_kernels.quantized_matmul(a.shape[0], a.shape[1], bits, group, count, widths,
                                                       a.ctypes.data, weights, scales, biases, out.ctypes.data)
        if status:
            blas.check(status, "quantized_matmul_packed" if self.packed else "quantized_matmul")
        return out
