"""The MusicGen decoder (transformers' ``MusicgenForCausalLM``): config, layers, ``sanitize``, ``make_cache``.

Melody checkpoints (``MusicgenMelodyForCausalLM``) use the same decoder without cross-attention: their text and
chroma come as a prefix of embeddings (:mod:`core.melody`) that :meth:`MusicgenDecoder.prefill` writes into the
self-attention caches before the first code.

The layers attend through a cache object (:mod:`core.cache`); which caches and which linear layer a run uses is
chosen by :mod:`core.backend`, so nothing here asks which device it runs on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import backend
from .cache import CrossAttention, SelfAttentionCache, attention, split_heads
from .loading import BaseConfig

# --------------------------------------------------------------------------------------------------- config


@dataclass
class DecoderConfig(BaseConfig):
    """The ``decoder`` section of a MusicGen ``config.json``."""

    vocab_size: int = 2048
    max_position_embeddings: int = 2048
    num_codebooks: int = 4
    audio_channels: int = 1
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    ffn_dim: int = 4096
    activation_function: str = "gelu"
    scale_embedding: bool = False
    pad_token_id: int = 2048
    bos_token_id: int = 2048
    cross_attention_hidden_size: int | None = None
    layer_norm_eps: float = 1e-5
    model_type: str = "musicgen_decoder"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_position_embeddings", "num_codebooks", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "ffn_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"decoder {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"decoder hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.audio_channels not in (1, 2) or self.num_codebooks % self.audio_channels:
            raise ValueError(f"decoder audio_channels must be 1 or 2 and divide num_codebooks, got "
                             f"{self.audio_channels} for {self.num_codebooks} codebooks")

    @property
    def cross_attention(self) -> bool:
        """Whether the layers cross-attend the text (plain MusicGen) or see it in a prefix (melody)."""
        return self.model_type != "musicgen_melody_decoder"

    @property
    def channel_codebooks(self) -> int:
        """Codebooks per audio channel: the delay pattern applies within each channel."""
        return self.num_codebooks // self.audio_channels


# --------------------------------------------------------------------------------------------------- layers


def sinusoids(positions: mx.array, dims: int) -> mx.array:
    """Positions ``(T,)`` -> ``(T, dims)`` embeddings exactly as transformers' MusicGen computes them: the
    tensor2tensor variant, ``[cos, sin]`` halves, frequencies ``exp(-i · ln(10000) / (half - 1))``."""
    half = dims // 2
    freqs = mx.exp(mx.arange(half, dtype=mx.float32) * -(math.log(10000) / (half - 1)))
    angles = positions.astype(mx.float32)[:, None] * freqs[None]
    emb = mx.concatenate([mx.cos(angles), mx.sin(angles)], axis=-1)
    if dims % 2:
        emb = mx.concatenate([emb, mx.zeros((emb.shape[0], 1))], axis=-1)
    return emb


class Attention(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        linear = backend.linear_class()
        self.q_proj = linear(dims, dims, bias=False)
        self.k_proj = linear(dims, dims, bias=False)
        self.v_proj = linear(dims, dims, bias=False)
        self.out_proj = linear(dims, dims, bias=False)

    def project_kv(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Keys and values ``(B, H, S, D)`` of ``x`` ``(B, S, dims)``."""
        return split_heads(self.k_proj(x), self.heads), split_heads(self.v_proj(x), self.heads)

    def __call__(self, x: mx.array, cache: SelfAttentionCache | None = None,
                 mask: mx.array | str | None = None) -> mx.array:
        """Self-attention of ``x`` ``(B, T, dims)``, through ``cache`` when given."""
        q, k, v = backend.project(x, [self.q_proj, self.k_proj, self.v_proj])
        if cache is None:
            o = attention(split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads),
                          self.scale, mask)
        else:
            o = cache.attend(q, k, v, self.heads, self.scale, mask)
        return self.out_proj(o)

    def cross(self, x: mx.array, text: CrossAttention) -> mx.array:
        """Cross-attention of ``x`` ``(B, T, dims)`` over the text's precomputed keys/values."""
        return self.out_proj(text.attend(self.q_proj(x), self.heads, self.scale))


class DecoderLayer(nn.Module):
    """Pre-LN block: self-attention, cross-attention over the text (not in melody decoders), GELU feed-forward; no
    biases but LayerNorms."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        dims, eps = config.hidden_size, config.layer_norm_eps
        linear, LayerNorm = backend.linear_class(), backend.layer_norm_class()
        self.self_attn = Attention(dims, config.num_attention_heads)
        self.self_attn_layer_norm = LayerNorm(dims, eps=eps)
        if config.cross_attention:
            self.encoder_attn = Attention(dims, config.num_attention_heads)
            self.encoder_attn_layer_norm = LayerNorm(dims, eps=eps)
        self.fc1 = linear(dims, config.ffn_dim, bias=False)
        self.fc2 = linear(config.ffn_dim, dims, bias=False)
        self.final_layer_norm = LayerNorm(dims, eps=eps)
        if config.activation_function not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported decoder activation {config.activation_function!r}")
        self.act = backend.gelu() if config.activation_function == "gelu" else nn.gelu_approx

    def __call__(self, x: mx.array, text: CrossAttention | None, cache: SelfAttentionCache | None,
                 mask: str | None) -> mx.array:
        x = x + self.self_attn(self.self_attn_layer_norm(x), cache=cache, mask=mask)
        if text is not None:
            x = x + self.encoder_attn.cross(self.encoder_attn_layer_norm(x), text)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class MusicgenDecoder(nn.Module):
    """K summed codebook embeddings + sinusoidal positions -> transformer -> K heads of logits.

    Attribute names are those of transformers' ``MusicgenForCausalLM`` without the ``model.decoder.`` prefix.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.num_codebooks = config.num_codebooks
        dims = config.hidden_size
        self.embed_scale = math.sqrt(dims) if config.scale_embedding else 1.0
        self.embed_tokens = [nn.Embedding(config.vocab_size + 1, dims) for _ in range(config.num_codebooks)]
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.layer_norm = backend.layer_norm_class()(dims, eps=config.layer_norm_eps)
        linear = backend.linear_class()
        self.lm_heads = [linear(dims, config.vocab_size, bias=False) for _ in range(config.num_codebooks)]

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint keys under ``decoder.`` (prefix already removed) -> this module's parameter names."""
        return {k.removeprefix("model.decoder."): v for k, v in weights.items() if "embed_positions" not in k}

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    @property
    def quantized(self) -> bool:
        """Whether the layers' projections are quantized (:func:`core.quantize.quantize_layers`)."""
        return isinstance(self.layers[0].fc1, nn.QuantizedLinear)

    def host_attention(self) -> bool:
        """Whether this run's backend attends in host memory (the CPU kernels) for this decoder."""
        return backend.host_attention(self.layer_norm.weight.dtype, self.head_dim)

    def make_cache(self, batch: int, length: int, host: bool | None = None) -> list[SelfAttentionCache]:
        """One self-attention cache per layer for ``length`` positions, from the backend (``host`` forces the
        host-memory caches of the CPU kernels on or off)."""
        host = self.host_attention() if host is None else host
        return backend.make_caches(len(self.layers), batch, self.config.num_attention_heads, self.head_dim, length,
                                   self.layer_norm.weight.dtype, host, self.quantized)

    def make_cross(self, keys_values: list[tuple[mx.array, mx.array]], mask: mx.array | None,
                   host: bool | None = None) -> list[CrossAttention]:
        """Each layer's cross-attention over the text's keys/values (from :meth:`cross_kv`) with key mask
        ``(B, 1, 1, S)``, once per generation (``host`` as in :meth:`make_cache`)."""
        host = self.host_attention() if host is None else host
        return backend.make_cross(keys_values, mask, host)

    def cross_kv(self, states: mx.array) -> list[tuple[mx.array, mx.array]]:
        """Cross-attention keys/values of the (projected) text states ``(B, S, dims)``."""
        return [layer.encoder_attn.project_kv(states) for layer in self.layers]

    def _layers(self, x: mx.array, text: list[CrossAttention] | None,
                cache: list[SelfAttentionCache] | None) -> mx.array:
        """Embeddings ``(B, T, dims)`` + positions (continuing from ``cache``) through every layer."""
        offset = cache[0].offset if cache else 0
        T = x.shape[1]
        x = x + sinusoids(mx.arange(offset, offset + T), x.shape[-1]).astype(x.dtype)
        if T == 1 and cache:
            stepped = backend.host_step(self.layers, x, text, cache)
            if stepped is not None:
                return stepped
        mask = "causal" if T > 1 else None
        for i, layer in enumerate(self.layers):
            x = layer(x, text[i] if text is not None else None, cache[i] if cache else None, mask)
        return x

    def prefill(self, prefix: mx.array, cache: list[SelfAttentionCache]) -> None:
        """Write a melody model's prefix embeddings ``(B, P, dims)`` into ``cache`` (positions from its offset);
        the prefix predicts nothing, so no logits are computed (evaluate the caches' ``state``)."""
        self._layers(prefix.astype(self.layer_norm.weight.dtype), None, cache)

    def __call__(self, tokens: mx.array, text: list[CrossAttention] | None,
                 cache: list[SelfAttentionCache] | None = None) -> mx.array:
        """Codes ``(B, K, T)`` -> logits ``(B, K, T, vocab)``; with ``cache`` the positions continue from it.
        ``text`` is None for a melody decoder (no cross-attention)."""
        B, K, T = tokens.shape
        x = sum(self.embed_tokens[k](tokens[:, k]) for k in range(K)) * self.embed_scale  # (B, T, dims)
        x = self.layer_norm(self._layers(x, text, cache))
        return mx.stack(backend.project(x, self.lm_heads), axis=1)  # (B, K, T, vocab)


__all__ = ["DecoderConfig", "MusicgenDecoder", "sinusoids"]
