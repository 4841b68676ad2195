"""What ``python -m bot`` (the bot, or the gateway) and ``python -m bot.worker`` (a worker) share at start: settings
and logging, the job store named by ``JOB_STORE``, the model's loader, and :class:`StartupError`, the one clear
line an operator gets when something is wrong."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dotenv import find_dotenv, load_dotenv

from .settings import Settings, SettingsError
from .store import JobStore, SQLiteJobStore
from .worker import GenerationWorker, WorkerError

log = logging.getLogger("bot")


class StartupError(Exception):
    """The process cannot start; the message says why and what to do."""


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # discord.py is chatty at INFO about the gateway; keep its warnings.
    logging.getLogger("discord").setLevel(max(getattr(logging, level), logging.WARNING))


def load_settings(prog: str) -> Settings | None:
    """Settings from the environment and the first ``.env`` found from the current folder up, with logging set up;
    None (after one line on stderr) when a setting is wrong."""
    dotenv = find_dotenv(usecwd=True)
    if dotenv:
        load_dotenv(dotenv)
    try:
        settings = Settings.from_env(base_dir=Path(dotenv).parent if dotenv else None)
    except SettingsError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
    setup_logging(settings.log_level)
    log.info("settings from the environment%s", f" and {dotenv}" if dotenv else " (no .env file found)")
    settings.apply_discord_endpoints()
    return settings


def model_factory(settings: Settings) -> Callable[[], Any]:
    """What the worker thread calls to load the model (on that thread: MLX streams are per thread)."""

    def load():
        import core  # only a process that generates imports the model library

        return core.MusicGen.from_pretrained(settings.musicgen_model, dtype=settings.musicgen_dtype,
                                             quantize=settings.musicgen_quantize)

    return load


def generation_worker(settings: Settings) -> GenerationWorker:
    """The generation worker of a process that generates (its thread loads the model when started)."""
    memory_limit = settings.memory_limit_mb * 2**20 if settings.memory_limit_mb else None
    return GenerationWorker(model_factory(settings), max_batch=settings.max_batch,
                            job_timeout=settings.job_timeout_seconds, memory_limit=memory_limit,
                            extend_stride=settings.extend_stride_seconds)


async def load_model(worker: GenerationWorker, settings: Settings) -> None:
    """Start the worker's thread and wait for it to load the model; :class:`StartupError` when it cannot."""
    import core  # a process that generates: the BLAS goes in before the worker thread imports MLX

    backend = core.preload_backend()
    log.info("loading model %s (%s, %s); BLAS: %s", settings.musicgen_model, settings.musicgen_dtype,
             f"{settings.musicgen_quantize}-bit decoder" if settings.musicgen_quantize else "not quantized", backend)
    worker.start()
    try:
        await worker.wait_ready()
    except WorkerError as exc:
        raise StartupError(f"{exc}. Check MUSICGEN_MODEL ({settings.musicgen_model!r}): a Hugging Face id such "
                           "as facebook/musicgen-small or a folder with config.json and model.safetensors.") from None


def open_store(settings: Settings) -> JobStore:
    """The job store ``JOB_STORE`` names; :class:`StartupError` (one line) when it cannot be used."""
    if settings.redis_url:
        from .redis_store import RedisJobStore, RedisUnavailable

        log.info("job store: %s (files here: %s)", settings.job_store_text, settings.files_dir)
        try:
            return RedisJobStore.from_url(settings.redis_url, files_dir=settings.files_dir,
                                          file_days=settings.clip_files_days)
        except RedisUnavailable as exc:
            raise StartupError(str(exc)) from None
    log.info("database: %s", settings.database_path)
    return open_sqlite(settings.database_path)


def open_sqlite(path: Path) -> SQLiteJobStore:
    """The SQLite job store at ``path``; :class:`StartupError` when it cannot be opened, created or written."""
    try:
        return SQLiteJobStore(path)
    except (sqlite3.Error, OSError) as exc:
        raise StartupError(f"Cannot use the database {str(path)!r} ({exc}); check DATABASE_PATH: a file the bot "
                           "can create and write, in a folder it can write (not used by another running bot).") from None


def console_main(argv: list[str] | None, *, name: str, module: str, usage: Callable[[str], str],
                 run: Callable[[Settings], Awaitable[None]]) -> int:
    """A console entry point (``name``, or ``python -m module``): ``--help``, one line for a wrong argument or
    setting, then ``run(settings)``; returns the exit status (0 after a clean stop, 2 when it cannot start)."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(usage(f"python -m {module}" if Path(sys.argv[0]).name == "__main__.py" else Path(sys.argv[0]).name))
        return 0
    if args:
        print(f"{name}: unknown argument {args[0]!r}; settings come from the environment and .env (see --help)",
              file=sys.stderr)
        return 2
    settings = load_settings(name)
    if settings is None:
        return 2
    try:
        asyncio.run(run(settings))
    except StartupError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
