"""Audio files from generated clips (WAV, FLAC, Ogg Vorbis, MP3; a smaller format when an upload limit is tight),
finishing touches (peak normalisation, a short fade-out). Members' uploads are decoded in :mod:`bot.untrusted_audio`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from core import audio_files

from .jobs import ClipData

log = logging.getLogger(__name__)

WAV_HEADER_BYTES = 44


pcm16 = audio_files.pcm16


def wav_bytes(clip: ClipData) -> bytes:
    """The clip as a 16-bit PCM WAV file with exactly ``clip.samples.shape[0]`` frames."""
    return _wav(clip.samples, clip.sampling_rate)


def wav_size(frames: int, channels: int) -> int:
    """Size in bytes of a 16-bit WAV file with this many frames."""
    return WAV_HEADER_BYTES + frames * channels * 2


def fit_wav(clip: ClipData, max_bytes: int) -> list[bytes]:
    """One WAV when it fits in ``max_bytes``, else stereo folded to mono, else the clip split into parts that fit.

    Every part keeps the original sampling rate; together the parts hold every sample exactly once.
    """
    data = wav_bytes(clip)
    if len(data) <= max_bytes:
        return [data]
    samples = clip.samples
    if samples.shape[1] > 1:
        samples = samples.mean(axis=1, keepdims=True)
        mono = _wav(samples, clip.sampling_rate)
        if len(mono) <= max_bytes:
            log.info("clip folded to mono to fit %d bytes", max_bytes)
            return [mono]
    per_part = (max_bytes - WAV_HEADER_BYTES) // (2 * samples.shape[1])
    if per_part < 1:
        raise ValueError(f"an upload limit of {max_bytes} bytes cannot hold any audio")
    parts = [_wav(samples[i:i + per_part], clip.sampling_rate) for i in range(0, samples.shape[0], per_part)]
    log.info("clip split into %d parts to fit %d bytes", len(parts), max_bytes)
    return parts


def _wav(samples: np.ndarray, sampling_rate: int) -> bytes:
    return audio_files.encode(samples, sampling_rate, "wav")


# -- finishing and encoding ------------------------------------------------------------------------------------
FADE_SECONDS = 0.05
PEAK = 10 ** (-1 / 20)  # normalise to -1 dBFS: loud, and lossy encoders' overshoot stays below full scale


@dataclass(frozen=True)
class AudioFormat:
    """A file format members can ask for."""

    name: str
    suffix: str
    content_type: str
    label: str


FORMATS: dict[str, AudioFormat] = {
    "wav": AudioFormat("wav", "wav", "audio/wav", "WAV (16-bit PCM)"),
    "flac": AudioFormat("flac", "flac", "audio/flac", "FLAC (lossless)"),
    "ogg": AudioFormat("ogg", "ogg", "audio/ogg", "Ogg Vorbis"),
    "mp3": AudioFormat("mp3", "mp3", "audio/mpeg", "MP3"),
}
# When a file is too large for the upload limit, try these in turn (lossless first, then the smallest lossy one).
FALLBACK_ORDER = ("wav", "flac", "mp3", "ogg")


def finish(samples: np.ndarray, sampling_rate: int, *, normalize: bool = True,
           fade_seconds: float = FADE_SECONDS) -> np.ndarray:
    """Peak-normalise ``samples`` ``(n, channels)`` to -1 dBFS (never clipping) and fade the last ``fade_seconds``
    out so a clip cut at its exact length ends without a click. ``normalize=False`` returns the samples as they are.
    """
    return audio_files.finish(samples, sampling_rate, normalize=normalize, fade_seconds=fade_seconds)


def encode(samples: np.ndarray, sampling_rate: int, fmt: str) -> bytes:
    """``samples`` ``(n, channels)`` in [-1, 1] as a ``fmt`` file (wav, flac, ogg or mp3), exactly ``n`` frames
    long for the lossless formats (the same files the command line writes)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown audio format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return audio_files.encode(samples, sampling_rate, fmt)


def encode_to_fit(samples: np.ndarray, sampling_rate: int, fmt: str, max_bytes: int) -> tuple[str, bytes]:
    """Encode in ``fmt``; when that is larger than ``max_bytes``, the first smaller format of
    :data:`FALLBACK_ORDER` after it that fits. Returns ``(format used, bytes)``; ValueError when none fits."""
    data = encode(samples, sampling_rate, fmt)
    if len(data) <= max_bytes:
        return fmt, data
    tried = [fmt]
    for other in FALLBACK_ORDER:
        if other in tried:
            continue
        tried.append(other)
        smaller = encode(samples, sampling_rate, other)
        if len(smaller) < len(data) and len(smaller) <= max_bytes:
            log.info("%s is %d bytes, over the %d-byte limit: sent as %s (%d bytes)", fmt, len(data), max_bytes,
                     other, len(smaller))
            return other, smaller
    raise ValueError(f"the clip does not fit in {max_bytes} bytes in any format")
