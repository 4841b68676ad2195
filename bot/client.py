"""The bot: discord.py client, the dispatcher that feeds the worker, progress edits and delivery of results.

``MusicBot`` gets everything it works with passed in (settings, store, queue, worker) so tests can build it with a
fake generator. ``setup_hook`` loads the cogs, waits for the model, recovers jobs left by a previous run, syncs
the commands deliberately (guild sync when ``DISCORD_GUILD_IDS`` is set) and starts the dispatcher: whenever the
worker is idle and the queue is not paused it takes up to ``MAX_BATCH`` jobs in fair order and generates them
together; deliveries run as their own tasks so the next batch starts at once.
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
from .delivery import Deliverer, DeliveryError, Undeliverable
from .jobs import Job, JobStatus
from .queue import JobQueue, Limits, QueueRefused
from .settings import Settings
from .store import JobStore
from .worker import GenerationWorker, JobResult

log = logging.getLogger(__name__)

EXTENSIONS = ("bot.cogs.music", "bot.cogs.sessions", "bot.cogs.admin")
BATCH_WINDOW_SECONDS = 0.3  # after the first job arrives at an idle worker, wait this long for more to batch


class MusicTree(app_commands.CommandTree):
    """The command tree: refuses DMs politely and turns expected failures into short ephemeral messages."""

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        if interaction.guild_id is None:
            await _reply(interaction, "I make music in servers only; please use my commands in a server channel.")
            return False
        bot = interaction.client
        if isinstance(bot, MusicBot) and bot.shutting_down:
            await _reply(interaction, "I'm restarting right now; please try again in a minute.")
            return False
        return True

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError, /) -> None:
        original = getattr(error, "original", error)
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
            message = "Sorry, something went wrong on my side (it has been logged). Please try again."
        await _reply(interaction, message)


async def _reply(interaction: discord.Interaction, message: str) -> None:
    """An ephemeral answer, whether or not the interaction was already answered."""
    try:
        if interaction.response.is_done():
            await interaction.followup.send(message, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())
        else:
            await interaction.response.send_message(message, ephemeral=True,
                                                    allowed_mentions=discord.AllowedMentions.none())
    except discord.HTTPException as exc:
        log.warning("could not answer interaction %s: %s", interaction.id, exc)


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
        self.deliverer = Deliverer(self)
        self.batch_window = batch_window
        self.shutting_down = False
        self.max_seconds_ceiling = settings.max_seconds
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None
        self._batch_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._last_edit: dict[int, float] = {}
        queue.stop_running = worker.cancel

    # -- start-up ---------------------------------------------------------------------------------------------
    async def setup_hook(self) -> None:
        if not self.worker.ready:
            try:
                self.worker.start()
            except RuntimeError:  # already started by the caller
                pass
            await self.worker.wait_ready()
        model_max = self.worker.max_seconds
        self.max_seconds_ceiling = max(1, min(self.settings.max_seconds, int(model_max)))
        if self.queue.max_seconds_ceiling > self.max_seconds_ceiling:
            self.queue.max_seconds_ceiling = self.max_seconds_ceiling
            if self.queue.limits.max_seconds > self.max_seconds_ceiling:
                self.queue.set_limits(max_seconds=self.max_seconds_ceiling)
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        for job in self.queue.recover():
            if job.status is JobStatus.FAILED:
                self.spawn(self.deliverer.notify(job, f"Sorry, your clip could not be made: {job.error}"))
        await self.sync_commands()
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="dispatcher")
        self.wake()
        log.info("ready: model max %d s, MAX_BATCH %d, %d job(s) waiting%s", self.max_seconds_ceiling,
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

    def wake(self) -> None:
        """Tell the dispatcher that there may be work (a job was queued, the queue resumed)."""
        self._wake.set()

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
        return formatting.fit_message(f"**{formatting.display(job.prompt, 300)}** · {job.seconds} s · "
                                      f"seed `{job.seed}`\n{state}")

    def cancel_job(self, job: Job, reason: str) -> Job | None:
        """Cancel a queued job (recorded now) or stop a running one (recorded, with ``reason``, when the worker
        lets go of it). None when the job had already ended."""
        current = self.store.get(job.id)
        if current is not None and current.status is JobStatus.RUNNING:
            self.store.update(job.id, error=reason)
        return self.queue.cancel(job.id, reason=reason)

    # -- the dispatcher ---------------------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while not self.shutting_down:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=5.0)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            while not self.shutting_down and not self.queue.paused and len(self.queue):
                if self.batch_window and len(self.queue) < self.worker.max_batch:
                    await asyncio.sleep(self.batch_window)  # let requests sent together share one batch
                    if self.shutting_down or self.queue.paused:
                        break
                size = self.worker.fit_batch(self.queue.ordered()[:self.worker.max_batch])
                batch = self.queue.next_batch(size)
                if not batch:
                    break
                self._batch_task = asyncio.create_task(self._run_batch(batch))
                try:
                    await asyncio.shield(self._batch_task)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("batch %s failed unexpectedly", [j.id for j in batch])
                finally:
                    self._batch_task = None

    async def _run_batch(self, batch: list[Job]) -> None:
        now = time.monotonic()
        for job in batch:
            self._last_edit[job.id] = now  # progress edits start one interval after this one
            self.spawn(self.deliverer.edit_status(self._fresh(job), self.status_text(job, f"Generating… {_bar(0)} 0%")))
        started = time.monotonic()
        results = await self.worker.run_batch(batch, on_progress=self._on_progress)
        elapsed = time.monotonic() - started
        if any(r.status is JobStatus.DONE for r in results):
            self.queue.record_timing(max(r.job.seconds for r in results), elapsed)
        for result in results:
            self._last_edit.pop(result.job.id, None)
            self.spawn(self._finish(result))

    def _fresh(self, job: Job) -> Job:
        return self.store.get(job.id) or job

    def _on_progress(self, job: Job, step: int, total: int) -> None:
        now = time.monotonic()
        last = self._last_edit.get(job.id)
        if step >= total or (last is not None and now - last < self.settings.progress_interval_seconds):
            return
        self._last_edit[job.id] = now
        percent = int(100 * step / max(total, 1))
        self.spawn(self.deliverer.edit_status(self._fresh(job), self.status_text(job, f"Generating… {_bar(percent)} {percent}%")))

    async def _finish(self, result: JobResult) -> None:
        job = self._fresh(result.job)
        if result.status is JobStatus.CANCELLED:
            job = self.queue.finish(job.id, JobStatus.CANCELLED, error=job.error or result.error)
            await self.deliverer.notify(job, job.error or "Cancelled.")
            return
        if result.status is JobStatus.FAILED or result.clip is None:
            error = result.error or "The generator returned no audio."
            job = self.queue.finish(job.id, JobStatus.FAILED, error=error)
            await self.deliverer.notify(job, f"Sorry, your clip could not be made: {error}")
            return
        try:  # the member's format (or a smaller one that fits), a PNG of the waveform, the buttons
            delivered = await self.deliverer.deliver_clip(job, result.clip, generated_in=result.elapsed)
        except Undeliverable as exc:
            log.warning("job %d undeliverable: %s", job.id, exc)
            self.queue.finish(job.id, JobStatus.UNDELIVERABLE, error=str(exc))
            return
        except DeliveryError as exc:
            log.warning("job %d delivery failed: %s", job.id, exc)
            job = self.queue.finish(job.id, JobStatus.FAILED, error=f"The clip could not be uploaded: {exc}")
            await self.deliverer.notify(job, f"Sorry, your clip was made but could not be uploaded: {exc}")
            return
        job = self.queue.finish(job.id, JobStatus.DONE, delivered_message_id=delivered.message_id,
                                delivered_url=delivered.url)
        log.info("job %d delivered via %s in %.1f s of generation: %s", job.id, delivered.via, result.elapsed,
                 delivered.url)
        await self.deliverer.edit_status(job, self.status_text(job, f"Done — your clip is here: {delivered.url}"))

    # -- shutdown ---------------------------------------------------------------------------------------------
    async def shutdown(self, grace: float | None = None) -> None:
        """Stop taking requests, let the running batch finish within ``grace`` seconds (else leave its jobs to be
        regenerated on the next start), finish deliveries, close the store and the Discord connection."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        if self.shutting_down:
            return
        self.shutting_down = True
        self.wake()
        log.info("shutting down (grace %.0f s)", grace)
        batch = self._batch_task
        if batch is not None and not batch.done():
            done, _ = await asyncio.wait({batch}, timeout=grace)
            if not done:
                interrupted = [j.id for j in self.queue.running()]
                log.warning("jobs %s interrupted by shutdown; they will be generated again on the next start",
                            interrupted)
                batch.cancel()
                await asyncio.gather(batch, return_exceptions=True)
                for job_id in interrupted:
                    self.queue.requeue(job_id, count_attempt=False)
                    log.info("job %d interrupted by shutdown: queued again for the next start", job_id)
                    job = self.store.get(job_id)
                    if job is not None:
                        self.spawn(self.deliverer.edit_status(job, self.status_text(
                            job, "Interrupted by a restart: your clip will be made as soon as I'm back.")))
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
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
