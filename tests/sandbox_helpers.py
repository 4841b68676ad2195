"""Files that attack the upload path, and a stand-in ffprobe that records its environment or hangs: shared by the
unit tests of bot/untrusted_audio.py and the end-to-end tests."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

HANG_MARKER = b"HANG-ME-PLEASE"


def ffmpeg_file(path: Path, *args: str) -> bytes:
    """Make ``path`` with the real ffmpeg from a lavfi source (``args`` are ffmpeg options) and return its bytes."""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args, str(path)], check=True)
    return path.read_bytes()


def tone_file(path: Path, seconds: float = 1.0, rate: int = 44100, channels: int = 2, *codec: str) -> bytes:
    return ffmpeg_file(path, "-f", "lavfi", "-i", f"sine=f=440:d={seconds}:r={rate}", "-ac", str(channels), *codec)


def flac_claiming(path: Path, total_samples: int) -> bytes:
    """A one-second FLAC whose STREAMINFO claims ``total_samples`` (0: unknown)."""
    data = bytearray(tone_file(path, 1.0, 44100, 1))
    assert data[:4] == b"fLaC"
    info = 8  # "fLaC" + the 4-byte metadata block header
    # bytes 10..17 of STREAMINFO: rate (20 bits), channels-1 (3), bits-1 (5), total samples (36)
    packed = int.from_bytes(data[info + 10:info + 18], "big")
    packed = (packed & ~((1 << 36) - 1)) | total_samples
    data[info + 10:info + 18] = packed.to_bytes(8, "big")
    data[info + 18:info + 34] = bytes(16)  # an MD5 of zeros means "not computed"
    return bytes(data)


def hls_playlist(url: str, local_file: Path) -> bytes:
    return (f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{url}\n#EXTINF:10,\nfile:{local_file}\n"
            "#EXT-X-ENDLIST\n").encode()


def ffconcat(url: str, local_file: Path) -> bytes:
    return f"ffconcat version 1.0\nfile '{url}'\nfile 'file:{local_file}'\n".encode()


class Recorder:
    """A Unix datagram socket the fake ffprobe reports to (it cannot write files: RLIMIT_FSIZE is 0)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.seen: list[dict] = []

    def records(self) -> list[dict]:
        while True:
            try:
                self.seen.append(json.loads(self.sock.recv(1 << 16)))
            except BlockingIOError:
                return self.seen

    def close(self) -> None:
        self.sock.close()


def fake_ffprobe(folder: Path, env_dump: Path) -> Path:
    """An ``ffprobe`` in ``folder`` that reports its environment and rlimits to the :class:`Recorder` at
    ``env_dump`` (JSON, one per run), hangs (with a grandchild that hangs too) when its input holds
    :data:`HANG_MARKER`, and otherwise hands the input to the real ffprobe."""
    real = shutil.which("ffprobe")
    assert real is not None
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "ffprobe"
    script.write_text(f"""#!{sys.executable}
import json, os, resource, socket, subprocess, sys, time
def report(record):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(json.dumps(record).encode(), {str(env_dump)!r})
data = sys.stdin.buffer.read()
# the environment exec gave it (os.environ has Python's own LC_CTYPE coercion added)
env = dict(v.split("=", 1) for v in open("/proc/self/environ").read().split("\\0") if v)
record = {{"env": env, "as": resource.getrlimit(resource.RLIMIT_AS)[0],
          "fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0], "pid": os.getpid(), "pgid": os.getpgid(0)}}
report(record)
if {HANG_MARKER!r} in data:
    child = subprocess.Popen(["sleep", "60"])
    report({{"grandchild": child.pid}})
    time.sleep(60)
done = subprocess.run([{real!r}, *sys.argv[1:]], input=data, capture_output=True)
sys.stdout.buffer.write(done.stdout)
sys.stderr.buffer.write(done.stderr)
sys.exit(done.returncode)
""")
    script.chmod(0o755)
    return script


@asynccontextmanager
async def listener() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A TCP listener on 127.0.0.1: the URL of a segment on it, and the list of what anyone sent it."""
    contacted: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        contacted.append(await reader.read(100))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/segment.mp3", contacted
    finally:
        server.close()
        await server.wait_closed()
