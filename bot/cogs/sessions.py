"""/session start|status|end: community generation sessions, each in its own thread with one shared queue lane."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from .. import formatting
from ..checks import UserError, is_admin_here
from ..jobs import Job, JobStatus, Session
from . import set_max_value

if TYPE_CHECKING:
    from ..client import MusicBot

log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()


@app_commands.guild_only()
class Sessions(commands.GroupCog, group_name="session", group_description="Community music sessions in a thread"):
    """A session: a thread where everyone's /music shares a theme, and a setlist at the end."""

    def __init__(self, bot: MusicBot) -> None:
        self.bot = bot
        super().__init__()
        set_max_value(self.start, "seconds", bot.queue.max_seconds_ceiling)

    @app_commands.command(name="start")
    @app_commands.describe(theme="A theme added to every prompt in the session, e.g. 'dreamy 80s synthwave'",
                           seconds="Default length of the session's clips in seconds")
    async def start(self, interaction: discord.Interaction, theme: app_commands.Range[str, 1, 200] | None = None,
                    seconds: app_commands.Range[int, 1, 30] | None = None) -> None:
        """Open a session thread here; /music inside it joins the session."""
        bot = self.bot
        theme_text = formatting.clean_theme(theme)
        if seconds is not None:
            seconds = bot.queue.check_length(seconds, guild_id=interaction.guild_id)
        channel = interaction.channel
        if isinstance(channel, discord.Thread) or bot.store.session_for_thread(interaction.channel_id or 0):
            raise UserError("Start a session from a text channel, not inside a thread.")
        if not isinstance(channel, discord.TextChannel):
            try:
                channel = await bot.fetch_channel(interaction.channel_id or 0)
            except discord.HTTPException:
                channel = None
            if not isinstance(channel, discord.TextChannel):
                raise UserError("Sessions can be started in a server's text channels only.")
        await interaction.response.defer(thinking=True)
        name = formatting.truncate(f"🎶 {theme_text or 'Music session'}", 100)
        try:
            thread = await channel.create_thread(name=name, type=discord.ChannelType.public_thread,
                                                 auto_archive_duration=1440, reason="music session")
        except discord.HTTPException as exc:
            log.warning("could not create a session thread in %s: %s", channel.id, exc)
            raise UserError("I could not create a thread here (I need the Create Public Threads permission).") from exc
        session = bot.store.add_session(Session(
            guild_id=interaction.guild_id, channel_id=channel.id, thread_id=thread.id, host_id=interaction.user.id,
            theme=theme_text, default_seconds=seconds))
        log.info("session %d started by %s in thread %s (theme %r)", session.id, interaction.user.id, thread.id,
                 theme_text)
        about = [f"Session hosted by {interaction.user.mention}."]
        if theme_text:
            about.append(f"Theme: **{formatting.display(theme_text, 300)}** (added to every prompt).")
        if seconds:
            about.append(f"Clips are {seconds} s unless you ask otherwise.")
        about.append("Use `/music` in this thread to add to the session; everyone takes turns. "
                     "`/session status` shows the setlist, and the host ends it with `/session end`.")
        try:
            await thread.send("\n".join(about), allowed_mentions=NO_MENTIONS, suppress_embeds=True)
        except discord.HTTPException as exc:
            log.warning("session %d: could not post the welcome message: %s", session.id, exc)
        # the first followup fills in the deferred answer (an edit of it could not set SUPPRESS_EMBEDS)
        await interaction.followup.send(f"Session started in {thread.mention}. Join in there!",
                                        allowed_mentions=NO_MENTIONS, suppress_embeds=True)

    @app_commands.command(name="status")
    async def status(self, interaction: discord.Interaction) -> None:
        """Show this session's setlist so far and who is waiting."""
        session = self._session_here(interaction)
        text = self._setlist(session, final=False)
        await interaction.response.send_message(text[0], ephemeral=True, allowed_mentions=NO_MENTIONS,
                                                suppress_embeds=True)

    @app_commands.command(name="end")
    async def end(self, interaction: discord.Interaction) -> None:
        """End this session and post its setlist (host or admin)."""
        bot = self.bot
        session = self._session_here(interaction)
        if interaction.user.id != session.host_id and not await is_admin_here(interaction, bot.settings):
            raise UserError("Only the session's host or an admin can end it.")
        await interaction.response.defer(thinking=True)
        session = bot.store.close_session(session.id)
        log.info("session %d ended by %s", session.id, interaction.user.id)
        parts = self._setlist(session, final=True)
        for part in parts:  # the first fills in the deferred answer; the setlist's prompts get no link previews
            await interaction.followup.send(part, allowed_mentions=NO_MENTIONS, suppress_embeds=True)
        thread = interaction.channel
        if isinstance(thread, discord.Thread):
            try:
                await thread.edit(archived=True, reason="music session ended")
            except discord.HTTPException as exc:
                log.info("session %d: could not archive its thread: %s", session.id, exc)

    # -- helpers ----------------------------------------------------------------------------------------------
    def _session_here(self, interaction: discord.Interaction) -> Session:
        session = self.bot.store.session_for_thread(interaction.channel_id or 0)
        if session is None:
            raise UserError("There is no open session here: use this inside a session's thread.")
        return session

    def _setlist(self, session: Session, *, final: bool) -> list[str]:
        """The setlist as one or more messages within Discord's length limit."""
        bot = self.bot
        # in the order they were played: by when generation started (clips of one batch start together, in the
        # queue's fair order), then by request
        done = sorted(bot.store.session_jobs(session.id, JobStatus.DONE),
                      key=lambda j: (j.started_at or j.finished_at or 0, j.id))
        waiting_ids = {j.id for j in bot.store.session_jobs(session.id, JobStatus.QUEUED, JobStatus.RUNNING)}
        waiting = [j for j in bot.queue.running() if j.id in waiting_ids]
        waiting += [j for j in bot.queue.ordered() if j.id in waiting_ids]
        title = "**Final setlist**" if final else "**Setlist so far**"
        if session.theme:
            title += f" — theme: {formatting.display(session.theme, 200)}"
        lines = [title]
        if not done:
            lines.append("No clips yet.")
        for number, job in enumerate(done, 1):
            link = f" — [listen]({job.delivered_url})" if job.delivered_url else ""
            lines.append(f"{number}. {formatting.display(job.prompt, 120)} — by {_author(job)} — "
                         f"{job.new_seconds} s{link}")
        if waiting:
            lines.append("**Still waiting**" if not final else "**Still being made (they will be posted here)**")
            lines += [f"• {_author(job)} — {formatting.display(job.prompt, 80)}" for job in waiting]
        return _pages(lines)


def _author(job: Job) -> str:
    return formatting.display(job.user_name, 60)


def _pages(lines: list[str], limit: int = formatting.MESSAGE_LIMIT) -> list[str]:
    pages: list[str] = []
    current = ""
    for line in lines:
        line = formatting.truncate(line, limit)
        if current and len(current) + 1 + len(line) > limit:
            pages.append(current)
            current = line
        else:
            current = f"{current}\n{line}" if current else line
    pages.append(current)
    return pages


async def setup(bot: MusicBot) -> None:
    await bot.add_cog(Sessions(bot))
