"""T5 text encoder (the conditioning model of MusicGen) on MLX.

Faithful to transformers' ``T5EncoderModel``: RMS layer norm without bias, unscaled dot-product attention with a
bucketed relative position bias computed by block 0 and shared by every block, pre-norm residual blocks, and a
ReLU (t5-base, what MusicGen uses) or gated feed-forward (T5 v1.1 / flan-t5). Attribute names mirror the
checkpoint keys once the ``text_encoder.`` prefix of a MusicGen checkpoint is stripped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .loading import BaseConfig

log = logging.getLogger(__name__)

# fp16 activations of T5 can overflow; like transformers, clamp the residual stream just below the fp16 maximum
FP16_CLAMP = 65504.0 - 1000.0

# transformers' ACT2FN names as they appear in T5 configs; "gated-gelu" means the tanh approximation ("gelu_new").
ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "gelu_new": nn.gelu_approx, "silu": nn.silu}


@dataclass
class T5Config(BaseConfig):
    """The ``text_encoder`` part of a MusicGen ``config.json`` (defaults are transformers' T5Config defaults)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self) -> None:
        _ = self.activation  # reject an unsupported feed_forward_proj now, with a readable message

    @property
    def is_gated(self) -> bool:
        """Whether the feed-forward is gated (``wi_0``/``wi_1``) as in T5 v1.1, or plain (``wi``)."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The activation name, parsed the way transformers parses ``feed_forward_proj``."""
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or parts[-1] not in ACTIVATIONS:
            raise ValueError(f"unsupported T5 feed_forward_proj {self.feed_forward_proj!r}: expected 'relu', "
                             "'gelu' or 'gated-{gelu,relu,silu}'")
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]


def relative_position_bucket(relative_position: mx.array, num_buckets: int, max_distance: int) -> mx.array:
    """Bidirectional T5 buckets: exact for small distances, logarithmic up to ``max_distance``, one per side."""
    num_buckets //= 2
    buckets = (relative_position > 0).astype(mx.int32) * num_buckets
    n = mx.abs(relative_position)
    max_exact = num_buckets // 2
    # log(0) is never used (small distances take the exact branch); clamp so it is never computed either
    scaled = mx.log(mx.maximum(n, 1).astype(mx.float32) / max_exact) / math.log(max_distance / max_exact)
    large = mx.minimum(max_exact + (scaled * (num_buckets - max_exact)).astype(mx.int32), num_buckets - 1)
    return buckets + mx.where(n < max_exact, n, large)


class T5LayerNorm(nn.Module):
    """RMS norm: scale only, no mean subtraction and no bias."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, config.num_heads)

    def position_bias(self, length: int) -> mx.array:
        """The learned bias for every (query, key) pair of a sequence: ``(1, H, L, L)``."""
        positions = mx.arange(length)
        relative = positions[None, :] - positions[:, None]  # key - query, (L, L)
        buckets = relative_position_bucket(relative, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
                   for proj in (self.q, self.k, self.v))  # (B, H, L, d_kv)
        # T5 folds the 1/sqrt(d_kv) scaling into its initialisation: the scores are not scaled
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias)
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseActDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.act = ACTIVATIONS[config.activation]
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.wo(self.act(self.wi(x)))


class T5DenseGatedActDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.act = ACTIVATIONS[config.activation]
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        # the checkpoint calls the gated variant DenseReluDense too
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = [T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)]

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


def _clamp_fp16(x: mx.array) -> mx.array:
    return mx.clip(x, -FP16_CLAMP, FP16_CLAMP) if x.dtype == mx.float16 else x


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        # only block 0 owns a relative position bias; every block reuses it
        self.block = [T5Block(config, has_relative_attention_bias=i == 0) for i in range(config.num_layers)]
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array, attention_mask: mx.array | None) -> mx.array:
        L = x.shape[1]
        bias = self.block[0].layer[0].SelfAttention.position_bias(L).astype(mx.float32)  # (1, H, L, L)
        neg = mx.finfo(x.dtype).min
        if attention_mask is not None:
            # masked keys get the most negative value of the compute dtype; a fully masked row then attends
            # uniformly (as in transformers) instead of turning into NaN
            keep = attention_mask.astype(mx.bool_)[:, None, None, :]  # (B, 1, 1, L)
            bias = mx.where(keep, bias, neg)  # (B, H, L, L)
        bias = mx.maximum(bias, neg).astype(x.dtype)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Module):
    """The encoder half of T5: token ids to hidden states."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """Encode ``input_ids`` (B, L) int32 with ``attention_mask`` (B, L) of 1/0; return (B, L, d_model) float32.

        Positions where the mask is 0 are hidden from every query; their own outputs are meaningless.
        """
        x = self.shared(input_ids)  # (B, L, d_model)
        return self.encoder(x, attention_mask).astype(mx.float32)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map checkpoint tensors (``text_encoder.`` prefix already stripped) to this module's parameter names.

        ``encoder.embed_tokens.weight`` is tied to ``shared.weight``: it is dropped, or used as ``shared`` when a
        checkpoint stores only it. Decoder tensors of a full T5 checkpoint are dropped.
        """
        weights = dict(weights)
        embed = weights.pop("encoder.embed_tokens.weight", None)
        if "shared.weight" not in weights and embed is not None:
            weights["shared.weight"] = embed
        return {k: v for k, v in weights.items()
                if not k.startswith(("decoder.", "lm_head."))}
