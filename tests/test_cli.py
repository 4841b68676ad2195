"""The command line as a user runs it: a subprocess that writes a WAV."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.test_continuation import build as build_windowed
from tests.test_musicgen import build

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mono")
    build(folder, seed=5)
    return folder


@pytest.fixture(scope="module")
def windowed(tmp_path_factory) -> Path:
    """A checkpoint with a 1 s window, so clips past the window are cheap."""
    folder = tmp_path_factory.mktemp("windowed")
    build_windowed(folder, seed=6)
    return folder


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf-home"))
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("seconds", ["0.5", "0.37"])
def test_writes_wav_of_exact_length(checkpoint, tmp_path, seconds):
    out = tmp_path / "clip.wav"
    result = run("warm synthwave", "--seconds", seconds, "--model", str(checkpoint), "-o", str(out), "--seed", "3",
                 "--top-k", "50", "--temperature", "0.9", "--guidance", "2.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    audio, rate = sf.read(out)
    assert rate == 32000
    assert audio.shape == (round(float(seconds) * 32000),)
    assert "BLAS" in result.stderr and "steps" in result.stderr and "seed 3" in result.stderr


@pytest.mark.parametrize("args", [
    ["", "--seconds", "1"], ["jazz", "--seconds", "0"], ["jazz", "--seconds", "-2"], ["jazz", "--seconds", "nan"],
    ["jazz", "--seconds", "61"], ["jazz", "--top-k", "0"], ["jazz", "--temperature", "0"],
    ["jazz", "--seconds", "45", "--extend-stride", "0"], ["jazz", "--seconds", "45", "--extend-stride", "30"],
    ["jazz", "--seconds", "45", "--max-seconds", "40"], ["jazz", "--max-seconds", "-1"],
    ["jazz", "--continue", "no-such-file.wav"], ["jazz", "--continue", "not-audio.txt"],
])
def test_bad_input_exits_with_one_line(checkpoint, tmp_path, args):
    (tmp_path / "not-audio.txt").write_text("hello")
    result = run(*args, "--model", str(checkpoint), "-o", str(tmp_path / "x.wav"), "--quiet", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.wav").exists()


def test_missing_checkpoint_exits_with_one_line(tmp_path):
    for model in (str(tmp_path / "nowhere"), "nobody-here/no-such-musicgen"):
        result = run("jazz", "--model", model, "--quiet", cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")


def test_longer_than_the_window(windowed, tmp_path):
    out = tmp_path / "long.wav"
    result = run("ambient drone", "--seconds", "1.3", "--extend-stride", "0.4", "--seed", "1", "--model",
                 str(windowed), "-o", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    audio, rate = sf.read(out)
    assert rate == 32000 and audio.shape == (round(1.3 * 32000),)
    # windows (start, length, prompt) (0, 50, 0), (20, 45, 30): one bar over both
    total = (50 + 3) + (45 + 3 - 30)
    assert f" {total}/{total} steps" in result.stderr and f" 54/{total} steps" in result.stderr
    result = run("ambient drone", "--seconds", "1.3", "--max-seconds", "1.2", "--model", str(windowed), "-q",
                 cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "1.2" in result.stderr


def test_continue_a_recording(windowed, tmp_path):
    t = np.arange(24000) / 48000
    sf.write(tmp_path / "in.wav", np.stack([np.sin(2 * np.pi * 330 * t), np.sin(2 * np.pi * 440 * t)], axis=1) / 3,
             48000)
    out = tmp_path / "out.wav"
    result = run("add drums", "--continue", "in.wav", "--seconds", "0.3", "--seed", "2", "--model", str(windowed),
                 "-o", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    audio, rate = sf.read(out)
    assert rate == 32000
    assert audio.shape == (16000 + 9600,)  # 0.5 s of input (25 whole frames) + 0.3 s new
