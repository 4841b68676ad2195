"""Getting clips and notices to members (the Discord side of :class:`bot.dispatcher.Outbox`).

A job remembers the interaction it came from. While that interaction's token lives (15 minutes) the clip is sent
as a followup and the status message is edited through it; once the token is gone — by the clock, or because
Discord answers 401 / "Invalid Webhook Token" — the clip goes to the channel as a normal message that mentions the
requester. Only the requester can ever be pinged, and no message of the bot shows link previews (a prompt may hold
a bare URL). Server errors and rate limits are retried with backoff; an
upload that is too large is re-encoded smaller (Ogg Vorbis) once; a deleted channel or a missing permission makes
the job undeliverable. :meth:`Deliverer.deliver_clip` is the whole finished-clip message: audio in the member's
format (or a smaller one that fits), a PNG of the waveform and the Regenerate / Extend / Variation buttons.

Delivery is idempotent as far as Discord allows: a channel message carries the job's ``nonce`` with
``enforce_nonce`` (Discord answers a repeat within a few minutes with the message it already has), and a job that
was being delivered when the bot stopped (``delivering_at`` set) is first looked for in its channel's recent
history — a message of the bot with the job's buttons — whichever way it was posted.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import discord
import numpy as np
import soundfile as sf

from . import audio
from .dispatcher import Delivered, DeliveryError, Undeliverable
from .formatting import display, fit_message, format_seconds, progress_bar, status_text
from .jobs import TOKEN_SAFETY_MARGIN, ClipData, Job, JobKind, save_tokens
from .picture import waveform_png
from .views import clip_view, custom_id

log = logging.getLogger(__name__)

DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024

INVALID_WEBHOOK_TOKEN = 50027
UNKNOWN_WEBHOOK = 10015
UNKNOWN_MESSAGE = 10008
PAYLOAD_TOO_LARGE = 40005

HISTORY_LOOKBACK = 100  # channel messages read, at most, when looking for a clip posted before a restart
HISTORY_MARGIN_SECONDS = 60  # look from this long before the first delivery attempt (clocks differ)

T = TypeVar("T")


def token_alive(job: Job, *, margin: float = TOKEN_SAFETY_MARGIN) -> bool:
    """Whether the job's interaction can still carry a followup or an edit that starts now."""
    return job.application_id is not None and job.token_alive(margin=margin)


def only_mention(user_id: int) -> discord.AllowedMentions:
    """Allowed mentions that can ping this one user and nobody else (no @everyone, roles or other users)."""
    return discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(user_id)], replied_user=False)


NO_MENTIONS = discord.AllowedMentions.none()


def token_gone(error: BaseException) -> bool:
    """Whether Discord refused a webhook call because the interaction token expired or is unknown."""
    if not isinstance(error, discord.HTTPException):
        return False
    return error.status == 401 or error.code in (INVALID_WEBHOOK_TOKEN, UNKNOWN_WEBHOOK)


def _retryable(error: BaseException) -> bool:
    if isinstance(error, discord.HTTPException):
        return error.status == 429 or error.status >= 500
    return isinstance(error, (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError))


def _too_large(error: BaseException) -> bool:
    return isinstance(error, discord.HTTPException) and (error.status == 413 or error.code == PAYLOAD_TOO_LARGE)


def to_ogg(data: bytes) -> bytes:
    """Re-encode an audio file (WAV, FLAC, MP3) as Ogg Vorbis (same length and rate, much smaller)."""
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    out = io.BytesIO()
    sf.write(out, np.clip(samples, -1.0, 1.0), rate, format="OGG", subtype="VORBIS")
    return out.getvalue()


def _with_suffix(filename: str, suffix: str) -> str:
    stem = filename.rsplit(".", 1)[0] if "." in filename else filename
    return f"{stem}.{suffix}"


_KIND_NOTES = {
    JobKind.REGENERATE: "a new take on clip #{parent} (new seed)",
    JobKind.VARIATION: "a variation of clip #{parent} (same seed, temperature {temperature:g})",
    JobKind.EXTEND: "clip #{parent} extended by {new_seconds} s",
    JobKind.CONTINUE: "your audio continued by {new_seconds} s",
}


def clip_message(job: Job, clip: ClipData, *, generated_in: float | None = None, fmt: str | None = None) -> str:
    """The text that goes with a delivered clip: the requester mentioned, the prompt (escaped), seed and duration,
    what the clip was made from, and a note when it was sent in another format than asked (``fmt``)."""
    took = "" if generated_in is None else (f"{generated_in:.1f} s" if generated_in < 10 else format_seconds(generated_in))
    made = f" · made in {took}" if took else ""
    lines = [f"<@{job.user_id}> your clip is ready 🎶", f"**Prompt:** {display(job.prompt, 600)}"]
    if job.model_prompt != job.prompt:
        lines.append(f"**As generated:** {display(job.model_prompt, 800)}")
    note = _KIND_NOTES.get(job.kind)
    if note:
        made_from = note.format(parent=job.parent_id, temperature=job.temperature, new_seconds=job.new_seconds)
        lines.append(f"**From:** {made_from}")
    if job.melody_name:
        lines.append(f"**Melody:** {display(job.melody_name, 200)}")
    lines.append(f"**Seed:** `{job.seed}` · **Duration:** {clip.seconds:g} s{made}")
    if fmt is not None and fmt != job.format:
        lines.append(f"*Sent as {fmt.upper()} instead of {job.format.upper()}: the {job.format.upper()} file would be "
                     f"larger than this channel's upload limit.*")
    return fit_message("\n".join(lines))


class Deliverer:
    """Sends a job's clip and notices through its interaction or its channel (see the module docstring)."""

    def __init__(self, client: discord.Client, *, files_dir: Path | None = None, normalize: bool = True,
                 retries: int = 4, backoff: float = 1.0,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 share_file: Callable[[Path], Any] = lambda path: None) -> None:
        self.client = client
        self.files_dir = files_dir  # where a clip's tokens are kept for Extend (None: nowhere)
        self.share_file = share_file  # makes them readable on other machines (JobStore.share_file)
        self.normalize = normalize
        self.retries = retries
        self.backoff = backoff
        self._sleep = sleep

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _webhook(self, job: Job) -> discord.Webhook:
        assert job.application_id is not None and job.interaction_token is not None
        return discord.Webhook.partial(job.application_id, job.interaction_token, client=self.client)

    def _channel(self, job: Job) -> discord.abc.Messageable:
        channel = self.client.get_channel(job.channel_id)
        if isinstance(channel, discord.abc.Messageable):
            return channel
        return self.client.get_partial_messageable(job.channel_id, guild_id=job.guild_id)

    def _url(self, job: Job, message_id: int) -> str:
        guild = job.guild_id if job.guild_id else "@me"
        return f"https://discord.com/channels/{guild}/{job.channel_id}/{message_id}"

    def upload_limit(self, job: Job) -> int:
        """Bytes one file may have: what the job's interaction said (``filesize_limit``), else the guild's."""
        if job.upload_limit:
            return int(job.upload_limit)
        guild = self.client.get_guild(job.guild_id) if job.guild_id else None
        return guild.filesize_limit if guild is not None else DEFAULT_UPLOAD_LIMIT

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except Exception as error:  # noqa: BLE001 - sorted below
                if not _retryable(error) or attempt == self.retries:
                    raise
                delay = self.backoff * 2**attempt
                retry_after = (error.response.headers.get("Retry-After")
                               if isinstance(error, discord.HTTPException) else None)
                if retry_after:
                    try:
                        delay = max(delay, float(retry_after))
                    except ValueError:
                        pass
                log.warning("%s failed (%s); retrying in %.1f s", what, error, delay)
                await self._sleep(delay)
        raise AssertionError("unreachable")

    # -- public API -------------------------------------------------------------------------------------------
    async def send(self, job: Job, content: str, *, data: bytes | None = None,
                   filename: str = "clip.wav", extra_files: Sequence[tuple[str, bytes]] = (),
                   view: discord.ui.View | None = None) -> Delivered:
        """Send ``content`` with the audio file ``data`` (if given), ``extra_files`` (name, bytes) and ``view`` to
        the requester; raise DeliveryError when it cannot be done. An audio file refused as too large is sent again
        as Ogg Vorbis once."""
        if data is not None and len(data) > self.upload_limit(job) and not filename.endswith(".ogg"):
            log.info("job %s: %d bytes is over the upload limit; sending Ogg Vorbis", job.id, len(data))
            data, filename = to_ogg(data), _with_suffix(filename, "ogg")
        try:
            return await self._send_once(job, content, data, filename, extra_files, view)
        except discord.HTTPException as error:
            if data is None or not _too_large(error) or filename.endswith(".ogg"):
                raise self._as_delivery_error(job, error) from error
            log.info("job %s: upload refused as too large; re-encoding as Ogg Vorbis", job.id)
        try:
            return await self._send_once(job, content, to_ogg(data), _with_suffix(filename, "ogg"), extra_files, view)
        except discord.HTTPException as error:
            raise self._as_delivery_error(job, error) from error

    async def deliver_clip(self, job: Job, clip: ClipData, *, generated_in: float | None = None) -> Delivered:
        """Deliver a finished clip as a member expects it: normalised with a fade-out (unless ``NORMALIZE_AUDIO`` is
        off), in the format they asked for (or a smaller one that fits the upload limit, said in the message), with
        a PNG of the waveform and the Regenerate / Extend / Variation buttons. The clip's tokens are kept next to
        the database first so Extend works on it later, across restarts."""
        if self.files_dir is not None and clip.tokens is not None:
            try:
                self.share_file(save_tokens(self.files_dir, job.id, clip.tokens))
            except OSError as exc:
                log.warning("job %s: could not keep the clip's tokens: %s", job.id, exc)
        if job.delivering_at is not None:
            found = await self.find_delivered(job)
            if found is not None:
                log.info("job %s: its clip was already posted before a restart (message %s); not posting again",
                         job.id, found.message_id)
                return found
        samples = audio.finish(clip.samples, clip.sampling_rate, normalize=self.normalize)
        picture = waveform_png(samples, clip.sampling_rate, job.prompt)
        wanted = job.format if job.format in audio.FORMATS else "wav"
        limit = self.upload_limit(job)
        try:
            fmt, data = audio.encode_to_fit(samples, clip.sampling_rate, wanted, limit)
        except ValueError as exc:
            raise DeliveryError("the clip is larger than this channel's upload limit in every format") from exc
        content = clip_message(job, clip, generated_in=generated_in, fmt=fmt)
        suffix = audio.FORMATS[fmt].suffix
        return await self.send(job, content, data=data, filename=f"musicgen-{job.id}.{suffix}",
                               extra_files=[(f"musicgen-{job.id}.png", picture)], view=clip_view(job.id))

    async def find_delivered(self, job: Job) -> Delivered | None:
        """The clip message of ``job`` if an earlier attempt posted it (a message of the bot in the job's channel,
        since shortly before ``job.delivering_at``, carrying the job's buttons); None when there is none or the
        history cannot be read."""
        me = self.client.user
        if me is None or job.delivering_at is None:
            return None
        since = datetime.datetime.fromtimestamp(job.delivering_at - HISTORY_MARGIN_SECONDS, tz=datetime.timezone.utc)
        marker = custom_id("regen", job.id)
        try:
            async for message in self._channel(job).history(limit=HISTORY_LOOKBACK, after=since):
                if message.author.id == me.id and marker in _custom_ids(message):
                    return Delivered(message.id, self._url(job, message.id), "found")
        except (discord.HTTPException, aiohttp.ClientError, asyncio.TimeoutError) as error:
            log.warning("job %s: could not read the channel's history to look for the clip: %s", job.id, error)
        return None

    def _as_delivery_error(self, job: Job, error: discord.HTTPException) -> DeliveryError:
        if isinstance(error, (discord.Forbidden, discord.NotFound)):
            return Undeliverable(f"the channel is gone or closed to the bot ({error.status}: {error.text or 'no detail'})")
        if _too_large(error):
            return DeliveryError("the clip is larger than this server's upload limit")
        return DeliveryError(f"Discord refused the upload ({error.status}: {error.text or 'no detail'})")

    async def _send_once(self, job: Job, content: str, data: bytes | None, filename: str,
                         extra_files: Sequence[tuple[str, bytes]] = (), view: discord.ui.View | None = None
                         ) -> Delivered:
        mentions = only_mention(job.user_id)
        extra: dict[str, Any] = {} if view is None else {"view": view}

        def files() -> list[discord.File]:
            out = [discord.File(io.BytesIO(data), filename=filename)] if data is not None else []
            return out + [discord.File(io.BytesIO(blob), filename=name) for name, blob in extra_files]

        if token_alive(job):
            webhook = self._webhook(job)
            try:
                message = await self._retry(
                    f"job {job.id}: followup",
                    lambda: webhook.send(content, files=files(), allowed_mentions=mentions, wait=True,
                                         suppress_embeds=True, **extra),
                )
                return Delivered(message.id, self._url(job, message.id), "interaction")
            except discord.HTTPException as error:
                if not token_gone(error):
                    raise
                log.info("job %s: interaction token no longer valid; sending to the channel instead", job.id)
        channel = self._channel(job)
        message = await self._retry(
            f"job {job.id}: channel message",
            lambda: channel.send(content, files=files(), allowed_mentions=mentions, suppress_embeds=True,
                                 nonce=job.delivery_nonce if job.id else None, **extra),
        )
        return Delivered(message.id, self._url(job, message.id), "channel")

    async def edit_status(self, job: Job, content: str) -> bool:
        """Best effort: edit the job's status message through its interaction. False when that is not possible."""
        if not token_alive(job, margin=5):
            return False
        if job.status_message_id is None:
            return False
        try:
            await self._webhook(job).edit_message(job.status_message_id, content=content, allowed_mentions=NO_MENTIONS)
            return True
        except (discord.HTTPException, aiohttp.ClientError, asyncio.TimeoutError) as error:
            log.debug("job %s: status edit failed: %s", job.id, error)
            return False

    async def notify(self, job: Job, content: str) -> bool:
        """Tell the requester something (removed, failed, cancelled): edit the status message while the token lives,
        else post a channel message that mentions them. Never raises; returns whether it got through."""
        if await self.edit_status(job, content):
            return True
        try:
            await self._retry(
                f"job {job.id}: notice",
                lambda: self._channel(job).send(f"<@{job.user_id}> {content}", allowed_mentions=only_mention(job.user_id),
                                                suppress_embeds=True),
            )
            return True
        except Exception as error:  # noqa: BLE001 - a notice must never take the bot down
            log.warning("job %s: could not notify the requester: %s", job.id, error)
            return False


def _custom_ids(message: discord.Message) -> list[str]:
    """The custom_id of every button and select on a message."""
    return [child.custom_id for row in message.components if isinstance(row, discord.ActionRow)
            for child in row.children if isinstance(child, (discord.Button, discord.SelectMenu)) and child.custom_id]


class DiscordOutbox:
    """The Discord side of :class:`bot.dispatcher.Outbox`: status-message edits (progress at most every
    ``progress_interval`` seconds per job), notices and clips through a :class:`Deliverer`. ``spawn`` runs the
    best-effort edits in the background (the bot keeps and awaits them at shutdown)."""

    def __init__(self, deliverer: Deliverer, *, spawn: Callable[[Coroutine[Any, Any, Any]], Any],
                 progress_interval: float = 2.0) -> None:
        self.deliverer = deliverer
        self.spawn = spawn
        self.progress_interval = progress_interval
        self._last_edit: dict[int, float] = {}

    def started(self, job: Job) -> None:
        self._last_edit[job.id] = time.monotonic()  # progress edits start one interval after this one
        self.spawn(self.deliverer.edit_status(job, status_text(job, f"Generating… {progress_bar(0)} 0%")))

    def progress(self, job: Job, step: int, total: int) -> None:
        now = time.monotonic()
        last = self._last_edit.get(job.id)
        if step >= total or (last is not None and now - last < self.progress_interval):
            return
        self._last_edit[job.id] = now
        percent = int(100 * step / max(total, 1))
        self.spawn(self.deliverer.edit_status(job, status_text(job, f"Generating… {progress_bar(percent)} {percent}%")))

    def interrupted(self, job: Job) -> None:
        self._last_edit.pop(job.id, None)
        self.spawn(self.deliverer.edit_status(job, status_text(
            job, "Interrupted by a restart: your clip will be made as soon as I'm back.")))

    async def notify(self, job: Job, text: str) -> None:
        self._last_edit.pop(job.id, None)
        await self.deliverer.notify(job, text)

    async def deliver(self, job: Job, clip: ClipData, *, generated_in: float) -> Delivered:
        self._last_edit.pop(job.id, None)
        return await self.deliverer.deliver_clip(job, clip, generated_in=generated_in)

    async def delivered(self, job: Job) -> None:
        await self.deliverer.edit_status(job, status_text(job, f"Done — your clip is here: {job.delivered_url}"))

    async def find_delivered(self, job: Job) -> Delivered | None:
        try:
            return await self.deliverer.find_delivered(job)
        except Exception:  # cannot tell: the clip is made again (and the nonce still guards a repeat)
            log.exception("job %d: looking for a clip posted before failed", job.id)
            return None
