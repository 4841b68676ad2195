"""Audio files from generated samples: WAV (16-bit PCM), FLAC, Ogg Vorbis and MP3, and peak normalisation.

Shared by the command line and the bot (NumPy, soundfile and, for MP3 when libsndfile lacks MPEG support, an
``ffmpeg`` pipe; no MLX). Output paths are checked by :func:`output_target` before any model is loaded.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import soundfile as sf

log = logging.getLogger(__name__)

FORMATS = ("wav", "flac", "ogg", "mp3")
FADE_SECONDS = 0.05
PEAK = 10 ** (-1 / 20)  # normalise to -1 dBFS: loud, and lossy encoders' overshoot stays below full scale
MP3_BITRATE = "128k"


def pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] (anything outside is clipped; NaN becomes 0) as int16."""
    x = np.nan_to_num(np.asarray(samples, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2")


def finish(samples: np.ndarray, sampling_rate: int, *, normalize: bool = True,
           fade_seconds: float = FADE_SECONDS) -> np.ndarray:
    """Peak-normalise ``samples`` ``(n, channels)`` to -1 dBFS (never clipping) and fade the last ``fade_seconds``
    out so a clip cut at its exact length ends without a click. ``normalize=False`` returns the samples as they are
    (as float32 ``(n, channels)``)."""
    x = np.nan_to_num(np.asarray(samples, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if x.ndim == 1:
        x = x[:, None]
    if not normalize:
        return x
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 1e-6:
        x = x * (PEAK / peak)
    n = min(x.shape[0], int(round(fade_seconds * sampling_rate)))
    if n > 1:
        ramp = np.cos(np.linspace(0.0, np.pi / 2, n, dtype=np.float32)) ** 2  # 1 → 0, smooth at both ends
        x = x.copy()
        x[-n:] *= ramp[:, None]
    return x.astype(np.float32, copy=False)


def encode(samples: np.ndarray, sampling_rate: int, fmt: str) -> bytes:
    """``samples`` ``(n, channels)`` in [-1, 1] as a ``fmt`` file (wav, flac, ogg or mp3), exactly ``n`` frames
    long for the lossless formats."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown audio format {fmt!r}; choose one of {', '.join(FORMATS)}")
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[:, None]
    if fmt == "wav":
        return _wav(samples, sampling_rate)
    clipped = np.clip(samples, -1.0, 1.0)
    out = io.BytesIO()
    if fmt == "flac":
        sf.write(out, clipped, sampling_rate, format="FLAC", subtype="PCM_16")
    elif fmt == "ogg":
        sf.write(out, clipped, sampling_rate, format="OGG", subtype="VORBIS")
    elif _libsndfile_mp3():
        sf.write(out, clipped, sampling_rate, format="MP3", subtype="MPEG_LAYER_III")
    else:
        return _ffmpeg_mp3(clipped, sampling_rate)
    return out.getvalue()


def _wav(samples: np.ndarray, sampling_rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(int(sampling_rate))
        w.writeframes(pcm16(samples).tobytes())
    return buf.getvalue()


def _libsndfile_mp3() -> bool:
    return "MP3" in sf.available_formats()  # libsndfile 1.1 and later


def _ffmpeg_mp3(samples: np.ndarray, sampling_rate: int) -> bytes:
    # Raw PCM in on stdin, MP3 out on stdout: no files, and the input format is forced (nothing is probed).
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "s16le", "-ar", str(sampling_rate),
               "-ac", str(samples.shape[1]), "-i", "pipe:0", "-f", "mp3", "-b:a", MP3_BITRATE, "pipe:1"]
    try:
        done = subprocess.run(command, input=pcm16(samples).tobytes(), capture_output=True, timeout=300, check=False)
    except FileNotFoundError:
        raise ValueError("writing MP3 needs libsndfile 1.1+ or ffmpeg on PATH") from None
    if done.returncode != 0:
        raise ValueError(f"ffmpeg could not encode MP3: {done.stderr.decode(errors='replace').strip()[:200]}")
    return done.stdout


def can_encode(fmt: str) -> str | None:
    """None when ``fmt`` can be written here; otherwise what is missing (checked before a model loads)."""
    if fmt not in FORMATS:
        return f"unknown audio format {fmt!r}; choose one of {', '.join(FORMATS)}"
    if fmt == "mp3" and not _libsndfile_mp3() and shutil.which("ffmpeg") is None:
        return "writing MP3 needs libsndfile 1.1+ or ffmpeg on PATH (apt-get install ffmpeg)"
    return None


# -- where the file goes ---------------------------------------------------------------------------------------
def output_target(output: Path, fmt: str | None = None, *, overwrite: bool = False) -> tuple[Path | None, str]:
    """Check an output path and choose the format, before anything expensive runs.

    ``output`` is a file (its extension gives the format; a name without one gets ``.wav``, or ``.<fmt>``) or an
    existing folder (a name is chosen later by :func:`name_in_folder`; returned as ``(None, format)``).
    ``fmt`` (from ``--format``) must agree with a file's extension. An existing file is refused unless
    ``overwrite``. Returns ``(file or None, format)``; raises ValueError naming the path.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown audio format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if output.is_dir():
        if not os.access(output, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write into the folder {output} (permission denied)")
        chosen = fmt or "wav"
        _check_encoder(chosen)
        return None, chosen
    suffix = output.suffix.lower().lstrip(".")
    if not suffix:
        chosen = fmt or "wav"
        output = output.with_name(output.name + "." + chosen)
    elif suffix not in FORMATS:
        raise ValueError(f"cannot write {output}: unknown extension .{suffix}; use .wav, .flac, .ogg or .mp3 "
                         "(or an existing folder)")
    elif fmt is not None and fmt != suffix:
        raise ValueError(f"cannot write {output}: its extension says {suffix} but --format says {fmt}")
    else:
        chosen = suffix
    _check_encoder(chosen)
    parent = output.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {output}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {output}: the folder {parent} is not writable")
    if output.exists() and not overwrite:
        raise ValueError(f"{output} already exists; pass --overwrite to replace it, or name another file")
    return output, chosen


def _check_encoder(fmt: str) -> None:
    problem = can_encode(fmt)
    if problem is not None:
        raise ValueError(problem)


def name_in_folder(folder: Path, prompt: str, seed: int, fmt: str) -> Path:
    """A file name for a clip in ``folder`` from its prompt and seed (``warm-synthwave-1234.wav``), with ``-2``,
    ``-3`` … added when that name is taken: a folder target never replaces a file."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-") or "clip"
    stem = f"{slug}-{seed}"
    path = folder / f"{stem}.{fmt}"
    n = 2
    while path.exists():
        path = folder / f"{stem}-{n}.{fmt}"
        n += 1
    return path


def write(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write an encoded file; without ``overwrite`` an existing file is never replaced (FileExistsError)."""
    with open(path, "wb" if overwrite else "xb") as f:
        f.write(data)
