"""Run the project's bot (``python -m bot``) as a subprocess against a FakeDiscord, as users start it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from .server import FakeDiscord

REPO_ROOT = Path(__file__).resolve().parents[2]


class BotProcess:
    """``python -m bot`` (or ``module``, e.g. ``bot.worker``) with the fake's environment; its stdout and stderr go
    to ``log_path``.

    ``await start()``, ``await wait_ready()`` (a worker: ``await wait_log(...)``), then ``await stop()`` (SIGTERM,
    graceful) or ``kill()`` (SIGKILL).
    """

    def __init__(self, fake: FakeDiscord, env: dict[str, str], log_path: Path, *, cwd: Path = REPO_ROOT,
                 module: str = "bot") -> None:
        self.fake = fake
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.module = module
        self.process: asyncio.subprocess.Process | None = None
        self._mark = 0  # events before this index belong to earlier bots

    async def start(self) -> BotProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._mark = len(self.fake.events)
        with open(self.log_path, "ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self.module, cwd=self.cwd, env=self.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file, stderr=asyncio.subprocess.STDOUT)
        return self

    @property
    def log(self) -> str:
        """Everything the bot printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def wait_ready(self, timeout: float = 120.0, *, commands: bool = True, log_line: str | None = None
                         ) -> None:
        """Wait until this process identified on the gateway and (if ``commands``) synced its commands, and
        ``log_line`` (if given) appears in its log. Fails at once, with the log, if the process exits first."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while True:
            if self.process.returncode is not None:
                raise RuntimeError(f"bot exited with {self.process.returncode} before it was ready:\n{self.log}")
            ready = self.fake.is_ready(commands=commands, after=self._mark)
            if ready and (log_line is None or log_line in self.log):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"bot not ready within {timeout} s:\n{self.log}")
            try:
                await self.fake.wait_until(lambda: self.fake.is_ready(commands=commands, after=self._mark), 0.2)
            except TimeoutError:
                pass

    async def wait_log(self, line: str, timeout: float = 120.0) -> None:
        """Wait until ``line`` appears in the log; fails at once, with the log, if the process exits first."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while line not in self.log:
            if self.process.returncode is not None:
                raise RuntimeError(f"{self.module} exited with {self.process.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{line!r} not in the log of {self.module} within {timeout} s:\n{self.log}")
            await asyncio.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.process is not None, "start() first"
        return self.process.pid

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout``); return the exit status."""
        if self.process is None or self.process.returncode is not None:
            return self.returncode if self.returncode is not None else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except asyncio.TimeoutError:
            self.kill()
            await self.process.wait()
            raise TimeoutError(f"bot did not stop within {timeout} s of SIGTERM:\n{self.log}") from None

    def kill(self) -> None:
        """SIGKILL: the bot dies without any cleanup (for durability tests)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()


def bot_env(fake: FakeDiscord, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment ``python -m bot`` gets: this process's, the fake's endpoints and token, a database in
    ``tmp_path``, quick settings for tests; ``extra`` (e.g. ``MUSICGEN_MODEL=...``) wins."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISCORD_")}
    env.update(fake.env())
    env.update(
        DATABASE_PATH=str(tmp_path / "bot.sqlite3"), PYTHONUNBUFFERED="1", LOG_LEVEL="INFO",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env
