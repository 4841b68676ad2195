"""Soak test (issue 4): 20 members send 200 /music requests to ``python -m bot`` (tiny model, 1 s clips) with random
cancels and an admin clear in the middle. Afterwards every request is accounted for — delivered once, cancelled with
a notice, or refused with a reason (a full queue, or a prompt too long from a modified client) — and the bot's
resident memory did not keep growing."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.fake_discord import FakeDiscord, Interaction
from tests.fake_discord.process import BotProcess

pytestmark = pytest.mark.e2e

MEMBERS = 20
REQUESTS = 200
AUDIO = (".wav", ".ogg", ".mp3", ".flac", ".opus")
CANCEL_WORDS = ("Cancelled", "cancelled", "cleared", "removed", "stopped")


def audio(interaction: Interaction) -> list:
    return [a for a in interaction.files if a.filename.endswith(AUDIO)]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def told(fake: FakeDiscord, interaction: Interaction) -> list[str]:
    """Every text the requester saw for this request: each version of its status message, and channel messages
    that mention them."""
    texts = []
    if interaction.original is not None:
        texts = [interaction.original.content] + [h.get("content") or "" for h in interaction.original.history]
    return texts + [m.content for m in fake.channel_messages if f"<@{interaction.user.id}>" in m.content]


async def test_200_requests_from_20_members_are_all_accounted_for(
        fake_discord: FakeDiscord, run_bot: Callable[..., Awaitable[BotProcess]], tiny_model: Path,
        tmp_path: Path) -> None:
    fake = fake_discord
    rng = random.Random(4)
    members = [fake.guild.add_member(f"member{n}") for n in range(MEMBERS)]
    admin = fake.guild.add_member("root", admin=True)
    bot = await run_bot(MUSICGEN_MODEL=str(tiny_model), COOLDOWN_SECONDS="0", MAX_PENDING_PER_USER="6",
                        MAX_QUEUE_SIZE="60", MAX_BATCH="8", MAX_SECONDS="2", PROGRESS_INTERVAL_SECONDS="1")
    pid = bot.process.pid
    samples: list[tuple[int, int]] = []  # (requests sent so far, RSS KiB)
    sent: list[Interaction] = []
    cancels: list[Interaction] = []

    async def sample_memory() -> None:
        while True:
            samples.append((len(sent), rss_kib(pid)))
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample_memory())
    started = time.monotonic()
    try:
        for n in range(REQUESTS):
            member = rng.choice(members)
            prompt = f"tune {n} for {member.user.name}"
            if n % 25 == 7:  # a modified client past Discord's length check: refused whatever the load
                prompt = prompt.ljust(400, "!")
            sent.append(await fake.invoke(member, "music", {"prompt": prompt, "seconds": rng.choice([1, 1, 2])},
                                          validate=False))
            if rng.random() < 0.08:
                cancels.append(await fake.invoke(rng.choice(members), "cancel"))
            if n == REQUESTS // 2:
                clear = await fake.invoke(admin, "admin clear")
                await clear.wait(lambda i: i.original is not None, 10)
                assert "Cleared" in clear.original.content
            await asyncio.sleep(rng.uniform(0.0, 0.08))

        def settled() -> bool:
            with sqlite3.connect(tmp_path / "bot.sqlite3") as db:
                open_jobs = db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()
            return open_jobs[0] == 0 and all(i.original is not None for i in sent)

        await fake.wait_until(settled, 90)
        await asyncio.sleep(1.5)  # the last deliveries and notices, and anything sent twice, arrive by now
    finally:
        sampler.cancel()
    elapsed = time.monotonic() - started

    with sqlite3.connect(tmp_path / "bot.sqlite3") as db:
        stored = {row[0]: (row[1], row[2]) for row in db.execute("SELECT interaction_id, status, id FROM jobs")}
    delivered = cancelled = refused = 0
    for interaction in sent:
        files = audio(interaction)
        if interaction.id not in stored:  # refused: an ephemeral answer with a reason, nothing stored or sent
            assert interaction.ephemeral and len(interaction.original.content) > 10, interaction.original.content
            assert files == []
            refused += 1
            continue
        status, job_id = stored[interaction.id]
        if status == "done":
            assert len(files) == 1, (job_id, len(files))
            delivered += 1
        else:
            assert status == "cancelled", (job_id, status)
            assert files == [], job_id
            assert any(word in text for text in told(fake, interaction) for word in CANCEL_WORDS), (
                job_id, told(fake, interaction))
            cancelled += 1
    assert delivered + cancelled + refused == REQUESTS
    assert delivered > 20 and cancelled > 5 and refused > 0, (delivered, cancelled, refused)
    assert len([a for a in fake.files if a.filename.endswith(AUDIO)]) == delivered  # nothing delivered twice
    for interaction in cancels:
        assert interaction.original is not None and interaction.ephemeral

    # Memory: after warming up (first quarter), RSS stays within a bound instead of growing with the requests.
    warm = [kib for count, kib in samples if REQUESTS // 4 <= count < REQUESTS // 2]
    late = [kib for count, kib in samples if count >= REQUESTS * 3 // 4]
    assert warm and late
    growth_mib = (max(late) - max(warm)) / 1024
    assert growth_mib < 64, f"RSS grew {growth_mib:.0f} MiB ({max(warm) / 1024:.0f} → {max(late) / 1024:.0f} MiB)"
    assert "Traceback" not in bot.log
    assert await bot.stop() == 0
    print(f"soak: {delivered} delivered, {cancelled} cancelled, {refused} refused in {elapsed:.0f} s; "
          f"RSS {max(warm) / 1024:.0f} → {max(late) / 1024:.0f} MiB")
