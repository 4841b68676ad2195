"""MusicGen-Melody's conditioning: the decoder sees a prefix of chroma and text states instead of cross-attention.

Mirrors transformers' ``MusicgenMelodyForConditionalGeneration``: the T5 states go through ``enc_to_dec_proj``
(zeroed where the prompt's mask is 0), the melody's one-hot chroma ``(F, 12)`` (:mod:`core.chroma`) through
``audio_enc_to_dec_proj`` (with bias), tiled and cut to exactly ``chroma_length`` frames; the decoder's input is
``[chroma (chroma_length), text (S), codes (T)]`` with sinusoidal positions counted from the first prefix
position, fully causal, with no padding mask (padded text positions are zero vectors that are still attended, as in
transformers, so a row's output depends on its prompt's padded length: :class:`core.MusicGen` never batches rows
whose prompts have different lengths). The decoder (:class:`core.decoder.MusicgenDecoder` without cross-attention)
prefills the prefix into its caches. Without a melody the chroma is the "null" melody, a one-hot on bin 0 in every
frame; the unconditional half of guidance gets the null melody and zero text states of the same length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .chroma import ChromaConfig, chroma_features
from .loading import BaseConfig

MODEL_TYPE = "musicgen_melody"

Melody = tuple[np.ndarray, int]
"""A melody as the API takes it: ``(samples, sampling_rate)``, samples ``(n,)`` or ``(n, channels)``."""


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


class MelodyConditioning:
    """What a melody model adds to MusicGen: the chroma extractor's settings, ``chroma_length`` and
    ``audio_enc_to_dec_proj`` (None when the chroma already has the decoder's width, as transformers)."""

    def __init__(self, config: MelodyConfig, chroma: ChromaConfig, dims: int):
        if chroma.num_chroma != config.num_chroma:
            raise ValueError(f"the feature extractor makes {chroma.num_chroma} chroma bins, the model takes "
                             f"{config.num_chroma}")
        self.config = config
        self.chroma = chroma
        self.audio_enc_to_dec_proj = nn.Linear(config.num_chroma, dims) if config.num_chroma != dims else None

    def prefix_length(self, text_length: int) -> int:
        """Decoder positions the prefix takes before the first code."""
        return self.config.chroma_length + text_length

    def melody_chroma(self, melody: Melody) -> np.ndarray:
        """``(samples, sampling_rate)`` -> one-hot chroma ``(F, 12)`` of its first ``chunk_length`` seconds;
        a bad melody is a ValueError fit to show a user."""
        try:
            samples, rate = melody
        except (TypeError, ValueError):
            raise ValueError("The melody must be (samples, sampling_rate).") from None
        return chroma_features(samples, rate, self.chroma)

    def chroma_states(self, chroma: np.ndarray, dtype: mx.Dtype) -> mx.array:
        """One-hot chroma ``(B, F, 12)`` -> projected, tiled and cut to ``(B, chroma_length, dims)``."""
        states = mx.array(np.asarray(chroma, dtype=np.float32))
        if self.audio_enc_to_dec_proj is not None:
            states = self.audio_enc_to_dec_proj(states.astype(self.audio_enc_to_dec_proj.weight.dtype))
        return fit_chroma(states, self.config.chroma_length).astype(dtype)

    def prefix(self, text: mx.array, chromas: Sequence[np.ndarray | None], *, guided: bool = False) -> mx.array:
        """The decoder's prefix ``(B, chroma_length + S, dims)`` from the projected, masked text states ``text``
        ``(B, S, dims)`` and each row's one-hot chroma ``(F, 12)`` or None (the null melody); ``2B`` rows,
        conditional first, when ``guided``."""
        if len(chromas) != text.shape[0]:
            raise ValueError(f"{len(chromas)} melodies for {text.shape[0]} prompts")
        dtype = text.dtype
        num_chroma = self.config.num_chroma
        chroma = mx.concatenate([self.chroma_states((null_chroma(num_chroma) if c is None else c)[None], dtype)
                                 for c in chromas])  # (B, chroma_length, dims)
        rows = mx.concatenate([chroma, text], axis=1)
        if guided:  # the null melody and zero text of the same length
            null = mx.repeat(self.chroma_states(null_chroma(num_chroma)[None], dtype), text.shape[0], axis=0)
            rows = mx.concatenate([rows, mx.concatenate([null, mx.zeros_like(text)], axis=1)])
        return rows


__all__ = ["MODEL_TYPE", "Melody", "MelodyConditioning", "MelodyConfig", "fit_chroma", "is_melody_config",
           "null_chroma"]
