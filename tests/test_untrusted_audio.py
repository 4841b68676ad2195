"""bot/untrusted_audio.py: members' files are sniffed, probed and decoded by ffprobe/ffmpeg children with an
allow-list, the pipe as their only protocol, an empty environment, rlimits, a timeout and an output cap."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from bot.untrusted_audio import (
    CHILD_ENV,
    MEMORY_LIMIT_BYTES,
    AudioError,
    Sandbox,
    decode,
    output_cap,
    probe,
    sniff,
)
from tests.sandbox_helpers import (
    HANG_MARKER,
    Recorder,
    fake_ffprobe,
    ffconcat,
    ffmpeg_file,
    flac_claiming,
    hls_playlist,
    listener,
    tone_file,
)

RATE = 32000


@pytest.mark.parametrize(("name", "codec", "container"), [
    ("a.wav", (), "wav"),
    ("a.flac", (), "flac"),
    ("a.ogg", ("-c:a", "libvorbis"), "ogg"),
    ("a.opus", ("-c:a", "libopus", "-f", "ogg"), "ogg"),
    ("a.mp3", (), "mp3"),
    ("a.m4a", ("-c:a", "aac"), "mov"),  # moov at the end, as ffmpeg writes by default: still read from the pipe
    ("a.aac", ("-c:a", "aac", "-f", "adts"), "aac"),
])
async def test_every_allowed_format_decodes_to_the_model_format(tmp_path: Path, name: str, codec: tuple[str, ...],
                                                                container: str) -> None:
    data = tone_file(tmp_path / name, 1.0, 44100, 2, *codec)
    assert sniff(data) == container
    for channels in (1, 2):
        samples = await decode(data, sampling_rate=RATE, channels=channels)
        assert samples.dtype == np.float32 and samples.shape[1] == channels and samples.flags.writeable
        assert abs(samples.shape[0] - RATE) < 2048  # lossy codecs add priming frames
        assert 0.05 < np.abs(samples).max() <= 1.0  # lavfi sine has amplitude 1/8; -3 dB when mixed


@pytest.mark.parametrize(("data", "match"), [
    (b"", "empty"),
    (b"not audio at all" * 100, "only read"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt garbage", "couldn't read|no audio"),
    (b"ID3 but not really an mp3" * 50, "couldn't read|no audio"),
    (b"#EXTM3U\n#EXTINF:1,\nhttp://127.0.0.1:1/x.mp3\n", "only read"),
    (b"ffconcat version 1.0\nfile 'file:/etc/passwd'\n", "only read"),
])
async def test_bad_uploads_are_refused_politely(data: bytes, match: str) -> None:
    with pytest.raises(AudioError, match=match):
        await decode(data, sampling_rate=RATE, channels=1)


async def test_a_codec_outside_the_allow_list_is_refused(tmp_path: Path) -> None:
    data = tone_file(tmp_path / "a.wav", 0.5, 8000, 1, "-c:a", "adpcm_ms")  # a WAV, but not PCM
    assert sniff(data) == "wav"
    with pytest.raises(AudioError, match="only read"):
        await decode(data, sampling_rate=RATE, channels=1)


async def test_limits_from_the_header_come_before_decoding(tmp_path: Path) -> None:
    bomb = flac_claiming(tmp_path / "bomb.flac", 44100 * 36000)  # ten hours, says the header
    assert (await probe(bomb)).seconds == pytest.approx(36000)
    with pytest.raises(AudioError, match="too long"):
        await decode(bomb, sampling_rate=RATE, channels=1)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:  # ffmpeg will not write 9 channels without a layout; the wave module will
        w.setnchannels(9)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(9 * 2 * 800))
    many = buf.getvalue()
    with pytest.raises(AudioError, match="9 channels"):
        await decode(many, sampling_rate=RATE, channels=1)
    with pytest.raises(AudioError, match="too large"):
        await decode(bomb, sampling_rate=RATE, channels=1, max_bytes=100)


async def test_output_past_the_cap_is_refused_when_the_header_does_not_say(tmp_path: Path) -> None:
    # a long, highly compressible FLAC whose STREAMINFO says "length unknown": only the byte cap can stop it
    long = ffmpeg_file(tmp_path / "long.flac", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "40")
    data = bytearray(long)
    info = 8
    packed = int.from_bytes(data[info + 10:info + 18], "big") & ~((1 << 36) - 1)
    data[info + 10:info + 18] = packed.to_bytes(8, "big")
    assert (await probe(bytes(data))).seconds is None
    with pytest.raises(AudioError, match="more audio than I accept"):
        await decode(bytes(data), sampling_rate=RATE, channels=1, max_seconds=30)
    assert output_cap(30, RATE, 1) == 30 * RATE * 4 + 64 * 1024


MEASURE = """
import asyncio, resource, sys
from bot.untrusted_audio import decode
data = open(sys.argv[1], "rb").read()
samples = asyncio.run(decode(data, sampling_rate=32000, channels=1))
child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(samples.shape[0], child, samples.nbytes)
"""


def test_many_channels_at_a_high_rate_decode_within_a_fixed_budget(tmp_path: Path) -> None:
    # 29 s × 8 channels × 384 kHz of silence: a tiny FLAC, 356 MB as float32 at its own rate
    path = tmp_path / "wide.flac"
    ffmpeg_file(path, "-f", "lavfi", "-i", "anullsrc=r=384000:cl=7.1", "-t", "29")
    assert path.stat().st_size < 2_000_000
    # a fresh interpreter, so that RUSAGE_CHILDREN holds only this decode's ffprobe and ffmpeg
    done = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    frames, child_peak, kept = (int(x) for x in done.stdout.split())
    assert frames == 29 * RATE
    assert child_peak < 160 * 1024 * 1024, child_peak  # the children's peak resident memory
    assert kept == 29 * RATE * 4  # the parent holds the model-rate version only
    assert child_peak < MEMORY_LIMIT_BYTES


async def test_children_get_an_empty_environment_and_rlimits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "secret-token")
    recorder = Recorder(tmp_path / "rec.sock")
    script = fake_ffprobe(tmp_path / "bin", recorder.path)
    data = tone_file(tmp_path / "a.wav", 0.5, 8000, 1)
    samples = await decode(data, sampling_rate=RATE, channels=1, sandbox=Sandbox(ffprobe=str(script)))
    assert samples.shape[0] == RATE // 2
    [record] = recorder.records()
    recorder.close()
    assert record["env"] == CHILD_ENV
    assert record["as"] == MEMORY_LIMIT_BYTES and record["fsize"] == 0
    assert record["pgid"] == record["pid"]  # its own process group, killed as one


async def test_a_hanging_child_is_killed_with_its_process_group_and_blocks_nothing(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "rec.sock")
    sandbox = Sandbox(ffprobe=str(fake_ffprobe(tmp_path / "bin", recorder.path)), timeout=3.0)
    data = tone_file(tmp_path / "a.wav", 0.5, 8000, 1)
    hang = data + HANG_MARKER
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    hanging = [asyncio.ensure_future(decode(hang, sampling_rate=RATE, channels=1, sandbox=sandbox)) for _ in range(8)]
    await asyncio.sleep(0.3)
    # the default executor (DNS lookups) and other decodes go on while eight children hang
    await asyncio.wait_for(loop.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM), 1.0)
    await asyncio.wait_for(loop.run_in_executor(None, time.sleep, 0.01), 1.0)
    fine = await decode(data, sampling_rate=RATE, channels=1)
    assert fine.shape[0] == RATE // 2
    for task in hanging:
        with pytest.raises(AudioError, match="too long to read"):
            await task
    assert time.monotonic() - started < 8.0
    grandchildren = [r["grandchild"] for r in recorder.records() if "grandchild" in r]
    recorder.close()
    assert grandchildren  # those that got that far in 3 s on a busy machine
    await asyncio.sleep(0.2)
    for pid in grandchildren:  # killed with the group (reaped by init, or a zombie at worst)
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        except FileNotFoundError:
            continue
        assert state == "Z", state


async def test_cancelling_a_decode_kills_the_child(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "rec.sock")
    sandbox = Sandbox(ffprobe=str(fake_ffprobe(tmp_path / "bin", recorder.path)), timeout=30)
    task = asyncio.ensure_future(decode(tone_file(tmp_path / "a.wav", 0.2, 8000, 1) + HANG_MARKER,
                                        sampling_rate=RATE, channels=1, sandbox=sandbox))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if any("grandchild" in r for r in recorder.records()):
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pid = recorder.records()[0]["pid"]
    recorder.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_playlists_never_reach_the_network_or_local_files(tmp_path: Path) -> None:
    local = tmp_path / "secret.wav"
    tone_file(local, 1.0, 8000, 1)
    async with listener() as (url, contacted):
        for data in (hls_playlist(url, local), ffconcat(url, local), b"ID3" + hls_playlist(url, local)):
            with pytest.raises(AudioError):
                await decode(data, sampling_rate=RATE, channels=1)
        await asyncio.sleep(0.2)
    assert contacted == []
