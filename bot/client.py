"""The bot: the discord.py client and its command tree; it wires the store, queue, worker, dispatcher and delivery.

``MusicBot`` gets everything it works with passed in (settings, store, queue, worker) so tests can build it with a
fake generator. ``setup_hook`` waits for the model (its longest clip becomes the queue's ceiling), loads the cogs,
recovers jobs left by a previous run, syncs the commands deliberately (guild sync when ``DISCORD_GUILD_IDS`` is
set) and starts the :class:`~bot.dispatcher.Dispatcher`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from . import formatting
from .background import Background
from .checks import UserError
from .delivery import Deliverer, DiscordOutbox
from .dispatcher import BATCH_WINDOW_SECONDS, Dispatcher
from .job_files import FileSweeper
from .jobs import Job, JobStatus
from .queue import LOCAL_WORKER, JobQueue, Limits, QueueRefused
from .remote import (
    MODEL_KEY,
    MODEL_REFRESH_SECONDS,
    Events,
    ModelFacts,
    ModelInfo,
    RemoteDispatch,
    RemoteModel,
)
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


class MusicBot(commands.AutoShardedBot):
    """The MusicGen Discord bot. Everything it works with is passed in.

    With a ``worker`` it generates and delivers itself (its :class:`~bot.dispatcher.Dispatcher` feeds the worker).
    Without one it is a gateway: workers in other processes (``python -m bot.worker``) take the jobs from the
    shared store; ``events`` carries wake-ups and cancels to them (:class:`~bot.remote.RemoteDispatch`), and what
    the model can do is what the workers wrote to the store (:class:`~bot.remote.RemoteModel`). With both (a shared
    store and ``EMBEDDED_WORKER=true``) it generates, publishes its model and hears cancels sent by other gateways.
    Sharded as Discord asks (``SHARD_COUNT`` / ``SHARD_IDS`` split the shards between gateway processes).
    """

    def __init__(self, settings: Settings, store: JobStore, queue: JobQueue, worker: GenerationWorker | None, *,
                 events: Events | None = None, batch_window: float = BATCH_WINDOW_SECONDS, **options: Any) -> None:
        intents = discord.Intents.none()
        intents.guilds = True  # channels, threads and roles for admin-role checks; no privileged intents
        super().__init__(command_prefix=commands.when_mentioned, intents=intents, tree_cls=MusicTree,
                         allowed_mentions=discord.AllowedMentions.none(), help_command=None,
                         shard_count=settings.shard_count, shard_ids=list(settings.shard_ids or ()) or None,
                         **options)
        self.settings = settings
        self.store = store
        self.queue = queue
        self.worker = worker
        self.deliverer = Deliverer(self, files_dir=store.files_dir, normalize=settings.normalize_audio,
                                   share_file=store.share_file)
        self.outbox = DiscordOutbox(self.deliverer, spawn=self.spawn,
                                    progress_interval=settings.progress_interval_seconds)
        self.model: ModelFacts
        self.dispatcher: Dispatcher | RemoteDispatch
        if worker is not None:
            self.model = worker
            self.dispatcher = Dispatcher(queue, store, worker, self.outbox, batch_window=batch_window,
                                         worker_id=settings.worker_name if store.shared else LOCAL_WORKER,
                                         lease_seconds=settings.job_lease_seconds)
        elif events is not None:
            self.model = self.remote_model = RemoteModel(store, fallback_max_seconds=settings.max_seconds)
            self.dispatcher = RemoteDispatch(queue, store, events)
        else:
            raise ValueError("a bot without a worker needs the events channel to its workers")
        self.events = events
        self._model_task: asyncio.Task | None = None
        self._listener: asyncio.Task | None = None
        self.sweeper = FileSweeper(store, settings.clip_files_days)
        self.shutting_down = False
        self.background = Background()

    # -- start-up ---------------------------------------------------------------------------------------------
    async def setup_hook(self) -> None:
        if self.worker is not None and not self.worker.ready:
            try:
                self.worker.start()
            except RuntimeError:  # already started by the caller
                pass
            await self.worker.wait_ready()
        if self.worker is not None and self.events is not None:  # generates, and shares the store with workers
            self.store.set_value(MODEL_KEY, ModelInfo.of(self.worker, self.settings.musicgen_model,
                                                         self.settings.worker_name).to_value())
            self._listener = asyncio.create_task(self.events.listen(on_wake=self.dispatcher.wake,
                                                                    on_cancel=self.worker.cancel), name="events")
        if self.worker is None:
            self.remote_model.refresh()
            if not self.remote_model.reported:
                log.warning("no worker has said yet what model it runs: until one does, clips are limited to "
                            "MAX_SECONDS and there is no melody option (start python -m bot.worker)")
            self._model_task = asyncio.create_task(self._follow_workers_model(), name="workers-model")
        self.queue.set_model_max(self.model.max_seconds)
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        for job in self.queue.recover():
            if job.status is JobStatus.FAILED:
                self.spawn(self.deliverer.notify(job, f"Sorry, your clip could not be made: {job.error}"))
        self.sweeper.start()  # after recovery: files of jobs queued again are in use
        await self.sync_commands()
        self.dispatcher.start()
        log.info("ready: clips up to %d s, MAX_BATCH %d, %d job(s) waiting%s", self.queue.max_seconds_ceiling,
                 self.model.max_batch, self.queue.waiting(), " (paused everywhere)" if self.queue.paused else "")

    async def _follow_workers_model(self) -> None:
        """A gateway: keep the longest clip in step with the model the workers report."""
        while not self.shutting_down:
            await asyncio.sleep(MODEL_REFRESH_SECONDS)
            info = self.remote_model.refresh()
            if info is not None:
                self.queue.set_model_max(info.max_seconds)

    async def sync_commands(self) -> None:
        """Register the commands: to the configured guilds (instant), globally, globally only when none are
        registered yet (a first start without DISCORD_GUILD_IDS), or not at all."""
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
        elif mode == "first":
            registered = await self.tree.fetch_commands()
            if registered:
                log.info("%d global commands already registered; not syncing (after changing commands, start once "
                         "with SYNC_COMMANDS=global, or set DISCORD_GUILD_IDS for instant per-server sync)",
                         len(registered))
                return
            synced = await self.tree.sync()
            log.warning("no slash commands were registered for this bot: synced %d commands globally, once. They can "
                        "take up to an hour to show in every server; for instant commands on your own server set "
                        "DISCORD_GUILD_IDS=<server id> (right-click the server → Copy Server ID).", len(synced))
        else:
            log.info("command sync skipped (SYNC_COMMANDS=none)")

    # -- helpers for cogs -------------------------------------------------------------------------------------
    def spawn(self, coro: Any) -> asyncio.Task:
        """Run a coroutine in the background, keeping a reference and logging its failure."""
        return self.background.spawn(coro)

    def position_text(self, job: Job) -> str:
        """"Queued: position 3, about 40 s" for a queued job, or what it is doing now."""
        position = self.queue.position(job.id)
        if position is None:
            if self.dispatcher.holds(job.id):
                return "Generating now…"
            return "Queued."
        wait = self.queue.estimated_wait(job.id)
        start = "starting now" if wait < 1 else f"estimated start in {formatting.format_seconds(wait)}"
        state = self.queue.state(job.guild_id)
        if state.holding:  # held: it starts once the queue is resumed
            return f"Queued at position **{position}**. {state.describe()}"
        return f"Queued at position **{position}** — {start}."

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
        await self.sweeper.stop()
        for task in (self._model_task, self._listener):
            if task is not None:
                task.cancel()
        await self.background.wait(max(grace, 5.0))
        if self.worker is not None:
            self.worker.stop(timeout=5.0, cancel_running=True)
        if self.events is not None:
            await self.events.close()
        self.store.close()
        await self.close()
        log.info("shut down cleanly")


__all__ = ["Limits", "MusicBot", "MusicTree"]
