"""/music, /continue, /queue, /cancel and /history: what every member uses; and what the buttons under a clip do."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import aiohttp
import discord
import numpy as np
from discord import app_commands
from discord.ext import commands

from .. import audio, formatting, untrusted_audio
from ..checks import UserError
from ..jobs import (
    MAX_TEMPERATURE,
    SEED_LIMIT,
    VARIATION_TEMPERATURE,
    Job,
    JobKind,
    JobStatus,
    new_seed,
    save_upload,
    tokens_file,
)
from ..queue import QueueRefused
from ..views import ClipButton
from . import set_max_value

if TYPE_CHECKING:
    from ..client import MusicBot

log = logging.getLogger(__name__)

DEFAULT_SECONDS = 10
EXTEND_SECONDS = 10  # what one click on Extend adds (less when the clip is near the model's longest)
QUEUE_PAGE = 10
HISTORY_SIZE = 10
READ_UPLOAD_SECONDS = 2.4  # download + decode must finish before Discord's 3 s deadline for the first answer
DOWNLOAD_SECONDS = 1.0  # of those, at most this for the download from Discord's CDN
Format = Literal["wav", "flac", "ogg", "mp3"]
GONE = ("Sorry, the data of that clip is gone (it was made before I kept it, or it was cleaned up), so I can't "
        "{what} it. Use /music to make a new one!")


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
        set_max_value(self.continue_, "seconds", bot.max_seconds_ceiling)

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
    )
    async def music(self, interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 300],
                    seconds: app_commands.Range[int, 1, 30] | None = None,
                    seed: app_commands.Range[int, 0, SEED_LIMIT - 1] | None = None,
                    format: Format = "wav") -> None:  # noqa: A002 - the option's name members see
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
            format=parse_format(format), **interaction_fields(interaction),
        )
        await enqueue(bot, interaction, job)

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
        bot = self.bot
        text = formatting.clean_prompt(prompt)
        limits = bot.queue.limits
        seconds = formatting.parse_seconds(DEFAULT_SECONDS if seconds is None else seconds, limits.max_seconds)
        rate = bot.worker.sampling_rate
        # already at the model's rate and channels, and no longer than the model's longest clip
        samples = await read_upload(audio, rate, bot.worker.channels, bot.worker.max_seconds)
        upload_seconds = samples.shape[0] / rate
        room = int(bot.worker.max_seconds - upload_seconds)
        if room < 1:
            raise UserError(f"Your clip is {upload_seconds:.1f} s long; I can make clips of at most "
                            f"{bot.worker.max_seconds:g} s in all, so there is no room to continue it.")
        if seconds > room:
            raise UserError(f"Your clip is {upload_seconds:.1f} s long, so I can add at most {room} s to it "
                            f"(at most {bot.worker.max_seconds:g} s in all).")
        files_dir = files_dir_of(bot)
        path = save_upload(files_dir, samples, rate)  # the model-rate version only: ~4 MB for 30 s of mono
        session = bot.store.session_for_thread(interaction.channel_id) if interaction.channel_id else None
        user = interaction.user
        job = Job(
            guild_id=interaction.guild_id, channel_id=interaction.channel_id or 0, user_id=user.id,
            user_name=formatting.strip_unsafe(user.display_name)[:100] or str(user.id), prompt=text,
            model_prompt=formatting.model_prompt(text, session.theme if session else ""), seconds=seconds,
            seed=new_seed(), session_id=session.id if session else None, kind=JobKind.CONTINUE,
            prompt_audio_path=str(path), format=parse_format(format), **interaction_fields(interaction),
        )
        try:
            await enqueue(bot, interaction, job)
        except QueueRefused:
            path.unlink(missing_ok=True)
            raise

    @app_commands.command(name="history")
    @app_commands.guild_only()
    async def history(self, interaction: discord.Interaction) -> None:
        """Your latest clips: prompt, seed, length and a link to each."""
        jobs = self.bot.store.recent_done(interaction.user.id, HISTORY_SIZE)
        if not jobs:
            raise UserError("You have no clips yet: use /music to make one!")
        lines = [f"**Your last {len(jobs)} clip{'s' if len(jobs) != 1 else ''}**"]
        now = time.time()
        for job in jobs:
            when = formatting.format_seconds(max(0.0, now - (job.finished_at or job.created_at)))
            link = f" — [open]({job.delivered_url})" if job.delivered_url else ""
            lines.append(f"`#{job.id}` {formatting.display(job.prompt, 80)} — seed `{job.seed}` — {job.seconds} s "
                         f"{_KIND_LABEL.get(job.kind, '')}— {when} ago{link}")
        await interaction.response.send_message(formatting.fit_message("\n".join(lines)), ephemeral=True,
                                                allowed_mentions=discord.AllowedMentions.none())

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


_KIND_LABEL = {JobKind.REGENERATE: "(regenerated) ", JobKind.VARIATION: "(variation) ",
               JobKind.EXTEND: "(extended) ", JobKind.CONTINUE: "(continued) "}


def parse_format(value: object) -> str:
    """One of the formats members can ask for (UserError otherwise: a client may ignore the choices)."""
    if value not in audio.FORMATS:
        raise UserError(f"I can send {', '.join(audio.FORMATS)}; please pick one of those formats.")
    return str(value)


def interaction_fields(interaction: discord.Interaction) -> dict:
    """What a job keeps of the interaction that asked for it: how to answer, and the upload limit there."""
    return dict(interaction_id=interaction.id, interaction_token=interaction.token,
                application_id=interaction.application_id, interaction_created_at=time.time(),
                upload_limit=interaction.filesize_limit)


def files_dir_of(bot: MusicBot) -> Path:
    files_dir = bot.store.files_dir
    if files_dir is None:
        raise UserError("I have nowhere to keep audio files right now, so I can't do that.")
    return files_dir


async def enqueue(bot: MusicBot, interaction: discord.Interaction, job: Job) -> None:
    """Queue ``job`` (written to the store before the member hears anything; QueueRefused → ephemeral), answer
    within 3 s, and show the position in the answer, which becomes the job's status message."""
    bot.queue.submit(job)
    await interaction.response.defer(thinking=True)
    bot.wake()
    try:
        message = await interaction.edit_original_response(
            content=bot.status_text(job, bot.position_text(job)), allowed_mentions=discord.AllowedMentions.none())
    except discord.HTTPException as exc:
        log.warning("job %d: could not show the position: %s", job.id, exc)
        return
    current = bot.store.update(job.id, status_message_id=message.id)
    if current.status is JobStatus.CANCELLED:
        # cancelled (by the member or an admin) while this answer was on its way: the cancel found no status
        # message to edit then, and the answer just said "Queued", so show why it is not
        await bot.deliverer.edit_status(current, current.error or "Cancelled.")


async def read_upload(attachment: discord.Attachment, sampling_rate: int, channels: int,
                      max_seconds: float) -> np.ndarray:
    """Download a member's audio file (streamed, capped, with its own timeout) and decode it in the sandbox of
    :mod:`bot.untrusted_audio` to float32 ``(n, channels)`` at ``sampling_rate``; UserError with a polite reason."""
    limit = untrusted_audio.MAX_INPUT_BYTES
    if attachment.size > limit:  # what Discord says; the download checks again as it streams
        raise UserError(f"That file is too large ({attachment.size / 1e6:.1f} MB; at most {limit / 1e6:.0f} MB).")
    started = time.monotonic()
    try:
        data = await download(attachment.url, limit, DOWNLOAD_SECONDS)
        left = READ_UPLOAD_SECONDS - (time.monotonic() - started)
        sandbox = untrusted_audio.Sandbox(timeout=max(0.1, left / 2))  # two children: ffprobe, then ffmpeg
        return await untrusted_audio.decode(data, sampling_rate=sampling_rate, channels=channels,
                                           max_seconds=max_seconds, sandbox=sandbox)
    except untrusted_audio.AudioError as exc:
        raise UserError(str(exc)) from exc
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        log.warning("could not download attachment %s: %s", attachment.id, exc or type(exc).__name__)
        raise UserError("I couldn't download that file; please try again.") from exc


async def download(url: str, max_bytes: int, timeout: float) -> bytes:
    """The body at ``url``, read in chunks on the event loop (no thread), at most ``max_bytes`` (AudioError past
    that, whatever Content-Length said) and within ``timeout`` seconds in all (asyncio.TimeoutError)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.get(url, allow_redirects=False) as response:
            response.raise_for_status()
            data = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                data += chunk
                if len(data) > max_bytes:
                    raise untrusted_audio.AudioError(f"That file is too large (at most {max_bytes / 1e6:.0f} MB).")
            return bytes(data)


async def follow_up(interaction: discord.Interaction, action: str, job_id: int) -> None:
    """A click on Regenerate / Extend / Variation under clip ``job_id``: queue the new job for the member who
    clicked, through the same queue and limits as /music. Refusals are short ephemeral answers."""
    from ..client import _reply  # one way to answer politely, shared with the command tree

    bot = interaction.client
    try:
        if getattr(bot, "shutting_down", False):
            raise UserError("I'm restarting right now; please try again in a minute.")
        await enqueue(bot, interaction, _follow_up_job(bot, interaction, action, job_id))
    except QueueRefused as exc:
        await _reply(interaction, exc.reason)
    except (UserError, formatting.PromptError) as exc:
        await _reply(interaction, str(exc))
    except Exception:
        log.exception("button %s on clip %d failed", action, job_id)
        await _reply(interaction, "Sorry, something went wrong on my side (it has been logged). Please try again.")


def _follow_up_job(bot: MusicBot, interaction: discord.Interaction, action: str, job_id: int) -> Job:
    what = {"regen": "regenerate", "extend": "extend", "vary": "make a variation of"}[action]
    parent = bot.store.get(job_id)
    if parent is None:
        raise UserError(GONE.format(what=what))
    for path in (parent.prompt_tokens_path, parent.prompt_audio_path):
        if path and not Path(path).exists():  # a clip made from files that are gone cannot be made again
            raise UserError(GONE.format(what=what))
    limits = bot.queue.limits
    kind, seed, temperature, seconds = JobKind.REGENERATE, new_seed(), parent.temperature, parent.seconds
    tokens_path, audio_path = parent.prompt_tokens_path, parent.prompt_audio_path
    if action == "vary":
        kind, seed = JobKind.VARIATION, parent.seed
        temperature = min(round(parent.temperature * VARIATION_TEMPERATURE, 4), MAX_TEMPERATURE)
    elif action == "extend":
        files_dir = bot.store.files_dir
        path = tokens_file(files_dir, parent.id) if files_dir is not None else None
        if path is None or not path.exists():
            raise UserError(GONE.format(what=what))
        try:
            frames = np.load(path, mmap_mode="r").shape[1]
        except (OSError, ValueError, IndexError):
            raise UserError(GONE.format(what=what)) from None
        have = frames / float(getattr(bot.worker.generator, "frame_rate", 50))
        room = int(bot.worker.max_seconds - have + 1e-6)
        if room < 1:
            raise UserError(f"That clip is already {have:.0f} s long, as long as I can make a clip "
                            f"({bot.worker.max_seconds:g} s).")
        kind, seconds, tokens_path, audio_path = JobKind.EXTEND, min(EXTEND_SECONDS, room, limits.max_seconds), \
            str(path), None
    seconds = min(seconds, limits.max_seconds)
    session = bot.store.session_for_thread(interaction.channel_id) if interaction.channel_id else None
    user = interaction.user
    return Job(
        guild_id=interaction.guild_id, channel_id=interaction.channel_id or parent.channel_id, user_id=user.id,
        user_name=formatting.strip_unsafe(user.display_name)[:100] or str(user.id), prompt=parent.prompt,
        model_prompt=parent.model_prompt, seconds=seconds, seed=seed, session_id=session.id if session else None,
        kind=kind, parent_id=parent.id, temperature=temperature, prompt_tokens_path=tokens_path,
        prompt_audio_path=audio_path, format=parent.format, **interaction_fields(interaction),
    )


def _describe(job: Job) -> str:
    return (f"`#{job.id}` {formatting.display(job.user_name, 60)} — {job.seconds} s — "
            f"{formatting.display(job.prompt, 80)}")


async def setup(bot: MusicBot) -> None:
    await bot.add_cog(Music(bot))
