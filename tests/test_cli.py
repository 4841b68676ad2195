"""The command line as a user runs it: a subprocess that writes a WAV."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from tests.test_musicgen import build

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mono")
    build(folder, seed=5)
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
    ["jazz", "--seconds", "31"], ["jazz", "--top-k", "0"], ["jazz", "--temperature", "0"],
])
def test_bad_input_exits_with_one_line(checkpoint, tmp_path, args):
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
