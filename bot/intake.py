"""From an interaction to a queued job: the checks, the job, ``queue.submit`` and the first answer.

Commands (``bot/cogs``) and the buttons under clips (``bot/views.py``) both come here, so /music, /continue,
Regenerate, Extend and Variation go through the same limits; a length is checked by
:meth:`bot.queue.JobQueue.check_length` only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import discord
import numpy as np

from . import audio, formatting, untrusted_audio
from .checks import UserError
from .jobs import (
    MAX_JOB_ID,
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
from .queue import QueueRefused
from .replies import OUR_FAULT, RESTARTING, reply

if TYPE_CHECKING:
    from .client import MusicBot

log = logging.getLogger(__name__)

DEFAULT_SECONDS = 10
EXTEND_SECONDS = 10  # what one click on Extend adds (less when the clip is near the model's longest)
READ_UPLOAD_SECONDS = 2.4  # download + decode must finish before Discord's 3 s deadline for the first answer
DOWNLOAD_SECONDS = 1.0  # of those, at most this for the download from Discord's CDN
# a clip's message is posted before its worker records the message's id: a click in between waits this long for it
# (well inside Discord's 3 s deadline for the first answer)
RECORD_WAIT_SECONDS = 1.5
NOT_THIS_CLIP = "That button doesn't belong to a clip I made here, so I can't use it."
GONE = ("Sorry, the data of that clip is gone (it was made before I kept it, or it was cleaned up), so I can't "
        "{what} it. Use /music to make a new one!")


def parse_seed(value: object) -> int:
    """A seed from 0 to 2**32 - 1 from whatever the client sent (UserError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise UserError(f"The seed must be a whole number from 0 to {SEED_LIMIT - 1}.")
    return value


def parse_format(value: object) -> str:
    """One of the formats members can ask for (UserError otherwise: a client may ignore the choices)."""
    if value not in audio.FORMATS:
        raise UserError(f"I can send {', '.join(audio.FORMATS)}; please pick one of those formats.")
    return str(value)


def interaction_fields(interaction: discord.Interaction) -> dict[str, Any]:
    """What a job keeps of the interaction that asked for it: how to answer, and the upload limit there."""
    return dict(interaction_id=interaction.id, interaction_token=interaction.token,
                application_id=interaction.application_id, interaction_created_at=time.time(),
                upload_limit=interaction.filesize_limit)


def _requester(interaction: discord.Interaction) -> dict[str, Any]:
    user = interaction.user
    return dict(guild_id=interaction.guild_id, user_id=user.id,
                user_name=formatting.strip_unsafe(user.display_name)[:100] or str(user.id))


def files_dir_of(bot: MusicBot) -> Path:
    files_dir = bot.store.files_dir
    if files_dir is None:
        raise UserError("I have nowhere to keep audio files right now, so I can't do that.")
    return files_dir


# -- /music and /continue ---------------------------------------------------------------------------------------
def music_job(bot: MusicBot, interaction: discord.Interaction, prompt: object, seconds: object | None,
              seed: object | None, fmt: object) -> Job:
    """The job for /music (the session's theme and default length inside a session thread)."""
    # The client enforces the schema, but a client that ignores it must get a clear answer too.
    if isinstance(prompt, str) and len(prompt) > formatting.MAX_PROMPT_CHARS:
        raise UserError(f"The prompt is too long ({len(prompt)} characters; at most {formatting.MAX_PROMPT_CHARS}).")
    text = formatting.clean_prompt(prompt)
    session = bot.store.session_for_thread(interaction.channel_id) if interaction.channel_id else None
    if seconds is None:
        default = session.default_seconds if session is not None and session.default_seconds else DEFAULT_SECONDS
        seconds = min(default, bot.queue.max_seconds(interaction.guild_id))
    return Job(channel_id=interaction.channel_id or 0, prompt=text,
               model_prompt=formatting.model_prompt(text, session.theme if session else ""),
               new_seconds=bot.queue.check_length(seconds, guild_id=interaction.guild_id), seed=new_seed() if seed is None else parse_seed(seed),
               session_id=session.id if session else None, format=parse_format(fmt), **_requester(interaction),
               **interaction_fields(interaction))


async def continue_job(bot: MusicBot, interaction: discord.Interaction, attachment: discord.Attachment,
                       prompt: object, seconds: object | None, fmt: object) -> Job:
    """The job for /continue: the upload is checked and decoded first, and kept on disk for the worker."""
    text, file_format = formatting.clean_prompt(prompt), parse_format(fmt)
    guild_id = interaction.guild_id
    bot.queue.check_length(DEFAULT_SECONDS if seconds is None else seconds, guild_id=guild_id)  # before the download
    rate = bot.model.sampling_rate
    # already at the model's rate and channels, and no longer than the model's longest clip
    samples = await read_upload(attachment, rate, bot.model.channels, bot.model.max_seconds)
    upload_seconds = samples.shape[0] / rate
    new_seconds = bot.queue.check_length(DEFAULT_SECONDS if seconds is None else seconds, upload_seconds,
                                         guild_id=guild_id)
    path = save_upload(files_dir_of(bot), samples, rate)  # the model-rate version only: ~4 MB for 30 s of mono
    bot.store.share_file(path)  # workers on other machines read it from the store
    session = bot.store.session_for_thread(interaction.channel_id) if interaction.channel_id else None
    return Job(channel_id=interaction.channel_id or 0, prompt=text,
               model_prompt=formatting.model_prompt(text, session.theme if session else ""),
               new_seconds=new_seconds, prompt_seconds=upload_seconds, seed=new_seed(),
               session_id=session.id if session else None, kind=JobKind.CONTINUE, prompt_audio_path=str(path),
               format=file_format, **_requester(interaction), **interaction_fields(interaction))


async def with_melody(bot: MusicBot, job: Job, attachment: discord.Attachment) -> Job:
    """``job`` following the tune in ``attachment``, read like /continue's upload and kept on disk for the worker
    (and for Regenerate/Variation); UserError when the model takes no melody or the file is refused."""
    if not bot.model.is_melody:
        raise UserError("This bot's model can't follow a melody (that needs a melody model such as "
                        "facebook/musicgen-melody); leave the melody out.")
    rate = bot.model.sampling_rate  # the tune at the model's rate and channels, like /continue's file
    samples = await read_upload(attachment, rate, bot.model.channels, bot.model.max_seconds)
    path = save_upload(files_dir_of(bot), samples, rate)
    bot.store.share_file(path)
    job.melody_path, job.melody_name = str(path), formatting.strip_unsafe(attachment.filename)[:100] or "melody"
    return job


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


async def enqueue(bot: MusicBot, interaction: discord.Interaction, job: Job) -> None:
    """Queue ``job`` (written to the store before the member hears anything; QueueRefused → ephemeral) and answer
    with its position (within Discord's 3 s); that answer becomes the job's status message. An upload kept for
    a refused job is removed."""
    try:
        bot.queue.submit(job)
    except QueueRefused:
        if job.kind is JobKind.CONTINUE and job.prompt_audio_path and job.parent_id is None:
            bot.store.drop_file(job.prompt_audio_path)
        if job.melody_path and job.parent_id is None:  # a new tune nobody else uses
            bot.store.drop_file(job.melody_path)
        raise
    bot.dispatcher.wake()
    try:
        # the answer carries the prompt: no link previews (the flag stays on through every later edit)
        answer = await interaction.response.send_message(
            formatting.status_text(job, bot.position_text(job)), allowed_mentions=discord.AllowedMentions.none(),
            suppress_embeds=True)
    except discord.HTTPException as exc:
        log.warning("job %d: could not show the position: %s", job.id, exc)
        return
    if answer.message_id is None:
        return
    try:
        current = bot.store.update(job.id, status_message_id=answer.message_id)
    except Exception as exc:  # the job is queued and answered; only later edits of this answer are lost
        log.warning("job %d: could not record its status message: %s", job.id, exc)
        return
    if current.status is JobStatus.CANCELLED:
        # cancelled (by the member or an admin) while this answer was on its way: the cancel found no status
        # message to edit then, and the answer just said "Queued", so show why it is not
        await bot.deliverer.edit_status(current, current.error or "Cancelled.")


# -- the buttons under a clip -----------------------------------------------------------------------------------
async def follow_up(bot: MusicBot, interaction: discord.Interaction, action: str, job_id: int) -> None:
    """A click on Regenerate / Extend / Variation under clip ``job_id``: queue the new job for the member who
    clicked, through the same queue and limits as /music. Refusals are short ephemeral answers."""
    try:
        if bot.shutting_down:
            raise UserError(RESTARTING)
        await wait_for_delivery_record(bot, job_id)
        await enqueue(bot, interaction, follow_up_job(bot, interaction, action, job_id))
    except QueueRefused as exc:
        await reply(interaction, exc.reason)
    except (UserError, formatting.PromptError) as exc:
        await reply(interaction, str(exc))
    except Exception:
        log.exception("button %s on clip %d failed", action, job_id)
        await reply(interaction, OUR_FAULT)


async def wait_for_delivery_record(bot: MusicBot, job_id: int) -> None:
    """Return once clip ``job_id`` is no longer being posted, or after RECORD_WAIT_SECONDS. A member can click a
    button the moment the clip appears, before its worker (maybe on another machine) has recorded which message
    it is; without the record the click would be refused as pressed on a message that is not the clip's."""
    deadline = time.monotonic() + RECORD_WAIT_SECONDS
    while time.monotonic() < deadline:
        job = bot.store.get(job_id) if 0 < job_id <= MAX_JOB_ID else None
        if job is None or not job.status.pending or job.delivering_at is None or job.delivered_message_id is not None:
            return
        await asyncio.sleep(0.1)


def follow_up_job(bot: MusicBot, interaction: discord.Interaction, action: str, job_id: int) -> Job:
    """The job a click on ``action`` ("regen", "extend", "vary") under clip ``job_id`` asks for."""
    what = {"regen": "regenerate", "extend": "extend", "vary": "make a variation of"}[action]
    parent = bot.store.get(job_id) if 0 < job_id <= MAX_JOB_ID else None
    if parent is None:
        raise UserError(GONE.format(what=what))
    # a custom_id is whatever the client sends: the clip must be of this server, and the button must be on the
    # clip's own message (not a copy of its custom_id somewhere else)
    pressed = interaction.message.id if interaction.message is not None else None
    if parent.guild_id != interaction.guild_id or pressed is None or pressed != parent.delivered_message_id:
        log.info("button %s for clip %d refused: pressed on message %s in guild %s", action, job_id, pressed,
                 interaction.guild_id)
        raise UserError(NOT_THIS_CLIP)
    for path in (parent.prompt_tokens_path, parent.prompt_audio_path, parent.melody_path):
        if path and not bot.store.local_file(path).exists():  # a clip made from files that are gone cannot be made again
            raise UserError(GONE.format(what=what))
    kind, seed, temperature = JobKind.REGENERATE, new_seed(), parent.temperature
    new_seconds, prompt_seconds = parent.new_seconds, parent.prompt_seconds
    tokens_path, audio_path = parent.prompt_tokens_path, parent.prompt_audio_path
    if action == "vary":
        kind, seed = JobKind.VARIATION, parent.seed
        temperature = min(round(parent.temperature * VARIATION_TEMPERATURE, 4), MAX_TEMPERATURE)
    elif action == "extend":
        files_dir = bot.store.files_dir
        path = bot.store.local_file(tokens_file(files_dir, parent.id)) if files_dir is not None else None
        if path is None or not path.exists():
            raise UserError(GONE.format(what=what))
        try:
            frames = np.load(path, mmap_mode="r").shape[1]
        except (OSError, ValueError, IndexError):
            raise UserError(GONE.format(what=what)) from None
        prompt_seconds = frames / bot.model.frame_rate
        room = bot.queue.room(prompt_seconds, guild_id=interaction.guild_id)
        if room < 1:
            raise UserError(f"That clip is already {prompt_seconds:.0f} s long, as long as I can make a clip "
                            f"({bot.queue.model_max_seconds:g} s).")
        kind, new_seconds, tokens_path, audio_path = JobKind.EXTEND, min(EXTEND_SECONDS, room), str(path), None
    # the admins may have lowered the limit since the parent was made
    new_seconds = min(new_seconds, bot.queue.room(prompt_seconds, guild_id=interaction.guild_id))
    session = bot.store.session_for_thread(interaction.channel_id) if interaction.channel_id else None
    return Job(channel_id=interaction.channel_id or parent.channel_id, prompt=parent.prompt,
               model_prompt=parent.model_prompt, new_seconds=new_seconds, prompt_seconds=prompt_seconds, seed=seed,
               session_id=session.id if session else None, kind=kind, parent_id=parent.id, temperature=temperature,
               prompt_tokens_path=tokens_path, prompt_audio_path=audio_path, format=parent.format,
               melody_path=parent.melody_path, melody_name=parent.melody_name,  # the same tune
               **_requester(interaction), **interaction_fields(interaction))
