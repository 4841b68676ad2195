"""/music, /continue, /queue, /cancel and /history: what every member uses; and what the buttons under a clip do."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from .. import formatting, intake
from ..checks import UserError
from ..jobs import SEED_LIMIT, Job, JobKind, JobStatus
from ..queue import QueueState
from ..views import ClipButton
from . import remove_option, set_max_value

if TYPE_CHECKING:
    from ..client import MusicBot

log = logging.getLogger(__name__)

QUEUE_PAGE = 10
HISTORY_SIZE = 10
Format = Literal["wav", "flac", "ogg", "mp3"]


class Music(commands.Cog):
    """Making music: request a clip, see the queue, cancel your requests."""

    def __init__(self, bot: MusicBot) -> None:
        self.bot = bot
        set_max_value(self.music, "seconds", bot.queue.max_seconds_ceiling)
        set_max_value(self.continue_, "seconds", bot.queue.max_seconds_ceiling)
        if not bot.model.is_melody:  # only a melody model follows a tune: members do not see the option
            remove_option(self.music, "melody")

    async def cog_load(self) -> None:
        # Buttons under clips delivered by this or any earlier run are understood from their custom_id alone.
        self.bot.add_dynamic_items(ClipButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(ClipButton)

    @app_commands.command(name="music")
    @app_commands.guild_only()
    @app_commands.describe(
        prompt="Describe the music, e.g. 'lo-fi hip hop with warm piano'",
        seconds="Length of the clip in seconds",
        seed="Same prompt + same seed = the same clip (random if left out)",
        format="File format: wav (default), flac, ogg or mp3",
        melody="A tune for the music to follow (wav, flac, ogg, mp3 or m4a; at most 30 s and 10 MB)",
    )
    async def music(self, interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 300],
                    seconds: app_commands.Range[int, 1, 30] | None = None,
                    seed: app_commands.Range[int, 0, SEED_LIMIT - 1] | None = None,
                    format: Format = "wav",  # noqa: A002 - the option's name members see
                    melody: discord.Attachment | None = None) -> None:
        """Turn a text prompt into a music clip."""
        job = intake.music_job(self.bot, interaction, prompt, seconds, seed, format)
        if melody is not None:
            job = await intake.with_melody(self.bot, job, melody)
        await intake.enqueue(self.bot, interaction, job)

    @app_commands.command(name="continue")
    @app_commands.guild_only()
    @app_commands.describe(
        audio="An audio file to continue (wav, flac, ogg, mp3 or m4a; at most 30 s and 10 MB)",
        prompt="Describe how the music should go on",
        seconds="How many seconds to add",
        format="File format: wav (default), flac, ogg or mp3",
    )
    async def continue_(self, interaction: discord.Interaction, audio: discord.Attachment,
                        prompt: app_commands.Range[str, 1, 300],
                        seconds: app_commands.Range[int, 1, 30] | None = None,
                        format: Format = "wav") -> None:  # noqa: A002
        """Continue your own audio clip with music from a text prompt."""
        job = await intake.continue_job(self.bot, interaction, audio, prompt, seconds, format)
        await intake.enqueue(self.bot, interaction, job)

    @app_commands.command(name="history")
    @app_commands.guild_only()
    async def history(self, interaction: discord.Interaction) -> None:
        """Your latest clips in this server: prompt, seed, length and a link to each."""
        jobs = self.bot.store.recent_done_in(interaction.guild_id, interaction.user.id, HISTORY_SIZE)
        if not jobs:
            raise UserError("You have no clips yet: use /music to make one!")
        lines = [f"**Your last {len(jobs)} clip{'s' if len(jobs) != 1 else ''}**"]
        now = time.time()
        for job in jobs:
            when = formatting.format_seconds(max(0.0, now - (job.finished_at or job.created_at)))
            link = f" — [open]({job.delivered_url})" if job.delivered_url else ""
            lines.append(f"`#{job.id}` {formatting.display(job.prompt, 80)} — seed `{job.seed}` — {job.new_seconds} s "
                         f"{_KIND_LABEL.get(job.kind, '')}— {when} ago{link}")
        await interaction.response.send_message(formatting.fit_message("\n".join(lines)), ephemeral=True,
                                                suppress_embeds=True,
                                                allowed_mentions=discord.AllowedMentions.none())

    @app_commands.command(name="queue")
    @app_commands.guild_only()
    async def queue(self, interaction: discord.Interaction) -> None:
        """Show what is being generated for this server and what comes next here."""
        bot = self.bot
        guild_id = interaction.guild_id
        lines = []
        running = [job for job in bot.queue.running(guild_id) if bot.dispatcher.holds(job.id)]
        if running:
            lines.append("**Generating now**")
            lines += [f"• {_describe(job)}" for job in running]
        order = bot.queue.ordered(guild_id)
        state = bot.queue.state(guild_id)
        if order:
            lines.append("**Up next**")
            for position, job in enumerate(order[:QUEUE_PAGE], 1):
                if state.holding:
                    lines.append(f"{position}. {_describe(job)} — held")
                else:
                    wait = formatting.format_seconds(bot.queue.estimated_wait(job.id))
                    lines.append(f"{position}. {_describe(job)} — starts in about {wait}")
            if len(order) > QUEUE_PAGE:
                lines.append(f"…and {len(order) - QUEUE_PAGE} more.")
        if not lines:
            lines.append("The queue is empty: use /music to make something!")
        if state != QueueState():
            lines.append(state.describe())
        await interaction.response.send_message(formatting.fit_message("\n".join(lines)), ephemeral=True,
                                                suppress_embeds=True,
                                                allowed_mentions=discord.AllowedMentions.none())

    @app_commands.command(name="cancel")
    @app_commands.guild_only()
    async def cancel(self, interaction: discord.Interaction) -> None:
        """Cancel your queued or running requests in this server."""
        bot = self.bot
        mine = bot.queue.jobs_of(interaction.user.id, interaction.guild_id)
        if not mine:
            raise UserError("You have no queued or running requests.")
        cancelled = []
        for job in mine:
            result = bot.dispatcher.cancel(job, "Cancelled by you.")
            if result is None:
                continue
            cancelled.append(result)
            if result.status is JobStatus.CANCELLED:
                bot.spawn(bot.deliverer.edit_status(result, "Cancelled."))
        listed = "\n".join(f"• {_describe(job)}" for job in cancelled)
        noun = "request" if len(cancelled) == 1 else "requests"
        await interaction.response.send_message(formatting.fit_message(f"Cancelled {len(cancelled)} {noun}:\n{listed}"),
                                                ephemeral=True, allowed_mentions=discord.AllowedMentions.none(),
                                                suppress_embeds=True)


_KIND_LABEL = {JobKind.REGENERATE: "(regenerated) ", JobKind.VARIATION: "(variation) ",
               JobKind.EXTEND: "(extended) ", JobKind.CONTINUE: "(continued) "}


def _describe(job: Job) -> str:
    return (f"`#{job.id}` {formatting.display(job.user_name, 60)} — {job.new_seconds} s — "
            f"{formatting.display(job.prompt, 80)}")


async def setup(bot: MusicBot) -> None:
    await bot.add_cog(Music(bot))
