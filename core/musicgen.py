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
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .encodec import EncodecConfig, EncodecModel
from .generation import Clip, GenerationRequest, GenerationStopped
from .loading import CheckpointError, check_weights, load_safetensors, parse_dtype, read_config, resolve
from .t5 import T5Config, T5EncoderModel
from .tokenizer import PromptTokenizer

log = logging.getLogger(__name__)

Request = GenerationRequest | Mapping


# --------------------------------------------------------------------------------------------------- config


@dataclass
class DecoderConfig:
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

    @classmethod
    def from_dict(cls, params: Mapping) -> DecoderConfig:
        """Build from a config dict, ignoring keys this model does not use."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in known})

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


class Attention(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims, bias=False)
        self.k_proj = nn.Linear(dims, dims, bias=False)
        self.v_proj = nn.Linear(dims, dims, bias=False)
        self.out_proj = nn.Linear(dims, dims, bias=False)

    def _heads(self, x: mx.array) -> mx.array:
        B, T, _ = x.shape
        return x.reshape(B, T, self.heads, -1).transpose(0, 2, 1, 3)  # (B, H, T, D)

    def project_kv(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Keys and values ``(B, H, S, D)`` of ``x`` ``(B, S, dims)``."""
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def __call__(self, x: mx.array, kv: tuple[mx.array, mx.array] | None = None, cache: KVCache | None = None,
                 mask: mx.array | str | None = None) -> mx.array:
        B, T, _ = x.shape
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
        self.self_attn_layer_norm = nn.LayerNorm(dims, eps=eps)
        self.encoder_attn = Attention(dims, config.num_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(dims, eps=eps)
        self.fc1 = nn.Linear(dims, config.ffn_dim, bias=False)
        self.fc2 = nn.Linear(config.ffn_dim, dims, bias=False)
        self.final_layer_norm = nn.LayerNorm(dims, eps=eps)
        if config.activation_function not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported decoder activation {config.activation_function!r}")
        self.act = nn.gelu if config.activation_function == "gelu" else nn.gelu_approx

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
        self.layer_norm = nn.LayerNorm(dims, eps=config.layer_norm_eps)
        self.lm_heads = [nn.Linear(dims, config.vocab_size, bias=False) for _ in range(config.num_codebooks)]

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint keys under ``decoder.`` (prefix already removed) -> this module's parameter names."""
        return {k.removeprefix("model.decoder."): v for k, v in weights.items() if "embed_positions" not in k}

    def make_cache(self, batch: int, length: int) -> list[KVCache]:
        cfg = self.config
        dtype = self.layer_norm.weight.dtype
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        return [KVCache(batch, cfg.num_attention_heads, head_dim, length, dtype) for _ in self.layers]

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


def top_k_mask(logits: mx.array, k: mx.array) -> mx.array:
    """True for exactly the ``k`` largest entries along the last axis (``k`` broadcasts over leading axes)."""
    order = mx.argsort(-logits, axis=-1)
    ranks = mx.argsort(order, axis=-1)  # rank of every entry, 0 = largest
    return ranks < k[..., None]


def sample(logits: mx.array, temperature: mx.array, top_k: mx.array, keys: Sequence[mx.array]) -> mx.array:
    """Sample ``(B, K)`` codes from logits ``(B, K, V)`` with per-row temperature ``(B,)``, top-k ``(B,)`` and
    random key: temperature first, then top-k (as transformers orders them), then Gumbel-max, so top_k=1 is argmax."""
    logits = logits.astype(mx.float32) / temperature[:, None, None]
    keep = top_k_mask(logits, top_k[:, None])
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
                 generation_config: Mapping | None = None):
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
                        quantize: int | None = None) -> MusicGen:
        """Load a Hugging Face MusicGen checkpoint from a folder or a hub id.

        ``quantize`` (4 or 8 bits) quantizes the decoder's linear layers after loading. Every problem with the files
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
        model = cls(config, text_encoder, decoder, audio_encoder, tokenizer, enc_to_dec_proj, generation_config)
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
    def max_seconds(self) -> float:
        """Longest clip: ``generation_config.json``'s ``max_length`` (1500 frames = 30 s for the real checkpoints),
        else as many frames as the decoder has positions for."""
        max_length = self.generation_config.get("max_length")
        if isinstance(max_length, int) and max_length > 0:
            return max_length / self.frame_rate
        cfg = self.decoder.config
        return (cfg.max_position_embeddings - cfg.channel_codebooks) / self.frame_rate

    def frames_for(self, seconds: float) -> int:
        """EnCodec frames covering ``seconds`` (a tolerance keeps 0.58 s at 29 frames, not 30 from float error)."""
        return max(1, math.ceil(seconds * self.frame_rate - 1e-9))

    def samples_for(self, seconds: float) -> int:
        return round(seconds * self.sampling_rate)

    # ---------------------------------------------------------------------------------------- generation

    def generate(self, prompt: str, seconds: float, *, seed: int | None = None, top_k: int = 250,
                 temperature: float = 1.0, guidance_scale: float = 3.0,
                 on_progress: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Clip:
        """One clip of exactly ``round(seconds × sampling_rate)`` samples; ``GenerationStopped`` if stopped."""
        request = GenerationRequest(prompt, seconds, seed, top_k, temperature, guidance_scale)
        clip = self.generate_batch([request], on_progress=_single_progress(on_progress),
                                   should_stop=_single_stop(should_stop))[0]
        if clip is None:
            raise GenerationStopped("generation was stopped")
        return clip

    def generate_tokens(self, prompt: str, frames: int, *, seed: int | None = None, top_k: int = 250,
                        temperature: float = 1.0, guidance_scale: float = 3.0,
                        on_progress: Callable[[int, int], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """EnCodec codes ``(codebooks, frames)`` for ``prompt``; ``GenerationStopped`` if stopped."""
        if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
            raise ValueError("frames must be a whole number of at least 1.")
        request = GenerationRequest(prompt, frames / self.frame_rate, seed, top_k, temperature, guidance_scale)
        request.validate(self.max_seconds)
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        codes = self._generate_codes([request], [int(frames)], [seed], _single_progress(on_progress),
                                     _single_stop(should_stop))[0]
        if codes is None:
            raise GenerationStopped("generation was stopped")
        return codes

    def decode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Codes ``(codebooks, frames)`` -> float32 audio ``(frames × hop, channels)``; stereo models decode the
        interleaved codebooks ``[::2]`` (left) and ``[1::2]`` (right) through the mono EnCodec."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[0] != self.num_codebooks:
            raise ValueError(f"tokens must be ({self.num_codebooks}, frames), got {tokens.shape}")
        codes = mx.array(tokens.astype(np.int32))
        streams = [codes] if self.channels == 1 else [codes[0::2], codes[1::2]]
        audio = [self.audio_encoder.decode(s[None, None], [None]) for s in streams]  # each (1, samples, 1)
        audio = mx.concatenate(audio, axis=-1)[0]
        mx.eval(audio)
        return np.array(audio.astype(mx.float32), copy=False)

    def generate_batch(self, requests: Sequence[Request], *,
                       on_progress: Callable[[int, int, int], None] | None = None,
                       should_stop: Callable[[int], bool] | None = None) -> list[Clip | None]:
        """Generate several clips in one batch; each request has its own prompt, length, seed and options.

        ``requests`` are :class:`GenerationRequest` or dicts with the same keys. ``on_progress(row, step, total)`` is
        called for every row after every step; ``should_stop(row)`` is checked for every row before every step, and
        a stopped row leaves the batch: its result is ``None`` while the others go on. Rows run for their own number
        of steps; each clip is exactly ``round(seconds × sampling_rate)`` samples and records its seed and tokens.
        """
        requests = [GenerationRequest.coerce(r) for r in requests]
        for request in requests:
            request.validate(self.max_seconds)
        if not requests:
            return []
        seeds = [r.seed if r.seed is not None else secrets.randbits(63) for r in requests]
        frames = [self.frames_for(r.seconds) for r in requests]
        start = time.perf_counter()
        codes = self._generate_codes(requests, frames, seeds, on_progress, should_stop)
        clips: list[Clip | None] = []
        for request, seed, tokens in zip(requests, seeds, codes, strict=True):
            if tokens is None:
                clips.append(None)
                continue
            audio = self.decode_tokens(tokens)
            n = self.samples_for(request.seconds)
            if audio.shape[0] >= n:
                audio = audio[:n]
            else:
                audio = np.concatenate([audio, np.zeros((n - audio.shape[0], audio.shape[1]), np.float32)])
            clips.append(Clip(np.ascontiguousarray(audio, dtype=np.float32), self.sampling_rate, seed, tokens))
        log.info("generated %d/%d clip(s) (%s s) in %.2f s", sum(c is not None for c in clips), len(clips),
                 ", ".join(f"{r.seconds:g}" for r in requests), time.perf_counter() - start)
        return clips

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
        if guided:
            states = mx.concatenate([states, mx.zeros_like(states)])
            attend = mx.concatenate([attend, mx.ones_like(attend)])
        dtype = self.decoder.layer_norm.weight.dtype
        return self.decoder.cross_kv(states.astype(dtype)), attend[:, None, None, :]

    def _generate_codes(self, requests: list[GenerationRequest], frames: list[int], seeds: list[int],
                        on_progress: Callable[[int, int, int], None] | None,
                        should_stop: Callable[[int], bool] | None) -> list[np.ndarray | None]:
        """The decoding loop: one ``mx.eval`` per step, rows leave the batch when done or stopped."""
        cfg = self.decoder.config
        K, pad = cfg.num_codebooks, cfg.pad_token_id
        delays = np.arange(K) // cfg.audio_channels  # stereo: L0, R0, L1, R1 … share a delay per pair
        steps = [f + cfg.channel_codebooks - 1 for f in frames]
        total = max(steps)
        guided = any(r.guidance_scale > 1 for r in requests)

        cross_kv, cross_mask = self._encode_text([r.prompt for r in requests], guided)
        rows = len(requests)
        cache = self.decoder.make_cache(2 * rows if guided else rows, total)
        scale = mx.array([r.guidance_scale for r in requests], dtype=mx.float32)
        temperature = mx.array([r.temperature for r in requests], dtype=mx.float32)
        top_k = mx.array([r.top_k for r in requests], dtype=mx.int32)
        limit = mx.array(frames, dtype=mx.int32)[:, None]
        keys = [mx.random.key(seed) for seed in seeds]
        tokens = mx.full((rows, K, 1), cfg.bos_token_id, dtype=mx.int32)
        delay = mx.array(delays, dtype=mx.int32)[None]
        active = list(range(rows))  # original row index of each batch row
        out = np.full((rows, K, total), pad, dtype=np.int32)
        stopped: set[int] = set()

        for step in range(total):
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
                cross_kv = [(k[full], v[full]) for k, v in cross_kv]
                cross_mask = cross_mask[full]
                scale, temperature, top_k, limit = scale[idx], temperature[idx], top_k[idx], limit[idx]
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
            sampled = sample(logits, temperature, top_k, [sub for _, sub in split])
            # delay pattern: codebook k holds frame (step - delay_k); before and after its frames it is padding
            frame = step - delay
            tokens = mx.where((frame >= 0) & (frame < limit), sampled, pad)[..., None]  # (b, K, 1)
            mx.eval(tokens, keys, [c.state for c in cache])
            out[active, :, step] = np.array(tokens[..., 0])
            if on_progress is not None:
                for row in active:
                    on_progress(row, step + 1, steps[row])

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
        decoding of the longest row (decoded one row at a time): every upsampling stage's activations, times the
        widest convolution's unfolded input. It errs on the high side.
        """
        requests = [GenerationRequest.coerce(r) for r in requests]
        if not requests:
            return 0
        weights = sum(v.nbytes for _, v in tree_flatten(self.parameters()))
        cfg = self.decoder.config
        rows = len(requests) * (2 if any(r.guidance_scale > 1 for r in requests) else 1)
        steps = max(self.frames_for(r.seconds) for r in requests) + cfg.channel_codebooks - 1
        tokens = max(len(ids) for ids in self.tokenizer([r.prompt for r in requests])[0]) if requests else 1
        item = self.decoder.layer_norm.weight.dtype.size
        kv = cfg.num_hidden_layers * 2 * rows * steps * cfg.hidden_size * item
        cross = cfg.num_hidden_layers * 2 * rows * tokens * cfg.hidden_size * item
        sampling = rows * cfg.num_codebooks * cfg.vocab_size * 4 * 8
        audio = self.audio_encoder_config()
        ratios = list(audio.get("upsampling_ratios") or [8, 5, 4, 4])
        width = int(audio.get("num_filters") or 64) * 2 ** len(ratios)
        length = max(self.frames_for(r.seconds) for r in requests)
        activations = width * length
        for ratio in ratios:
            width, length = width // 2, length * ratio
            activations += width * length
        kernel = int(audio.get("kernel_size") or 7)
        decode = 4 * activations * (kernel + 3) * (2 if self.channels == 2 else 1)
        return int(weights + kv + cross + sampling + decode)

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


__all__ = ["DecoderConfig", "MusicGen", "MusicgenDecoder", "sample", "sinusoids", "top_k_mask"]
