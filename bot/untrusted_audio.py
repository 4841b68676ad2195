"""Members' audio files, decoded by ffprobe/ffmpeg child processes that are kept on a short leash.

An upload is attacker-controlled bytes. Before any child sees them the container is sniffed from their magic
numbers (WAV, FLAC, Ogg, MP3, MP4/M4A, ADTS AAC; playlists such as HLS or ffconcat match none of them) and the
demuxer is forced with ``-f``. The children read the bytes from stdin with only the ``pipe`` protocol allowed, so no
file or network is ever opened; they run in their own process group with an empty environment, a cap on address
space, no file writes, and a wall-clock timeout after which the whole group is killed. ffprobe's report is checked
against an allow-list of codecs, the channel count, the rate and the duration the header claims before anything is
decoded; ffmpeg then resamples and downmixes to the model's format while it streams, and its output is read with a
byte cap, so neither the full-rate original nor a "bomb" ever sits in memory or on disk.

Standard library and NumPy only: no MLX, no discord.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import shutil
import signal
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

MAX_INPUT_BYTES = 10 * 1024 * 1024
MAX_SECONDS = 30.0
MAX_CHANNELS = 8
MAX_INPUT_RATE = 384_000
TIMEOUT_SECONDS = 2.0  # per child, wall clock
MEMORY_LIMIT_BYTES = 512 * 1024 * 1024  # address space: ffmpeg's shared libraries alone map ~300 MB
OUTPUT_SLACK_BYTES = 64 * 1024

# container (ffmpeg demuxer forced with -f) -> codecs ffprobe may report for its audio stream
ALLOWED: dict[str, frozenset[str]] = {
    "wav": frozenset({"pcm_u8", "pcm_s16le", "pcm_s24le", "pcm_s32le", "pcm_f32le", "pcm_f64le", "pcm_alaw",
                      "pcm_mulaw"}),
    "flac": frozenset({"flac"}),
    "ogg": frozenset({"vorbis", "opus", "flac"}),
    "mp3": frozenset({"mp3"}),
    "mov": frozenset({"aac"}),  # m4a / mp4
    "aac": frozenset({"aac"}),  # raw ADTS
}
FORMATS_TEXT = "WAV, FLAC, Ogg (Vorbis or Opus), MP3 or M4A/AAC"
UNSUPPORTED = f"I can only read {FORMATS_TEXT} files; please send one of those."
TOO_MUCH = "That file holds more audio than I accept; please send a shorter clip."
UNREADABLE = f"I couldn't read that file as audio; please send a {FORMATS_TEXT} file."


class AudioError(ValueError):
    """A member's file was refused or could not be read; the message is fit to show them."""


@dataclass(frozen=True)
class Probe:
    """What ffprobe read from a file's header."""

    container: str
    codec: str
    channels: int
    sampling_rate: int
    seconds: float | None  # None when the header does not say (e.g. MP3 without a Xing frame, read from a pipe)


def sniff(data: bytes) -> str | None:
    """The ffmpeg demuxer for ``data`` from its magic numbers, or None when it is none of the allowed containers."""
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[4:8] == b"ftyp":
        return "mov"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        layer = (head[1] >> 1) & 0x3
        if layer == 0 and head[1] & 0xF6 == 0xF0:  # MPEG-2/4 ADTS: sync 0xFFF, layer 00
            return "aac"
        if layer != 0:
            return "mp3"
    return None


def output_cap(max_seconds: float, rate: int, channels: int) -> int:
    """The most bytes of float32 output accepted for ``max_seconds`` at ``rate`` × ``channels`` (plus slack)."""
    return int(max_seconds * rate) * channels * 4 + OUTPUT_SLACK_BYTES


def _limits(memory_bytes: int, cpu_seconds: int) -> None:
    # runs in the child between fork and exec: only setrlimit, nothing that could take a lock
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # writes to files fail; pipes are not files
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))


# The children's whole environment: nothing of the bot's (no DISCORD_TOKEN). OpenBLAS, which ffmpeg links, spins
# at start-up when its thread pool cannot map memory under RLIMIT_AS; one thread avoids that.
CHILD_ENV: dict[str, str] = {"OPENBLAS_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Sandbox:
    """How the children run: which binaries, how long, how much memory."""

    ffmpeg: str = "ffmpeg"
    ffprobe: str = "ffprobe"
    timeout: float = TIMEOUT_SECONDS
    memory_bytes: int = MEMORY_LIMIT_BYTES

    def resolve(self, name: str) -> str:
        path = shutil.which(name)  # resolved here: the child gets no PATH
        if path is None:
            raise AudioError("I can't read audio files right now (the audio decoder is missing); sorry!")
        return path

    async def run(self, argv: list[str], data: bytes, max_output: int) -> bytes:
        """Run ``argv`` with ``data`` on stdin; its stdout, or AudioError when it fails, times out or writes more
        than ``max_output`` bytes. The child's process group is killed however this ends (cancellation too)."""
        cpu = max(1, int(self.timeout) + 1)
        proc = await asyncio.create_subprocess_exec(
            self.resolve(argv[0]), *argv[1:], stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=dict(CHILD_ENV), cwd="/", start_new_session=True,
            preexec_fn=lambda: _limits(self.memory_bytes, cpu))
        try:
            return await asyncio.wait_for(self._talk(proc, argv[0], data, max_output), self.timeout)
        except asyncio.TimeoutError:
            log.info("%s took longer than %.1f s: killed", argv[0], self.timeout)
            raise AudioError("That file took too long to read; please send a shorter or simpler clip.") from None
        finally:
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await proc.wait()

    @staticmethod
    async def _talk(proc: asyncio.subprocess.Process, name: str, data: bytes, max_output: int) -> bytes:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

        async def feed() -> None:
            try:
                proc.stdin.write(data)
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the child stopped reading (ffprobe has seen enough): fine
            finally:
                proc.stdin.close()

        async def drain_stderr() -> bytes:
            return await proc.stderr.read(16 * 1024)

        feeder = asyncio.ensure_future(feed())
        errors = asyncio.ensure_future(drain_stderr())
        chunks: list[bytes] = []
        size = 0
        try:
            while chunk := await proc.stdout.read(256 * 1024):
                size += len(chunk)
                if size > max_output:
                    log.info("%s wrote more than %d bytes: stopped", name, max_output)
                    raise AudioError(TOO_MUCH)
                chunks.append(chunk)
            status = await proc.wait()
            stderr = await errors
        finally:
            feeder.cancel()
            errors.cancel()
        if status != 0:
            first = stderr.decode("utf-8", "replace").strip().splitlines()[:1]
            log.info("%s refused an upload (exit %d): %s", name, status, first[0][:200] if first else "")
            raise AudioError(UNREADABLE)
        return b"".join(chunks)


async def probe(data: bytes, sandbox: Sandbox = Sandbox()) -> Probe:
    """Sniff the container and read its first audio stream's header with ffprobe; AudioError unless the container
    and codec are allowed."""
    container = sniff(data)
    if container is None:
        raise AudioError(UNSUPPORTED)
    argv = [sandbox.ffprobe, "-hide_banner", "-v", "error", "-protocol_whitelist", "pipe", "-f", container,
            "-select_streams", "a:0", "-show_entries", "stream=codec_name,channels,sample_rate,duration:format=duration",
            "-of", "json", "-i", "pipe:0"]
    out = await sandbox.run(argv, data, 64 * 1024)
    try:
        report = json.loads(out or b"{}")
        stream = report["streams"][0]
        codec = str(stream["codec_name"])
        channels = int(stream["channels"])
        rate = int(stream["sample_rate"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise AudioError(UNREADABLE) from None
    seconds = None
    for claimed in (stream.get("duration"), report.get("format", {}).get("duration")):
        try:
            seconds = float(claimed)
            break
        except (TypeError, ValueError):
            continue
    if codec not in ALLOWED[container]:
        log.info("upload refused: codec %s in %s", codec, container)
        raise AudioError(UNSUPPORTED)
    return Probe(container, codec, channels, rate, seconds)


async def decode(data: bytes, *, sampling_rate: int, channels: int, max_seconds: float = MAX_SECONDS,
                 max_bytes: int = MAX_INPUT_BYTES, sandbox: Sandbox = Sandbox()) -> np.ndarray:
    """A member's audio file as float32 ``(n, channels)`` at ``sampling_rate`` (resampled and mixed by ffmpeg as it
    streams). Raises :class:`AudioError` with a polite reason for empty, oversized, unsupported, too long, too
    many channels, unreadable or slow files."""
    if not data:
        raise AudioError("That file is empty.")
    if len(data) > max_bytes:
        raise AudioError(f"That file is too large ({len(data) / 1e6:.1f} MB; at most {max_bytes / 1e6:.0f} MB).")
    info = await probe(data, sandbox)
    if not 1 <= info.channels <= MAX_CHANNELS:
        raise AudioError(f"That file has {info.channels} channels; I can read at most {MAX_CHANNELS}.")
    if not 1 <= info.sampling_rate <= MAX_INPUT_RATE:
        raise AudioError(f"That file's sampling rate ({info.sampling_rate} Hz) is outside what I read "
                         f"(at most {MAX_INPUT_RATE} Hz).")
    if info.seconds is not None and info.seconds > max_seconds + 0.5:
        raise AudioError(f"That clip is too long ({info.seconds:.1f} s; at most {max_seconds:g} s).")
    argv = [sandbox.ffmpeg, "-nostdin", "-hide_banner", "-v", "error", "-threads", "1",
            "-protocol_whitelist", "pipe", "-f", info.container, "-i", "pipe:0",
            "-map", "0:a:0", "-vn", "-sn", "-dn", "-ac", str(channels), "-ar", str(sampling_rate),
            "-f", "f32le", "-c:a", "pcm_f32le", "pipe:1"]
    out = await sandbox.run(argv, data, output_cap(max_seconds, sampling_rate, channels))
    samples = np.frombuffer(out, dtype="<f4")
    samples = samples[: samples.size - samples.size % channels].reshape(-1, channels)
    if samples.shape[0] == 0:
        raise AudioError("That file holds no audio.")
    seconds = samples.shape[0] / sampling_rate
    if seconds > max_seconds + 0.05:  # the cap has slack for rounding; the limit itself is exact
        raise AudioError(f"That clip is too long ({seconds:.1f} s; at most {max_seconds:g} s).")
    if not np.all(np.isfinite(samples)):
        raise AudioError("That file holds invalid audio samples.")
    return samples.astype(np.float32)  # a writable copy
