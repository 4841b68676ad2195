"""End to end, what the bot keeps and what it shows: a /continue request cancelled while queued leaves no upload
behind, the buttons of a clip whose files were swept answer politely, and a prompt with a bare URL is never shown
with a link preview (every message of the bot carries SUPPRESS_EMBEDS). The real bot (``MusicBot`` in this process
with a fake generator) against the fake Discord."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bot import job_files
from bot.client import MusicBot
from bot.store import SQLiteJobStore
from tests.e2e_helpers import says
from tests.fake_discord import FakeDiscord, Interaction
from tests.fake_discord.models import Channel, Member
from tests.in_process import RATE, running_bot

pytestmark = pytest.mark.e2e

URL = "https://example.com/listen"


@dataclass
class World:
    fake: FakeDiscord
    bot: MusicBot
    store: SQLiteJobStore
    admin: Member

    async def run(self, user: Member, command: str, options: dict | None = None,
                  channel: Channel | None = None) -> Interaction:
        """A command, answered (its first answer, or the deferred one filled in)."""
        interaction = await self.fake.invoke(user, command, options or {}, channel=channel)
        await interaction.wait(lambda i: i.original is not None and not i.original.loading, 15)
        return interaction

    def uploads(self) -> list[Path]:
        files_dir = self.store.files_dir
        return sorted(files_dir.glob("upload-*")) if files_dir is not None and files_dir.exists() else []


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with FakeDiscord() as fake:
        admin = fake.guild.add_member("admin", admin=True)
        async with running_bot(fake, tmp_path) as (bot, _, store):
            yield World(fake, bot, store, admin)


def wav(seconds: float) -> bytes:
    t = np.arange(int(RATE * seconds)) / RATE
    out = io.BytesIO()
    sf.write(out, (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), RATE, format="WAV")
    return out.getvalue()


async def test_a_continue_cancelled_while_queued_leaves_no_upload(world: World) -> None:
    fake = world.fake
    await world.run(world.admin, "admin pause")
    alice = fake.guild.add_member("alice")
    request = await fake.invoke(alice, "continue", {"audio": fake.upload("mine.wav", wav(1.0), "audio/wav"),
                                                    "prompt": "and then drums", "seconds": 1})
    await request.wait(lambda i: says(i, "position **1**"), 15)
    assert len(world.uploads()) == 1  # kept for the worker while it waits
    cancel = await world.run(alice, "cancel")
    assert "Cancelled 1 request" in cancel.original.content
    await request.wait(lambda i: says(i, "Cancelled"), 10)
    assert world.uploads() == []
    await world.run(world.admin, "admin resume")
    await asyncio.sleep(0.3)
    assert not [a for m in request.messages for a in m.attachments]  # nothing was made of it


async def test_a_bare_url_in_a_prompt_is_never_previewed(world: World) -> None:
    fake, admin = world.fake, world.admin
    bob, carol = fake.guild.add_member("bob"), fake.guild.add_member("carol")
    made = await fake.invoke(bob, "music", {"prompt": f"like {URL} but slower", "seconds": 1})
    await made.wait_files(2, timeout=30)
    history = await world.run(bob, "history")
    assert URL in history.original.content

    await world.run(admin, "admin pause")
    waiting = [await fake.invoke(user, "music", {"prompt": f"{user.name} {URL}", "seconds": 1})
               for user in (bob, carol)]
    for interaction in waiting:
        await interaction.wait(lambda i: says(i, "position"), 10)
    listing = await world.run(carol, "queue")
    assert URL in listing.original.content
    removed = await world.run(admin, "admin remove", {"position": 1})
    assert URL in removed.original.content
    gone = await fake.wait_until(lambda: [i for i in waiting if says(i, "removed from the queue by an admin")], 10)
    [left] = [i for i in waiting if i not in gone]  # the other member cancels theirs
    cancelled = await world.run(bob if left is waiting[0] else carol, "cancel")
    assert URL in cancelled.original.content
    await world.run(admin, "admin resume")

    start = await world.run(bob, "session start", {"theme": f"tunes from {URL}", "seconds": 1})
    assert "Session started" in start.original.content
    [thread] = [t for t in fake.guild.threads if "tunes from" in t.name]
    in_session = await fake.invoke(carol, "music", {"prompt": f"see {URL}"}, channel=thread)
    await in_session.wait_files(2, timeout=30)
    end = await world.run(bob, "session end", channel=thread)
    assert "Final setlist" in end.original.content and URL in end.original.content

    mine = [m for m in fake.messages if m.author.id == fake.bot.id]
    assert sum(URL in m.content for m in mine) >= 8
    assert all(m.suppress_embeds for m in mine), [(m.content[:60], m.flags) for m in mine if not m.suppress_embeds]


async def test_after_retention_the_buttons_of_a_continued_clip_say_its_data_is_gone(world: World) -> None:
    fake = world.fake
    dora = fake.guild.add_member("dora")
    request = await fake.invoke(dora, "continue", {"audio": fake.upload("mine.wav", wav(1.0), "audio/wav"),
                                                   "prompt": "and then strings", "seconds": 1})
    await request.wait_files(2, timeout=30)
    [clip] = [m for m in request.messages if m.attachments]
    job = world.store.recent_done(dora.id)[0]
    files = [Path(job.prompt_audio_path), job_files.tokens_file(world.store.files_dir, job.id)]
    assert all(p.exists() for p in files)
    later = time.time() + 31 * job_files.DAY_SECONDS  # a month on, as the daily sweep would see it
    assert sorted(job_files.sweep(world.store, 30, now=later)) == sorted(files)
    for action in ("regen", "vary", "extend"):
        pressed = await fake.click(clip, f"clip:{action}:{job.id}", dora)
        await pressed.wait(lambda i: i.original is not None, 10)
        assert pressed.ephemeral and "data of that clip is gone" in pressed.original.content
