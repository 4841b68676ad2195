"""Audio files from generated clips: 16-bit PCM WAV, and smaller encodings when an upload limit is tight."""

from __future__ import annotations

import io
import logging
import wave

import numpy as np

from core.generation import Clip

log = logging.getLogger(__name__)

WAV_HEADER_BYTES = 44


def pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] (anything outside is clipped; NaN becomes 0) as int16."""
    x = np.nan_to_num(np.asarray(samples, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2")


def wav_bytes(clip: Clip) -> bytes:
    """The clip as a 16-bit PCM WAV file with exactly ``clip.samples.shape[0]`` frames."""
    return _wav(clip.samples, clip.sampling_rate)


def wav_size(frames: int, channels: int) -> int:
    """Size in bytes of a 16-bit WAV file with this many frames."""
    return WAV_HEADER_BYTES + frames * channels * 2


def fit_wav(clip: Clip, max_bytes: int) -> list[bytes]:
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
    samples = np.asarray(samples)
    if samples.ndim == 1:
        samples = samples[:, None]
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(int(sampling_rate))
        w.writeframes(pcm16(samples).tobytes())
    return buf.getvalue()
