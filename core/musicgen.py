"""MusicGen on MLX: a T5 text encoder, a transformer decoder over EnCodec codebooks, and EnCodec.

Reads the Hugging Face checkpoints (``facebook/musicgen-small`` …) directly. The decoder mirrors transformers'
``MusicgenForCausalLM`` (``decoder.model.decoder.*``, ``decoder.lm_heads.*``), generation mirrors
``MusicgenForConditionalGeneration.generate``: the delay pattern of ``build_delay_pattern_mask`` (per channel for
stereo), classifier-free guidance as one batch of cond + uncond rows, temperature, then top-k.

Generation is batched: every row has its own prompt, length, seed and sampling options, and its own random stream
(derived from its seed and the step only), so a row's output does not depend on what it was batched with.
"""

from __future__ import annotations

import logging
import math
import mmap
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .cpu import blas
from .encodec import EncodecConfig, EncodecModel
from .cpu.fast_ops import LayerNorm, gelu
from .generation import Clip, GenerationRequest, GenerationStopped
from .loading import (
    BaseConfig,
    CheckpointError,
    check_weights,
    load_safetensors,
    parse_dtype,
    read_config,
    resolve,
)
from .t5 import T5Config, T5EncoderModel
from .tokenizer import PromptTokenizer

log = logging.getLogger(__name__)

Request = GenerationRequest | Mapping


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


class Linear(nn.Linear):
    """``nn.Linear`` without bias that, on the CPU with BLIS for a few rows, multiplies as ``(W @ xᵀ)ᵀ``.

    A decoder step multiplies 2 × prompts rows by every weight matrix, so it is bound by streaming the weights.
    Up to 16 rows the skinny kernel (:mod:`core.cpu.blas`) streams them once in ``x @ Wᵀ``. Past it (or from 4 rows
    without it) BLIS streams them faster as ``W @ xᵀ`` (all of a musicgen-small step's products at 16 rows: 152
    vs 160 ms; before the kernel, 8 rows: 104 vs 114 ms), OpenBLAS slower (16 rows: 180 vs 147 ms), so
    ``transposed_rows`` (the row range that takes ``W @ xᵀ``, or None) follows the BLAS in use.
    """

    transposed_rows: tuple[int, int] | None = None  # set below, from the BLAS that core.cpu.blas loaded

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        span = self.transposed_rows
        if span is None or not span[0] <= rows <= span[1] or "bias" in self or mx.default_device() != mx.cpu:
            return super().__call__(x)
        out = self.weight @ x.reshape(rows, x.shape[-1]).T  # (out, rows)
        return out.T.reshape(*x.shape[:-1], out.shape[0])


if blas.active_library == "blis":
    Linear.transposed_rows = (blas.cpu_kernels.skinny_max_rows() + 1 if blas.cpu_kernels else 4, 64)


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

    def select(self, rows: mx.array) -> None:
        """Keep only ``rows`` of the batch (a finished or cancelled row leaves)."""
        self.keys, self.values = self.keys[rows], self.values[rows]

    @property
    def state(self) -> list[mx.array]:
        return [self.keys, self.values]


class HostKVCache:
    """A float32 KV cache in NumPy memory whose one-position steps the C kernel attends (``decode_attention`` of
    core/cpu/_cpu_kernels.c), on the CPU.

    MLX's CPU attention is one ``cblas_sgemm`` per row and head and a scalar ``exp``: at 8 rows and 250 positions
    ~50 ms of a ~135 ms musicgen-small step. The kernel reads each row's keys and values once, on the product
    threads. A step evaluates its query, key and value (one ``mx.eval`` per layer) and hands their buffers over;
    longer inputs (the prefill) attend in MLX and are copied in.
    """

    def __init__(self, batch: int, heads: int, head_dim: int, length: int):
        shape = (batch, heads, length, head_dim)
        self.keys, self.values = _lazy_float32(shape), _lazy_float32(shape)
        self.offset = 0

    @staticmethod
    def available(dtype: mx.Dtype, head_dim: int) -> bool:
        """Whether generation with this dtype and head size can use it (the kernels are loaded, float32, CPU)."""
        return (blas.cpu_kernels is not None and dtype == mx.float32 and head_dim <= 256
                and mx.default_device() == mx.cpu)

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write ``(B, H, T, D)`` at the current offset; return everything written so far, as MLX arrays."""
        end = self.offset + keys.shape[2]
        self.keys[:, :, self.offset:end] = np.asarray(keys.astype(mx.float32))
        self.values[:, :, self.offset:end] = np.asarray(values.astype(mx.float32))
        self.offset = end
        if end == keys.shape[2]:
            return keys, values
        return mx.array(self.keys[:, :, :end]), mx.array(self.values[:, :, :end])

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        """One position: ``q``, ``k``, ``v`` ``(B, 1, H·D)`` -> the attention output ``(B, 1, H·D)``, after writing
        ``k``/``v`` at the current offset."""
        B, heads, capacity, head_dim = self.keys.shape
        if self.offset >= capacity:
            raise ValueError(f"the KV cache holds {capacity} positions")
        q, k, v = _host_float32(q, k, v)
        out = np.empty_like(q)
        self.offset += 1
        status = blas.cpu_kernels.decode_attention(
            B * heads, self.offset, head_dim, scale, q.ctypes.data, k.ctypes.data, v.ctypes.data,
            self.keys.ctypes.data, self.values.ctypes.data, capacity, out.ctypes.data)
        if status != 0:
            raise RuntimeError(f"decode_attention refused {B * heads} × {self.offset} × {head_dim}")
        return mx.array(out)

    def select(self, rows: mx.array) -> None:
        """Keep only ``rows`` of the batch (a finished or cancelled row leaves)."""
        index = np.asarray(rows)
        self.keys, self.values = self.keys[index], self.values[index]

    @property
    def state(self) -> list[mx.array]:
        return []  # nothing for MLX to evaluate: every step has written it already


def _host_float32(*arrays: mx.array) -> list[np.ndarray]:
    """``arrays`` evaluated (together) as C-contiguous float32 NumPy arrays, for the C kernels (no copy where MLX's
    buffer already is one)."""
    mx.eval(*arrays)
    return [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]


def _lazy_float32(shape: tuple[int, ...]) -> np.ndarray:
    """Memory for a host KV cache: mapped lazily in small pages, so each page costs its first write only.

    NumPy asks for huge pages for large arrays; where the kernel compacts memory for those on the first write
    (``defrag=madvise``), the first step of a fresh 8-row cache took 0.3-0.6 s instead of 0.09 s.
    """
    count = math.prod(shape)
    memory = mmap.mmap(-1, max(4 * count, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype=np.float32, count=count).reshape(shape)


class HostCrossKV:
    """One layer's cross-attention keys/values and key mask, also in NumPy memory, for the C kernel's one-position
    steps (``cross_attention`` of core/cpu/_cpu_kernels.c); longer inputs (the prefill) use the MLX arrays.

    MLX attends the text one ``cblas_sgemm`` per row and head: 10-14 ms of a 105 ms step at 8 rows, 4 at 2.
    """

    def __init__(self, keys: mx.array, values: mx.array, mask: mx.array):
        self.arrays = (keys, values)  # (B, H, S, D)
        self.mask = mask  # (B, 1, 1, S) bool
        self.host_keys, self.host_values = _host_float32(*self.arrays)
        self.host_mask = np.ascontiguousarray(np.asarray(mask).reshape(mask.shape[0], -1), dtype=np.uint8)

    def attend(self, q: mx.array, scale: float) -> mx.array:
        """``q`` ``(B, 1, H·D)`` -> the attention output ``(B, 1, H·D)``."""
        B, heads, length, head_dim = self.host_keys.shape
        (q,) = _host_float32(q)
        out = np.empty_like(q)
        status = blas.cpu_kernels.cross_attention(
            B, heads, length, head_dim, scale, q.ctypes.data, self.host_keys.ctypes.data,
            self.host_values.ctypes.data, self.host_mask.ctypes.data, out.ctypes.data)
        if status != 0:
            raise RuntimeError(f"cross_attention refused {B} × {heads} × {length} × {head_dim}")
        return mx.array(out)

    def select(self, rows: mx.array) -> HostCrossKV:
        """The same for only ``rows`` of the batch."""
        keys, values = self.arrays
        return HostCrossKV(keys[rows], values[rows], self.mask[rows])


class Attention(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.q_proj = Linear(dims, dims, bias=False)
        self.k_proj = Linear(dims, dims, bias=False)
        self.v_proj = Linear(dims, dims, bias=False)
        self.out_proj = Linear(dims, dims, bias=False)

    def _heads(self, x: mx.array) -> mx.array:
        B, T, _ = x.shape
        return x.reshape(B, T, self.heads, -1).transpose(0, 2, 1, 3)  # (B, H, T, D)

    def project_kv(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Keys and values ``(B, H, S, D)`` of ``x`` ``(B, S, dims)``."""
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def __call__(self, x: mx.array, kv: tuple[mx.array, mx.array] | HostCrossKV | None = None,
                 cache: KVCache | HostKVCache | None = None, mask: mx.array | str | None = None) -> mx.array:
        B, T, _ = x.shape
        if isinstance(cache, HostKVCache) and T == 1 and kv is None:  # a decoding step, in the C kernel
            o = cache.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.scale)
            return self.out_proj(o.reshape(B, T, -1))
        if isinstance(kv, HostCrossKV):
            if T == 1:
                return self.out_proj(kv.attend(self.q_proj(x), self.scale).reshape(B, T, -1))
            kv = kv.arrays
        q = self._heads(self.q_proj(x))
        if kv is None:  # self-attention
            k, v = self.project_kv(x)
            if cache is not None:
                k, v = cache.update(k, v)
        else:  # cross-attention with precomputed keys/values
            k, v = kv
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)  # (B, H, T, D)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    """Pre-LN block: self-attention, cross-attention over the text, GELU feed-forward; no biases but LayerNorms."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        dims, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = Attention(dims, config.num_attention_heads)
        self.self_attn_layer_norm = LayerNorm(dims, eps=eps)
        self.encoder_attn = Attention(dims, config.num_attention_heads)
        self.encoder_attn_layer_norm = LayerNorm(dims, eps=eps)
        self.fc1 = Linear(dims, config.ffn_dim, bias=False)
        self.fc2 = Linear(config.ffn_dim, dims, bias=False)
        self.final_layer_norm = LayerNorm(dims, eps=eps)
        if config.activation_function not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported decoder activation {config.activation_function!r}")
        self.act = gelu if config.activation_function == "gelu" else nn.gelu_approx

    def __call__(self, x: mx.array, cross_kv: tuple[mx.array, mx.array], cross_mask: mx.array | None,
                 cache: KVCache | None, mask: str | None) -> mx.array:
        x = x + self.self_attn(self.self_attn_layer_norm(x), cache=cache, mask=mask)
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), kv=cross_kv, mask=cross_mask)
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
        self.layer_norm = LayerNorm(dims, eps=config.layer_norm_eps)
        self.lm_heads = [Linear(dims, config.vocab_size, bias=False) for _ in range(config.num_codebooks)]

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint keys under ``decoder.`` (prefix already removed) -> this module's parameter names."""
        return {k.removeprefix("model.decoder."): v for k, v in weights.items() if "embed_positions" not in k}

    def make_cache(self, batch: int, length: int, host: bool | None = None) -> list[KVCache] | list[HostKVCache]:
        """One cache per layer for ``length`` positions; in host memory for the C kernel's attention when it can
        (``host=None``), or as told."""
        cfg = self.config
        dtype = self.layer_norm.weight.dtype
        heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        if host is None:
            host = HostKVCache.available(dtype, head_dim)
        if host:
            return [HostKVCache(batch, heads, head_dim, length) for _ in self.layers]
        return [KVCache(batch, heads, head_dim, length, dtype) for _ in self.layers]

    def cross_kv(self, states: mx.array) -> list[tuple[mx.array, mx.array]]:
        """Cross-attention keys/values of the (projected) text states ``(B, S, dims)``, once per generation."""
        return [layer.encoder_attn.project_kv(states) for layer in self.layers]

    def __call__(self, tokens: mx.array, cross_kv: list[tuple[mx.array, mx.array]], cross_mask: mx.array | None,
                 cache: list[KVCache] | None = None) -> mx.array:
        """Codes ``(B, K, T)`` -> logits ``(B, K, T, vocab)``; with ``cache`` the positions continue from it."""
        B, K, T = tokens.shape
        offset = cache[0].offset if cache else 0
        x = sum(self.embed_tokens[k](tokens[:, k]) for k in range(K)) * self.embed_scale  # (B, T, dims)
        x = x + sinusoids(mx.arange(offset, offset + T), x.shape[-1]).astype(x.dtype)
        mask = "causal" if T > 1 else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cross_kv[i], cross_mask, cache[i] if cache else None, mask)
        x = self.layer_norm(x)
        return mx.stack([head(x) for head in self.lm_heads], axis=1)  # (B, K, T, vocab)


# --------------------------------------------------------------------------------------------------- sampling


def top_k_mask(logits: mx.array, k: mx.array, k_max: int | None = None) -> mx.array:
    """True for exactly the ``k`` largest entries along the last axis (``k`` broadcasts over leading axes; ties at
    the k-th value are kept lowest index first). ``k_max``, a bound on ``k`` known beforehand, saves work.

    A partial selection of the ``k_max`` largest and a sort of only those give each row its k-th value (4 prompts'
    logits: 0.5 ms, against 1.7 ms to sort all 2048).
    """
    vocab = logits.shape[-1]
    k = mx.minimum(k, vocab)[..., None]
    k_max = vocab if k_max is None else max(1, min(k_max, vocab))
    largest = mx.sort(mx.topk(logits, k_max, axis=-1), axis=-1)  # ascending: the k-th largest is at k_max - k
    index = mx.broadcast_to(k_max - k, (*logits.shape[:-1], 1))
    kth = mx.take_along_axis(largest, index, axis=-1)
    above = logits > kth
    tied = logits == kth
    room = k - above.sum(axis=-1, keepdims=True)
    return above | (tied & (mx.cumsum(tied.astype(mx.int32), axis=-1) <= room))


def sample(logits: mx.array, temperature: mx.array, top_k: mx.array, keys: Sequence[mx.array],
           top_k_max: int | None = None) -> mx.array:
    """Sample ``(B, K)`` codes from logits ``(B, K, V)`` with per-row temperature ``(B,)``, top-k ``(B,)`` (at most
    ``top_k_max`` if given) and random key: temperature first, then top-k (as transformers orders them), then
    Gumbel-max, so top_k=1 is argmax."""
    logits = logits.astype(mx.float32) / temperature[:, None, None]
    keep = top_k_mask(logits, top_k[:, None], top_k_max)
    noise = mx.stack([mx.random.gumbel(logits.shape[1:], key=key) for key in keys])
    return mx.argmax(mx.where(keep, logits + noise, -mx.inf), axis=-1).astype(mx.int32)


# --------------------------------------------------------------------------------------------------- model


class MusicGen:
    """Text-to-music: tokenizer + T5 encoder + ``enc_to_dec_proj`` + decoder + EnCodec, loaded from one checkpoint.

    ``dtype`` applies to the decoder (the part that runs every step); the T5 encoder runs once per generation and
    EnCodec decodes audio, both stay float32.
    """

    def __init__(self, config: Mapping, text_encoder: T5EncoderModel, decoder: MusicgenDecoder,
                 audio_encoder: EncodecModel, tokenizer: PromptTokenizer, enc_to_dec_proj: nn.Linear | None = None,
                 generation_config: Mapping | None = None, max_seconds: float | None = None):
        if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                        or not math.isfinite(max_seconds) or max_seconds <= 0):
            raise ValueError(f"max_seconds must be a positive number of seconds, got {max_seconds!r}")
        self._max_seconds = None if max_seconds is None else float(max_seconds)
        self.config = dict(config)
        self.text_encoder = text_encoder
        self.enc_to_dec_proj = enc_to_dec_proj
        self.decoder = decoder
        self.audio_encoder = audio_encoder
        self.tokenizer = tokenizer
        self.generation_config = dict(generation_config or {})

    # ---------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, dtype: str | mx.Dtype = "float32",
                        quantize: int | None = None, max_seconds: float | None = None) -> MusicGen:
        """Load a Hugging Face MusicGen checkpoint from a folder or a hub id.

        ``quantize`` (4 or 8 bits) quantizes the decoder's linear layers after loading. ``max_seconds`` is the
        longest clip :meth:`generate` accepts (default: twice the model's window, 60 s for the real checkpoints;
        clips longer than the window are made window by window). Every problem with the files
        raises :class:`CheckpointError` naming the file.
        """
        dtype = parse_dtype(dtype)
        folder = resolve(name_or_path)
        config = read_config(folder)
        config_file = folder / "config.json"
        for part in ("text_encoder", "audio_encoder", "decoder"):
            if not isinstance(config.get(part), dict):
                raise CheckpointError(f"{config_file} has no '{part}' section: is this a MusicGen checkpoint?")
        if config["decoder"].get("model_type") == "musicgen_melody_decoder" or config.get("model_type") == \
                "musicgen_melody":
            raise CheckpointError(f"{config_file}: MusicGen-Melody checkpoints are not supported")
        generation_config = {}
        if (folder / "generation_config.json").is_file():
            generation_config = read_config(folder, "generation_config.json")
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"{tokenizer_file} is missing (the prompt tokenizer)")
        try:
            tokenizer = PromptTokenizer.from_file(tokenizer_file,
                                                  pad_token_id=int(config["text_encoder"].get("pad_token_id") or 0))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{tokenizer_file} could not be read: {e}") from None

        try:
            decoder_config = DecoderConfig.from_dict(config["decoder"])
            text_encoder = T5EncoderModel(T5Config.from_dict(config["text_encoder"]))
            decoder = MusicgenDecoder(decoder_config)
            audio_encoder = EncodecModel(EncodecConfig.from_dict(config["audio_encoder"]))
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{config_file} is not a valid MusicGen config: {e}") from None
        text_size = text_encoder_size(config["text_encoder"])
        enc_to_dec_proj = None
        if text_size != decoder_config.hidden_size and decoder_config.cross_attention_hidden_size is None:
            enc_to_dec_proj = nn.Linear(text_size, decoder_config.hidden_size)

        weights = load_safetensors(folder)
        source = str(folder / ("model.safetensors" if (folder / "model.safetensors").is_file()
                               else "model.safetensors.index.json"))
        parts: dict[str, dict[str, mx.array]] = {"text_encoder": {}, "audio_encoder": {}, "decoder": {},
                                                 "enc_to_dec_proj": {}}
        for key, value in weights.items():
            prefix, _, rest = key.partition(".")
            if prefix not in parts:
                raise CheckpointError(f"{source} holds an unexpected tensor {key}")
            parts[prefix][rest] = value

        def load(module: nn.Module, weights: dict[str, mx.array], name: str, to: mx.Dtype) -> None:
            weights = {k: v.astype(to) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
            check_weights(module, weights, f"{source} ({name})")

        try:
            load(text_encoder, text_encoder.sanitize(parts["text_encoder"]), "text_encoder", mx.float32)
            load(audio_encoder, audio_encoder.sanitize(parts["audio_encoder"]), "audio_encoder", mx.float32)
            load(decoder, decoder.sanitize(parts["decoder"]), "decoder", dtype)
            if enc_to_dec_proj is not None:
                load(enc_to_dec_proj, parts["enc_to_dec_proj"], "enc_to_dec_proj", dtype)
            elif parts["enc_to_dec_proj"]:
                raise CheckpointError(f"{source} has enc_to_dec_proj weights its config does not expect")
        except CheckpointError:
            raise
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{source} does not match {config_file}: {e}") from None
        if quantize is not None:
            if quantize not in (4, 8):
                raise ValueError(f"quantize must be 4 or 8 bits, got {quantize!r}")
            nn.quantize(decoder, group_size=64, bits=quantize,
                        class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 64 == 0)
        model = cls(config, text_encoder, decoder, audio_encoder, tokenizer, enc_to_dec_proj, generation_config,
                    max_seconds)
        mx.eval(model.parameters())
        log.info("loaded %s: %d codebooks, %d channel(s), decoder %s%s, max %.4g s", folder,
                 decoder_config.num_codebooks, model.channels, dtype, f" q{quantize}" if quantize else "",
                 model.max_seconds)
        return model

    def parameters(self) -> dict:
        """Every module's parameters, keyed like the checkpoint."""
        tree = {"text_encoder": self.text_encoder.parameters(), "decoder": self.decoder.parameters(),
                "audio_encoder": self.audio_encoder.parameters()}
        if self.enc_to_dec_proj is not None:
            tree["enc_to_dec_proj"] = self.enc_to_dec_proj.parameters()
        return tree

    # ---------------------------------------------------------------------------------------- properties

    @property
    def sampling_rate(self) -> int:
        return int(self.audio_encoder.sampling_rate)

    @property
    def frame_rate(self) -> float:
        return self.audio_encoder.frame_rate

    @property
    def channels(self) -> int:
        return self.decoder.config.audio_channels

    @property
    def num_codebooks(self) -> int:
        return self.decoder.config.num_codebooks

    @property
    def window_frames(self) -> int:
        """Frames the model generates in one go: ``generation_config.json``'s ``max_length`` (1500 frames = 30 s for
        the real checkpoints), else as many frames as the decoder has positions for."""
        max_length = self.generation_config.get("max_length")
        if isinstance(max_length, int) and not isinstance(max_length, bool) and max_length > 0:
            return max_length
        cfg = self.decoder.config
        return cfg.max_position_embeddings - cfg.channel_codebooks

    @property
    def window_seconds(self) -> float:
        """The model's window in seconds (30 s for the real checkpoints)."""
        return self.window_frames / self.frame_rate

    @property
    def max_seconds(self) -> float:
        """Longest clip (``from_pretrained(max_seconds=…)``, default twice the window: 60 s for the real
        checkpoints). Clips longer than the window are continued window by window."""
        return self._max_seconds if self._max_seconds is not None else 2 * self.window_seconds

    @property
    def default_extend_stride(self) -> float:
        """How far each window moves past the previous one by default: 60 % of the window (18 s of 30 s, as
        audiocraft), so every later window is prompted with the last 40 % (12 s) of the one before."""
        return 0.6 * self.window_seconds

    def frames_for(self, seconds: float) -> int:
        """EnCodec frames covering ``seconds`` (a tolerance keeps 0.58 s at 29 frames, not 30 from float error)."""
        return max(1, math.ceil(seconds * self.frame_rate - 1e-9))

    def samples_for(self, seconds: float) -> int:
        return round(seconds * self.sampling_rate)

    # ---------------------------------------------------------------------------------------- generation

    def generate(self, prompt: str, seconds: float, *, seed: int | None = None, top_k: int = 250,
                 temperature: float = 1.0, guidance_scale: float = 3.0, prompt_tokens: np.ndarray | None = None,
                 extend_stride: float | None = None, on_progress: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Clip:
        """One clip of exactly ``round(seconds × sampling_rate)`` samples; ``GenerationStopped`` if stopped.

        ``prompt_tokens`` ``(codebooks, frames)`` makes it a continuation: the clip's first frames are exactly those
        codes and ``seconds`` is the total length (prompt + new). Up to ``max_seconds``; beyond the model's window the
        clip is continued window by window, each window moving ``extend_stride`` seconds (default
        :attr:`default_extend_stride`) and prompted with the end of the one before. ``on_progress(step, total)``
        counts decoder steps over all windows.
        """
        request = GenerationRequest(prompt, seconds, seed, top_k, temperature, guidance_scale, prompt_tokens,
                                    extend_stride)
        clip = self.generate_batch([request], on_progress=_single_progress(on_progress),
                                   should_stop=_single_stop(should_stop))[0]
        if clip is None:
            raise GenerationStopped("generation was stopped")
        return clip

    def generate_tokens(self, prompt: str, frames: int, *, seed: int | None = None, top_k: int = 250,
                        temperature: float = 1.0, guidance_scale: float = 3.0,
                        prompt_tokens: np.ndarray | None = None, extend_stride: float | None = None,
                        on_progress: Callable[[int, int], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """EnCodec codes ``(codebooks, frames)`` for ``prompt`` (``frames`` in total, prompt tokens included);
        ``GenerationStopped`` if stopped."""
        if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
            raise ValueError("frames must be a whole number of at least 1.")
        request = GenerationRequest(prompt, frames / self.frame_rate, seed, top_k, temperature, guidance_scale,
                                    prompt_tokens, extend_stride)
        request.validate(self.max_seconds)
        self._check_request(request, int(frames))
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        codes = self._generate_rows([request], [int(frames)], [seed], _single_progress(on_progress),
                                    _single_stop(should_stop))[0]
        if codes is None:
            raise GenerationStopped("generation was stopped")
        return codes

    def decode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Codes ``(codebooks, frames)`` -> float32 audio ``(frames × hop, channels)``; stereo models decode the
        interleaved codebooks ``[::2]`` (left) and ``[1::2]`` (right) through the mono EnCodec."""
        return self.decode_token_rows([tokens])[0]

    def decode_token_rows(self, rows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """:meth:`decode_tokens` of several clips; clips with the same number of frames are decoded as one batch."""
        checked = []
        for tokens in rows:
            tokens = np.asarray(tokens)
            if tokens.ndim != 2 or tokens.shape[0] != self.num_codebooks:
                raise ValueError(f"tokens must be ({self.num_codebooks}, frames), got {tokens.shape}")
            checked.append(tokens.astype(np.int32))
        audio: list[np.ndarray | None] = [None] * len(checked)
        for frames in dict.fromkeys(t.shape[1] for t in checked):
            group = [i for i, t in enumerate(checked) if t.shape[1] == frames]
            codes = np.stack([checked[i] for i in group])  # (rows, K, F)
            streams = codes if self.channels == 1 else np.concatenate([codes[:, 0::2], codes[:, 1::2]])
            decoded = self.audio_encoder.decode(mx.array(streams)[:, None], [None])  # (streams, samples, 1)
            if self.channels == 2:  # left rows first, then right rows
                decoded = mx.concatenate(mx.split(decoded, 2), axis=-1)
            mx.eval(decoded)
            decoded = np.array(decoded.astype(mx.float32), copy=False)
            for row, i in enumerate(group):
                audio[i] = decoded[row]
        return audio

    def generate_batch(self, requests: Sequence[Request], *,
                       on_progress: Callable[[int, int, int], None] | None = None,
                       should_stop: Callable[[int], bool] | None = None) -> list[Clip | None]:
        """Generate several clips in one batch; each request has its own prompt, length, seed and options.

        ``requests`` are :class:`GenerationRequest` or dicts with the same keys. ``on_progress(row, step, total)`` is
        called for every row after every step; ``should_stop(row)`` is checked for every row before every step, and
        a stopped row leaves the batch: its result is ``None`` while the others go on. Rows run for their own number
        of steps; each clip is exactly ``round(seconds × sampling_rate)`` samples and records its seed and tokens.
        Rows that fit in the model's window run together; longer rows (and rows whose prompt tokens do not leave
        room in one window) run after them, one at a time, window by window.
        """
        requests = [GenerationRequest.coerce(r) for r in requests]
        for request in requests:
            request.validate(self.max_seconds)
        frames = [self.frames_for(r.seconds) for r in requests]
        for request, n in zip(requests, frames, strict=True):
            self._check_request(request, n)
        if not requests:
            return []
        seeds = [r.seed if r.seed is not None else secrets.randbits(63) for r in requests]
        start = time.perf_counter()
        codes = self._generate_rows(requests, frames, seeds, on_progress, should_stop)
        finished = [i for i, tokens in enumerate(codes) if tokens is not None]
        audio = dict(zip(finished, self.decode_token_rows([codes[i] for i in finished]), strict=True))
        clips: list[Clip | None] = []
        for i, (request, seed, tokens) in enumerate(zip(requests, seeds, codes, strict=True)):
            if tokens is None:
                clips.append(None)
                continue
            clips.append(Clip(_fit(audio[i], self.samples_for(request.seconds)), self.sampling_rate, seed, tokens))
        log.info("generated %d/%d clip(s) (%s s) in %.2f s", sum(c is not None for c in clips), len(clips),
                 ", ".join(f"{r.seconds:g}" for r in requests), time.perf_counter() - start)
        return clips

    # ---------------------------------------------------------------------------------------- continuation

    def continue_tokens(self, tokens: np.ndarray, prompt: str, seconds: float, **options) -> Clip:
        """Continue EnCodec codes ``(codebooks, frames)`` (e.g. a clip's ``tokens``) by ``seconds`` of new music.

        ``seconds`` is the length of the new part: the clip is the given frames (decoded again) followed by exactly
        ``round(seconds × sampling_rate)`` new samples, and its ``tokens`` start with ``tokens`` exactly. The model is
        conditioned on at most the last ``window − min(seconds, extend_stride)`` seconds of the given frames (all of
        them are kept in the result). ``options`` are those of :meth:`generate` (``seed``, ``top_k``,
        ``temperature``, ``guidance_scale``, ``extend_stride``, ``on_progress``, ``should_stop``).
        """
        on_progress, should_stop = options.pop("on_progress", None), options.pop("should_stop", None)
        request = GenerationRequest(prompt, seconds, **options)
        request.validate(self.max_seconds)
        tokens = self._check_tokens(tokens, "The prompt tokens")
        if tokens.shape[1] > self.frames_for(self.max_seconds):
            raise ValueError(f"The audio to continue is too long ({tokens.shape[1] / self.frame_rate:g} s; at most "
                             f"{self.max_seconds:g} s).")
        new = self.frames_for(seconds)
        request = GenerationRequest(prompt, (tokens.shape[1] + new) / self.frame_rate, request.seed, request.top_k,
                                    request.temperature, request.guidance_scale, tokens, request.extend_stride)
        self._check_request(request, tokens.shape[1] + new)
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        start = time.perf_counter()
        codes = self._generate_rows([request], [tokens.shape[1] + new], [seed], _single_progress(on_progress),
                                    _single_stop(should_stop))[0]
        if codes is None:
            raise GenerationStopped("generation was stopped")
        audio = self.decode_tokens(codes)
        hop = audio.shape[0] // codes.shape[1]
        audio = _fit(audio, tokens.shape[1] * hop + self.samples_for(seconds))
        log.info("continued %.2f s by %g s in %.2f s", tokens.shape[1] / self.frame_rate, seconds,
                 time.perf_counter() - start)
        return Clip(audio, self.sampling_rate, seed, codes)

    def continue_audio(self, audio: np.ndarray, sampling_rate: int, prompt: str, seconds: float, **options) -> Clip:
        """Continue a recording by ``seconds`` of new music guided by ``prompt``.

        ``audio`` is ``(samples,)`` or ``(samples, channels)`` at ``sampling_rate``. It is resampled to the model's
        rate (band-limited FFT resampling, see :func:`resample`), mixed to the model's channels (the mean for a mono
        model; mono is duplicated and more than two channels are mixed down for a stereo model), EnCodec-encoded and
        continued with :meth:`continue_tokens`. ``seconds`` is the length of the new part: the result is the input
        (decoded again from its codes, its end trimmed to a whole EnCodec frame, i.e. by less than one frame) followed
        by exactly ``round(seconds × sampling_rate)`` new samples. The input may be at most ``max_seconds`` long; the
        model is conditioned on its last ``window − min(seconds, extend_stride)`` seconds. Bad input raises
        ``ValueError`` with a message fit to show a user.
        """
        tokens = self.encode_audio(audio, sampling_rate)
        return self.continue_tokens(tokens, prompt, seconds, **options)

    def encode_audio(self, audio: np.ndarray, sampling_rate: int) -> np.ndarray:
        """Audio ``(samples,)`` or ``(samples, channels)`` at any rate -> EnCodec codes ``(codebooks, frames)``
        of its whole frames, as the decoder uses them (stereo: left and right interleaved)."""
        if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, np.integer)) or sampling_rate < 1:
            raise ValueError(f"The sampling rate must be a whole number of hertz, got {sampling_rate!r}.")
        try:
            audio = np.asarray(audio, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError("The audio must be an array of samples.") from None
        if audio.ndim == 1:
            audio = audio[:, None]
        if audio.ndim != 2 or audio.shape[1] < 1:
            raise ValueError(f"The audio must have shape (samples,) or (samples, channels), got {audio.shape}.")
        if audio.shape[0] == 0:
            raise ValueError("The audio is empty.")
        if not np.isfinite(audio).all():
            raise ValueError("The audio contains invalid samples (NaN or infinity).")
        if audio.shape[0] / sampling_rate > self.max_seconds:
            raise ValueError(f"The audio is too long ({audio.shape[0] / sampling_rate:.1f} s; at most "
                             f"{self.max_seconds:g} s).")
        audio = resample(audio, sampling_rate, self.sampling_rate)
        if self.channels == 1 or audio.shape[1] > 2:
            audio = audio.mean(axis=1, keepdims=True)
        if self.channels == 2 and audio.shape[1] == 1:
            audio = np.repeat(audio, 2, axis=1)
        hop = round(self.sampling_rate / self.frame_rate)
        frames = audio.shape[0] // hop
        if frames < 1:
            raise ValueError(f"The audio is too short: it needs at least {1000 * hop / self.sampling_rate:g} ms.")
        audio = mx.array(np.ascontiguousarray(audio[: frames * hop]))
        streams = [audio[None, :, c:c + 1] for c in range(self.channels)]  # each (1, samples, 1)
        K = self.num_codebooks // self.channels
        codes = []
        for stream in streams:
            stream_codes, _ = self.audio_encoder.encode(stream)  # (1, chunks, Q, F): MusicGen's codec is unchunked
            if stream_codes.shape[1] != 1 or stream_codes.shape[2] < K:
                raise ValueError(f"this model's EnCodec gives codes of shape {stream_codes.shape[1:3]} per frame, "
                                 f"not the {K} codebooks its decoder expects")
            codes.append(stream_codes[0, 0, :K])  # (K, F)
        tokens = codes[0] if self.channels == 1 else mx.stack(codes, axis=1).reshape(-1, frames)  # L0, R0, L1 …
        mx.eval(tokens)
        return np.array(tokens, dtype=np.int32)

    def _check_tokens(self, tokens: np.ndarray, what: str) -> np.ndarray:
        """Codes ``(codebooks, frames)`` as int32, or a user-fit ValueError."""
        tokens = np.asarray(tokens)
        K, vocab = self.num_codebooks, self.decoder.config.vocab_size
        if tokens.ndim != 2 or tokens.shape[0] != K or tokens.shape[1] < 1:
            raise ValueError(f"{what} must have shape ({K}, frames) with at least one frame, got {tokens.shape}.")
        if not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0 or tokens.max() >= vocab:
            raise ValueError(f"{what} must be whole numbers from 0 to {vocab - 1}.")
        return tokens.astype(np.int32)

    def _check_request(self, request: GenerationRequest, frames: int) -> None:
        """What only the model can check: prompt tokens that fit it and an extend stride inside the window."""
        if request.extend_stride is not None and not request.extend_stride < self.window_seconds:
            raise ValueError(f"The extend stride must be less than the model's window of {self.window_seconds:g} s "
                             f"(got {request.extend_stride:g}).")
        if request.prompt_tokens is not None:
            tokens = self._check_tokens(request.prompt_tokens, "The prompt tokens")
            if tokens.shape[1] >= frames:
                raise ValueError(f"The length ({frames / self.frame_rate:g} s) must be longer than the audio prompt "
                                 f"({tokens.shape[1] / self.frame_rate:g} s).")

    def _stride_frames(self, request: GenerationRequest) -> int:
        stride = request.extend_stride if request.extend_stride is not None else self.default_extend_stride
        return min(max(1, round(stride * self.frame_rate)), self.window_frames - 1)

    def _windows(self, frames: int, prompt: int, stride: int) -> list[tuple[int, int, int]]:
        """The windows ``(start, length, prompt)`` (in frames) that make ``frames`` from ``prompt`` known frames.

        As audiocraft extends past its window: each window is at most ``window_frames`` long; the first is prompted
        with at most the last ``window − min(new, stride)`` given frames, every later one starts ``stride`` frames
        after the one before and is prompted with its last ``window − stride`` frames; only frames after a window's
        prompt are new.
        """
        window = self.window_frames
        p = min(prompt, window - min(frames - prompt, stride))
        start, plan = prompt - p, []
        while True:
            length = min(frames - start, window)
            plan.append((start, length, p))
            if start + length >= frames:
                return plan
            start, p = start + stride, window - stride

    def _generate_rows(self, requests: list[GenerationRequest], frames: list[int], seeds: list[int],
                       on_progress: Callable[[int, int, int], None] | None,
                       should_stop: Callable[[int], bool] | None) -> list[np.ndarray | None]:
        """Codes of every row: the rows that fit in one window together, then the others window by window."""
        prompts = [None if r.prompt_tokens is None else self._check_tokens(r.prompt_tokens, "The prompt tokens")
                   for r in requests]
        plans = [self._windows(n, 0 if p is None else p.shape[1], self._stride_frames(r))
                 for r, n, p in zip(requests, frames, prompts, strict=True)]
        together = [i for i, plan in enumerate(plans) if len(plan) == 1 and plan[0][0] == 0]
        results: list[np.ndarray | None] = [None] * len(requests)
        if together:
            progress = None if on_progress is None else lambda i, step, total: on_progress(together[i], step, total)
            stop = None if should_stop is None else lambda i: should_stop(together[i])
            codes = self._generate_codes([requests[i] for i in together], [frames[i] for i in together],
                                         [seeds[i] for i in together], progress, stop,
                                         [prompts[i] for i in together])
            for i, c in zip(together, codes, strict=True):
                results[i] = c
        for row in range(len(requests)):
            if row not in together:
                results[row] = self._generate_windows(row, requests[row], plans[row], seeds[row], prompts[row],
                                                      on_progress, should_stop)
        return results

    def _generate_windows(self, row: int, request: GenerationRequest, plan: list[tuple[int, int, int]], seed: int,
                          prompt: np.ndarray | None, on_progress: Callable[[int, int, int], None] | None,
                          should_stop: Callable[[int], bool] | None) -> np.ndarray | None:
        """One row window by window (``plan`` from :meth:`_windows`); progress counts steps over all windows."""
        extra = self.decoder.config.channel_codebooks - 1
        steps = [length + extra - p for _, length, p in plan]  # a window's prompt is prefilled, not stepped
        total, done = sum(steps), 0
        tokens = prompt if prompt is not None else np.zeros((self.num_codebooks, 0), np.int32)
        stop = None if should_stop is None else lambda _i: should_stop(row)
        for w, (start, length, p) in enumerate(plan):
            assert start + p == tokens.shape[1]
            progress = None if on_progress is None else \
                lambda _i, step, _total, done=done: on_progress(row, done + step, total)
            window_seed = seed if w == 0 else int(np.random.SeedSequence([seed, w]).generate_state(1, np.uint64)[0]
                                                  >> np.uint64(1))
            codes = self._generate_codes([request], [length], [window_seed], progress, stop,
                                         [tokens[:, start:] if p else None])[0]
            if codes is None:
                return None
            tokens = np.concatenate([tokens, codes[:, p:]], axis=1)
            done += steps[w]
            log.info("row %d: window %d/%d done (frames %d-%d)", row, w + 1, len(plan), start, start + length)
        return tokens

    def _encode_text(self, prompts: list[str], guided: bool) -> tuple[list, mx.array]:
        """Cross-attention K/V per layer and the boolean cross mask ``(rows, 1, 1, S)``.

        As transformers does: states are projected, then zeroed where the mask is 0; the unconditional half (when
        ``guided``) gets zero states and a zero mask, so its cross-attention input is exactly zero. An all-masked row
        attends uniformly to zero values, like transformers' additive mask.
        """
        ids, mask = self.tokenizer(prompts)
        mask = mx.array(mask)
        states = self.text_encoder(mx.array(ids), mask)  # (B, L, d_t5)
        if self.enc_to_dec_proj is not None:
            states = self.enc_to_dec_proj(states.astype(self.enc_to_dec_proj.weight.dtype))
        states = states * mask[..., None].astype(states.dtype)
        attend = mask.astype(mx.bool_)
        dtype = self.decoder.layer_norm.weight.dtype
        cross_kv = self.decoder.cross_kv(states.astype(dtype))
        if guided:  # the projections have no bias: zero states give exactly zero keys and values
            cross_kv = [(mx.concatenate([k, mx.zeros_like(k)]), mx.concatenate([v, mx.zeros_like(v)]))
                        for k, v in cross_kv]
            attend = mx.concatenate([attend, mx.ones_like(attend)])
        return cross_kv, attend[:, None, None, :]

    def _generate_codes(self, requests: list[GenerationRequest], frames: list[int], seeds: list[int],
                        on_progress: Callable[[int, int, int], None] | None,
                        should_stop: Callable[[int], bool] | None,
                        prompts: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray | None]:
        """The decoding loop: one ``mx.eval`` per step, rows leave the batch when done or stopped.

        ``prompts[row]`` ``(K, P)`` with ``P < frames[row]`` are forced as that row's first frames, in the delay
        pattern, as transformers does with ``decoder_input_ids``. The positions every row knows are prefilled in one
        decoder call; a row with a longer prompt steps through the rest of it with its codes forced. Progress counts
        the steps after the prefill.
        """
        cfg = self.decoder.config
        K, pad = cfg.num_codebooks, cfg.pad_token_id
        delays = np.arange(K) // cfg.audio_channels  # stereo: L0, R0, L1, R1 … share a delay per pair
        steps = [f + cfg.channel_codebooks - 1 for f in frames]
        total = max(steps)
        guided = any(r.guidance_scale > 1 for r in requests)
        rows = len(requests)
        prompts = list(prompts) if prompts is not None else [None] * rows
        lengths = [0 if p is None else p.shape[1] for p in prompts]
        start = min(lengths)  # positions 0 … start - 1 are prefilled; the loop begins at step `start`

        # out[row, k, t] is decoder position t + 1; codebook k holds frame t - delay_k there
        out = np.full((rows, K, total), pad, dtype=np.int32)
        forced = np.full((rows, K, max(max(lengths), 1)), pad, dtype=np.int32)  # prompt frames, padded
        for row, p in enumerate(prompts):
            if p is not None:
                forced[row, :, : p.shape[1]] = p
                for k, d in enumerate(delays):
                    out[row, k, d: d + p.shape[1]] = p[k]

        cross_kv, cross_mask = self._encode_text([r.prompt for r in requests], guided)
        cache = self.decoder.make_cache(2 * rows if guided else rows, total)
        if isinstance(cache[0], HostKVCache):  # the text is attended by the C kernel too
            cross_kv = [HostCrossKV(k, v, cross_mask) for k, v in cross_kv]
        scale = mx.array([r.guidance_scale for r in requests], dtype=mx.float32)
        temperature = mx.array([r.temperature for r in requests], dtype=mx.float32)
        top_k = mx.array([r.top_k for r in requests], dtype=mx.int32)
        top_k_max = max(r.top_k for r in requests)
        limit = mx.array(frames, dtype=mx.int32)[:, None]
        prompt_limit = mx.array(lengths, dtype=mx.int32)[:, None]
        given = mx.array(forced)
        keys = [mx.random.key(seed) for seed in seeds]
        for _ in range(start):  # a row's random stream depends on its seed and the step only
            keys = [mx.random.split(key)[0] for key in keys]
        bos = np.full((rows, K, 1), cfg.bos_token_id, dtype=np.int32)
        if start > 0:
            prefix = mx.array(np.concatenate([bos, out[:, :, : start - 1]], axis=2))  # positions 0 … start - 1
            self.decoder(mx.concatenate([prefix, prefix]) if guided else prefix, cross_kv, cross_mask, cache)
            mx.eval(keys, [c.state for c in cache])  # only the cache: the prefill's logits are never computed
        tokens = mx.array(out[:, :, start - 1: start] if start > 0 else bos)  # position `start`
        delay = mx.array(delays, dtype=mx.int32)[None]
        codebook = mx.arange(K)
        active = list(range(rows))  # original row index of each batch row
        stopped: set[int] = set()

        for step in range(start, total):
            leave = [i for i, row in enumerate(active)
                     if step >= steps[row] or (should_stop is not None and should_stop(row))]
            for i in leave:
                if step < steps[active[i]]:
                    stopped.add(active[i])
                    log.info("row %d stopped at step %d/%d", active[i], step, steps[active[i]])
            if leave:
                keep = [i for i in range(len(active)) if i not in leave]
                active = [active[i] for i in keep]
                if not active:
                    break
                idx = mx.array(keep, dtype=mx.int32)
                full = mx.concatenate([idx, idx + len(keep) + len(leave)]) if guided else idx
                for c in cache:
                    c.select(full)
                cross_kv = [kv.select(full) if isinstance(kv, HostCrossKV) else (kv[0][full], kv[1][full])
                            for kv in cross_kv]
                cross_mask = cross_mask[full]
                scale, temperature, top_k, limit = scale[idx], temperature[idx], top_k[idx], limit[idx]
                prompt_limit, given = prompt_limit[idx], given[idx]
                keys = [keys[i] for i in keep]
                tokens = tokens[idx]

            inputs = mx.concatenate([tokens, tokens]) if guided else tokens
            logits = self.decoder(inputs, cross_kv, cross_mask, cache)[:, :, -1].astype(mx.float32)  # (b, K, V)
            if guided:
                cond, uncond = mx.split(logits, 2)
                s = scale[:, None, None]
                logits = mx.where(s > 1, uncond + (cond - uncond) * s, cond)
            split = [mx.random.split(key) for key in keys]
            keys = [k for k, _ in split]
            sampled = sample(logits, temperature, top_k, [sub for _, sub in split], top_k_max)
            # delay pattern: codebook k holds frame (step - delay_k); before and after its frames it is padding,
            # and the frames of a row's prompt are its prompt's codes
            frame = step - delay  # (1, K)
            column = np.clip(step - delays, 0, given.shape[2] - 1)
            sampled = mx.where(frame < prompt_limit, given[:, codebook, mx.array(column)], sampled)
            tokens = mx.where((frame >= 0) & (frame < limit), sampled, pad)[..., None]  # (b, K, 1)
            mx.eval(tokens, keys, [c.state for c in cache])
            out[active, :, step] = np.array(tokens[..., 0])
            if on_progress is not None:
                for row in active:
                    on_progress(row, step + 1 - start, steps[row] - start)

        results: list[np.ndarray | None] = []
        for row in range(rows):
            if row in stopped:
                results.append(None)
                continue
            f = frames[row]
            results.append(np.stack([out[row, k, d:d + f] for k, d in enumerate(delays)]))
        return results

    # ---------------------------------------------------------------------------------------- memory

    def estimate_batch_bytes(self, requests: Sequence[Request]) -> int:
        """Rough peak memory in bytes to generate ``requests`` together, for choosing a batch size.

        Sums the weights, the self-attention KV cache (preallocated for 2 rows per request with guidance, for the
        longest row), the cross-attention K/V of the padded prompts, the per-step sampling work, and EnCodec
        decoding: every row through the LSTM together (its gates and states), then the longest row alone through
        the upsampling stages (every stage's activations, times the widest convolution's unfolded input). It errs
        on the high side.
        """
        requests = [GenerationRequest.coerce(r) for r in requests]
        if not requests:
            return 0
        weights = sum(v.nbytes for _, v in tree_flatten(self.parameters()))
        cfg = self.decoder.config
        rows = len(requests) * (2 if any(r.guidance_scale > 1 for r in requests) else 1)
        frames = max(self.frames_for(r.seconds) for r in requests)
        steps = frames + cfg.channel_codebooks - 1
        tokens = max(len(ids) for ids in self.tokenizer([r.prompt for r in requests])[0]) if requests else 1
        item = self.decoder.layer_norm.weight.dtype.size
        kv = cfg.num_hidden_layers * 2 * rows * steps * cfg.hidden_size * item
        cross = cfg.num_hidden_layers * 2 * rows * tokens * cfg.hidden_size * item
        sampling = rows * cfg.num_codebooks * cfg.vocab_size * 4 * 8
        audio = self.audio_encoder_config()
        ratios = list(audio.get("upsampling_ratios") or [8, 5, 4, 4])
        width = int(audio.get("num_filters") or 64) * 2 ** len(ratios)
        streams = 2 if self.channels == 2 else 1
        lstm = 4 * len(requests) * streams * frames * width * 12  # gates (4×), input, output and states
        activations, length = width * frames, frames
        for ratio in ratios:
            width, length = width // 2, length * ratio
            activations += width * length
        kernel = int(audio.get("kernel_size") or 7)
        decode = 4 * activations * (kernel + 3) * streams
        return int(weights + kv + cross + sampling + decode + lstm)

    def audio_encoder_config(self) -> dict:
        return dict(self.config.get("audio_encoder") or {})


def text_encoder_size(config: Mapping) -> int:
    """Hidden size of the text encoder's output (``d_model`` for T5)."""
    return int(config.get("d_model") or config.get("hidden_size"))


def _single_progress(on_progress: Callable[[int, int], None] | None) -> Callable[[int, int, int], None] | None:
    if on_progress is None:
        return None
    return lambda _row, step, total: on_progress(step, total)


def _single_stop(should_stop: Callable[[], bool] | None) -> Callable[[int], bool] | None:
    if should_stop is None:
        return None
    return lambda _row: bool(should_stop())


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Resample ``(samples, channels)`` audio from ``rate`` to ``target`` Hz to ``round(samples × target / rate)``
    samples, band-limited with numpy's real FFT (the spectrum is cut or zero-padded at the lower Nyquist frequency,
    like ``scipy.signal.resample``), so downsampling does not alias. The FFT treats the clip as periodic: the first
    and last milliseconds may ring slightly."""
    audio = np.asarray(audio, dtype=np.float32)
    if rate == target:
        return audio
    n = audio.shape[0]
    m = max(1, round(n * target / rate))
    spectrum = np.fft.rfft(audio.astype(np.float64), axis=0)
    common = min(n, m)
    resized = np.zeros((m // 2 + 1, audio.shape[1]), dtype=spectrum.dtype)
    resized[: common // 2 + 1] = spectrum[: common // 2 + 1]
    if common % 2 == 0 and common > 1:  # the shorter signal's Nyquist bin stands for both signs of that frequency
        resized[common // 2] *= 2.0 if m < n else 0.5
    return (np.fft.irfft(resized, n=m, axis=0) * (m / n)).astype(np.float32)


def _fit(audio: np.ndarray, samples: int) -> np.ndarray:
    """Crop or zero-pad ``(n, channels)`` audio to exactly ``samples``, as contiguous float32."""
    if audio.shape[0] >= samples:
        audio = audio[:samples]
    else:
        audio = np.concatenate([audio, np.zeros((samples - audio.shape[0], audio.shape[1]), audio.dtype)])
    return np.ascontiguousarray(audio, dtype=np.float32)


__all__ = ["DecoderConfig", "MusicGen", "MusicgenDecoder", "resample", "sample", "sinusoids", "top_k_mask"]
