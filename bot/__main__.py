"""``python -m bot`` (or ``musicgen-bot``): read settings, set up logging, load the model, run the bot.

A missing token, a bad setting, a model that cannot be loaded or a Discord that cannot be reached gives one clear
message and exit status 2. ``--help`` prints the settings and commands and loads nothing.
SIGINT/SIGTERM shut down gracefully (the running clip may finish within ``SHUTDOWN_GRACE_SECONDS``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import aiohttp
import discord

from .client import MusicBot
from .queue import JobQueue, Limits
from .settings import VARIABLES, Settings
from .startup import StartupError, console_main, generation_worker, load_model, open_store

log = logging.getLogger("bot")


async def run(settings: Settings) -> None:
    """Build everything and run until the bot closes or a signal asks it to stop."""
    store = open_store(settings)
    queue = JobQueue(store, Limits.from_settings(settings), batch_size=settings.max_batch)
    events = None
    if settings.redis_url:
        from .redis_store import RedisEvents

        events = RedisEvents.from_url(settings.redis_url)
    worker = None
    if settings.embedded_worker:
        worker = generation_worker(settings)
        try:
            await load_model(worker, settings)
        except StartupError:
            store.close()
            raise
    else:
        log.info("gateway only: workers (python -m bot.worker) generate and deliver; no model is loaded here")
    bot = MusicBot(settings, store, queue, worker, events=events)
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
    return console_main(argv, name="musicgen-bot", module="bot", usage=usage, run=run)


if __name__ == "__main__":
    sys.exit(main())
