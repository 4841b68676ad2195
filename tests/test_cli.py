"""The command line as a user runs it: a subprocess that writes WAV, FLAC, Ogg or MP3."""

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


def run(*args: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSICGEN_")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf-home"), **extra)
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
    ["jazz", "--format", "aiff"],
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
    assert f"100% {total}/{total} steps" in result.stderr and "\r" not in result.stderr
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


def ffprobe_frames(path: Path) -> tuple[int, int, str]:
    """Sample frames, rate and codec of ``path`` as ffprobe decodes it."""
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
                            "stream=codec_name,sample_rate", "-of", "default=nw=1", str(path)],
                           capture_output=True, text=True, check=True).stdout
    info = dict(line.split("=", 1) for line in probe.split())
    decoded = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1", "-"],
                             capture_output=True, check=True).stdout
    return len(decoded) // 2, int(info["sample_rate"]), info["codec_name"]


@pytest.mark.parametrize("name, codec", [("clip.wav", "pcm_s16le"), ("clip.flac", "flac"), ("clip.ogg", "vorbis"),
                                         ("clip.MP3", "mp3")])
def test_every_format_from_the_extension(checkpoint, tmp_path, name, codec):
    out = tmp_path / name
    result = run("warm synthwave", "--seconds", "0.37", "--model", str(checkpoint), "-o", str(out), "--seed", "3",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    frames = round(0.37 * 32000)
    decoded, rate, found = ffprobe_frames(out)
    assert (rate, found) == (32000, codec)
    if codec == "mp3":  # MP3 pads to whole 1152-sample frames; libsndfile writes a gapless header
        audio, rate = sf.read(out)
        assert rate == 32000 and abs(audio.shape[0] - frames) <= 1152 and abs(decoded - frames) <= 2 * 1152
    else:  # exact as libsndfile reads it; ffmpeg too, but for the samples it trims off a Vorbis stream's start
        audio, rate = sf.read(out)
        assert rate == 32000 and audio.shape == (frames,)
        assert decoded == frames if codec != "vorbis" else frames - 256 <= decoded <= frames
        peak = np.max(np.abs(audio))
        assert 0.85 < peak <= 0.9 if codec != "vorbis" else 0.7 < peak < 1.0  # normalised to -1 dBFS
    assert f"({name.rsplit('.', 1)[1].lower()})" in result.stderr


def test_format_flag_folder_and_no_normalize(checkpoint, tmp_path):
    first = run("Warm synthwave, 80s!", "--seconds", "0.3", "--model", str(checkpoint), "-o", str(tmp_path),
                "--seed", "11", "--format", "flac", "--no-normalize", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run("Warm synthwave, 80s!", "--seconds", "0.3", "--model", str(checkpoint), "--seed", "11",
                 "--format", "flac", cwd=tmp_path)  # default output: the current folder; the name is taken
    assert second.returncode == 0, second.stderr
    raw, _ = sf.read(tmp_path / "warm-synthwave-80s-11.flac")
    normalised, _ = sf.read(tmp_path / "warm-synthwave-80s-11-2.flac")
    assert raw.shape == normalised.shape == (9600,)
    assert abs(np.max(np.abs(normalised)) - 10 ** (-1 / 20)) < 1e-3
    assert not np.allclose(raw, normalised, atol=1e-3)  # the same seed, only the normalisation differs
    # a name without extension takes --format's
    third = run("x", "--seconds", "0.2", "--model", str(checkpoint), "-o", str(tmp_path / "plain"), "--format",
                "ogg", "-q", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert sf.info(str(tmp_path / "plain.ogg")).format == "OGG"


@pytest.mark.parametrize("output, extra, message", [
    ("missing-folder/clip.wav", [], "missing-folder does not exist"),
    ("clip.mp4", [], "unknown extension .mp4"),
    ("clip.wav", ["--format", "mp3"], "its extension says wav but --format says mp3"),
    ("exists.wav", [], "exists.wav already exists; pass --overwrite"),
    ("locked/clip.wav", [], "locked is not writable"),
])
def test_bad_output_fails_before_the_model_loads(tmp_path, output, extra, message):
    (tmp_path / "exists.wav").write_bytes(b"keep")
    (tmp_path / "locked").mkdir(mode=0o500)
    model = str(tmp_path / "no-model-here")  # loading it would fail with a checkpoint error instead
    result = run("jazz", "--model", model, "-o", output, *extra, cwd=tmp_path)
    if message.startswith("locked") and os.access(tmp_path / "locked", os.W_OK):  # root ignores permissions
        assert result.returncode == 2 and "no-model-here" in result.stderr
        return
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and "BLAS" not in result.stderr
    assert (tmp_path / "exists.wav").read_bytes() == b"keep"


def test_overwrite_replaces_a_file(checkpoint, tmp_path):
    (tmp_path / "clip.ogg").write_bytes(b"old")
    result = run("x", "--seconds", "0.2", "--model", str(checkpoint), "-o", "clip.ogg", "--overwrite", "-q",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sf.info(str(tmp_path / "clip.ogg")).frames == 6400


def test_model_from_the_environment(checkpoint, tmp_path):
    result = run("x", "--seconds", "0.2", "-o", "a.wav", cwd=tmp_path, MUSICGEN_MODEL=str(checkpoint))
    assert result.returncode == 0, result.stderr
    flag_wins = run("x", "-o", "b.wav", "--model", str(tmp_path / "nowhere"), "-q", cwd=tmp_path,
                    MUSICGEN_MODEL=str(checkpoint))
    assert flag_wins.returncode == 2 and "nowhere" in flag_wins.stderr
    missing = run("x", "-o", "c.wav", "-q", cwd=tmp_path, MUSICGEN_MODEL=str(tmp_path / "elsewhere"))
    assert missing.returncode == 2 and "elsewhere" in missing.stderr
    assert "--model FOLDER" in missing.stderr and "MUSICGEN_MODEL" in missing.stderr


def test_offline_hub_message_says_what_to_do(tmp_path):
    result = run("x", "--model", "nobody-here/no-such-musicgen", "-q", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--model FOLDER" in result.stderr and "MUSICGEN_MODEL" in result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr


def test_bad_blas_choice_is_refused(tmp_path):
    result = run("x", "-q", cwd=tmp_path, MUSICGEN_BLAS="bogus")
    assert result.returncode == 2 and result.stderr.startswith("error: MUSICGEN_BLAS must be one of")


def test_help_names_the_program_and_every_option(tmp_path):
    result = run("--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m core")
    for option in ("--top-k", "--temperature", "--guidance", "--format", "--no-normalize", "--overwrite"):
        assert option in result.stdout
    from core.__main__ import build_parser, program_name

    assert program_name("/venv/bin/musicgen") == "musicgen" and program_name("/x/core/__main__.py") == "python -m core"
    undocumented = [action.dest for action in build_parser()._actions if not action.help]
    assert not undocumented
    script = subprocess.run([sys.executable, "-c", "import sys; sys.argv[0] = '/venv/bin/musicgen';"
                             "from core.__main__ import main; main(['--help'])"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert script.stdout.startswith("usage: musicgen ")


def test_progress_lines_off_a_terminal():
    import io

    from core.__main__ import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(stream=stream, interval=3600)
    for step in range(1, 201):
        bar(step, 200)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 10 and lines[-1].startswith("100% 200/200 steps") and lines[0].startswith(" 10% 20/200")


def test_quantize(tmp_path):
    """``--quantize 8`` loads the decoder quantized (the load line says so); other widths are refused."""
    build(tmp_path / "model", seed=7, decoder="tiny-64")
    out = tmp_path / "clip.wav"
    result = run("jazz", "--seconds", "0.3", "--model", str(tmp_path / "model"), "-o", str(out), "--quantize", "8",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "q8" in result.stderr and sf.read(out)[0].shape == (round(0.3 * 32000),)
    result = run("jazz", "--model", str(tmp_path / "model"), "--quantize", "3", cwd=tmp_path)
    assert result.returncode == 2 and "--quantize" in result.stderr
