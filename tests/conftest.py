"""Shared fixtures: a fake Discord per test, and the bot run as a subprocess against it."""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

import core
from bot.redis_store import RedisJobStore
from bot.store import JobStore, SQLiteJobStore
from tests.fake_discord import FakeDiscord
from tests.fake_discord.process import BotProcess, bot_env
from tests.redis_server import RedisServer

core.preload_backend()  # before any test module imports mlx, so the CPU kernels and a fast BLAS are used


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MusicGen checkpoint in the Hugging Face format, built once for the whole test run (the bots
    under test only read it)."""
    from tests.tiny_models import build_musicgen

    folder = tmp_path_factory.mktemp("tiny-musicgen")
    build_musicgen(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_melody_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MusicGen-Melody checkpoint (Hugging Face format), built once for the whole test run."""
    from tests.tiny_models import build_musicgen_melody

    folder = tmp_path_factory.mktemp("tiny-musicgen-melody")
    build_musicgen_melody(folder)
    return folder


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    """A started fake Discord with one guild (``.guild``, channel ``.channel``); stopped after the test."""
    async with FakeDiscord() as fake:
        yield fake


@pytest.fixture
async def run_bot(fake_discord: FakeDiscord, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[BotProcess]]]:
    """``bot = await run_bot(MUSICGEN_MODEL=str(folder), MAX_SECONDS="5")``: start ``python -m bot`` against
    ``fake_discord`` and wait until it is connected with its commands synced. Extra keyword arguments become
    environment variables. Every bot still running is stopped (SIGTERM) after the test; its log is in ``bot.log``.
    """
    started: list[BotProcess] = []

    async def start(*, wait: bool = True, timeout: float = 120.0, **env: str) -> BotProcess:
        log_path = tmp_path / f"bot-{len(started)}.log"
        bot = BotProcess(fake_discord, bot_env(fake_discord, tmp_path, **env), log_path)
        started.append(bot)
        await bot.start()
        if wait:
            await bot.wait_ready(timeout)
        return bot

    yield start
    for bot in started:
        if bot.returncode is None:
            await bot.stop()


# -- the job store, on each backend --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One ``redis-server`` (no persistence) for the whole test run; tests keep apart by key prefix."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], JobStore]]:
    """``make_store()``: a store on this test's data, on each backend in turn; a second call opens the same data
    again (a restart: the same SQLite file, the same Redis and key prefix). Every store is closed after the test and
    the test's Redis keys deleted."""
    opened: list[JobStore] = []
    if request.param == "sqlite":
        def open_() -> JobStore:
            opened.append(SQLiteJobStore(tmp_path / "var" / "bot.sqlite3"))
            return opened[-1]
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"test-{secrets.token_hex(4)}:"

        def open_() -> JobStore:
            opened.append(RedisJobStore.from_url(server.url, files_dir=tmp_path / "var" / "clips", prefix=prefix))
            return opened[-1]
    yield open_
    for store in opened:
        with contextlib.suppress(sqlite3.ProgrammingError):  # a test that restarts closed it already
            store.close()
    if request.param == "redis":
        client = server.client()
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def store(make_store: Callable[[], JobStore]) -> JobStore:
    """A fresh, empty job store, SQLite then Redis (the contract tests run on both)."""
    return make_store()
