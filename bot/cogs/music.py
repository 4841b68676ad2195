"""/music, /queue and /cancel: what every member uses."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from .. import formatting
from ..checks import UserError
from ..jobs import SEED_LIMIT, Job, JobStatus, new_seed
from . import set_max_value

if TYPE_CHECKING:
    from ..client import MusicBot

log = logging.getLogger(__name__)

DEFAULT_SECONDS = 10
QUEUE_PAGE = 10


def parse_seed(value: object) -> int:
    """A seed from 0 to 2**32 - 1 from whatever the client sent (UserError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise UserError(f"The seed must be a whole number from 0 to {SEED_LIMIT - 1}.")
    return value


class Music(commands.Cog):
    """Making music: request a clip, see the queue, cancel your requests."""

    def __init__(self, bot: MusicBot) -> None:
        self.bot = bot
        set_max_value(self.music, "seconds", bot.max_seconds_ceiling)

    @app_commands.command(name="music")
    @app_commands.guild_only()
    @app_commands.describe(
        prompt="Describe the music, e.g. 'lo-fi hip hop with warm piano'",
        seconds="Length of the clip in seconds",
        seed="Same prompt + same seed = the same clip (random if left out)",
    )
    async def music(self, interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 300],
                    seconds: app_commands.Range[int, 1, 30] | None = None,
                    seed: app_commands.Range[int, 0, SEED_LIMIT - 1] | None = None) -> None:
        """Turn a text prompt into a music clip."""
        bot = self.bot
        # The client enforces the schema, but a client that ignores it must get a clear answer too.
        if isinstance(prompt, str) and len(prompt) > formatting.MAX_PROMPT_CHARS:
            raise UserError(f"The prompt is too long ({len(prompt)} characters; at most "
                            f"{formatting.MAX_PROMPT_CHARS}).")
        text = formatting.clean_prompt(prompt)
        session = bot.store.session_for_thread(interaction.channel_id) if interaction.channel_id else None
        limits = bot.queue.limits
        if seconds is None:
            default = session.default_seconds if session is not None and session.default_seconds else DEFAULT_SECONDS
            seconds = min(default, limits.max_seconds)
        seconds = formatting.parse_seconds(seconds, limits.max_seconds)
        user = interaction.user
        job = Job(
            guild_id=interaction.guild_id, channel_id=interaction.channel_id or 0, user_id=user.id,
            user_name=formatting.strip_unsafe(user.display_name)[:100] or str(user.id), prompt=text,
            model_prompt=formatting.model_prompt(text, session.theme if session else ""), seconds=seconds,
            seed=new_seed() if seed is None else parse_seed(seed), session_id=session.id if session else None,
            interaction_id=interaction.id, interaction_token=interaction.token,
            application_id=interaction.application_id, interaction_created_at=time.time(),
        )
        bot.queue.submit(job)  # written to the store before the member hears anything; QueueRefused → ephemeral
        await interaction.response.defer(thinking=True)
        bot.wake()
        try:
            message = await interaction.edit_original_response(
                content=bot.status_text(job, bot.position_text(job)), allowed_mentions=discord.AllowedMentions.none())
        except discord.HTTPException as exc:
            log.warning("job %d: could not show the position: %s", job.id, exc)
            return
        bot.store.update(job.id, status_message_id=message.id)

    @app_commands.command(name="queue")
    @app_commands.guild_only()
    async def queue(self, interaction: discord.Interaction) -> None:
        """Show what is being generated and what comes next."""
        bot = self.bot
        lines = []
        running = bot.queue.running()
        if running:
            lines.append("**Generating now**")
            lines += [f"• {_describe(job)}" for job in running]
        order = bot.queue.ordered()
        if order:
            lines.append("**Up next**")
            for position, job in enumerate(order[:QUEUE_PAGE], 1):
                wait = formatting.format_seconds(bot.queue.estimated_wait(job.id))
                lines.append(f"{position}. {_describe(job)} — starts in about {wait}")
            if len(order) > QUEUE_PAGE:
                lines.append(f"…and {len(order) - QUEUE_PAGE} more.")
        if not lines:
            lines.append("The queue is empty: use /music to make something!")
        if bot.queue.paused:
            lines.append("The queue is paused by an admin for now.")
        await interaction.response.send_message(formatting.fit_message("\n".join(lines)), ephemeral=True,
                                                allowed_mentions=discord.AllowedMentions.none())

    @app_commands.command(name="cancel")
    @app_commands.guild_only()
    async def cancel(self, interaction: discord.Interaction) -> None:
        """Cancel your queued or running requests."""
        bot = self.bot
        mine = bot.queue.jobs_of(interaction.user.id)
        if not mine:
            raise UserError("You have no queued or running requests.")
        cancelled = []
        for job in mine:
            result = bot.cancel_job(job, "Cancelled by you.")
            if result is None:
                continue
            cancelled.append(result)
            if result.status is JobStatus.CANCELLED:
                bot.spawn(bot.deliverer.edit_status(result, "Cancelled."))
        listed = "\n".join(f"• {_describe(job)}" for job in cancelled)
        noun = "request" if len(cancelled) == 1 else "requests"
        await interaction.response.send_message(formatting.fit_message(f"Cancelled {len(cancelled)} {noun}:\n{listed}"),
                                                ephemeral=True, allowed_mentions=discord.AllowedMentions.none())


def _describe(job: Job) -> str:
    return (f"`#{job.id}` {formatting.display(job.user_name, 60)} — {job.seconds} s — "
            f"{formatting.display(job.prompt, 80)}")


async def setup(bot: MusicBot) -> None:
    await bot.add_cog(Music(bot))
