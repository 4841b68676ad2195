"""``python -m bot`` (or ``musicgen-bot``): read settings, set up logging, load the model, run the bot.

A missing token, a bad setting, a model that cannot be loaded or a Discord that cannot be reached gives one clear
message and exit status 2. ``--help`` prints the settings and commands and loads nothing.
SIGINT/SIGTERM shut down gracefully (the running clip may finish within ``SHUTDOWN_GRACE_SECONDS``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
import sys
from pathlib import Path

import aiohttp
import discord
from dotenv import find_dotenv, load_dotenv

import core

from .client import MusicBot
from .queue import JobQueue, Limits
from .settings import VARIABLES, Settings, SettingsError
from .store import SQLiteJobStore
from .worker import GenerationWorker, WorkerError

log = logging.getLogger("bot")


class StartupError(Exception):
    """The bot cannot start; the message says why and what to do."""


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # discord.py is chatty at INFO about the gateway; keep its warnings.
    logging.getLogger("discord").setLevel(max(getattr(logging, level), logging.WARNING))


def model_factory(settings: Settings):
    """What the worker thread calls to load the model (on that thread: MLX streams are per thread)."""

    def load():
        return core.MusicGen.from_pretrained(settings.musicgen_model, dtype=settings.musicgen_dtype,
                                             quantize=settings.musicgen_quantize)

    return load


def open_store(path: Path) -> SQLiteJobStore:
    """The job store at ``path``; :class:`StartupError` (one line) when it cannot be opened, created or written."""
    try:
        return SQLiteJobStore(path)
    except (sqlite3.Error, OSError) as exc:
        raise StartupError(f"Cannot use the database {str(path)!r} ({exc}); check DATABASE_PATH: a file the bot "
                           "can create and write, in a folder it can write (not used by another running bot).") from None


async def run(settings: Settings) -> None:
    """Build everything and run until the bot closes or a signal asks it to stop."""
    log.info("database: %s", settings.database_path)
    store = open_store(settings.database_path)
    memory_limit = settings.memory_limit_mb * 2**20 if settings.memory_limit_mb else None
    worker = GenerationWorker(model_factory(settings), max_batch=settings.max_batch,
                              job_timeout=settings.job_timeout_seconds, memory_limit=memory_limit,
                              extend_stride=settings.extend_stride_seconds)
    queue = JobQueue(store, Limits.from_settings(settings), batch_size=settings.max_batch)
    backend = core.preload_backend()  # before the worker thread imports MLX
    log.info("loading model %s (%s, %s); BLAS: %s", settings.musicgen_model, settings.musicgen_dtype,
             f"{settings.musicgen_quantize}-bit decoder" if settings.musicgen_quantize else "not quantized", backend)
    worker.start()
    try:
        await worker.wait_ready()
    except WorkerError as exc:
        store.close()
        raise StartupError(f"{exc}. Check MUSICGEN_MODEL ({settings.musicgen_model!r}): a Hugging Face id such "
                           "as facebook/musicgen-small or a folder with config.json and model.safetensors.") from None
    bot = MusicBot(settings, store, queue, worker)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:  # Windows
            pass
    async with bot:
        runner = asyncio.create_task(bot.start(settings.discord_token), name="discord")
        stopper = asyncio.create_task(stop.wait(), name="signals")
        done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stopper in done:
            log.info("signal received")
            await bot.shutdown()
        else:
            stopper.cancel()
        try:
            await runner
        except discord.LoginFailure:
            raise StartupError("Discord refused the token: check DISCORD_TOKEN (Developer Portal → your app → "
                               "Bot → Reset Token).") from None
        except discord.PrivilegedIntentsRequired:
            raise StartupError("Discord refused the gateway intents for this bot.") from None
        except (aiohttp.ClientConnectionError, OSError) as exc:  # DNS, refused, unreachable: no traceback
            where = settings.discord_api_base or "discord.com"
            what = "could not be reached" if bot.user is None else "was lost"  # no user: login never answered
            raise StartupError(f"Discord {what} ({where}: {exc.__class__.__name__}); check the network, a proxy "
                               "or firewall, and DISCORD_API_BASE if set.") from None
        finally:
            if not bot.shutting_down:
                await bot.shutdown(grace=0)


COMMANDS = (
    ("/music prompt [seconds] [seed] [format]", "queue a clip"),
    ("/continue audio prompt [seconds] [format]", "continue your own recording"),
    ("/queue", "the running and next clips"),
    ("/cancel", "cancel your own clips"),
    ("/history", "your last 10 clips"),
    ("/session start|status|end", "a community session in a thread"),
    ("/admin pause|resume|close|open|status|clear|remove|skip|limits",
     "this server's queue control (Manage Server, ADMIN_ROLE_IDS/ADMIN_USER_IDS, owners)"),
)


def usage(prog: str = "python -m bot") -> str:
    """The ``--help`` text: how to run the bot, its settings with defaults, where ``.env`` is read, the commands."""
    lines = [f"usage: {prog} [-h]", "",
             "Run the MusicGen Discord bot. Settings come from the environment and from a .env file (the first",
             "found in the current folder or a folder above it; the environment wins). See .env.example.", "",
             "settings (default: meaning):"]
    for name, default, meaning in VARIABLES:
        lines.append(f"  {name:<27} {default or '-'}: {meaning}")
    lines += ["", "slash commands:"]
    lines += [f"  {command:<46} {what}" for command, what in COMMANDS]
    lines += ["", "Exit status: 0 after a clean shutdown (SIGINT/SIGTERM), 2 when it cannot start."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(usage("python -m bot" if Path(sys.argv[0]).name == "__main__.py" else Path(sys.argv[0]).name))
        return 0
    if args:
        print(f"musicgen-bot: unknown argument {args[0]!r}; settings come from the environment and .env "
              "(see --help)", file=sys.stderr)
        return 2
    dotenv = find_dotenv(usecwd=True)
    if dotenv:
        load_dotenv(dotenv)
    try:
        settings = Settings.from_env(base_dir=Path(dotenv).parent if dotenv else None)
    except SettingsError as exc:
        print(f"musicgen-bot: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    log.info("settings from the environment%s", f" and {dotenv}" if dotenv else " (no .env file found)")
    settings.apply_discord_endpoints()
    try:
        asyncio.run(run(settings))
    except StartupError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
