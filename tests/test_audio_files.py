"""core.audio_files: the files the command line and the bot write, and the checks made before a model loads."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from bot import audio
from core import audio_files


def tone(frames: int = 8000, channels: int = 2) -> np.ndarray:
    t = np.arange(frames, dtype=np.float32) / 32000
    return np.stack([0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)], axis=1)


def test_mp3_through_ffmpeg_when_libsndfile_lacks_it(monkeypatch):
    monkeypatch.setattr(audio_files, "_libsndfile_mp3", lambda: False)
    data = audio_files.encode(tone(), 32000, "mp3")
    assert data[:3] == b"ID3" or data[0] == 0xFF  # an ID3 tag or an MPEG frame sync
    decoded, rate = sf.read(io.BytesIO(data))
    assert rate == 32000 and decoded.shape[1] == 2 and abs(decoded.shape[0] - 8000) <= 2 * 1152
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "ffmpeg" in audio_files.can_encode("mp3")
    with pytest.raises(ValueError, match="ffmpeg"):
        audio_files.encode(tone(), 32000, "mp3")


@pytest.mark.parametrize("fmt", audio_files.FORMATS)
def test_the_bot_sends_the_same_files(fmt):
    samples = audio.finish(tone(), 32000)
    assert np.array_equal(samples, audio_files.finish(tone(), 32000))
    if fmt in ("wav", "flac"):  # deterministic encoders: byte for byte
        assert audio.encode(samples, 32000, fmt) == audio_files.encode(samples, 32000, fmt)
    else:
        assert sf.info(io.BytesIO(audio.encode(samples, 32000, fmt))).format == fmt.upper()


def test_output_target(tmp_path):
    assert audio_files.output_target(tmp_path / "a.FLAC") == (tmp_path / "a.FLAC", "flac")
    assert audio_files.output_target(tmp_path / "a", "ogg") == (tmp_path / "a.ogg", "ogg")
    assert audio_files.output_target(tmp_path / "a") == (tmp_path / "a.wav", "wav")
    assert audio_files.output_target(tmp_path, "mp3") == (None, "mp3")
    (tmp_path / "a.wav").write_bytes(b"x")
    assert audio_files.output_target(tmp_path / "a.wav", overwrite=True) == (tmp_path / "a.wav", "wav")
    for path, fmt, message in [(tmp_path / "a.wav", None, "already exists"), (tmp_path / "a.aiff", None, ".aiff"),
                               (tmp_path / "a.ogg", "wav", "--format says wav"), (tmp_path, "opus", "opus"),
                               (tmp_path / "no" / "a.wav", None, "does not exist")]:
        with pytest.raises(ValueError, match=message):
            audio_files.output_target(path, fmt)


def test_names_in_a_folder_never_replace_a_file(tmp_path):
    first = audio_files.name_in_folder(tmp_path, "  Lo-fi piano: rainy night!! ", 42, "ogg")
    assert first == tmp_path / "lo-fi-piano-rainy-night-42.ogg"
    audio_files.write(first, b"one")
    second = audio_files.name_in_folder(tmp_path, "Lo-fi piano: rainy night", 42, "ogg")
    assert second == tmp_path / "lo-fi-piano-rainy-night-42-2.ogg"
    assert audio_files.name_in_folder(tmp_path, "☃☃", 1, "wav") == tmp_path / "clip-1.wav"
    assert len(audio_files.name_in_folder(tmp_path, "x" * 500, 1, "wav").name) < 70
    with pytest.raises(FileExistsError):
        audio_files.write(first, b"two")
    assert first.read_bytes() == b"one"


def test_normalisation_and_its_opt_out():
    loud = tone() * 5  # peaks far above full scale
    out = audio_files.finish(loud, 32000)
    assert abs(np.max(np.abs(out)) - audio_files.PEAK) < 1e-4 and np.all(np.abs(out[-1]) < 1e-6)  # faded out
    assert np.array_equal(audio_files.finish(loud, 32000, normalize=False), loud)
