"""Host-memory attention state for the C kernels' one-position steps (``decode_attention`` and
``cross_attention`` of core/cpu/_cpu_kernels.c); the same interface as :mod:`core.cache`, chosen by
:mod:`core.backend` only on a CPU run with the kernels loaded."""

from __future__ import annotations

import math
import mmap

import mlx.core as mx
import numpy as np

from ..cache import CrossKV, attention, split_heads
from . import blas

# A quantized decoder's host caches hold float16 keys and values (see HostKVCache); False keeps them float32, so
# the kernels' step and MLX's caches compute the same sums (tests compare the paths exactly that way).
half_when_quantized = True


def kernels_can_attend(dtype: mx.Dtype, head_dim: int) -> bool:
    """Whether generation with this dtype and head size can attend in the C kernels (loaded, float32)."""
    return blas.cpu_kernels is not None and dtype == mx.float32 and head_dim <= 256


def host_float32(*arrays: mx.array) -> list[np.ndarray]:
    """``arrays`` evaluated (together) as C-contiguous float32 NumPy arrays, for the C kernels (no copy where MLX's
    buffer already is one)."""
    mx.eval(*arrays)
    return [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]


def lazy_zeros(shape: tuple[int, ...], dtype: type[np.floating] = np.float32) -> np.ndarray:
    """Memory for a host KV cache: mapped lazily in small pages, so each page costs its first write only.

    NumPy asks for huge pages for large arrays; where the kernel compacts memory for those on the first write
    (``defrag=madvise``), the first step of a fresh 8-row cache took 0.3-0.6 s instead of 0.09 s.
    """
    count = math.prod(shape)
    memory = mmap.mmap(-1, max(np.dtype(dtype).itemsize * count, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype=dtype, count=count).reshape(shape)


class HostKVCache:
    """A KV cache in NumPy memory whose one-position steps the C kernel attends.

    MLX's CPU attention is one ``cblas_sgemm`` per row and head and a scalar ``exp``: at 8 rows and 250 positions
    ~50 ms of a ~135 ms musicgen-small step. The kernel reads each row's keys and values once, on the product
    threads. A step evaluates its query, key and value (one ``mx.eval`` per layer) and hands their buffers over;
    longer inputs (the prefill) attend in MLX and are copied in.

    ``half`` keeps the keys and values as float16 (rounded to nearest when written; scores and sums stay float32):
    the attention of many rows reads the cache at the memory's speed, so fewer bytes take less time (8 rows of a
    5 s musicgen-small clip, during generation: 1.83 -> 1.24 s; int8 caches, also tried, were no faster).
    :func:`core.backend.make_caches` asks for it only for a quantized decoder, whose products round more than that
    already; float32 decoders keep exact caches.
    """

    def __init__(self, batch: int, heads: int, head_dim: int, length: int, half: bool = False):
        shape = (batch, heads, length, head_dim)
        dtype = np.float16 if half else np.float32
        self.keys, self.values = lazy_zeros(shape, dtype), lazy_zeros(shape, dtype)
        self.half = half
        self.offset = 0

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write ``(B, H, T, D)`` at the current offset; return everything written so far, as float32 MLX arrays
        (as the cache holds them: rounded to float16 where ``half``)."""
        end = self.offset + keys.shape[2]
        self.keys[:, :, self.offset:end] = np.asarray(keys.astype(mx.float32))
        self.values[:, :, self.offset:end] = np.asarray(values.astype(mx.float32))
        self.offset = end
        if end == keys.shape[2] and not self.half:
            return keys, values
        return (mx.array(self.keys[:, :, :end].astype(np.float32, copy=False)),
                mx.array(self.values[:, :, :end].astype(np.float32, copy=False)))

    def attend(self, q: mx.array, k: mx.array, v: mx.array, heads: int, scale: float,
               mask: mx.array | str | None) -> mx.array:
        if q.shape[1] != 1:  # the prefill: MLX attends, the cache keeps a copy
            keys, values = self.update(split_heads(k, heads), split_heads(v, heads))
            return attention(split_heads(q, heads), keys, values, scale, mask)
        return mx.array(self.attend_host(*host_float32(q, k, v), scale))

    def attend_host(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
        """One position's attention on host arrays: ``q``, ``k``, ``v`` C-contiguous float32 ``(B, 1, H·D)``
        (``(B, H·D)`` will do); returns ``(B, 1, H·D)``-shaped like ``q``."""
        B, heads, capacity, head_dim = self.keys.shape
        if self.offset >= capacity:
            raise ValueError(f"the KV cache holds {capacity} positions")
        out = np.empty_like(q)
        self.offset += 1
        kernel = blas.cpu_kernels.decode_attention_f16 if self.half else blas.cpu_kernels.decode_attention
        blas.check(kernel(B * heads, self.offset, head_dim, scale, q.ctypes.data, k.ctypes.data, v.ctypes.data,
                          self.keys.ctypes.data, self.values.ctypes.data, capacity, out.ctypes.data),
                   "decode_attention_f16" if self.half else "decode_attention")
        return out

    def select(self, rows: mx.array) -> None:
        index = np.asarray(rows)
        self.keys, self.values = self.keys[index], self.values[index]

    @property
    def state(self) -> list[mx.array]:
        return []  # nothing for MLX to evaluate: every step has written it already


class HostCrossKV(CrossKV):
    """One layer's cross-attention keys/values and key mask, also in NumPy memory, for the C kernel's one-position
    steps; longer inputs (the prefill) attend in MLX.

    MLX attends the text one ``cblas_sgemm`` per row and head: 10-14 ms of a 105 ms step at 8 rows, 4 at 2.
    """

    def __init__(self, keys: mx.array, values: mx.array, mask: mx.array):
        super().__init__(keys, values, mask)  # (B, H, S, D), (B, 1, 1, S) bool
        self.host_keys, self.host_values = host_float32(keys, values)
        self.host_mask = np.ascontiguousarray(np.asarray(mask).reshape(mask.shape[0], -1), dtype=np.uint8)

    def attend(self, q: mx.array, heads: int, scale: float) -> mx.array:
        if q.shape[1] != 1:
            return super().attend(q, heads, scale)
        return mx.array(self.attend_host(*host_float32(q), scale))

    def attend_host(self, q: np.ndarray, scale: float) -> np.ndarray:
        """One position's cross-attention on a host array: ``q`` C-contiguous float32 ``(B, 1, H·D)``."""
        B, heads, length, head_dim = self.host_keys.shape
        out = np.empty_like(q)
        blas.check(blas.cpu_kernels.cross_attention(
            B, heads, length, head_dim, scale, q.ctypes.data, self.host_keys.ctypes.data,
            self.host_values.ctypes.data, self.host_mask.ctypes.data, out.ctypes.data), "cross_attention")
        return out

    def select(self, rows: mx.array) -> HostCrossKV:
        return HostCrossKV(self.keys[rows], self.values[rows], self.mask[rows])
