"""The bot: the discord.py client, its command tree, and the Discord side of the dispatcher (status messages,
progress edits, delivery of results: :class:`bot.dispatcher.Outbox`).

``MusicBot`` gets everything it works with passed in (settings, store, queue, worker) so tests can build it with a
fake generator. ``setup_hook`` waits for the model (its longest clip becomes the queue's ceiling), loads the cogs,
recovers jobs left by a previous run, syncs the commands deliberately (guild sync when ``DISCORD_GUILD_IDS`` is
set) and starts the :class:`~bot.dispatcher.Dispatcher`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from . import formatting
from .checks import UserError
from .delivery import Deliverer
from .dispatcher import BATCH_WINDOW_SECONDS, Delivered, Dispatcher
from .jobs import ClipData, Job, JobStatus
from .queue import JobQueue, Limits, QueueRefused
from .replies import OUR_FAULT, RESTARTING, SERVERS_ONLY, reply
from .settings import Settings
from .store import JobStore
from .worker import GenerationWorker

log = logging.getLogger(__name__)

EXTENSIONS = ("bot.cogs.music", "bot.cogs.sessions", "bot.cogs.admin")


class MusicTree(app_commands.CommandTree):
    """The command tree: refuses DMs politely and turns expected failures into short ephemeral messages."""

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        if interaction.guild_id is None:
            await reply(interaction, SERVERS_ONLY)
            return False
        bot = interaction.client
        if isinstance(bot, MusicBot) and bot.shutting_down:
            await reply(interaction, RESTARTING)
            return False
        return True

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError, /) -> None:
        original = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        if isinstance(original, QueueRefused):
            message = original.reason
        elif isinstance(original, (UserError, formatting.PromptError)):
            message = str(original)
        elif isinstance(error, app_commands.CheckFailure):
            message = str(error) or "You can't use this command here."
        elif isinstance(error, app_commands.TransformerError):
            message = "One of the options has a value I can't use; please check it and try again."
        elif isinstance(error, app_commands.CommandSignatureMismatch):
            log.warning("/%s sent with options that do not match the command (client out of date?)",
                        error.command.qualified_name)
            message = ("A required option (such as the prompt) is missing, or your Discord app has an old version "
                       "of this command; please fill in every option, or try again in a minute.")
        else:
            command = interaction.command.qualified_name if interaction.command else "?"
            log.error("command /%s failed", command, exc_info=original)
            message = OUR_FAULT
        await reply(interaction, message)


class MusicBot(commands.Bot):
    """The MusicGen Discord bot. Everything it works with is passed in."""

    def __init__(self, settings: Settings, store: JobStore, queue: JobQueue, worker: GenerationWorker, *,
                 batch_window: float = BATCH_WINDOW_SECONDS, **options: Any) -> None:
        intents = discord.Intents.none()
        intents.guilds = True  # channels, threads and roles for admin-role checks; no privileged intents
        super().__init__(command_prefix=commands.when_mentioned, intents=intents, tree_cls=MusicTree,
                         allowed_mentions=discord.AllowedMentions.none(), help_command=None, **options)
        self.settings = settings
        self.store = store
        self.queue = queue
        self.worker = worker
        self.deliverer = Deliverer(self, files_dir=store.files_dir, normalize=settings.normalize_audio)
        self.dispatcher = Dispatcher(queue, store, worker, self, batch_window=batch_window)
        self.shutting_down = False
        self._background: set[asyncio.Task] = set()
        self._last_edit: dict[int, float] = {}

    # -- start-up ---------------------------------------------------------------------------------------------
    async def setup_hook(self) -> None:
        if not self.worker.ready:
            try:
                self.worker.start()
            except RuntimeError:  # already started by the caller
                pass
            await self.worker.wait_ready()
        self.queue.set_model_max(self.worker.max_seconds)
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        for job in self.queue.recover():
            if job.status is JobStatus.FAILED:
                self.spawn(self.deliverer.notify(job, f"Sorry, your clip could not be made: {job.error}"))
        await self.sync_commands()
        self.dispatcher.start()
        log.info("ready: clips up to %d s, MAX_BATCH %d, %d job(s) waiting%s", self.queue.max_seconds_ceiling,
                 self.worker.max_batch, len(self.queue), " (queue paused)" if self.queue.paused else "")

    async def sync_commands(self) -> None:
        """Register the commands: to the configured guilds (instant), globally, or not at all."""
        mode = self.settings.sync_commands
        if mode == "guilds":
            for guild_id in self.settings.discord_guild_ids:
                guild = discord.Object(guild_id)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
                log.info("synced %d commands to guild %s", len(synced), guild_id)
        elif mode == "global":
            synced = await self.tree.sync()
            log.info("synced %d commands globally (may take up to an hour to show)", len(synced))
        else:
            log.info("command sync skipped (SYNC_COMMANDS=none)")

    # -- helpers for cogs -------------------------------------------------------------------------------------
    def spawn(self, coro: Any) -> asyncio.Task:
        """Run a coroutine in the background, keeping a reference and logging its failure."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    def position_text(self, job: Job) -> str:
        """"Queued: position 3, about 40 s" for a queued job, or what it is doing now."""
        position = self.queue.position(job.id)
        if position is None:
            current = self.store.get(job.id)
            if current is not None and current.status is JobStatus.RUNNING:
                return "Generating now…"
            return "Queued."
        wait = self.queue.estimated_wait(job.id)
        start = "starting now" if wait < 1 else f"estimated start in {formatting.format_seconds(wait)}"
        paused = " The queue is paused by an admin for now." if self.queue.paused else ""
        return f"Queued at position **{position}** — {start}.{paused}"

    def status_text(self, job: Job, state: str) -> str:
        """The status message: what was asked for, then ``state`` (position, progress, done)."""
        return formatting.fit_message(f"**{formatting.display(job.prompt, 300)}** · {job.new_seconds} s · "
                                      f"seed `{job.seed}`\n{state}")

    # -- the Discord side of the dispatcher (bot.dispatcher.Outbox) ----------------------------------------
    def started(self, job: Job) -> None:
        self._last_edit[job.id] = time.monotonic()  # progress edits start one interval after this one
        self.spawn(self.deliverer.edit_status(job, self.status_text(job, f"Generating… {_bar(0)} 0%")))

    def progress(self, job: Job, step: int, total: int) -> None:
        now = time.monotonic()
        last = self._last_edit.get(job.id)
        if step >= total or (last is not None and now - last < self.settings.progress_interval_seconds):
            return
        self._last_edit[job.id] = now
        percent = int(100 * step / max(total, 1))
        self.spawn(self.deliverer.edit_status(job, self.status_text(job, f"Generating… {_bar(percent)} {percent}%")))

    def interrupted(self, job: Job) -> None:
        self._last_edit.pop(job.id, None)
        self.spawn(self.deliverer.edit_status(job, self.status_text(
            job, "Interrupted by a restart: your clip will be made as soon as I'm back.")))

    async def notify(self, job: Job, text: str) -> None:
        self._last_edit.pop(job.id, None)
        await self.deliverer.notify(job, text)

    async def deliver(self, job: Job, clip: ClipData, *, generated_in: float) -> Delivered:
        """The member's format (or a smaller one that fits), a PNG of the waveform, the buttons."""
        self._last_edit.pop(job.id, None)
        return await self.deliverer.deliver_clip(job, clip, generated_in=generated_in)

    async def delivered(self, job: Job) -> None:
        await self.deliverer.edit_status(job, self.status_text(job, f"Done — your clip is here: {job.delivered_url}"))

    # -- shutdown ---------------------------------------------------------------------------------------------
    async def shutdown(self, grace: float | None = None) -> None:
        """Stop taking requests, let the running batch finish within ``grace`` seconds (else leave its jobs to be
        regenerated on the next start), finish deliveries, close the store and the Discord connection."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        if self.shutting_down:
            return
        self.shutting_down = True
        log.info("shutting down (grace %.0f s)", grace)
        await self.dispatcher.stop(grace)
        if self._background:
            await asyncio.wait(set(self._background), timeout=max(grace, 5.0))
        self.worker.stop(timeout=5.0, cancel_running=True)
        self.store.close()
        await self.close()
        log.info("shut down cleanly")


def _bar(percent: int, width: int = 10) -> str:
    filled = max(0, min(width, round(percent * width / 100)))
    return "▰" * filled + "▱" * (width - filled)


__all__ = ["Limits", "MusicBot", "MusicTree"]
