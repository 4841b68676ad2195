"""The decoder's attention state, as MLX arrays: what every backend offers and what runs on a GPU.

A cache *attends*: the decoder's layers hand it their projected queries, keys and values and get the attention
output back, so a backend with its own attention (the CPU kernels, :mod:`core.cpu.cache`) plugs in by offering a
cache with the same methods; the layers never ask which device they run on.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx


def split_heads(x: mx.array, heads: int) -> mx.array:
    """``(B, T, H·D)`` -> ``(B, H, T, D)``."""
    B, T, _ = x.shape
    return x.reshape(B, T, heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x: mx.array) -> mx.array:
    """``(B, H, T, D)`` -> ``(B, T, H·D)``."""
    B, _, T, _ = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, -1)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None) -> mx.array:
    """Headed ``(B, H, T, D)`` queries over ``(B, H, S, D)`` keys/values -> ``(B, T, H·D)``."""
    return merge_heads(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask))


class SelfAttentionCache(Protocol):
    """What a decoder layer asks of its self-attention cache."""

    offset: int

    def attend(self, q: mx.array, k: mx.array, v: mx.array, heads: int, scale: float,
               mask: mx.array | str | None) -> mx.array:
        """Append ``k``/``v`` ``(B, T, H·D)`` and attend ``q`` ``(B, T, H·D)`` over everything so far."""

    def select(self, rows: mx.array) -> None:
        """Keep only ``rows`` of the batch."""

    @property
    def state(self) -> list[mx.array]:
        """What ``mx.eval`` must evaluate after a step."""


class CrossAttention(Protocol):
    """What a decoder layer asks of the text it attends (keys/values computed once per generation)."""

    def attend(self, q: mx.array, heads: int, scale: float) -> mx.array:
        """``q`` ``(B, T, H·D)`` over the text -> ``(B, T, H·D)``."""

    def select(self, rows: mx.array) -> CrossAttention:
        """The same for only ``rows`` of the batch."""


class KVCache:
    """Self-attention keys/values preallocated for the whole generation; each step writes its slot in place."""

    def __init__(self, batch: int, heads: int, head_dim: int, length: int, dtype: mx.Dtype):
        self.keys = mx.zeros((batch, heads, length, head_dim), dtype=dtype)
        self.values = mx.zeros((batch, heads, length, head_dim), dtype=dtype)
        self.offset = 0

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write ``(B, H, T, D)`` at the current offset; return everything written so far."""
        end = self.offset + keys.shape[2]
        self.keys[:, :, self.offset:end, :] = keys
        self.values[:, :, self.offset:end, :] = values
        self.offset = end
        return self.keys[:, :, :end, :], self.values[:, :, :end, :]

    def attend(self, q: mx.array, k: mx.array, v: mx.array, heads: int, scale: float,
               mask: mx.array | str | None) -> mx.array:
        keys, values = self.update(split_heads(k, heads), split_heads(v, heads))
        return attention(split_heads(q, heads), keys, values, scale, mask)

    def select(self, rows: mx.array) -> None:
        self.keys, self.values = self.keys[rows], self.values[rows]

    @property
    def state(self) -> list[mx.array]:
        return [self.keys, self.values]


class CrossKV:
    """One layer's cross-attention keys/values ``(B, H, S, D)`` and boolean key mask ``(B, 1, 1, S)``."""

    def __init__(self, keys: mx.array, values: mx.array, mask: mx.array | None):
        self.keys, self.values, self.mask = keys, values, mask

    def attend(self, q: mx.array, heads: int, scale: float) -> mx.array:
        return attention(split_heads(q, heads), self.keys, self.values, scale, self.mask)

    def select(self, rows: mx.array) -> CrossKV:
        return CrossKV(self.keys[rows], self.values[rows], None if self.mask is None else self.mask[rows])
