"""A decoder step in host memory: every layer's one-position pass in NumPy and the C kernels, with no MLX
operation in between.

Each return to MLX costs an evaluation (~30-50 µs on a 2-core VM, more under load), and a step of musicgen-small
crosses ~200 times when each quantized projection and attention is one kernel call between MLX operations: that
was as long as the quantized products themselves. Here the hidden state ``(B, 1, dims)`` leaves MLX once per step
and comes back once; the layer norms and residual sums are NumPy, the projections, attention and GELU the kernels'.
:mod:`core.backend` takes this path for one-position steps of a decoder built from
:class:`~core.cpu.quantized.FewRowQuantizedLinear` layers attending through the host caches; anything else (the
prefill, more than 16 rows, float caches) runs in MLX as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from . import blas
from .cache import HostCrossKV, HostKVCache, host_float32
from .quantized import MAX_ROWS, FewRowQuantizedLinear, Product


class _Norm:
    """A layer norm's weight and bias as host arrays, for the kernels' ``layer_norm_rows``."""

    def __init__(self, norm):
        self.weight, self.bias = (np.ascontiguousarray(np.asarray(a), dtype=np.float32) for a in (norm.weight, norm.bias))
        self.eps = float(norm.eps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = np.empty_like(x)
        blas.cpu_kernels.layer_norm_rows(x.shape[0], x.shape[1], x.ctypes.data, self.weight.ctypes.data,
                                         self.bias.ctypes.data, self.eps, out.ctypes.data)
        return out


class _LayerHost:
    """One decoder layer's norms and projections (their kernel calls prepared) for the host step, built once per
    layer and weights."""

    def __init__(self, layer):
        self.key = layer.fc1.weight
        attn = layer.self_attn
        self.heads, self.scale = attn.heads, attn.scale
        self.norm1, self.norm3 = _Norm(layer.self_attn_layer_norm), _Norm(layer.final_layer_norm)
        self.qkv = Product([attn.q_proj, attn.k_proj, attn.v_proj])
        self.out = Product([attn.out_proj])
        self.cross = "encoder_attn" in layer
        if self.cross:
            self.norm2 = _Norm(layer.encoder_attn_layer_norm)
            self.cross_q, self.cross_out = Product([layer.encoder_attn.q_proj]), Product([layer.encoder_attn.out_proj])
        self.fc1, self.fc2 = Product([layer.fc1]), Product([layer.fc2])


def _layer_host(layer) -> _LayerHost | None:
    host = layer.__dict__.get("_host_step")
    if host is not None and host.key is layer.fc1.weight:
        return host
    projections = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.out_proj,
                   layer.fc1, layer.fc2]
    if "encoder_attn" in layer:
        projections += [layer.encoder_attn.q_proj, layer.encoder_attn.out_proj]
    if not all(isinstance(p, FewRowQuantizedLinear) and p._host() is not None for p in projections):
        return None
    if len({(p.bits, p.group_size) for p in projections[:3]}) != 1 or layer.act.__name__ != "gelu":
        return None  # q, k and v go in one call; the approximate GELU has no kernel
    host = _LayerHost(layer)
    object.__setattr__(layer, "_host_step", host)  # a plain attribute: not a parameter
    return host


def usable(layers: Sequence, x: mx.array, text: Sequence | None, cache: Sequence) -> bool:
    """Whether :func:`step` takes this one-position call."""
    if x.ndim != 3 or x.shape[1] != 1 or x.shape[0] > MAX_ROWS or x.dtype != mx.float32 or blas.cpu_kernels is None:
        return False
    if not all(isinstance(c, HostKVCache) for c in cache):
        return False
    if text is not None and not all(isinstance(t, HostCrossKV) for t in text):
        return False
    return all(_layer_host(layer) is not None and _layer_host(layer).cross == (text is not None) for layer in layers)


def step(layers: Sequence, x: mx.array, text: Sequence | None, cache: Sequence) -> mx.array:
    """``x`` ``(B, 1, dims)`` (embeddings plus positions) through every layer, as the layers' own ``__call__``
    would (check :func:`usable` first)."""
    B, _, dims = x.shape
    (h,) = host_float32(x.reshape(B, dims))
    h = h.copy()
    gelu = blas.cpu_kernels.gelu_inplace
    for i, layer in enumerate(layers):
        p = _layer_host(layer)
        qkv = p.qkv(p.norm1(h))  # (B, 3 dims)
        q, k, v = (np.ascontiguousarray(qkv[:, j * dims:(j + 1) * dims]) for j in range(3))
        h += p.out(cache[i].attend_host(q, k, v, p.scale))
        if text is not None:
            h += p.cross_out(text[i].attend_host(p.cross_q(p.norm2(h)), p.scale))
        f = p.fc1(p.norm3(h))
        gelu(f.size, f.ctypes.data)
        h += p.fc2(f)
    return mx.array(h).reshape(B, 1, dims)
