"""The one place that chooses how the decoder runs: which linear layer it is built from and which caches it
attends through. Everything else in the model asks here and never which device it is on.

The MLX backend (:mod:`core.cache`, ``nn.Linear``) runs everywhere. On a Linux CPU run whose kernels
:func:`core.preload_backend` loaded, :mod:`core.cpu` offers host caches the C kernels attend and a linear layer that
follows the BLAS; a Metal (or CUDA) run never imports :mod:`core.cpu`. A later CPU kernel (e.g. few-row products of
MLX's quantized layout, :mod:`core.cpu.quantized`) plugs in here too: :func:`linear_class` and
:func:`quantized_linear_class` are where the model takes its layers from, :func:`project` how it applies several
to one input.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .cache import CrossAttention, CrossKV, KVCache, SelfAttentionCache

log = logging.getLogger(__name__)


def _cpu_backend_loaded() -> bool:
    """Whether this is a Linux CPU run on which :func:`core.preload_backend` loaded something (never imports
    :mod:`core.cpu` otherwise)."""
    if not sys.platform.startswith("linux") or mx.default_device() != mx.cpu:
        return False
    blas = sys.modules.get("core.cpu.blas")
    return blas is not None and blas.active_library is not None


def cpu_backend_missing() -> str | None:
    """On a Linux CPU run whose MLX did not get the CPU backend (:func:`core.preload_backend` not called, or called
    after MLX was imported), what MLX uses instead; None otherwise (a GPU run needs none)."""
    if not sys.platform.startswith("linux") or mx.default_device() != mx.cpu:
        return None
    blas = sys.modules.get("core.cpu.blas")
    chosen = blas.active_blas if blas is not None else "not chosen yet"
    return chosen if chosen == "not chosen yet" or "too late" in chosen else None


def linear_class() -> type[nn.Linear]:
    """The class of the decoder's projections."""
    if _cpu_backend_loaded():
        from .cpu.linear import FewRowLinear

        return FewRowLinear
    return nn.Linear


def quantized_linear_class() -> type[nn.QuantizedLinear]:
    """The class of the decoder's quantized projections: MLX's own (Metal runs it as it is), or on a Linux CPU run
    with the kernels loaded one whose few-row products run in them (:mod:`core.cpu.quantized`)."""
    if _cpu_backend_loaded() and sys.modules["core.cpu.blas"].cpu_kernels is not None:
        from .cpu.quantized import FewRowQuantizedLinear

        return FewRowQuantizedLinear
    return nn.QuantizedLinear


def project(x: mx.array, layers: Sequence[nn.Module]) -> list[mx.array]:
    """``[layer(x) for layer in layers]``: one kernel call for all of them where the layers are the CPU kernels'
    quantized ones (every call costs a crossing from Python)."""
    if "core.cpu.quantized" in sys.modules:
        from .cpu.quantized import FewRowQuantizedLinear
        from .cpu.quantized import project as host_project

        if isinstance(layers[0], FewRowQuantizedLinear):
            return host_project(x, layers)
    return [layer(x) for layer in layers]


def checkpoint_weights(module: nn.Module) -> dict[str, mx.array]:
    """``module``'s parameters, flat, as a checkpoint holds them: quantized layers in MLX's layout even where the
    CPU kernels rearranged them for their int8-activation product."""
    weights = dict(tree_flatten(module.parameters()))
    if "core.cpu.quantized" in sys.modules:
        from .cpu.quantized import FewRowQuantizedLinear

        for name, layer in module.named_modules():
            if isinstance(layer, FewRowQuantizedLinear) and layer.packed:
                weights.update({f"{name}.{key}": value for key, value in layer.mlx_layout().items()})
    return weights


def host_step(layers: Sequence[nn.Module], x: mx.array, text: Sequence[CrossAttention] | None,
              cache: Sequence[SelfAttentionCache]) -> mx.array | None:
    """A one-position step ``x`` ``(B, 1, dims)`` through every layer in host memory (:mod:`core.cpu.host_step`,
    for quantized layers on a CPU run), or None where the layers' own calls must run it."""
    if "core.cpu.quantized" not in sys.modules:
        return None
    from .cpu import host_step as host

    return host.step(layers, x, text, cache) if host.usable(layers, x, text, cache) else None


def layer_norm_class() -> type[nn.LayerNorm]:
    """The class of the decoder's layer norms: fused on a CPU run (:mod:`core.cpu.fast_ops`)."""
    if mx.default_device() == mx.cpu:
        from .cpu.fast_ops import LayerNorm

        return LayerNorm
    return nn.LayerNorm


def gelu() -> Callable[[mx.array], mx.array]:
    """The decoder's exact GELU: fused on a CPU run."""
    if mx.default_device() == mx.cpu:
        from .cpu.fast_ops import gelu as fused

        return fused
    return nn.gelu


def host_attention(dtype: mx.Dtype, head_dim: int) -> bool:
    """Whether the CPU kernels attend for a decoder of this dtype and head size."""
    if not sys.platform.startswith("linux") or mx.default_device() != mx.cpu or "core.cpu.blas" not in sys.modules:
        return False
    from .cpu.cache import kernels_can_attend

    return kernels_can_attend(dtype, head_dim)


def make_caches(layers: int, batch: int, heads: int, head_dim: int, length: int, dtype: mx.Dtype,
                host: bool, quantized: bool = False) -> list[SelfAttentionCache]:
    """One self-attention cache per layer for ``length`` positions (``host``: the CPU kernels'; for a
    ``quantized`` decoder those keep float16 keys and values, half the bytes the attention reads)."""
    if host:
        from .cpu import cache

        half = quantized and cache.half_when_quantized
        return [cache.HostKVCache(batch, heads, head_dim, length, half=half) for _ in range(layers)]
    return [KVCache(batch, heads, head_dim, length, dtype) for _ in range(layers)]


def make_cross(keys_values: Sequence[tuple[mx.array, mx.array]], mask: mx.array | None,
               host: bool) -> list[CrossAttention]:
    """Each layer's text keys/values ``(B, H, S, D)`` with the key mask ``(B, 1, 1, S)`` (``host``: the CPU
    kernels')."""
    if host and mask is not None:
        from .cpu.cache import HostCrossKV

        return [HostCrossKV(k, v, mask) for k, v in keys_values]
    return [CrossKV(k, v, mask) for k, v in keys_values]


def generation_scope():
    """A context for one generation: the CPU kernels' workers spin between calls only inside it (sleep outside);
    nothing elsewhere."""
    if _cpu_backend_loaded() and sys.modules["core.cpu.blas"].cpu_kernels is not None:
        from .cpu.blas import busy

        return busy()
    from contextlib import nullcontext

    return nullcontext()


def cpu_paths():
    """EnCodec's NumPy paths (:mod:`core.cpu.encodec_numpy`) on a CPU run, None on a GPU (whose bandwidth needs
    none of them; :mod:`core.cpu` is then never imported)."""
    if mx.default_device() != mx.cpu:
        return None
    from .cpu import encodec_numpy

    return encodec_numpy
