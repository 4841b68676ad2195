"""/admin pause|resume|clear|remove|skip|limits.

The group is registered with ``default_permissions(manage_guild=True)``, which only hides it in the client, so
every subcommand is checked again at run time (:func:`bot.checks.require_admin`: Manage Server, or a configured
admin role or user). Every member whose request is removed, cleared or skipped is told.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from .. import formatting
from ..checks import UserError, require_admin
from ..jobs import Job

if TYPE_CHECKING:
    from ..client import MusicBot

log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()


@app_commands.guild_only()
@app_commands.default_permissions(manage_guild=True)
class Admin(commands.GroupCog, group_name="admin", group_description="Control the music queue (server managers)"):
    """Queue control for server managers and the configured admins."""

    def __init__(self, bot: MusicBot) -> None:
        self.bot = bot
        super().__init__()

    async def interaction_check(self, interaction: discord.Interaction) -> bool:  # type: ignore[override]
        require_admin(interaction, self.bot.settings)
        return True

    async def _answer(self, interaction: discord.Interaction, text: str) -> None:
        await interaction.response.send_message(formatting.fit_message(text), ephemeral=True,
                                                allowed_mentions=NO_MENTIONS)

    def _tell(self, jobs: list[Job], notice: str) -> None:
        for job in jobs:
            self.bot.spawn(self.bot.deliverer.notify(job, notice))

    @app_commands.command(name="pause")
    async def pause(self, interaction: discord.Interaction) -> None:
        """Stop starting new clips and taking requests (the running clips finish)."""
        self.bot.queue.pause()
        log.info("queue paused by %s", interaction.user.id)
        await self._answer(interaction, "Paused: running clips finish, nothing new starts, new requests are refused. "
                                        "Use `/admin resume` to go on.")

    @app_commands.command(name="resume")
    async def resume(self, interaction: discord.Interaction) -> None:
        """Start generating and taking requests again."""
        self.bot.queue.resume()
        self.bot.dispatcher.wake()
        log.info("queue resumed by %s", interaction.user.id)
        await self._answer(interaction, f"Resumed: {len(self.bot.queue)} request(s) waiting.")

    @app_commands.command(name="clear")
    async def clear(self, interaction: discord.Interaction) -> None:
        """Remove every queued request (running clips finish); everyone affected is told."""
        cleared = self.bot.queue.clear()
        log.info("queue cleared by %s: jobs %s", interaction.user.id, [j.id for j in cleared])
        self._tell(cleared, "Your request was removed: an admin cleared the queue.")
        await self._answer(interaction, f"Cleared {len(cleared)} queued request(s); their requesters are being told.")

    @app_commands.command(name="remove")
    @app_commands.describe(position="Position in /queue (1 is next)")
    async def remove(self, interaction: discord.Interaction, position: app_commands.Range[int, 1, 10_000]) -> None:
        """Remove one queued request by its position; its requester is told."""
        if isinstance(position, bool) or not isinstance(position, int):
            raise UserError("The position must be a whole number (see /queue).")
        try:
            job = self.bot.queue.remove(position)
        except IndexError as exc:
            raise UserError(str(exc)) from None
        log.info("job %d removed by %s", job.id, interaction.user.id)
        self._tell([job], "Your request was removed from the queue by an admin.")
        await self._answer(interaction, f"Removed `#{job.id}` by {formatting.display(job.user_name, 60)}: "
                                        f"{formatting.display(job.prompt, 100)}")

    @app_commands.command(name="skip")
    @app_commands.describe(job="The job number (#) to stop, from /queue; all running clips when left out")
    async def skip(self, interaction: discord.Interaction, job: app_commands.Range[int, 1] | None = None) -> None:
        """Stop the clip(s) being generated now; the rest of a batch goes on."""
        running = self.bot.queue.running()
        if job is not None:
            running = [j for j in running if j.id == job]
            if not running:
                raise UserError(f"Job #{job} is not being generated right now (see /queue).")
        if not running:
            raise UserError("Nothing is being generated right now.")
        for target in running:
            self.bot.dispatcher.cancel(target, "Your clip was stopped by an admin.")
        log.info("jobs %s skipped by %s", [j.id for j in running], interaction.user.id)
        await self._answer(interaction, "Stopping " + ", ".join(f"`#{j.id}`" for j in running) + ".")

    @app_commands.command(name="limits")
    @app_commands.describe(max_seconds="Longest clip a member may ask for",
                           max_pending_per_user="Requests one member may have waiting or running",
                           max_queue_size="Requests the whole queue may hold",
                           cooldown_seconds="Seconds a member waits between requests")
    async def limits(self, interaction: discord.Interaction,
                     max_seconds: app_commands.Range[int, 1, 3600] | None = None,
                     max_pending_per_user: app_commands.Range[int, 1, 100] | None = None,
                     max_queue_size: app_commands.Range[int, 1, 10_000] | None = None,
                     cooldown_seconds: app_commands.Range[int, 0, 86_400] | None = None) -> None:
        """Show the limits, or change some of them."""
        changes = {name: value for name, value in {
            "max_seconds": max_seconds, "max_pending_per_user": max_pending_per_user,
            "max_queue_size": max_queue_size, "cooldown_seconds": cooldown_seconds}.items() if value is not None}
        for name, value in changes.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{name} must be a whole number.")
        queue = self.bot.queue
        if changes:
            try:
                queue.set_limits(**changes)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            log.info("limits changed by %s: %s", interaction.user.id, changes)
        limits = queue.limits
        await self._answer(interaction, "\n".join([
            "**Limits**" + (" (updated)" if changes else ""),
            f"• Longest clip: {limits.max_seconds} s (at most {queue.max_seconds_ceiling} s)",
            f"• Pending requests per member: {limits.max_pending_per_user}",
            f"• Queue size: {limits.max_queue_size}",
            f"• Cooldown between requests: {limits.cooldown_seconds:g} s",
            f"• Queue {'paused' if queue.paused else 'running'}, {len(queue)} waiting",
        ]))


async def setup(bot: MusicBot) -> None:
    await bot.add_cog(Admin(bot))
