"""The bot run inside the test's own event loop against the fake Discord, with a fake generator: for end-to-end
tests that need to reach into the bot (its store, queue or dispatcher) while it runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from bot.client import MusicBot
from bot.queue import JobQueue, Limits
from bot.settings import Settings
from bot.store import SQLiteJobStore
from bot.worker import GenerationWorker
from tests.fake_discord import FakeDiscord
from tests.fake_discord.client import use_fake
from tests.fakes import FakeGenerator

RATE = 8000  # small clips: the tests count samples, not listen


@asynccontextmanager
async def running_bot(fake: FakeDiscord, tmp_path: Path, *, step_delay: float = 0.002,
                      store_class: Callable[[Path], SQLiteJobStore] = SQLiteJobStore,
                      **env: str) -> AsyncIterator[tuple[MusicBot, FakeGenerator, SQLiteJobStore]]:
    """A connected :class:`MusicBot` (settings from ``env`` over quick test defaults), its fake generator and its
    store; shut down on exit."""
    settings = Settings.from_env(dict(fake.env(), DATABASE_PATH=str(tmp_path / "bot.sqlite3"), COOLDOWN_SECONDS="0",
                                      MAX_PENDING_PER_USER="5", MAX_SECONDS="10", MAX_BATCH="1", **env))
    gen = FakeGenerator(sampling_rate=RATE, step_delay=step_delay)
    store = store_class(settings.database_path)
    worker = GenerationWorker(lambda: gen, max_batch=settings.max_batch, job_timeout=settings.job_timeout_seconds,
                              hard_timeout_grace=2.0, memory_limit=2**31, clear_cache=lambda: None)
    queue = JobQueue(store, Limits.from_settings(settings), batch_size=settings.max_batch)
    bot = MusicBot(settings, store, queue, worker, batch_window=0.0)
    with use_fake(fake):
        await bot.login(settings.discord_token)
        runner = asyncio.create_task(bot.connect())
        await fake.wait_ready()
        try:
            yield bot, gen, store
        finally:
            await bot.shutdown(grace=0)
            await asyncio.wait_for(runner, 10)
