"""Group-wise affine quantization of the decoder's linear layers at load, in MLX's own layout (``mx.quantize``).

The layers come from the backend (:func:`core.backend.quantized_linear_class`: MLX's ``nn.QuantizedLinear`` on
Metal, the CPU kernels' few-row class on a Linux CPU run), so a quantized checkpoint is the same on both.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from . import backend


def quantizable(module: nn.Module, group_size: int) -> bool:
    """Whether a layer is quantized: a float ``Linear`` whose input width the group size divides."""
    return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0


def quantize_layers(decoder: nn.Module, bits: int, group_size: int = 64) -> list[str]:
    """Swap the decoder's quantizable linear layers for the backend's quantized class, in place; return their
    names. Nothing is computed: the new layers' weights are placeholders until real ones are loaded
    (:func:`quantize_weights` makes them from a float checkpoint, layer by layer)."""
    if bits not in (4, 8):
        raise ValueError(f"quantize must be 4 or 8 bits, got {bits!r}")
    cls = backend.quantized_linear_class()
    swapped = []
    for name, module in decoder.named_modules():
        if name and quantizable(module, group_size):
            outputs, inputs = module.weight.shape
            swapped.append((name, cls(inputs, outputs, bias="bias" in module, group_size=group_size, bits=bits)))
    decoder.update_modules(tree_unflatten(swapped))
    return [name for name, _ in swapped]


def quantize_weights(weights: dict[str, mx.array], layers: list[str], bits: int, group_size: int = 64) -> None:
    """Replace each named layer's float ``weight`` in ``weights`` by MLX's quantized ``weight``, ``scales`` and
    ``biases``, in place, one layer at a time (each is evaluated and its float weight dropped before the next is
    read, so a lazily loaded checkpoint never holds the float and the quantized decoder at once)."""
    for name in layers:
        weight = weights.pop(f"{name}.weight")
        packed, scales, biases = mx.quantize(weight.astype(mx.float32), group_size=group_size, bits=bits)
        mx.eval(packed, scales, biases)
        del weight
        weights[f"{name}.weight"], weights[f"{name}.scales"], weights[f"{name}.biases"] = packed, scales, biases


__all__ = ["quantizable", "quantize_layers", "quantize_weights"]
