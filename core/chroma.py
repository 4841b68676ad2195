"""The melody's chroma, as transformers' ``MusicgenMelodyFeatureExtractor`` computes it, in NumPy.

A melody is downmixed to mono, resampled to the extractor's rate with torchaudio's windowed-sinc resampler
(``rolloff=0.945``, ``lowpass_filter_width=24``), cut to ``chunk_length`` seconds, zero-padded on both sides up to
one FFT if shorter, turned into a power spectrogram (periodic Hann window, ``center=True`` with reflect padding,
divided by the window's L2 norm), projected onto 12 pitch classes by librosa's chroma filter bank, normalised by
each frame's maximum and finally reduced to a one-hot of the loudest pitch class per frame.

Computed in float64 and returned as float32; no torch, no MLX.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .loading import BaseConfig


@dataclass
class ChromaConfig(BaseConfig):
    """The fields of a melody checkpoint's ``preprocessor_config.json`` that shape the chroma."""

    sampling_rate: int = 32000
    n_fft: int = 16384
    hop_length: int = 4096
    chunk_length: int = 30
    num_chroma: int = 12

    def __post_init__(self) -> None:
        for name in ("sampling_rate", "n_fft", "hop_length", "chunk_length", "num_chroma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"chroma {name} must be a positive integer, got {value!r}")

    @property
    def max_samples(self) -> int:
        """The longest melody, in samples at :attr:`sampling_rate`; the rest is cut off."""
        return self.chunk_length * self.sampling_rate

    def frames_for(self, samples: int) -> int:
        """Chroma frames of a melody of ``samples`` (at :attr:`sampling_rate`): one per hop, centred."""
        samples = max(min(samples, self.max_samples), self.n_fft)
        return 1 + samples // self.hop_length


# --------------------------------------------------------------------------------------------------- resampling


@lru_cache(maxsize=8)
def _sinc_kernel(orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> tuple[np.ndarray, np.ndarray, int]:
    """torchaudio's ``_get_sinc_resample_kernel`` (Hann-windowed sinc) for reduced rates, stored sparsely.

    torchaudio's kernel has ``new`` rows of ``2·width + orig`` taps, but row ``p`` is zero (its window is) outside
    ``2·width + 1`` taps from ``floor(p · orig / new)``: only those are kept, so rates that share no factor
    (44099 → 32000: 32000 rows × 44150 taps, 11 GB dense) cost ``new × (2·width + 1)``. Returns the rows
    ``(new, 2·width + 1)``, each row's first tap ``(new,)`` and ``width``.

    Computed in float32, step by step as torchaudio does for float32 audio: its float32 rounding of the phases
    moves the output by up to ~1e-5 of full scale, more than the rest of the computation.
    """
    f32 = np.float32
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    phase = np.arange(new)
    starts = phase * orig // new  # (new,)
    taps = starts[:, None] + np.arange(2 * width + 1)[None]  # (new, S): indices into torchaudio's row
    idx = (taps - width).astype(f32) / f32(orig)
    t = (-phase).astype(f32)[:, None] / f32(new) + idx
    t = np.clip(t * f32(base), -lowpass_filter_width, lowpass_filter_width).astype(f32)
    window = np.cos(t * f32(math.pi / lowpass_filter_width / 2)) ** 2
    t = t * f32(math.pi)
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, f32(1.0), np.sin(t) / t).astype(f32)
    kernel = (kernel * (window * f32(base / orig))).astype(np.float64)
    kernel.flags.writeable = False
    starts.flags.writeable = False
    return kernel, starts, width


def resample(audio: np.ndarray, rate: int, target: int, *, lowpass_filter_width: int = 24,
             rolloff: float = 0.945) -> np.ndarray:
    """Resample ``(n,)`` or ``(n, channels)`` audio along its first axis as ``torchaudio.functional.resample``
    does (its ``sinc_interp_hann`` method), to ``ceil(n × target / rate)`` samples; float64.

    Output sample ``j · new + p`` (rates reduced by their gcd) is input frame ``j`` (``orig`` samples apart)
    filtered by kernel row ``p``; each row has ``2·width + 1`` taps (~51 between the usual rates), so the cost is
    ~51 multiply-adds per output sample whatever the rates.
    """
    if isinstance(rate, bool) or isinstance(target, bool) or int(rate) != rate or int(target) != target \
            or rate < 1 or target < 1:
        raise ValueError(f"sample rates must be positive integers, got {rate!r} and {target!r}")
    audio = np.asarray(audio, dtype=np.float64)
    if rate == target:
        return audio
    gcd = math.gcd(int(rate), int(target))
    orig, new = int(rate) // gcd, int(target) // gcd
    kernel, starts, width = _sinc_kernel(orig, new, lowpass_filter_width, float(rolloff))
    mono = audio.ndim == 1
    signal = audio[:, None] if mono else audio
    n = signal.shape[0]
    padded = np.pad(signal, ((width, width + orig), (0, 0)))
    span = kernel.shape[1]
    frames = n // orig + 1  # torchaudio's conv1d output length (stride orig over n + 2·width + orig samples)
    out = np.empty((frames, new, signal.shape[1]))
    for p in range(new):
        # (frames, channels, span) windows of this phase, strided views of the padded signal
        windows = sliding_window_view(padded[starts[p]:starts[p] + (frames - 1) * orig + span], span, axis=0)
        out[:, p] = windows[::orig] @ kernel[p]
    out = out.reshape(-1, signal.shape[1])[: math.ceil(new * n / orig)]
    return out[:, 0] if mono else out


# --------------------------------------------------------------------------------------------------- chroma


@lru_cache(maxsize=4)
def chroma_filter_bank(sampling_rate: int, n_fft: int, num_chroma: int = 12) -> np.ndarray:
    """librosa's chroma filter bank as transformers builds it (tuning 0, L2-normalised columns, Gaussian octave
    weighting centred on octave 5 with half-width 2, starting at C): ``(num_chroma, n_fft // 2 + 1)``."""
    frequencies = np.linspace(0, sampling_rate, n_fft, endpoint=False)[1:]
    octaves = np.log2(frequencies / (440.0 / 16))
    bins = num_chroma * octaves
    bins = np.concatenate(([bins[0] - 1.5 * num_chroma], bins))
    widths = np.concatenate((np.maximum(bins[1:] - bins[:-1], 1.0), [1]))
    filters = np.subtract.outer(bins, np.arange(0, num_chroma, dtype="d")).T
    half = np.round(float(num_chroma) / 2)
    filters = np.remainder(filters + half + 10 * num_chroma, num_chroma) - half
    filters = np.exp(-0.5 * (2 * filters / np.tile(widths, (num_chroma, 1))) ** 2)
    filters = filters / np.sum(filters**2, axis=0, keepdims=True) ** 0.5
    filters *= np.tile(np.exp(-0.5 * (((bins / num_chroma - 5.0) / 2.0) ** 2)), (num_chroma, 1))
    filters = np.roll(filters, -3 * (num_chroma // 12), axis=0)
    # transformers hands the bank to torch as float32
    filters = np.ascontiguousarray(filters[:, : int(1 + n_fft / 2)]).astype(np.float32).astype(np.float64)
    filters.flags.writeable = False
    return filters


def to_mono(samples: np.ndarray) -> np.ndarray:
    """``(n,)`` or ``(n, channels)`` -> ``(n,)`` float64, channels averaged as the extractor does."""
    samples = np.asarray(samples)
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float64)
    elif samples.ndim != 1:
        raise ValueError(f"a melody is (samples,) or (samples, channels), got shape {samples.shape}")
    if samples.size == 0:
        raise ValueError("the melody is empty")
    if not np.issubdtype(samples.dtype, np.number):
        raise ValueError(f"melody samples must be numbers, got {samples.dtype}")
    samples = samples.astype(np.float64)
    if not np.isfinite(samples).all():
        raise ValueError("the melody holds NaN or infinite samples")
    return samples


def normalized_chroma(samples: np.ndarray, sampling_rate: int, config: ChromaConfig | None = None) -> np.ndarray:
    """The frame-normalised chroma before the one-hot: ``(frames, num_chroma)`` float64 in [0, 1].

    ``samples`` ``(n,)`` or ``(n, channels)`` at ``sampling_rate``.
    """
    config = config or ChromaConfig()
    if isinstance(sampling_rate, bool) or int(sampling_rate) != sampling_rate or sampling_rate < 1:
        raise ValueError(f"the sampling rate must be a positive integer, got {sampling_rate!r}")
    # only the first max_samples (after resampling) count: cut the input past them and the resampler's reach
    # (its kernel spans ~26 samples at the lower rate either way), so a long melody costs no more than 30 s
    keep = math.ceil(config.max_samples * sampling_rate / config.sampling_rate) + int(sampling_rate) \
        + 64 * math.ceil(sampling_rate / config.sampling_rate) + 64
    wav = resample(to_mono(np.asarray(samples)[:keep]), int(sampling_rate), config.sampling_rate)
    wav = wav[: config.max_samples]
    if wav.shape[0] < config.n_fft:  # one FFT at least, the silence split around the melody
        pad = config.n_fft - wav.shape[0]
        wav = np.pad(wav, (pad // 2, pad // 2 + pad % 2))
    half = config.n_fft // 2
    wav = np.pad(wav, half, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * math.pi * np.arange(config.n_fft) / config.n_fft)  # periodic Hann
    frames = sliding_window_view(wav, config.n_fft)[:: config.hop_length]  # (frames, n_fft)
    spec = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2 / np.sum(window**2)  # (frames, bins)
    raw = spec @ chroma_filter_bank(config.sampling_rate, config.n_fft, config.num_chroma).T  # (frames, chroma)
    return raw / np.maximum(np.abs(raw).max(axis=-1, keepdims=True), 1e-6)


def chroma_features(samples: np.ndarray, sampling_rate: int, config: ChromaConfig | None = None) -> np.ndarray:
    """The melody conditioning of transformers' extractor: a one-hot of the loudest pitch class per frame,
    ``(frames, num_chroma)`` float32, ``frames = 1 + min(n', max_samples) // hop`` (``n'`` the length at the
    extractor's rate, at least one FFT)."""
    chroma = normalized_chroma(samples, sampling_rate, config)
    onehot = np.zeros(chroma.shape, dtype=np.float32)
    onehot[np.arange(chroma.shape[0]), chroma.argmax(axis=-1)] = 1.0
    return onehot


def chroma_config(preprocessor: Mapping | None) -> ChromaConfig:
    """The chroma settings of a ``preprocessor_config.json`` (defaults of ``facebook/musicgen-melody`` without)."""
    return ChromaConfig.from_dict(preprocessor or {})


__all__ = ["ChromaConfig", "chroma_config", "chroma_features", "chroma_filter_bank", "normalized_chroma",
           "resample", "to_mono"]
