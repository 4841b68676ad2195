"""MusicGen-Melody on MLX: the decoder conditions on a prefix of chroma and text states instead of cross-attention.

Mirrors transformers' ``MusicgenMelodyForConditionalGeneration``: the T5 states go through ``enc_to_dec_proj``
(zeroed where the prompt's mask is 0), the melody's one-hot chroma ``(F, 12)`` through ``audio_enc_to_dec_proj``
(with bias), tiled and cut to exactly ``chroma_length`` frames; the decoder's input is
``[chroma (chroma_length), text (S), codes (T)]`` with sinusoidal positions counted from the first prefix
position, fully causal, with no padding mask (padded text positions are zero vectors that are still attended, as in
transformers). The decoder's outputs at the prefix positions are dropped. Without a melody the chroma is the
"null" melody, a one-hot on bin 0 in every frame; the unconditional half of guidance gets the null melody and zero
text states of the same length.

Phase 1: the model pieces, teacher-forced logits and a plain single-row generation loop (tested against
transformers' greedy generation); batching, windows past 30 s and the public API join the shared generation code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .chroma import ChromaConfig, chroma_features
from .cpu.fast_ops import LayerNorm, gelu
from .encodec import EncodecConfig, EncodecModel
from .loading import (
    BaseConfig,
    CheckpointError,
    check_weights,
    load_safetensors,
    parse_dtype,
    read_config,
    resolve,
)
from .musicgen import (
    Attention,
    DecoderConfig,
    HostKVCache,
    KVCache,
    Linear,
    sample,
    sinusoids,
    text_encoder_size,
)
from .t5 import T5Config, T5EncoderModel
from .tokenizer import PromptTokenizer

log = logging.getLogger(__name__)

MODEL_TYPE = "musicgen_melody"


# --------------------------------------------------------------------------------------------------- config


@dataclass
class MelodyConfig(BaseConfig):
    """The top-level keys of a melody ``config.json`` beyond its three sections."""

    num_chroma: int = 12
    chroma_length: int = 235

    def __post_init__(self) -> None:
        for name in ("num_chroma", "chroma_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def is_melody_config(config: Mapping) -> bool:
    """Whether a ``config.json`` describes a MusicGen-Melody checkpoint."""
    decoder = config.get("decoder")
    return config.get("model_type") == MODEL_TYPE or (
        isinstance(decoder, Mapping) and decoder.get("model_type") == MODEL_TYPE + "_decoder")


# --------------------------------------------------------------------------------------------------- decoder


class MelodyDecoderLayer(nn.Module):
    """Pre-LN block: causal self-attention over prefix + codes, GELU feed-forward; no cross-attention."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        dims, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = Attention(dims, config.num_attention_heads)
        self.self_attn_layer_norm = LayerNorm(dims, eps=eps)
        self.fc1 = Linear(dims, config.ffn_dim, bias=False)
        self.fc2 = Linear(config.ffn_dim, dims, bias=False)
        self.final_layer_norm = LayerNorm(dims, eps=eps)
        if config.activation_function not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported decoder activation {config.activation_function!r}")
        self.act = gelu if config.activation_function == "gelu" else nn.gelu_approx

    def __call__(self, x: mx.array, cache: KVCache | HostKVCache | None, mask: str | None) -> mx.array:
        x = x + self.self_attn(self.self_attn_layer_norm(x), cache=cache, mask=mask)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class MelodyDecoder(nn.Module):
    """Prefix ``(B, P, dims)`` + K summed codebook embeddings + sinusoidal positions -> K heads of logits.

    Attribute names are those of transformers' ``MusicgenMelodyForCausalLM`` without ``model.decoder.``.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.num_codebooks = config.num_codebooks
        dims = config.hidden_size
        self.embed_scale = math.sqrt(dims) if config.scale_embedding else 1.0
        self.embed_tokens = [nn.Embedding(config.vocab_size + 1, dims) for _ in range(config.num_codebooks)]
        self.layers = [MelodyDecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.layer_norm = LayerNorm(dims, eps=config.layer_norm_eps)
        self.lm_heads = [Linear(dims, config.vocab_size, bias=False) for _ in range(config.num_codebooks)]

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint keys under ``decoder.`` (prefix already removed) -> this module's parameter names."""
        return {k.removeprefix("model.decoder."): v for k, v in weights.items() if "embed_positions" not in k}

    def make_cache(self, batch: int, length: int, host: bool | None = None) -> list[KVCache] | list[HostKVCache]:
        """One self-attention cache per layer for ``length`` positions (prefix included)."""
        cfg = self.config
        dtype = self.layer_norm.weight.dtype
        heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        if host is None:
            host = HostKVCache.available(dtype, head_dim)
        if host:
            return [HostKVCache(batch, heads, head_dim, length) for _ in self.layers]
        return [KVCache(batch, heads, head_dim, length, dtype) for _ in self.layers]

    def __call__(self, tokens: mx.array, prefix: mx.array | None = None,
                 cache: list[KVCache] | list[HostKVCache] | None = None) -> mx.array:
        """Codes ``(B, K, T)`` after ``prefix`` ``(B, P, dims)`` (the first call only) -> logits ``(B, K, T, vocab)``
        of the code positions; with ``cache`` the positions continue from it."""
        B, K, T = tokens.shape
        offset = cache[0].offset if cache else 0
        x = sum(self.embed_tokens[k](tokens[:, k]) for k in range(K)) * self.embed_scale  # (B, T, dims)
        if prefix is not None:
            x = mx.concatenate([prefix.astype(x.dtype), x], axis=1)  # (B, P + T, dims)
        x = x + sinusoids(mx.arange(offset, offset + x.shape[1]), x.shape[-1]).astype(x.dtype)
        mask = "causal" if x.shape[1] > 1 else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cache[i] if cache else None, mask)
        x = self.layer_norm(x[:, -T:])  # the prefix positions predict nothing
        return mx.stack([head(x) for head in self.lm_heads], axis=1)  # (B, K, T, vocab)


# --------------------------------------------------------------------------------------------------- prefix


def null_chroma(num_chroma: int = 12, frames: int = 1) -> np.ndarray:
    """The melody of "no melody": a one-hot on bin 0 in every frame, ``(frames, num_chroma)``."""
    chroma = np.zeros((frames, num_chroma), dtype=np.float32)
    chroma[:, 0] = 1.0
    return chroma


def fit_chroma(states: mx.array, length: int) -> mx.array:
    """Projected chroma ``(B, F, dims)`` tiled (whole repeats) and cut to exactly ``length`` frames."""
    frames = states.shape[1]
    if frames < length:
        states = mx.concatenate([states] * math.ceil(length / frames), axis=1)
    return states[:, :length]


class MusicgenMelody:
    """Tokenizer + T5 + ``enc_to_dec_proj`` + chroma + ``audio_enc_to_dec_proj`` + :class:`MelodyDecoder` + EnCodec,
    loaded from one Hugging Face melody checkpoint."""

    def __init__(self, config: Mapping, text_encoder: T5EncoderModel, decoder: MelodyDecoder,
                 audio_encoder: EncodecModel, tokenizer: PromptTokenizer, enc_to_dec_proj: nn.Linear | None,
                 audio_enc_to_dec_proj: nn.Linear | None, chroma: ChromaConfig | None = None,
                 generation_config: Mapping | None = None):
        self.config = dict(config)
        self.melody_config = MelodyConfig.from_dict(config)
        self.text_encoder = text_encoder
        self.enc_to_dec_proj = enc_to_dec_proj
        self.audio_enc_to_dec_proj = audio_enc_to_dec_proj
        self.decoder = decoder
        self.audio_encoder = audio_encoder
        self.tokenizer = tokenizer
        self.chroma = chroma or ChromaConfig()
        self.generation_config = dict(generation_config or {})
        if self.chroma.num_chroma != self.melody_config.num_chroma:
            raise ValueError(f"the feature extractor makes {self.chroma.num_chroma} chroma bins, the model takes "
                             f"{self.melody_config.num_chroma}")

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, dtype: str | mx.Dtype = "float32") -> MusicgenMelody:
        """Load a melody checkpoint (folder or hub id); problems with the files raise :class:`CheckpointError`."""
        dtype = parse_dtype(dtype)
        folder = resolve(name_or_path)
        config = read_config(folder)
        config_file = folder / "config.json"
        for part in ("text_encoder", "audio_encoder", "decoder"):
            if not isinstance(config.get(part), dict):
                raise CheckpointError(f"{config_file} has no '{part}' section: is this a MusicGen checkpoint?")
        if not is_melody_config(config):
            raise CheckpointError(f"{config_file} is not a MusicGen-Melody checkpoint")
        generation_config = {}
        if (folder / "generation_config.json").is_file():
            generation_config = read_config(folder, "generation_config.json")
        preprocessor = {}
        if (folder / "preprocessor_config.json").is_file():
            preprocessor = read_config(folder, "preprocessor_config.json")
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
            melody_config = MelodyConfig.from_dict(config)
            chroma = ChromaConfig.from_dict(preprocessor)
            decoder_config = DecoderConfig.from_dict(config["decoder"])
            text_encoder = T5EncoderModel(T5Config.from_dict(config["text_encoder"]))
            decoder = MelodyDecoder(decoder_config)
            audio_encoder = EncodecModel(EncodecConfig.from_dict(config["audio_encoder"]))
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{config_file} is not a valid MusicGen-Melody config: {e}") from None
        dims = decoder_config.hidden_size
        # transformers creates each projection only when the widths differ
        text_size = text_encoder_size(config["text_encoder"])
        enc_to_dec_proj = nn.Linear(text_size, dims) if text_size != dims else None
        chroma_size = melody_config.num_chroma
        audio_enc_to_dec_proj = nn.Linear(chroma_size, dims) if chroma_size != dims else None

        weights = load_safetensors(folder)
        source = str(folder / ("model.safetensors" if (folder / "model.safetensors").is_file()
                               else "model.safetensors.index.json"))
        parts: dict[str, dict[str, mx.array]] = {"text_encoder": {}, "audio_encoder": {}, "decoder": {},
                                                 "enc_to_dec_proj": {}, "audio_enc_to_dec_proj": {}}
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
            for name, module in (("enc_to_dec_proj", enc_to_dec_proj),
                                 ("audio_enc_to_dec_proj", audio_enc_to_dec_proj)):
                if module is not None:
                    load(module, parts[name], name, dtype)
                elif parts[name]:
                    raise CheckpointError(f"{source} has {name} weights its config does not expect")
        except CheckpointError:
            raise
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{source} does not match {config_file}: {e}") from None
        model = cls(config, text_encoder, decoder, audio_encoder, tokenizer, enc_to_dec_proj, audio_enc_to_dec_proj,
                    chroma, generation_config)
        mx.eval(model.parameters())
        log.info("loaded melody model %s: %d codebooks, decoder %s", folder, decoder_config.num_codebooks, dtype)
        return model

    def parameters(self) -> dict:
        """Every module's parameters, keyed like the checkpoint."""
        tree = {"text_encoder": self.text_encoder.parameters(), "decoder": self.decoder.parameters(),
                "audio_encoder": self.audio_encoder.parameters()}
        for name in ("enc_to_dec_proj", "audio_enc_to_dec_proj"):
            module = getattr(self, name)
            if module is not None:
                tree[name] = module.parameters()
        return tree

    # ---------------------------------------------------------------------------------------- conditioning

    def melody_chroma(self, melody: tuple[np.ndarray, int]) -> np.ndarray:
        """``(samples, sampling_rate)`` with samples ``(n,)`` or ``(n, channels)`` -> one-hot chroma ``(F, 12)``."""
        samples, rate = melody
        return chroma_features(samples, rate, self.chroma)

    def text_states(self, prompts: list[str]) -> mx.array:
        """Projected T5 states ``(B, S, dims)``, zero where a prompt is padding (as transformers multiplies)."""
        ids, mask = self.tokenizer(prompts)
        mask = mx.array(mask)
        states = self.text_encoder(mx.array(ids), mask)  # (B, S, d_t5)
        if self.enc_to_dec_proj is not None:
            states = self.enc_to_dec_proj(states.astype(self.enc_to_dec_proj.weight.dtype))
        return states * mask[..., None].astype(states.dtype)

    def chroma_states(self, chroma: np.ndarray) -> mx.array:
        """One-hot chroma ``(B, F, 12)`` -> projected, tiled and cut to ``(B, chroma_length, dims)``."""
        states = mx.array(np.asarray(chroma, dtype=np.float32))
        if self.audio_enc_to_dec_proj is not None:
            states = self.audio_enc_to_dec_proj(states.astype(self.audio_enc_to_dec_proj.weight.dtype))
        return fit_chroma(states, self.melody_config.chroma_length)

    def prefix(self, prompts: list[str], melodies: Sequence[np.ndarray | None] | None = None, *,
               guided: bool = False) -> mx.array:
        """The decoder's prefix ``(B, chroma_length + S, dims)`` (``2B`` rows, conditional first, when
        ``guided``). ``melodies[i]`` is row i's one-hot chroma ``(F, 12)`` or None (the null melody)."""
        melodies = list(melodies) if melodies is not None else [None] * len(prompts)
        if len(melodies) != len(prompts):
            raise ValueError(f"{len(melodies)} melodies for {len(prompts)} prompts")
        num_chroma = self.melody_config.num_chroma
        text = self.text_states(prompts)
        chroma = mx.concatenate([self.chroma_states((null_chroma(num_chroma) if m is None else m)[None])
                                 for m in melodies])  # (B, chroma_length, dims)
        rows = mx.concatenate([chroma, text.astype(chroma.dtype)], axis=1)
        if guided:  # the null melody and zero text of the same length
            null = mx.repeat(self.chroma_states(null_chroma(num_chroma)[None]), len(prompts), axis=0)
            rows = mx.concatenate([rows, mx.concatenate([null, mx.zeros_like(text).astype(null.dtype)], axis=1)])
        return rows.astype(self.decoder.layer_norm.weight.dtype)

    def logits(self, prompts: list[str], codes: np.ndarray, melodies: Sequence[np.ndarray | None] | None = None,
               *, guided: bool = False) -> mx.array:
        """Teacher-forced logits of codes ``(B, K, T)``: ``(B, K, T, vocab)``, or ``(2B, K, T, vocab)`` when
        ``guided`` (the unconditional rows see the same codes, as in generation)."""
        prefix = self.prefix(prompts, melodies, guided=guided)
        codes = mx.array(np.asarray(codes, dtype=np.int32))
        if guided:
            codes = mx.concatenate([codes, codes])
        return self.decoder(codes, prefix)

    # ---------------------------------------------------------------------------------------- generation

    def generate_tokens(self, prompt: str, frames: int, *, melody: tuple[np.ndarray, int] | None = None,
                        seed: int = 0, top_k: int = 250, temperature: float = 1.0,
                        guidance_scale: float = 3.0) -> np.ndarray:
        """Codes ``(K, frames)`` for one prompt, conditioned on ``melody`` ``(samples, sampling_rate)`` if given.

        A plain single-row loop (prefix prefilled with the first step, then one position per step, the delay
        pattern per channel, guidance as transformers does it); batching, windows and progress belong to the
        shared generation code in phase 2.
        """
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be a positive integer, got {frames!r}")
        cfg = self.decoder.config
        K, pad = cfg.num_codebooks, cfg.pad_token_id
        delays = np.arange(K) // cfg.audio_channels  # stereo: L0, R0, L1, R1 … share a delay per pair
        steps = frames + cfg.channel_codebooks - 1
        guided = guidance_scale > 1
        chroma = None if melody is None else [self.melody_chroma(melody)]
        prefix = self.prefix([prompt], chroma, guided=guided)
        cache = self.decoder.make_cache(prefix.shape[0], prefix.shape[1] + steps)
        temperature_, top_k_ = mx.array([temperature], dtype=mx.float32), mx.array([top_k], dtype=mx.int32)
        key = mx.random.key(seed)
        tokens = mx.full((1, K, 1), cfg.bos_token_id, dtype=mx.int32)
        out = np.full((K, steps), pad, dtype=np.int32)
        for step in range(steps):
            inputs = mx.concatenate([tokens, tokens]) if guided else tokens
            logits = self.decoder(inputs, prefix if step == 0 else None, cache)[:, :, -1].astype(mx.float32)
            if guided:
                cond, uncond = mx.split(logits, 2)
                logits = uncond + (cond - uncond) * guidance_scale
            key, sub = mx.random.split(key)
            sampled = sample(logits, temperature_, top_k_, [sub], top_k)
            frame = step - delays
            valid = mx.array((frame >= 0) & (frame < frames))[None]
            tokens = mx.where(valid, sampled, pad)[..., None]  # (1, K, 1)
            mx.eval(tokens, key, [c.state for c in cache])
            out[:, step] = np.array(tokens[0, :, 0])
        return np.stack([out[k, d:d + frames] for k, d in enumerate(delays)])

    def decode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Codes ``(K, frames)`` -> float32 audio ``(frames × hop, channels)``; stereo decodes ``[::2]`` (left)
        and ``[1::2]`` (right) through the mono EnCodec."""
        tokens = np.asarray(tokens, dtype=np.int32)
        channels = self.decoder.config.audio_channels
        streams = tokens[None] if channels == 1 else np.stack([tokens[0::2], tokens[1::2]])
        audio = self.audio_encoder.decode(mx.array(streams)[:, None], [None])  # (streams, samples, 1)
        return np.array(mx.concatenate(list(audio), axis=-1).astype(mx.float32))


__all__ = ["MODEL_TYPE", "MelodyConfig", "MelodyDecoder", "MelodyDecoderLayer", "MusicgenMelody", "fit_chroma",
           "is_melody_config", "null_chroma"]
