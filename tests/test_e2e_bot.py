"""End to end: ``python -m bot`` with a tiny random MusicGen, driven through the fake Discord as members would.

One bot process serves the whole module (tests use their own members so they do not share limits); each test
waits until the work it started is finished.
"""

from __future__ import annotations

import asyncio
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import soundfile as sf

from tests.fake_discord import MANAGE_GUILD, Attachment, FakeDiscord, Interaction, Member, Message
from tests.fake_discord.process import BotProcess, bot_env

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

RATE = 32000  # the tiny model's EnCodec sampling rate
LONG = 30  # seconds of audio that keep the tiny model busy for a few seconds


@dataclass
class World:
    fake: FakeDiscord
    bot: BotProcess
    admin: Member
    dj: Member  # has the role configured in ADMIN_ROLE_IDS, no Manage Server

    def member(self, name: str) -> Member:
        return self.fake.guild.add_member(name)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("e2e-bot")
    async with FakeDiscord() as fake:
        admin = fake.guild.add_member("boss", admin=True)
        dj_role = fake.guild.add_role("DJ")
        dj = fake.guild.add_member("dj", roles=[dj_role])
        env = bot_env(fake, tmp, MUSICGEN_MODEL=str(tiny_model), COOLDOWN_SECONDS="0", MAX_PENDING_PER_USER="3",
                      MAX_BATCH="4", ADMIN_ROLE_IDS=str(dj_role.id))
        bot = BotProcess(fake, env, tmp / "bot.log")
        await bot.start()
        await bot.wait_ready(120)
        yield World(fake, bot, admin, dj)
        assert await bot.stop() == 0, bot.log
        assert "Traceback" not in bot.log, bot.log


# -- helpers ----------------------------------------------------------------------------------------------------
def frames(attachment: Attachment) -> tuple[int, int]:
    info = sf.info(io.BytesIO(attachment.data))
    return info.frames, info.samplerate


def contents(fake: FakeDiscord, message: Message) -> list[tuple[float, str]]:
    """Every version of a message after each edit, with the time of the edit."""
    times = [e.at for e in fake.events_of("edit") if e.data is message]
    versions = [h.get("content", "") for h in message.history[1:]] + [message.content]
    return list(zip(times, versions, strict=True))


def job_ids(log: str, pattern: str) -> list[list[int]]:
    return [[int(x) for x in m.split(", ") if x] for m in re.findall(pattern, log)]


def says(interaction: Interaction, text: str) -> bool:
    return interaction.original is not None and text in interaction.original.content


async def finished(interaction: Interaction, timeout: float = 60.0) -> None:
    """Wait until the status message says the job ended (done, cancelled, removed, failed)."""
    await interaction.wait(lambda i: i.original is not None and any(
        word in i.original.content for word in ("Done", "Cancel", "removed", "stopped", "Sorry")), timeout)


async def busy(world: World, seconds: int = LONG) -> Interaction:
    """Keep the worker busy with a long clip from a member of its own; returns once it is generating."""
    hog = world.member("hog")
    interaction = await world.fake.invoke(hog, "music", {"prompt": "a very long drone", "seconds": seconds})
    await interaction.wait(lambda i: says(i, "Generating"), 30)
    return interaction


# -- tests ------------------------------------------------------------------------------------------------------
async def test_registered_schema(world: World) -> None:
    fake = world.fake
    music = fake.command("music")
    options = {o["name"]: o for o in music["options"]}
    assert options["prompt"]["type"] == 3 and options["prompt"]["required"] is True
    assert (options["prompt"]["min_length"], options["prompt"]["max_length"]) == (1, 300)
    assert options["seconds"]["type"] == 4 and options["seconds"]["required"] is False
    assert (options["seconds"]["min_value"], options["seconds"]["max_value"]) == (1, 60)  # MAX_SECONDS default 60 = the model's max (2 × its 30 s window)
    assert options["seed"]["type"] == 4 and options["seed"]["min_value"] == 0
    for name in ("queue", "cancel"):
        assert fake.command(name)["options"] == []

    admin = fake.command("admin")
    assert int(admin["default_member_permissions"]) == MANAGE_GUILD
    subcommands = {o["name"]: o for o in admin["options"]}
    assert set(subcommands) >= {"pause", "resume", "clear", "remove", "skip", "limits"}
    position = subcommands["remove"]["options"][0]
    assert position["name"] == "position" and position["required"] and position["min_value"] == 1

    session = {o["name"]: o for o in fake.command("session")["options"]}
    assert set(session) == {"start", "status", "end"}
    start = {o["name"]: o for o in session["start"]["options"]}
    assert start["seconds"]["max_value"] == 60 and start["theme"]["type"] == 3
    # guild sync only: nothing global
    assert fake.commands() == []


async def test_music_delivers_exact_clip_with_progress(world: World) -> None:
    fake = world.fake
    alice = world.member("alice")
    seconds = 50  # two windows: long enough for the tiny model to take a few seconds (~4 s), so progress is shown
    interaction = await fake.invoke(alice, "music", {"prompt": "calm **piano** @everyone", "seconds": seconds,
                                                     "seed": 1234})
    callback = await interaction.wait_callback()
    assert callback["type"] == 4 and interaction.latency < 3  # answered with the position within 3 s
    assert not interaction.ephemeral
    [wav, _png] = await interaction.wait_files(2, timeout=60)  # the clip and its picture
    await finished(interaction)

    assert frames(wav) == (seconds * RATE, RATE)
    [delivery] = [m for m in interaction.followups if m.attachments]
    assert alice.mention in delivery.content
    assert "`1234`" in delivery.content and f"{seconds} s" in delivery.content
    assert "calm \\*\\*piano\\*\\*" in delivery.content  # markdown escaped
    assert "@everyone" not in delivery.content  # a mention that cannot ping

    versions = contents(fake, interaction.original)
    texts = [text for _, text in versions]
    assert "position **1**" in interaction.original.history[0]["content"]  # the answer, before any edit
    progress = [(at, text) for at, text in versions if "Generating" in text]
    assert any(re.search(r"Generating… \S+ [1-9]\d*%", text) for _, text in progress), texts
    gaps = [b[0] - a[0] for a, b in zip(progress, progress[1:], strict=False)]
    assert all(gap >= 1.9 for gap in gaps), gaps  # at most one progress edit every 2 s
    assert "Done" in texts[-1] and delivery.id and str(delivery.id) in texts[-1]


async def test_fair_order_queue_and_cancel(world: World) -> None:
    fake = world.fake
    anna, bob = world.member("anna"), world.member("bob")
    hog = await busy(world)
    mine = [await fake.invoke(anna, "music", {"prompt": f"anna {n}", "seconds": 1}) for n in range(3)]
    bobs = await fake.invoke(bob, "music", {"prompt": "bob 0", "seconds": 1})
    for interaction in [*mine, bobs]:
        await interaction.wait(lambda i: says(i, "position"))
    # bob's only request is served right after anna's first, though anna asked three times before him
    assert "position **2**" in bobs.original.content

    listing = await fake.invoke(bob, "queue")
    await listing.wait(lambda i: i.original is not None)
    assert listing.ephemeral
    lines = [line for line in listing.original.content.splitlines() if re.match(r"\d+\. ", line)]
    assert [line.split(" — ")[2] for line in lines] == ["anna 0", "bob 0", "anna 1", "anna 2"]
    assert "hog" in listing.original.content.split("Up next")[0]  # the running job is shown first

    cancel = await fake.invoke(anna, "cancel")
    await cancel.wait(lambda i: i.original is not None)
    assert cancel.ephemeral and "Cancelled 3 requests" in cancel.original.content
    for interaction in mine:
        await interaction.wait(lambda i: says(i, "Cancelled"))
    await finished(bobs)
    await finished(hog)
    assert all(not i.files for i in mine)
    assert frames(bobs.files[0]) == (RATE, RATE)


async def test_cancel_running_job(world: World) -> None:
    fake = world.fake
    carl = world.member("carl")
    interaction = await fake.invoke(carl, "music", {"prompt": "endless", "seconds": LONG})
    await interaction.wait(lambda i: says(i, "Generating"), 30)
    cancel = await fake.invoke(carl, "cancel")
    await cancel.wait(lambda i: i.original is not None)
    assert "Cancelled 1 request" in cancel.original.content
    await interaction.wait(lambda i: says(i, "Cancelled by you"), 30)
    await asyncio.sleep(0.5)
    assert interaction.files == []


async def test_admin_commands_checked_at_run_time(world: World) -> None:
    fake = world.fake
    eve = world.member("eve")
    hog = await busy(world, 10)
    waiting = await fake.invoke(world.member("frank"), "music", {"prompt": "keep me", "seconds": 1})
    await waiting.wait(lambda i: says(i, "position"))

    for path, options in [("admin clear", {}), ("admin remove", {"position": 1}), ("admin pause", {}),
                          ("admin skip", {}), ("admin limits", {"max_seconds": 1})]:
        refused = await fake.invoke(eve, path, options)  # the fake lets her invoke it; the bot must refuse
        await refused.wait(lambda i: i.original is not None)
        assert refused.ephemeral and "Only server managers" in refused.original.content, path

    allowed = await fake.invoke(world.dj, "admin limits")  # configured admin role, no Manage Server
    await allowed.wait(lambda i: i.original is not None)
    assert "Longest clip: 60 s" in allowed.original.content

    removed = await fake.invoke(world.admin, "admin remove", {"position": 1})
    await removed.wait(lambda i: i.original is not None)
    assert "keep me" in removed.original.content
    await waiting.wait(lambda i: says(i, "removed from the queue by an admin"))
    skipped = await fake.invoke(world.admin, "admin skip")
    await skipped.wait(lambda i: i.original is not None)
    await hog.wait(lambda i: says(i, "stopped by an admin"), 30)
    assert waiting.files == [] and hog.files == []


async def test_session_from_start_to_setlist(world: World) -> None:
    fake = world.fake
    host, guest, other = world.member("host"), world.member("guest"), world.member("other")
    start = await fake.invoke(host, "session start", {"theme": "dreamy synthwave", "seconds": 1})
    await start.wait(lambda i: says(i, "Session started"))
    [thread] = [t for t in fake.guild.threads if t.parent is fake.channel and "dreamy synthwave" in t.name]
    assert thread.mention in start.original.content
    assert host.mention in thread.messages[0].content

    requests = [await fake.invoke(member, "music", {"prompt": f"{member.name} tune"}, channel=thread)
                for member in (host, guest)]
    for interaction in requests:
        [wav, _png] = await interaction.wait_files(2, timeout=60)  # the clip and its picture
        assert frames(wav) == (RATE, RATE)  # the session's default length
        assert interaction.followups[-1].channel is thread
        assert "dreamy synthwave, " in interaction.followups[-1].content  # theme combined with the prompt
        await finished(interaction)

    status = await fake.invoke(guest, "session status", channel=thread)
    await status.wait(lambda i: i.original is not None)
    assert status.ephemeral and "host tune" in status.original.content

    refused = await fake.invoke(other, "session end", channel=thread)
    await refused.wait(lambda i: i.original is not None)
    assert refused.ephemeral and "host" in refused.original.content

    end = await fake.invoke(host, "session end", channel=thread)
    await end.wait(lambda i: says(i, "Final setlist"))
    setlist = end.original.content
    for interaction, member in zip(requests, (host, guest), strict=True):
        delivered = interaction.followups[-1]
        assert f"{member.name} tune" in setlist and str(delivered.id) in setlist
        assert setlist.index("host tune") < setlist.index("guest tune")
    await fake.wait_until(lambda: thread.archived, 10)
    after = await fake.invoke(guest, "music", {"prompt": "too late"}, channel=thread)
    await after.wait_files(1, timeout=60)  # an ended session's thread is a plain channel again
    assert "dreamy" not in after.followups[-1].content


async def test_delivery_after_token_expired(world: World) -> None:
    fake = world.fake
    gina = world.member("gina")
    interaction = await fake.invoke(gina, "music", {"prompt": "late night jazz", "seconds": 2})
    await interaction.wait_callback()
    fake.expire(interaction)  # 401 50027 from now on
    message = await fake.wait_for(lambda e: e.kind == "message" and e.data.attachments
                                  and gina.mention in e.data.content, 60)
    delivered = message.data
    assert delivered.webhook_id is None and delivered.channel is fake.channel  # a normal channel message
    assert frames(delivered.attachments[0]) == (2 * RATE, RATE)
    assert interaction.files == []


async def test_four_members_share_one_batch(world: World) -> None:
    fake = world.fake
    members = [world.member(f"crowd{n}") for n in range(4)]
    lengths = [1, 2, 1, 2]
    before = world.bot.log
    interactions = await asyncio.gather(*[
        fake.invoke(member, "music", {"prompt": f"crowd tune {n}", "seconds": seconds})
        for n, (member, seconds) in enumerate(zip(members, lengths, strict=True))])
    for interaction, seconds in zip(interactions, lengths, strict=True):
        [wav, _png] = await interaction.wait_files(2, timeout=60)  # the clip and its picture
        assert frames(wav) == (seconds * RATE, RATE)
    log = world.bot.log[len(before):]
    queued = [int(n) for n in re.findall(r"job (\d+) queued", log)]
    assert len(queued) == 4
    assert sorted(queued) in [sorted(batch) for batch in job_ids(log, r"batch of 4 started: jobs \[([\d, ]+)\]")]
