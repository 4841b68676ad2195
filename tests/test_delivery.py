"""bot.delivery against the fake Discord: followup while the token lives, channel message after, faults."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator

import discord
import numpy as np
import pytest
import soundfile as sf
from discord import app_commands

from bot.audio import wav_bytes
from bot.delivery import Deliverer, DeliveryError, Undeliverable, clip_message, only_mention
from bot.jobs import ClipData, Job
from tests.fake_discord import FakeDiscord, Interaction, Member
from tests.fake_discord.client import use_fake

RATE = 32000


class Harness:
    def __init__(self, fake: FakeDiscord, client: discord.Client, member: Member) -> None:
        self.fake, self.client, self.member = fake, client, member
        self.sleeps: list[float] = []

        async def sleep(delay: float) -> None:
            self.sleeps.append(delay)

        self.deliverer = Deliverer(client, retries=3, backoff=0.5, sleep=sleep)

    async def interaction(self) -> Interaction:
        """A /music interaction answered with a deferral, as the bot does first."""
        interaction = await self.fake.invoke(self.member, "music", {"prompt": "x"})
        await interaction.wait_callback()
        return interaction

    def job(self, interaction: Interaction | None = None, *, age: float = 0.0, prompt: str = "warm piano") -> Job:
        return Job(guild_id=self.fake.guild.id, channel_id=self.fake.channel.id, user_id=self.member.id,
                   user_name=self.member.name, prompt=prompt, model_prompt=prompt, new_seconds=2, seed=42, id=7,
                   interaction_id=interaction.id if interaction else None,
                   interaction_token=interaction.token if interaction else None,
                   application_id=self.fake.application_id, interaction_created_at=time.time() - age)

    def webhook_requests(self) -> list[tuple]:
        return [e.data for e in self.fake.events_of("request") if e.data[1].startswith("/webhooks")]


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    async with FakeDiscord() as fake:
        member = fake.guild.add_member("alice")
        client = discord.Client(intents=discord.Intents(guilds=True))
        tree = app_commands.CommandTree(client)

        @tree.command(name="music", description="make music")
        async def music(interaction: discord.Interaction, prompt: str) -> None:
            await interaction.response.defer(thinking=True)  # what the bot does first; the test does the rest

        with use_fake(fake):
            await client.login(fake.token)
            tree.copy_global_to(guild=discord.Object(fake.guild.id))
            await tree.sync(guild=discord.Object(fake.guild.id))
            runner = asyncio.create_task(client.connect())
            await fake.wait_ready()
            try:
                yield Harness(fake, client, member)
            finally:
                await client.close()
                await runner


def clip(seconds: float = 2.0) -> ClipData:
    t = np.arange(int(seconds * RATE)) / RATE
    return ClipData(samples=(0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[:, None], sampling_rate=RATE, seed=42)


def frames(data: bytes) -> int:
    return sf.info(io.BytesIO(data)).frames


async def test_followup_while_the_token_lives(harness: Harness) -> None:
    interaction = await harness.interaction()
    job = harness.job(interaction)
    delivered = await harness.deliverer.send(job, clip_message(job, clip()), data=wav_bytes(clip()))
    assert delivered.via == "interaction"
    [message] = [m for m in interaction.followups if m.attachments]
    assert message.id == delivered.message_id and str(message.id) in delivered.url
    assert frames(message.attachments[0].data) == 2 * RATE
    assert harness.member.mention in message.content


async def test_channel_message_once_the_token_is_older_than_15_minutes(harness: Harness) -> None:
    interaction = await harness.interaction()
    job = harness.job(interaction, age=15 * 60 + 1)
    delivered = await harness.deliverer.send(job, clip_message(job, clip()), data=wav_bytes(clip()))
    assert delivered.via == "channel"
    assert harness.webhook_requests() == []  # it did not even try the dead token
    [message] = [m for m in harness.fake.channel.messages if m.attachments]
    assert message.webhook_id is None and harness.member.mention in message.content
    assert frames(message.attachments[0].data) == 2 * RATE


async def test_channel_message_when_discord_says_the_token_is_invalid(harness: Harness) -> None:
    interaction = await harness.interaction()
    harness.fake.expire(interaction)  # webhooks answer 401 50027 although the clock says it is alive
    job = harness.job(interaction)
    delivered = await harness.deliverer.send(job, "here", data=wav_bytes(clip()))
    assert delivered.via == "channel"
    assert [r[2] for r in harness.webhook_requests()] == [401]
    assert interaction.followups == []


async def test_rate_limited_followup_is_retried(harness: Harness) -> None:
    interaction = await harness.interaction()
    harness.fake.fail("POST", "/webhooks/*", 429, times=2, retry_after=0.01)
    delivered = await harness.deliverer.send(harness.job(interaction), "here", data=wav_bytes(clip()))
    assert delivered.via == "interaction"
    assert [r[2] for r in harness.webhook_requests()] == [429, 429, 200]


async def test_server_errors_are_retried_with_backoff(harness: Harness) -> None:
    class Response:  # the parts of aiohttp's response that discord.py and the bot read
        status, reason = 503, "Service Unavailable"
        headers: dict[str, str] = {}

    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise discord.DiscordServerError(Response(), {"message": "busy", "code": 0})
        return "ok"

    assert await harness.deliverer._retry("test", flaky) == "ok"
    assert harness.sleeps == [0.5, 1.0]
    calls.clear()

    async def always_down() -> str:
        raise discord.DiscordServerError(Response(), {"message": "down", "code": 0})

    with pytest.raises(discord.DiscordServerError):
        await harness.deliverer._retry("test", always_down)


async def test_too_large_upload_is_sent_as_ogg(harness: Harness) -> None:
    interaction = await harness.interaction()
    harness.fake.fail("POST", "/webhooks/*", 413)
    data = wav_bytes(clip())
    delivered = await harness.deliverer.send(harness.job(interaction), "here", data=data, filename="clip.wav")
    assert delivered.via == "interaction"
    [attachment] = interaction.files
    assert attachment.filename == "clip.ogg" and attachment.size < len(data) / 4
    assert frames(attachment.data) == 2 * RATE  # same length, smaller encoding


async def test_deleted_channel_is_undeliverable(harness: Harness) -> None:
    harness.fake.fail("POST", "/channels/*/messages", 404)
    with pytest.raises(Undeliverable):
        await harness.deliverer.send(harness.job(None), "here", data=wav_bytes(clip()))


async def test_missing_permission_is_undeliverable(harness: Harness) -> None:
    harness.fake.fail("POST", "/channels/*/messages", 403)
    with pytest.raises(Undeliverable):
        await harness.deliverer.send(harness.job(None), "here", data=wav_bytes(clip()))


async def test_other_refusals_fail_the_delivery(harness: Harness) -> None:
    harness.fake.fail("POST", "/channels/*/messages", 400)
    with pytest.raises(DeliveryError) as caught:
        await harness.deliverer.send(harness.job(None), "here", data=wav_bytes(clip()))
    assert not isinstance(caught.value, Undeliverable)


async def test_notify_edits_the_status_or_posts_to_the_channel(harness: Harness) -> None:
    interaction = await harness.interaction()
    # the bot turns the deferral into its status message first
    original = await harness.client.http.request(
        discord.http.Route("PATCH", "/webhooks/{app}/{token}/messages/@original", app=harness.fake.application_id,
                           token=interaction.token), json={"content": "queued"})
    job = harness.job(interaction)
    job.status_message_id = int(original["id"])
    assert await harness.deliverer.notify(job, "Removed by an admin.")
    assert interaction.original.content == "Removed by an admin."

    harness.fake.expire(interaction)
    assert await harness.deliverer.notify(job, "Cleared.")
    [notice] = [m for m in harness.fake.channel.messages if m.webhook_id is None]
    assert notice.content == f"{harness.member.mention} Cleared."


def test_only_the_requester_can_be_pinged() -> None:
    assert only_mention(5).to_dict() == {"parse": [], "users": [5]}  # no everyone, roles or replied user


def test_clip_message_escapes_the_prompt() -> None:
    job = Job(guild_id=1, channel_id=2, user_id=3, user_name="x", prompt="@everyone **loud** <@&123456789012345678>",
              model_prompt="@everyone **loud** <@&123456789012345678>", new_seconds=2, seed=99)
    text = clip_message(job, clip(), generated_in=1.25)
    assert text.startswith("<@3> ") and "`99`" in text and "2 s" in text and "1.2 s" in text
    assert "@everyone" not in text and "<@&123456789012345678>" not in text and "\\*\\*loud\\*\\*" in text


async def test_deliver_clip_sends_the_format_a_picture_and_buttons(harness: Harness) -> None:
    interaction = await harness.interaction()
    job = harness.job(interaction)
    job.format = "flac"
    tokens = np.arange(8, dtype=np.int64).reshape(4, 2)
    made = ClipData(clip().samples * 3.0, RATE, seed=42, tokens=tokens)  # too loud: normalised, not clipped
    delivered = await harness.deliverer.deliver_clip(job, made)
    [message] = [m for m in interaction.followups if m.attachments]
    assert message.id == delivered.message_id
    audio_file, png = message.attachments
    assert audio_file.filename == "musicgen-7.flac" and png.filename == "musicgen-7.png"
    samples, rate = sf.read(io.BytesIO(audio_file.data), dtype="float32")
    assert rate == RATE and samples.shape == (2 * RATE,)
    assert 0.85 < np.abs(samples).max() < 0.9  # -1 dBFS
    assert abs(samples[-1]) < 1e-3  # faded out
    assert png.data[:8] == b"\x89PNG\r\n\x1a\n"
    assert message.custom_ids == ["clip:regen:7", "clip:extend:7", "clip:vary:7"]
    assert "Sent as" not in message.content


async def test_deliver_clip_falls_back_to_a_smaller_format_and_says_so(harness: Harness) -> None:
    interaction = await harness.interaction()
    job = harness.job(interaction)
    job.upload_limit = (44 + 2 * RATE * 2) // 3  # what the interaction said: the WAV does not fit
    await harness.deliverer.deliver_clip(job, clip())
    [message] = [m for m in interaction.followups if m.attachments]
    audio_file = message.attachments[0]
    assert not audio_file.filename.endswith(".wav") and audio_file.size <= job.upload_limit
    assert "instead of WAV" in message.content and "upload limit" in message.content
