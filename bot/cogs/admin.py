"""/admin pause|resume|close|open|status|clear|remove|skip|limits, each for the server it is used in.

Pause *holds* the server's queue (requests are accepted and wait; nothing new starts); close refuses new requests.
The bot's owners are admins in every server and alone may pause every server at once (``everywhere``). The group
is registered with ``default_permissions(manage_guild=True)``, which only hides it in the client, so every
subcommand is checked again at run time (:func:`bot.checks.require_admin_here`: Manage Server, or a configured
admin role or user, or an owner). Every member whose request is removed, cleared or skipped is told.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from .. import formatting
from ..checks import UserError, is_owner, require_admin_here
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
        await require_admin_here(interaction, self.bot.settings)
        return True

    async def _answer(self, interaction: discord.Interaction, text: str) -> None:
        # lists carry members' prompts: no link previews
        await interaction.response.send_message(formatting.fit_message(text), ephemeral=True,
                                                allowed_mentions=NO_MENTIONS, suppress_embeds=True)

    def _tell(self, jobs: list[Job], notice: str) -> None:
        for job in jobs:
            self.bot.spawn(self.bot.deliverer.notify(job, notice))

    async def _require_owner(self, interaction: discord.Interaction) -> None:
        if not await is_owner(interaction, self.bot.settings):
            raise UserError("Only the bot's owners can act on every server at once.")

    def _status_line(self, guild_id: int | None) -> str:
        queue = self.bot.queue
        return f"{queue.state(guild_id).describe()} {queue.waiting(guild_id)} request(s) waiting here."

    @app_commands.command(name="pause")
    @app_commands.describe(everywhere="Owners only: pause every server's queue")
    async def pause(self, interaction: discord.Interaction, everywhere: bool = False) -> None:
        """Hold this server's queue: requests are taken and wait; nothing new starts (running clips finish)."""
        queue, guild_id = self.bot.queue, interaction.guild_id
        if everywhere:
            await self._require_owner(interaction)
            queue.pause_everywhere()
            log.info("queue paused everywhere by %s", interaction.user.id)
            await self._answer(interaction, "Paused everywhere: every server's requests are held until "
                                            "`/admin resume everywhere:true`.")
            return
        queue.pause(guild_id)
        log.info("queue of guild %s paused by %s", guild_id, interaction.user.id)
        closed = " New requests are refused too (the queue is closed)." if queue.state(guild_id).closed else (
            " To refuse new requests as well, use `/admin close`.")
        await self._answer(interaction, "Paused: running clips finish, nothing new starts; new requests are "
                                        f"accepted and wait. Use `/admin resume` to go on.{closed}")

    @app_commands.command(name="resume")
    @app_commands.describe(everywhere="Owners only: lift the pause of every server set with everywhere")
    async def resume(self, interaction: discord.Interaction, everywhere: bool = False) -> None:
        """Start generating this server's requests again, in their fair order."""
        queue, guild_id = self.bot.queue, interaction.guild_id
        if everywhere:
            await self._require_owner(interaction)
            queue.pause_everywhere(False)
            log.info("queue resumed everywhere by %s", interaction.user.id)
        else:
            queue.resume(guild_id)
            log.info("queue of guild %s resumed by %s", guild_id, interaction.user.id)
        self.bot.dispatcher.wake()
        await self._answer(interaction, ("Resumed everywhere. " if everywhere else "Resumed. ")
                           + self._status_line(guild_id))

    @app_commands.command(name="close")
    async def close(self, interaction: discord.Interaction) -> None:
        """Refuse new requests in this server (waiting ones are still made unless the queue is paused)."""
        self.bot.queue.close(interaction.guild_id)
        log.info("queue of guild %s closed by %s", interaction.guild_id, interaction.user.id)
        await self._answer(interaction, "Closed: new requests are politely refused. Use `/admin open` to take "
                                        "them again. " + self._status_line(interaction.guild_id))

    @app_commands.command(name="open")
    async def open(self, interaction: discord.Interaction) -> None:
        """Take new requests in this server again."""
        self.bot.queue.close(interaction.guild_id, False)
        log.info("queue of guild %s opened by %s", interaction.guild_id, interaction.user.id)
        await self._answer(interaction, "Open: new requests are taken again. " + self._status_line(interaction.guild_id))

    @app_commands.command(name="status")
    @app_commands.describe(everywhere="Owners only: every server with waiting or running requests")
    async def status(self, interaction: discord.Interaction, everywhere: bool = False) -> None:
        """Whether this server's queue is paused or closed, and how much is waiting."""
        queue = self.bot.queue
        if not everywhere:
            running = len(queue.running(interaction.guild_id))
            await self._answer(interaction, f"{self._status_line(interaction.guild_id)} {running} being generated.")
            return
        await self._require_owner(interaction)
        lines = [f"**Every server** — {'paused everywhere' if queue.paused else 'running'}"]
        for guild_id in queue.guilds():
            state = queue.state(guild_id)
            flags = [word for word, on in (("paused", state.paused), ("closed", state.closed)) if on]
            name = "jobs without a server" if guild_id is None else f"server `{guild_id}`"
            lines.append(f"• {name}: {queue.waiting(guild_id)} waiting, {len(queue.running(guild_id))} running"
                         + (f" ({', '.join(flags)})" if flags else ""))
        if len(lines) == 1:
            lines.append("Nothing is waiting or running.")
        await self._answer(interaction, "\n".join(lines))

    @app_commands.command(name="clear")
    async def clear(self, interaction: discord.Interaction) -> None:
        """Remove every queued request of this server (running clips finish); everyone affected is told."""
        cleared = self.bot.queue.clear(interaction.guild_id)
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
            job = self.bot.queue.remove(interaction.guild_id, position)
        except IndexError as exc:
            raise UserError(str(exc)) from None
        log.info("job %d removed by %s", job.id, interaction.user.id)
        self._tell([job], "Your request was removed from the queue by an admin.")
        await self._answer(interaction, f"Removed `#{job.id}` by {formatting.display(job.user_name, 60)}: "
                                        f"{formatting.display(job.prompt, 100)}")

    @app_commands.command(name="skip")
    @app_commands.describe(job="The job number (#) to stop, from /queue; all running clips when left out")
    async def skip(self, interaction: discord.Interaction, job: app_commands.Range[int, 1] | None = None) -> None:
        """Stop this server's clip(s) being generated now; the rest of a batch goes on."""
        running = self.bot.queue.running(interaction.guild_id)
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
                           max_queue_size="Requests this server's queue may hold",
                           cooldown_seconds="Seconds a member waits between requests")
    async def limits(self, interaction: discord.Interaction,
                     max_seconds: app_commands.Range[int, 1, 3600] | None = None,
                     max_pending_per_user: app_commands.Range[int, 1, 100] | None = None,
                     max_queue_size: app_commands.Range[int, 1, 10_000] | None = None,
                     cooldown_seconds: app_commands.Range[int, 0, 86_400] | None = None) -> None:
        """Show this server's limits, or change some of them."""
        changes = {name: value for name, value in {
            "max_seconds": max_seconds, "max_pending_per_user": max_pending_per_user,
            "max_queue_size": max_queue_size, "cooldown_seconds": cooldown_seconds}.items() if value is not None}
        for name, value in changes.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{name} must be a whole number.")
        queue = self.bot.queue
        if changes:
            try:
                queue.set_limits(interaction.guild_id, **changes)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            log.info("limits of guild %s changed by %s: %s", interaction.guild_id, interaction.user.id, changes)
        limits = queue.limits_for(interaction.guild_id)
        await self._answer(interaction, "\n".join([
            "**Limits**" + (" (updated)" if changes else ""),
            f"• Longest clip: {limits.max_seconds} s (at most {queue.max_seconds_ceiling} s)",
            f"• Pending requests per member: {limits.max_pending_per_user}",
            f"• Queue size: {limits.max_queue_size}",
            f"• Cooldown between requests: {limits.cooldown_seconds:g} s",
            self._status_line(interaction.guild_id),
        ]))


async def setup(bot: MusicBot) -> None:
    await bot.add_cog(Admin(bot))
