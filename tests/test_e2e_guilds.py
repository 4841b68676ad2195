"""Each server its own queue, limits and admins, end to end: the real bot (``MusicBot`` in this process with a fake
generator) against a fake Discord holding two guilds, each with its own admin, and the application's owner."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.client import MusicBot
from bot.jobs import JobStatus
from bot.store import SQLiteJobStore
from tests.e2e_helpers import audio, clips, frames, says
from tests.fake_discord import FakeDiscord, Interaction
from tests.fake_discord.models import Channel, Guild, Member
from tests.fakes import FakeGenerator
from tests.in_process import RATE, running_bot

pytestmark = pytest.mark.e2e



@dataclass
class World:
    fake: FakeDiscord
    bot: MusicBot
    gen: FakeGenerator
    store: SQLiteJobStore
    a: Guild
    b: Guild
    admin_a: Member
    admin_b: Member
    owner: Member  # the application's owner, a plain member of guild B (no Manage Server)
    configured_owner: Member  # in OWNER_USER_IDS, a plain member of guild A

    def channel(self, guild: Guild) -> Channel:
        return guild.text_channels[0]

    async def run(self, user: Member, command: str, options: dict | None = None) -> Interaction:
        """An ephemeral command, answered."""
        interaction = await self.fake.invoke(user, command, options or {}, channel=self.channel(user.guild))
        await interaction.wait(lambda i: i.original is not None, 10)
        return interaction

    async def music(self, user: Member, prompt: str, seconds: int = 1) -> Interaction:
        interaction = await self.fake.invoke(user, "music", {"prompt": prompt, "seconds": seconds},
                                             channel=self.channel(user.guild))
        await interaction.wait(lambda i: says(i, "position") or says(i, "Generating") or i.ephemeral, 10)
        return interaction


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with FakeDiscord() as fake:
        a = fake.guild
        b = fake.add_guild("Other Guild")
        admin_a, admin_b = a.add_member("admin-a", admin=True), b.add_member("admin-b", admin=True)
        owner = b.add_member(user=fake.owner)
        configured_owner = a.add_member("operator")
        async with running_bot(fake, tmp_path, OWNER_USER_IDS=str(configured_owner.id)) as (bot, gen, store):
            yield World(fake, bot, gen, store, a, b, admin_a, admin_b, owner, configured_owner)


async def test_two_servers_are_served_in_turn_with_their_own_positions(world: World) -> None:
    refused = await world.run(world.admin_b, "admin pause", {"everywhere": True})
    assert "Only the bot's owners" in refused.original.content and not world.bot.queue.paused
    paused = await world.run(world.owner, "admin pause", {"everywhere": True})
    assert "Paused everywhere" in paused.original.content
    alice, amy = world.a.add_member("alice"), world.a.add_member("amy")
    bob = world.b.add_member("bob")
    requests = [await world.music(alice, "a1"), await world.music(alice, "a2"), await world.music(amy, "a3"),
                await world.music(bob, "b1"), await world.music(bob, "b2")]
    # positions (when each was answered) are each server's own; the answer says that the queue is held
    for interaction, position in zip(requests, [1, 2, 2, 1, 2], strict=True):
        assert says(interaction, f"position **{position}**") and says(interaction, "paused by the bot's owner")
    status = await world.run(world.owner, "admin status", {"everywhere": True})
    assert f"server `{world.a.id}`: 3 waiting" in status.original.content
    assert f"server `{world.b.id}`: 2 waiting" in status.original.content
    await world.run(world.configured_owner, "admin resume", {"everywhere": True})
    assert not world.bot.queue.paused
    for interaction in requests:
        [wav] = await clips(interaction, 1, timeout=20)
        assert frames(wav.data) == RATE
    done = sorted(world.store.by_status(JobStatus.DONE), key=lambda j: j.started_at)
    # server A, server B, A, B, A: round-robin between servers; inside A alice and amy take turns
    assert [j.prompt for j in done] == ["a1", "b1", "a3", "b2", "a2"]


async def test_an_admin_of_one_server_cannot_see_or_change_another_servers_queue(world: World) -> None:
    world.gen.hang = True  # the first job keeps generating until it is skipped
    alice, amy = world.a.add_member("alice"), world.a.add_member("amy")
    running = await world.music(alice, "secret alpha plans", 5)
    await world.fake.wait_until(lambda: world.bot.queue.running(), 10)
    waiting = [await world.music(amy, "hidden beta tune"), await world.music(alice, "quiet gamma")]
    [a_running] = world.bot.queue.running()

    bob = world.b.add_member("bob")
    b_job = await world.music(bob, "bob's own song")
    assert says(b_job, "position **1**")  # guild A's waiting jobs are not ahead of it in B's numbering
    queue_b = (await world.run(world.admin_b, "queue")).original.content
    assert "bob's own song" in queue_b
    for hidden in ("alice", "amy", "secret alpha", "hidden beta", "quiet gamma", f"#{a_running.id}"):
        assert hidden not in queue_b
    history = (await world.run(bob, "history")).original.content
    assert "secret alpha" not in history

    # B's admin acts on B only: pause, limits, remove, clear, skip
    await world.run(world.admin_b, "admin pause")
    assert world.bot.queue.state(world.b.id).paused and not world.bot.queue.state(world.a.id).paused
    limits = await world.run(world.admin_b, "admin limits", {"max_seconds": 2})
    assert "Longest clip: 2 s" in limits.original.content
    assert "Longest clip: 10 s" in (await world.run(world.admin_a, "admin limits")).original.content
    too_long = await world.music(world.b.add_member("bea"), "long one", 5)
    assert too_long.ephemeral and "from 1 to 2" in too_long.original.content
    fine = await world.music(world.a.add_member("ann"), "long one in A", 5)
    assert says(fine, "position")
    missing = await world.run(world.admin_b, "admin remove", {"position": 2})
    assert "no request at position 2" in missing.original.content
    skip = await world.run(world.admin_b, "admin skip", {"job": a_running.id})
    assert f"Job #{a_running.id} is not being generated" in skip.original.content
    assert "Nothing is being generated" in (await world.run(world.admin_b, "admin skip")).original.content
    cleared = await world.run(world.admin_b, "admin clear")
    assert "Cleared 1 queued request" in cleared.original.content
    await b_job.wait(lambda i: says(i, "cleared"), 10)
    assert [j.status for j in (world.store.get(a_running.id), *map(world.store.get, [
        j.id for j in world.store.guild_jobs(world.a.id, JobStatus.QUEUED)]))] == [JobStatus.RUNNING] + [
        JobStatus.QUEUED] * 3
    for interaction in waiting:
        assert not says(interaction, "removed") and not says(interaction, "cleared")

    # A's own admin does act on A; the owner, a plain member of B, is an admin there
    skipped = await world.run(world.admin_a, "admin skip")
    assert f"#{a_running.id}" in skipped.original.content
    await running.wait(lambda i: says(i, "stopped by an admin"), 10)
    world.gen.hang = False
    for interaction in waiting:
        await clips(interaction, 1, timeout=20)
    owner_status = await world.run(world.owner, "admin status")
    assert "paused by an admin" in owner_status.original.content
    await world.run(world.owner, "admin resume")
    assert not world.bot.queue.state(world.b.id).paused
    assert audio(b_job.files) == []
