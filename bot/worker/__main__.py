"""``python -m bot.worker`` (or ``musicgen-worker``): a generation worker for a job store shared by several machines.

Run one per machine next to a gateway (``python -m bot`` with ``JOB_STORE=redis://…``). It loads the model on its
generation thread, claims batches from the shared queue in fair order under its ``WORKER_ID`` with leases it
renews every ``JOB_LEASE_SECONDS / 3``, edits progress and delivers clips through Discord's REST API (the
interaction's token, or a channel message once it has expired). It never opens a gateway connection: the gateway
stays the only one. It tells the gateway what its model can do (:class:`bot.remote.ModelInfo` in the store),
listens for wake-ups and cancels, and takes over the jobs of workers whose lease ran out.

SIGINT/SIGTERM: the running batch may finish within ``SHUTDOWN_GRACE_SECONDS``; what it cannot finish goes back
to the queue for another worker. Exit status 0 after a clean stop, 2 when it cannot start (one clear line).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import aiohttp
import discord

from ..background import Background
from ..delivery import Deliverer, DiscordOutbox
from ..dispatcher import Dispatcher
from ..job_files import FileSweeper
from ..queue import JobQueue, Limits
from ..remote import MODEL_KEY, ModelInfo
from ..settings import VARIABLES, Settings
from ..startup import StartupError, console_main, generation_worker, load_model, open_store

log = logging.getLogger("bot.worker.main")

WORKER_VARIABLES = ("DISCORD_TOKEN", "JOB_STORE", "WORKER_ID", "JOB_LEASE_SECONDS", "FILES_DIR", "MUSICGEN_MODEL",
                    "MUSICGEN_DTYPE", "MUSICGEN_QUANTIZE", "MAX_SECONDS", "MAX_BATCH", "MEMORY_LIMIT_MB", "JOB_TIMEOUT_SECONDS",
                    "SHUTDOWN_GRACE_SECONDS", "PROGRESS_INTERVAL_SECONDS", "EXTEND_STRIDE_SECONDS",
                    "NORMALIZE_AUDIO", "CLIP_FILES_DAYS", "LOG_LEVEL", "MUSICGEN_BLAS", "DISCORD_API_BASE")


async def login(client: discord.Client, settings: Settings) -> None:
    """Log in to Discord's REST API only (who the bot is; no gateway); :class:`StartupError` when it cannot."""
    try:
        await client.login(settings.discord_token)
    except discord.LoginFailure:
        raise StartupError("Discord refused the token: check DISCORD_TOKEN (Developer Portal → your app → Bot → "
                           "Reset Token).") from None
    except (aiohttp.ClientConnectionError, OSError) as exc:
        where = settings.discord_api_base or "discord.com"
        raise StartupError(f"Discord could not be reached ({where}: {exc.__class__.__name__}); check the network, "
                           "a proxy or firewall, and DISCORD_API_BASE if set.") from None


async def run(settings: Settings) -> None:
    """Load the model, log in to Discord's REST API and serve the shared queue until a signal stops it."""
    if not settings.redis_url:
        raise StartupError("python -m bot.worker serves a shared queue: set JOB_STORE=redis://host:port/db (with "
                           "SQLite, python -m bot generates itself).")
    from ..redis_store import RedisEvents

    worker_id = settings.worker_name
    store = open_store(settings)
    client = discord.Client(intents=discord.Intents.none(), allowed_mentions=discord.AllowedMentions.none())
    worker = generation_worker(settings)
    events = None
    try:
        await load_model(worker, settings)
        await login(client, settings)
        queue = JobQueue(store, Limits.from_settings(settings), batch_size=settings.max_batch)
        queue.set_model_max(worker.max_seconds)
        background = Background()
        deliverer = Deliverer(client, files_dir=store.files_dir, normalize=settings.normalize_audio,
                              share_file=store.share_file)
        outbox = DiscordOutbox(deliverer, spawn=background.spawn, progress_interval=settings.progress_interval_seconds)
        dispatcher = Dispatcher(queue, store, worker, outbox, worker_id=worker_id,
                                lease_seconds=settings.job_lease_seconds)
        store.set_value(MODEL_KEY, ModelInfo.of(worker, settings.musicgen_model, worker_id).to_value())  # what the gateway offers members follows the workers' model
        events = RedisEvents.from_url(settings.redis_url)
        listener = asyncio.create_task(events.listen(on_wake=dispatcher.wake, on_cancel=worker.cancel),
                                       name="events")
        sweeper = FileSweeper(store, settings.clip_files_days)  # this machine's copies of clip files
        sweeper.start()
        queue.worker_alive(worker_id, settings.job_lease_seconds)  # counted in the wait estimate from now on
        dispatcher.recover_expired()  # jobs of workers that died while nobody was looking
        dispatcher.start()
        log.info("worker %s ready: %s, clips up to %g s, MAX_BATCH %d, leases of %g s; %d job(s) waiting",
                 worker_id, settings.musicgen_model, worker.max_seconds, worker.max_batch,
                 settings.job_lease_seconds, queue.waiting())

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except NotImplementedError:  # Windows
                pass
        await stop.wait()
        log.info("worker %s stopping (grace %.0f s)", worker_id, settings.shutdown_grace_seconds)
        await dispatcher.stop(settings.shutdown_grace_seconds)
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await sweeper.stop()
        await background.wait(max(settings.shutdown_grace_seconds, 5.0))
        log.info("worker %s stopped cleanly", worker_id)
    finally:
        worker.stop(timeout=5.0, cancel_running=True)
        if events is not None:
            await events.close()
        await client.close()
        store.close()


def usage(prog: str) -> str:
    """The ``--help`` text: what a worker is, and the settings it reads."""
    meanings = {name: (default, meaning) for name, default, meaning in VARIABLES}
    lines = [f"usage: {prog} [-h]", "",
             "Run a MusicGen generation worker for a shared job store (JOB_STORE=redis://...): it claims jobs,",
             "generates and delivers them through Discord's REST API; the gateway (python -m bot) takes the",
             "requests. Settings come from the environment and .env, as for the bot.", "",
             "settings it reads (default: meaning):"]
    for name in WORKER_VARIABLES:
        default, meaning = meanings[name]
        lines.append(f"  {name:<27} {default or '-'}: {meaning}")
    lines += ["", "Exit status: 0 after a clean stop (SIGINT/SIGTERM), 2 when it cannot start."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    return console_main(argv, name="musicgen-worker", module="bot.worker", usage=usage, run=run)


if __name__ == "__main__":
    sys.exit(main())
