"""Audio formats: every format round-trips with the right rate and length, the fallback is smaller, clips are
normalised with a fade-out (members' uploads: tests/test_untrusted_audio.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from pydub import AudioSegment

from bot.audio import PEAK, encode, encode_to_fit, finish

RATE = 32000


def tone(seconds: float = 1.0, channels: int = 1, amplitude: float = 0.3, rate: int = RATE) -> np.ndarray:
    t = np.arange(round(seconds * rate), dtype=np.float32) / rate
    wave = amplitude * np.sin(2 * np.pi * 440 * t)
    return np.repeat(wave[:, None], channels, axis=1).astype(np.float32)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg"])
def test_soundfile_formats_round_trip(fmt: str, channels: int) -> None:
    samples = tone(1.5, channels)
    data = encode(samples, RATE, fmt)
    decoded, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    assert rate == RATE
    assert decoded.shape == samples.shape
    tolerance = 2e-4 if fmt in ("wav", "flac") else 0.05
    assert np.abs(decoded - samples).mean() < tolerance


def test_mp3_round_trips_through_ffmpeg() -> None:
    samples = tone(2.0)
    data = encode(samples, RATE, "mp3")
    segment = AudioSegment.from_file(io.BytesIO(data), format="mp3")  # an independent decoder (ffmpeg)
    assert segment.frame_rate == RATE and segment.channels == 1
    # MP3 pads a few frames of encoder delay; the length is right to within one MP3 frame (1152 samples).
    assert abs(segment.frame_count() - samples.shape[0]) <= 1152 * 2
    assert len(data) < len(encode(samples, RATE, "wav")) / 4


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown audio format"):
        encode(tone(), RATE, "aiff")


def test_fallback_picks_a_smaller_format_that_fits() -> None:
    samples = tone(3.0)
    wav = encode(samples, RATE, "wav")
    fmt, data = encode_to_fit(samples, RATE, "wav", len(wav) + 10)
    assert fmt == "wav" and data == wav
    fmt, data = encode_to_fit(samples, RATE, "wav", len(wav) // 3)
    assert fmt != "wav" and len(data) <= len(wav) // 3
    info = sf.info(io.BytesIO(data)) if fmt != "mp3" else None
    if info is not None:
        assert info.samplerate == RATE and info.frames == samples.shape[0]
    with pytest.raises(ValueError, match="does not fit"):
        encode_to_fit(samples, RATE, "wav", 100)


def test_finish_normalises_without_clipping_and_fades_out() -> None:
    loud = tone(1.0, 2, amplitude=3.0)  # far above full scale
    out = finish(loud, RATE)
    assert out.shape == loud.shape
    assert np.max(np.abs(out)) == pytest.approx(PEAK, rel=1e-3)
    quiet = finish(tone(1.0, amplitude=0.01), RATE)
    assert np.max(np.abs(quiet)) == pytest.approx(PEAK, rel=1e-3)
    fade = round(0.05 * RATE)
    assert out[-1].max() == pytest.approx(0.0, abs=1e-6)
    assert np.abs(out[-fade // 4:]).max() < 0.5 * PEAK  # the last part of the fade is quiet
    assert np.abs(out[:-fade]).max() == pytest.approx(PEAK, rel=1e-3)  # before the fade nothing changed shape
    silence = finish(np.zeros((100, 1), np.float32), RATE)
    assert not np.any(silence)
    assert np.array_equal(finish(loud, RATE, normalize=False), loud)  # the setting turns both off
