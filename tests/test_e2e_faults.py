"""Issue 4 faults, end to end: the real bot (``MusicBot``, run in this process with a fake generator that can be told
to raise, hang or want a lot of memory) against the fake Discord. Generator faults fail only their job, with a clear
message, and the next job is served; upload faults are retried, re-encoded or recorded undeliverable; mentions in
prompts never ping; unknown components crash nothing."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bot.client import MusicBot
from bot.jobs import JobStatus
from bot.queue import JobQueue, Limits
from bot.settings import Settings
from bot.store import SQLiteJobStore
from bot.worker import GenerationWorker
from tests.e2e_helpers import audio, clips, frames, says
from tests.fake_discord import FakeDiscord, Interaction
from tests.fake_discord.client import use_fake
from tests.fake_discord.models import Message
from tests.fake_discord.server import Body
from tests.fakes import FakeGenerator

pytestmark = pytest.mark.e2e

RATE = 8000
GiB = 2**30


class HungryGenerator(FakeGenerator):
    """Estimates ``per_row`` bytes per request (and records the batch sizes it was asked about)."""

    def __init__(self, *, per_row: int = 0, **kw) -> None:
        super().__init__(**kw)
        self.per_row = per_row

    def estimate_batch_bytes(self, requests) -> int:
        return self.per_row * len(requests)


@dataclass
class World:
    fake: FakeDiscord
    bot: MusicBot
    gen: HungryGenerator
    store: SQLiteJobStore
    payloads: list[tuple[str, str, dict]] = field(default_factory=list)

    def member(self, name: str):
        return self.fake.guild.add_member(name)



def notices_for(fake: FakeDiscord, interaction: Interaction) -> list[str]:
    """What the requester was told: every version of their status message and channel messages mentioning them."""
    texts = [] if interaction.original is None else [interaction.original.content]
    if interaction.original is not None:
        texts += [h.get("content") or "" for h in interaction.original.history]
    texts += [m.content for m in fake.channel_messages if f"<@{interaction.user.id}>" in m.content]
    return texts


@pytest.fixture
async def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    payloads: list[tuple[str, str, dict]] = []
    read_body = FakeDiscord._read_body

    async def spy(self: FakeDiscord, request) -> Body:  # every JSON body the bot sent, to check allowed_mentions
        body = await read_body(self, request)
        if isinstance(body.json, dict):
            payloads.append((request.method, request.path, body.json))
        return body

    monkeypatch.setattr(FakeDiscord, "_read_body", spy)
    async with FakeDiscord() as fake:
        env = dict(fake.env(), DATABASE_PATH=str(tmp_path / "bot.sqlite3"), COOLDOWN_SECONDS="0",
                   MAX_PENDING_PER_USER="5", MAX_SECONDS="10", JOB_TIMEOUT_SECONDS="1", MAX_BATCH="4")
        settings = Settings.from_env(env)
        gen = HungryGenerator(sampling_rate=RATE, step_delay=0.002)
        store = SQLiteJobStore(settings.database_path)
        worker = GenerationWorker(lambda: gen, max_batch=settings.max_batch, job_timeout=settings.job_timeout_seconds,
                                  hard_timeout_grace=2.0, memory_limit=3 * GiB, clear_cache=lambda: None)
        queue = JobQueue(store, Limits.from_settings(settings), batch_size=settings.max_batch)
        bot = MusicBot(settings, store, queue, worker, batch_window=0.2)
        bot.deliverer.backoff = 0.05
        with use_fake(fake):
            await bot.login(settings.discord_token)
            runner = asyncio.create_task(bot.connect())
            await fake.wait_ready()
            try:
                yield World(fake, bot, gen, store, payloads)
            finally:
                await bot.shutdown(grace=0)
                await asyncio.wait_for(runner, 10)


async def music(world: World, name: str, prompt: str = "calm piano", seconds: int = 1) -> Interaction:
    interaction = await world.fake.invoke(world.member(name), "music", {"prompt": prompt, "seconds": seconds})
    await interaction.wait(lambda i: says(i, "position") or says(i, "Generating"), 10)
    return interaction


def job_of(world: World, interaction: Interaction):
    [job] = [j for j in world.store.jobs_of(interaction.user.id)]
    return job


@pytest.mark.parametrize("fault, expected", [
    (RuntimeError("kaboom"), "Generation failed (RuntimeError: kaboom)"),
    (MemoryError(), "ran out of memory"),
])
async def test_a_generator_error_fails_that_job_clearly_and_the_next_is_served(world: World, fault, expected) -> None:
    world.gen.fail_with = fault
    first = await music(world, "unlucky")
    await first.wait(lambda i: any(expected in t for t in notices_for(world.fake, i)), 10)
    assert "could not be made" in " ".join(notices_for(world.fake, first))
    assert job_of(world, first).status is JobStatus.FAILED and audio(first.files) == []
    second = await music(world, "next")
    [wav] = await clips(second, 1, timeout=10)
    assert frames(wav.data) == RATE
    assert (world.bot.worker.failed, world.bot.worker.completed) == (1, 1)


async def test_a_hung_generation_is_stopped_by_the_job_timeout(world: World) -> None:
    world.gen.hang = True
    stuck = await music(world, "stuck")
    await stuck.wait(lambda i: any("longer than 1 s" in t for t in notices_for(world.fake, i)), 10)
    assert job_of(world, stuck).status is JobStatus.FAILED
    world.gen.hang = False
    fine = await music(world, "fine")
    [wav] = await clips(fine, 1, timeout=10)
    assert frames(wav.data) == RATE


@pytest.mark.parametrize("status", [500, 429])
async def test_an_upload_refused_for_a_while_is_retried(world: World, status: int) -> None:
    world.fake.fail("POST", "/webhooks/*", status, times=2)
    interaction = await music(world, f"retry{status}")
    [wav] = await clips(interaction, 1, timeout=15)
    assert frames(wav.data) == RATE
    assert len(audio(world.fake.files)) == 1
    assert [e.data[2] for e in world.fake.events_of("fault")] == [status, status]
    assert job_of(world, interaction).status is JobStatus.DONE


async def test_an_upload_too_large_is_re_encoded_smaller(world: World) -> None:
    world.fake.fail("POST", "/webhooks/*", 413, times=1)
    interaction = await music(world, "big", seconds=3)
    [clip] = await clips(interaction, 1, timeout=15)
    assert clip.filename.endswith(".ogg") and frames(clip.data) == 3 * RATE
    assert job_of(world, interaction).status is JobStatus.DONE


async def test_a_deleted_channel_makes_the_job_undeliverable(world: World, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="bot")
    world.fake.fail("POST", "/webhooks/*", 404, times=50, code=10003, message="Unknown Channel")
    world.fake.fail("POST", "/channels/*/messages", 404, times=50, code=10003, message="Unknown Channel")
    interaction = await music(world, "gone")
    await world.fake.wait_until(lambda: job_of(world, interaction).status.final, 10)
    job = job_of(world, interaction)
    assert job.status is JobStatus.UNDELIVERABLE and "gone" in job.error
    assert f"job {job.id} undeliverable" in caplog.text
    assert audio(world.fake.files) == []


async def test_batches_are_shrunk_to_fit_memory_and_every_clip_arrives(world: World, caplog) -> None:
    caplog.set_level(logging.INFO, logger="bot")
    world.gen.per_row = GiB  # the worker's limit is 3 GiB: at most 3 rows together
    world.gen.step_delay = 0.01
    interactions = await asyncio.gather(*(world.fake.invoke(world.member(f"crowd{n}"), "music",
                                                            {"prompt": f"tune {n}", "seconds": 1}) for n in range(4)))
    for interaction in interactions:
        [wav] = await clips(interaction, 1, timeout=15)
        assert frames(wav.data) == RATE
    assert max(len(call) for call in world.gen.calls) == 3
    assert sum(len(call) for call in world.gen.calls) == 4
    assert "batch shrunk to 3 job(s)" in caplog.text


async def test_admin_skip_of_one_job_leaves_the_rest_of_its_batch_running(world: World) -> None:
    world.gen.step_delay = 0.05  # 1 s clips: 50 steps, 2.5 s
    world.bot.worker.job_timeout = 30.0
    admin = world.fake.guild.add_member("root", admin=True)
    interactions = await asyncio.gather(*(world.fake.invoke(world.member(f"band{n}"), "music",
                                                            {"prompt": f"riff {n}", "seconds": 1}) for n in range(3)))
    await world.fake.wait_until(lambda: len(world.bot.queue.running()) == 3, 10)
    victim = job_of(world, interactions[1])
    skip = await world.fake.invoke(admin, "admin skip", {"job": victim.id})
    await skip.wait(lambda i: i.original is not None, 10)
    assert f"#{victim.id}" in skip.original.content
    for n in (0, 2):
        [wav] = await clips(interactions[n], 1, timeout=15)
        assert frames(wav.data) == RATE
    await world.fake.wait_until(lambda: job_of(world, interactions[1]).status.final, 10)
    assert job_of(world, interactions[1]).status is JobStatus.CANCELLED
    assert audio(interactions[1].files) == [] and len(world.gen.calls) == 1
    assert any("stopped by an admin" in t for t in notices_for(world.fake, interactions[1]))


HOSTILE = ("@everyone @here <@&{role}> <@{user}> **bold ~~strike ||spoiler `code` # Heading\n> quote "
           "\u202eevil\u200b [link](https://example.com) " + "x" * 20)


async def test_mentions_in_prompts_never_ping_anyone_but_the_requester(world: World) -> None:
    fake = world.fake
    victim = world.member("victim")
    role = fake.guild.add_role("Everyone-ish", permissions=0)
    prompt = HOSTILE.format(role=role.id, user=victim.id)
    interaction = await fake.invoke(world.member("mallory"), "music", {"prompt": prompt, "seconds": 1})
    await clips(interaction, 1, timeout=10)
    fake.expire(interaction)  # the next one is delivered as a channel message that mentions the requester
    late = await fake.invoke(world.member("mallory2"), "music", {"prompt": prompt, "seconds": 1})
    await late.wait(lambda i: says(i, "position") or says(i, "Generating"), 10)
    fake.expire(late)
    await fake.wait_for(lambda e: e.kind == "message" and e.data.attachments, timeout=10)
    messages = [(m, p, body) for m, p, body in world.payloads if "content" in body and body["content"]]
    assert any("everyone" in body["content"] for _, _, body in messages)
    for method, path, body in messages:
        allowed = body.get("allowed_mentions")
        assert allowed is not None, (method, path, body["content"][:80])
        assert allowed.get("parse", []) == [], (path, allowed)
        assert allowed.get("roles", []) == [], (path, allowed)
        assert {str(u) for u in allowed.get("users", [])} <= {str(interaction.user.id), str(late.user.id)}, (path, allowed)
    shown = [body["content"] for _, _, body in messages if "evil" in body["content"]]
    assert shown and all("\u202e" not in text and "@everyone" not in text for text in shown)
    assert all(len(text) <= 2000 for _, _, body in messages for text in [body["content"]])


async def test_unknown_components_crash_nothing(world: World) -> None:
    fake = world.fake
    stranger = world.member("stranger")
    old = Message(id=4242, channel=fake.channel, author=stranger.user, content="an old message", components=[{"type": 1, "components": [
                      {"type": 2, "style": 1, "label": "?", "custom_id": "no-such-button:1"},
                      {"type": 2, "style": 1, "label": "?", "custom_id": "x" * 100}]}])
    fake.channel.messages.append(old)
    for custom_id in old.custom_ids:
        click = await fake.click(old, custom_id, stranger)
        await asyncio.sleep(0.3)
        # ignored, or answered with an ephemeral message: never a public reply
        assert all(m.ephemeral for m in click.messages), [m.content for m in click.messages]
    interaction = await music(world, "after-clicks")
    [wav] = await clips(interaction, 1, timeout=10)
    assert frames(wav.data) == RATE


async def test_the_token_is_never_logged(world: World, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    world.fake.fail("POST", "/webhooks/*", 500, times=1)
    interaction = await music(world, "logged")
    await clips(interaction, 1, timeout=10)
    text = caplog.text + json.dumps([body for _, _, body in world.payloads])
    assert world.fake.token not in text  # the bot token: never, at any level, in any logger
    # interaction tokens are short-lived webhook credentials: the bot's own logs never show them either
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("bot"))
    assert ours and interaction.token not in ours


async def test_a_cancel_before_the_position_is_shown_still_reaches_the_status_message(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """/cancel handled while the bot's "Queued" answer is still on its way (a slow Discord): the member ends up
    seeing the cancel, not a "Queued" that never changes."""
    world.bot.batch_window = 5.0  # the job stays queued for the whole test
    read_body = FakeDiscord._read_body
    slow_edit = asyncio.Event()

    async def slow(self: FakeDiscord, request) -> Body:
        if request.method == "POST" and request.path.endswith("/callback") and not slow_edit.is_set():
            slow_edit.set()
            await asyncio.sleep(0.5)
        return await read_body(self, request)

    monkeypatch.setattr(FakeDiscord, "_read_body", slow)
    member = world.member("quick")
    request = await world.fake.invoke(member, "music", {"prompt": "calm piano", "seconds": 1})
    await asyncio.wait_for(slow_edit.wait(), 10)  # the answer with the position is being taken, slowly
    cancel = await world.fake.invoke(member, "cancel")
    await cancel.wait(lambda i: i.original is not None, 10)
    assert "Cancelled 1 request" in cancel.original.content
    await request.wait(lambda i: i.original is not None and "Cancelled" in i.original.content, 10)
    assert job_of(world, request).status is JobStatus.CANCELLED
    assert audio(request.files) == []
