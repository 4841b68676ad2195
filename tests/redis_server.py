"""A throwaway ``redis-server`` for tests: 127.0.0.1, a free port, its own folder; stop, SIGKILL and restart.

Debian's ``redis-server`` (``apt-get install redis-server``) is what CI installs. No persistence by default
(``--save "" --appendonly no``); ``appendonly=True`` writes an AOF with the given ``appendfsync``.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT = 20.0  # seconds until a started server must answer PING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``redis-server`` in ``folder`` on ``port`` (a free one when None). ``start()`` returns once it answers PING."""

    def __init__(self, folder: str | Path, *, port: int | None = None, appendonly: bool = False,
                 appendfsync: str = "everysec") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def start(self) -> RedisServer:
        args = [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder),
                "--save", "", "--daemonize", "no", "--logfile", str(self.folder / "redis.log"),
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        client = self.client()
        try:
            while True:
                if self.process is None or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited at start; see {self.folder / 'redis.log'}")
                try:
                    if client.ping():
                        return
                except redis.BusyLoadingError:  # still reading its AOF
                    pass
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT} s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM and wait (Redis writes nothing more with ``--save ""``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, nothing flushed beyond what ``appendfsync`` already wrote."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=20)
        self.process = None

    def restart(self) -> RedisServer:
        """Start again on the same folder and port (after :meth:`stop` or :meth:`kill`)."""
        self.stop()
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
