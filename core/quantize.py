"""8- and 4-bit decoder weights: group-wise affine quantization in MLX's own layout (``mx.quantize``).

A step of the decoder streams every weight once, so the step's time follows the weights' bytes: 8 bits read a
quarter of float32's, 4 bits an eighth. The layers come from :func:`core.backend.quantized_linear_class`
(``nn.QuantizedLinear`` on Metal, the CPU kernel's on Linux); T5, EnCodec, the embeddings and the layer norms stay
as they are. :func:`quantize_weights` quantizes a loaded checkpoint's tensors one at a time, so the float32 decoder
and the quantized one are never held together.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from . import backend

log = logging.getLogger(__name__)

BITS = (4, 8)
GROUP_SIZE = 64  # MLX's default, and what mlx-lm ships; groups of 32, 64 and 128 are what its kernels take
GROUP_SIZES = (32, 64, 128)


def check_quantization(bits: int | None, group_size: int = GROUP_SIZE) -> None:
    """ValueError unless ``bits`` is None, 4 or 8 and ``group_size`` one MLX's kernels take."""
    if bits is not None and (isinstance(bits, bool) or bits not in BITS):
        raise ValueError(f"quantize must be 4 or 8 bits (or None for float weights), got {bits!r}")
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size!r}")


def quantizable(module: nn.Module, group_size: int) -> bool:
    """Whether ``module`` is a linear layer whose rows split into whole groups."""
    return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0


def quantize_layers(model: nn.Module, bits: int, group_size: int = GROUP_SIZE) -> list[str]:
    """Replace, in place, every linear layer of ``model`` whose input size is a multiple of ``group_size`` by the
    backend's quantized layer of the same shape (its parameters are placeholders, never evaluated: load the
    quantized weights next). Returns the replaced layers' names."""
    check_quantization(bits, group_size)
    layer_class = backend.quantized_linear_class()
    names: list[str] = []

    def swap(path: str, module: nn.Module) -> nn.Module:
        if not quantizable(module, group_size):
            return module
        names.append(path)
        output_dims, input_dims = module.weight.shape
        return layer_class(input_dims, output_dims, "bias" in module, group_size, bits)

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return names


def quantize_weights(weights: MutableMapping[str, mx.array], layers: list[str], bits: int,
                     group_size: int = GROUP_SIZE) -> None:
    """Quantize, in place, ``<layer>.weight`` of each of ``layers`` into ``<layer>.weight`` (packed),
    ``<layer>.scales`` and ``<layer>.biases``. One tensor at a time: each quantized copy is evaluated and its float
    source dropped before the next, so at most one float matrix is held beside the quantized ones (the other float
    tensors stay as ``mx.load`` left them: unread until evaluated). The caller must hold no other reference to the
    float tensors."""
    for layer in layers:
        key = f"{layer}.weight"
        weight = weights.pop(key)
        quantized = mx.quantize(weight.astype(mx.float32), group_size=group_size, bits=bits)
        mx.eval(*quantized)
        del weight
        weights[key], weights[f"{layer}.scales"], weights[f"{layer}.biases"] = quantized


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters, as held (packed where quantized)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


__all__ = ["BITS", "GROUP_SIZE", "check_quantization", "quantizable", "quantize_layers", "quantize_weights",
           "weight_bytes"]
