"""Issue 17 items 5 and 7, end to end: the real bot (``MusicBot`` in this process, a fake generator) against the
fake Discord, with a store whose writes fail like a full disk for as long as a test says. The job that finished
meanwhile is delivered once space is back, later jobs run without a restart, the dispatch loop restarts when it
dies, and ``/queue`` never says "Generating now" for a job that is not. Forged buttons and link previews too."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bot.client import MusicBot
from bot.jobs import Job, JobStatus, Session
from bot.store import SQLiteJobStore
from tests.e2e_helpers import audio, clips, frames, says
from tests.fake_discord import FakeDiscord, Interaction
from tests.fake_discord.models import SUPPRESS_EMBEDS
from tests.fakes import FakeGenerator
from tests.in_process import RATE, running_bot

pytestmark = pytest.mark.e2e



class FullDiskStore(SQLiteJobStore):
    """The SQLite store, except that while ``full`` names an operation (or holds "*") that write raises what
    SQLite raises when the disk is full. Reads go on working, as they do on a full disk."""

    WRITES = ("add", "update", "update_many", "set_value", "add_session", "update_session")

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.full: set[str] = set()
        self.refused = 0

    def _check(self, op: str) -> None:
        if op in self.full or "*" in self.full:
            self.refused += 1
            raise sqlite3.OperationalError("database or disk is full")

    def add(self, job: Job) -> Job:
        self._check("add")
        return super().add(job)

    def update(self, job_id: int, **changes: Any) -> Job:
        self._check("update")
        return super().update(job_id, **changes)

    def update_if(self, job_id: int, expected: Any, **changes: Any) -> Job | None:
        self._check("update")  # a compare-and-set is an update
        return super().update_if(job_id, expected, **changes)

    def update_many(self, job_ids, **changes: Any) -> None:
        self._check("update_many")
        super().update_many(job_ids, **changes)

    def set_value(self, key: str, value: Any) -> None:
        self._check("set_value")
        super().set_value(key, value)

    def add_session(self, session: Session) -> Session:
        self._check("add_session")
        return super().add_session(session)

    def update_session(self, session_id: int, **changes: Any) -> Session:
        self._check("update_session")
        return super().update_session(session_id, **changes)


@dataclass
class World:
    fake: FakeDiscord
    bot: MusicBot
    gen: FakeGenerator
    store: FullDiskStore

    def member(self, name: str):
        return self.fake.guild.add_member(name)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with FakeDiscord() as fake:
        async with running_bot(fake, tmp_path, step_delay=0.01, store_class=FullDiskStore) as (bot, gen, store):
            bot.dispatcher.store_backoff = 0.1
            bot.deliverer.backoff = 0.05
            try:
                yield World(fake, bot, gen, store)
            finally:
                store.full.clear()  # let shutdown record what it must


async def music(world: World, name: str, prompt: str = "calm piano", seconds: int = 1) -> Interaction:
    interaction = await world.fake.invoke(world.member(name), "music", {"prompt": prompt, "seconds": seconds})
    await interaction.wait(lambda i: says(i, "position") or says(i, "Generating"), 10)
    return interaction


async def queue_text(world: World) -> str:
    shown = await world.fake.invoke(world.member("looker"), "queue")
    await shown.wait(lambda i: i.original is not None, 10)
    return shown.original.content


def job_of(world: World, interaction: Interaction) -> Job:
    [job] = world.store.jobs_of(interaction.user.id)
    return job


async def test_a_full_disk_while_a_clip_is_made_delays_it_and_later_jobs_run_once_space_is_back(
        world: World) -> None:
    gate = world.gen.block = threading.Event()
    first = await music(world, "first")
    await world.fake.wait_until(lambda: world.gen.calls and job_of(world, first).status_message_id, 10)
    world.store.full.add("*")  # the disk fills while the clip is being made
    gate.set()
    await world.fake.wait_until(lambda: world.store.refused >= 3, 20)  # the outcome waits for the store
    assert audio(first.files) == []  # "delivering" could not be recorded: it waits (the clip is in memory)
    assert "Generating now" not in await queue_text(world) or world.bot.dispatcher.holds(job_of(world, first).id)
    # a request while the disk is full gets a polite answer, not silence
    refused = await world.fake.invoke(world.member("refused"), "music", {"prompt": "x", "seconds": 1})
    await refused.wait(lambda i: i.original is not None, 10)
    assert refused.ephemeral and "went wrong" in refused.original.content

    world.store.full.clear()  # space is back: no restart
    [wav] = await clips(first, 1, timeout=20)
    assert frames(wav.data) == RATE
    await world.fake.wait_until(lambda: job_of(world, first).status is JobStatus.DONE, 10)
    assert job_of(world, first).delivered_message_id is not None
    later = await music(world, "later")
    [wav] = await clips(later, 1, timeout=20)
    assert frames(wav.data) == RATE
    assert "Generating now" not in await queue_text(world)
    await asyncio.sleep(0.5)
    assert len(audio(first.files)) == 1  # exactly once


async def test_the_dispatch_loop_restarts_after_it_dies_and_nothing_stays_generating(world: World) -> None:
    world.store.full.add("update")  # jobs can be added, not started: taking a batch fails in the loop
    waiting = await music(world, "waiting")
    await world.fake.wait_until(lambda: world.bot.dispatcher.restarts >= 2, 20)
    assert job_of(world, waiting).status is JobStatus.QUEUED
    assert "Generating now" not in await queue_text(world)
    world.store.full.clear()
    [wav] = await clips(waiting, 1, timeout=20)
    assert frames(wav.data) == RATE
    another = await music(world, "another")
    await clips(another, 1, timeout=20)


async def test_a_failed_job_is_reported_even_when_the_store_never_takes_it(world: World) -> None:
    world.bot.dispatcher.store_retry_seconds = 1.0
    world.gen.fail_with = RuntimeError("kaboom")
    gate = world.gen.block = threading.Event()
    unlucky = await music(world, "unlucky")
    await world.fake.wait_until(lambda: world.gen.calls and job_of(world, unlucky).status_message_id, 10)
    world.store.full.add("update")
    gate.set()
    await unlucky.wait(lambda i: says(i, "could not be made"), 20)
    assert "kaboom" in unlucky.original.content
    world.store.full.clear()
    assert "Generating now" not in await queue_text(world)  # not held, whatever the store still says
    fine = await music(world, "fine")
    await clips(fine, 1, timeout=20)


# -- forged buttons -----------------------------------------------------------------------------------------
async def delivered(world: World, name: str) -> tuple[Interaction, Job]:
    interaction = await music(world, name)
    await clips(interaction, 1, timeout=20)
    await world.fake.wait_until(lambda: job_of(world, interaction).status is JobStatus.DONE, 10)
    return interaction, job_of(world, interaction)


async def test_forged_buttons_are_refused_politely(world: World) -> None:
    fake = world.fake
    mallory = world.member("mallory")
    interaction, job = await delivered(world, "owner")
    [clip_message] = [m for m in interaction.followups if m.attachments]

    async def press(message, custom_id: str) -> Interaction:
        # a client can send any custom_id on any message: copy the clip's buttons with another id
        message.components = [{"type": 1, "components": [
            {"type": 2, "style": 1, "label": "Regenerate", "custom_id": custom_id}]}]
        click = await fake.click(message, custom_id, mallory)
        await click.wait(lambda i: i.callbacks, 10)
        await asyncio.sleep(0.2)
        return click

    # the same clip id pressed on another message (a message of the bot that is not the clip's)
    other = fake.channel.messages[0]
    for custom_id in (f"clip:regen:{job.id}", "clip:extend:9999999999999999999", "clip:vary:0"):
        click = await press(other, custom_id)
        assert click.ephemeral and all(m.ephemeral for m in click.messages), custom_id
        assert any("can't" in m.content for m in click.messages), [m.content for m in click.messages]
    # the real button on the clip's own message works (for anyone in the server)
    real = await fake.click(clip_message, f"clip:vary:{job.id}", mallory)
    await clips(real, 1, timeout=20)
    # a clip of another server, pressed in this one
    elsewhere = fake.add_guild("Elsewhere")
    foreign = world.store.add(Job(guild_id=elsewhere.id, channel_id=1, user_id=1, user_name="x", prompt="theirs",
                                  model_prompt="theirs", new_seconds=1, seed=1, status=JobStatus.DONE,
                                  delivered_message_id=clip_message.id))
    click = await press(clip_message, f"clip:regen:{foreign.id}")
    assert click.ephemeral and any("doesn't belong" in m.content for m in click.messages)
    assert len(world.store.by_status()) == 3  # the clip, its variation and the foreign row: nothing forged


async def test_a_click_the_moment_a_clip_appears_waits_for_its_record(world: World) -> None:
    """The clip's message is posted before its worker records the message's id (on Redis, from another machine):
    a click in between is not refused as pressed on a message that is not the clip's."""
    interaction, job = await delivered(world, "quick")
    [clip_message] = [m for m in interaction.followups if m.attachments]
    # as the store reads between the post and the record: still running, being delivered, no message yet
    world.store.update(job.id, status=JobStatus.RUNNING, delivering_at=job.finished_at, delivered_message_id=None)

    async def record_later() -> None:
        await asyncio.sleep(0.4)
        world.store.update(job.id, status=JobStatus.DONE, delivered_message_id=clip_message.id)

    recording = asyncio.create_task(record_later())
    click = await world.fake.click(clip_message, f"clip:vary:{job.id}", world.member("fast"))
    [wav] = await clips(click, 1, timeout=20)
    await recording
    assert frames(wav.data) == RATE and not click.ephemeral


# -- link previews ------------------------------------------------------------------------------------------
async def test_bare_urls_in_prompts_are_never_previewed(world: World) -> None:
    prompt = "lofi like https://example.com/track and http://10.0.0.1/x"
    interaction = await music(world, "linker", prompt=prompt)
    await clips(interaction, 1, timeout=20)
    await world.fake.wait_until(lambda: job_of(world, interaction).status is JobStatus.DONE, 10)
    shown = [m for m in world.fake.messages if "example.com" in m.content]
    assert len(shown) >= 2  # the status message and the clip
    assert all(m.flags & SUPPRESS_EMBEDS for m in shown), [(m.content[:40], m.flags) for m in shown]
    # a clip delivered to the channel (the interaction's token expired) too, with the job's nonce
    late = await music(world, "late", prompt=prompt)
    world.fake.expire(late)
    await world.fake.wait_until(lambda: job_of(world, late).status.final, 20)
    [posted] = [m for m in world.fake.channel_messages if m.attachments and "example.com" in m.content]
    assert posted.suppress_embeds and posted.nonce == f"clip-{job_of(world, late).id}"
