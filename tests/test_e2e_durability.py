"""End to end, issue 4: a killed bot delivers every job exactly once after a restart; hostile input gets clear
answers; bad start-up settings give one clear message and exit status 2."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.e2e_helpers import audio, clips, frames, says
from tests.fake_discord import FakeDiscord
from tests.fake_discord.process import REPO_ROOT, BotProcess

pytestmark = pytest.mark.e2e

RATE = 32000



async def test_killed_while_generating_every_job_is_delivered_once_after_restart(
        fake_discord: FakeDiscord, run_bot: Callable[..., Awaitable[BotProcess]], tiny_model: Path) -> None:
    fake = fake_discord
    settings = dict(MUSICGEN_MODEL=str(tiny_model), COOLDOWN_SECONDS="0", MAX_BATCH="1", PROGRESS_INTERVAL_SECONDS="1")
    bot = await run_bot(**settings)
    long_one = await fake.invoke(fake.guild.add_member("long"), "music", {"prompt": "long drone", "seconds": 30})
    await long_one.wait(lambda i: says(i, "Generating"), 30)
    waiting = [await fake.invoke(fake.guild.add_member(f"m{n}"), "music", {"prompt": f"short {n}", "seconds": 1})
               for n in range(2)]
    for interaction in waiting:
        await interaction.wait(lambda i: says(i, "position"), 10)
    bot.kill()
    await bot.wait_exit()
    assert audio(long_one.files) == [] and all(audio(i.files) == [] for i in waiting)

    again = await run_bot(**settings)
    everyone = [long_one, *waiting]
    for interaction in everyone:
        await clips(interaction, 1, timeout=90)
    await asyncio.sleep(1.0)  # anything delivered twice would arrive by now
    assert [len(audio(i.files)) for i in everyone] == [1, 1, 1]
    assert len(audio(fake.files)) == 3
    assert [frames(audio(i.files)[0].data) for i in everyone] == [30 * RATE, RATE, RATE]
    assert "recovered: queued again" in again.log
    assert await again.stop() == 0


async def test_hostile_input_gets_clear_ephemeral_answers(
        fake_discord: FakeDiscord, run_bot: Callable[..., Awaitable[BotProcess]], tiny_model: Path) -> None:
    fake = fake_discord
    bot = await run_bot(MUSICGEN_MODEL=str(tiny_model), COOLDOWN_SECONDS="0", MAX_SECONDS="30")
    mallory = fake.guild.add_member("mallory")
    cases = [
        ({"prompt": "x" * 6000}, "too long"),
        ({"prompt": "\u200b\u202e\u2066 \x07"}, "empty"),
        ({"prompt": "ok", "seconds": 10**20}, "from 1 to 30"),
        ({"prompt": "ok", "seconds": 0}, "from 1 to 30"),
        ({"prompt": "ok", "seconds": "ten"}, "from 1 to 30"),
        ({"prompt": "ok", "seed": -5}, "seed"),
        ({"seconds": 2}, "prompt"),
    ]
    for options, expected in cases:
        interaction = await fake.invoke(mallory, "music", options, validate=False)
        await interaction.wait(lambda i: i.original is not None, 10)
        assert interaction.ephemeral and expected in interaction.original.content, (options,
                                                                                     interaction.original.content)
    dm = await fake.invoke(mallory, "music", {"prompt": "in private"}, channel=fake.dm_channel(mallory))
    await dm.wait(lambda i: i.original is not None, 10)
    assert dm.ephemeral and "servers" in dm.original.content

    # after all that, a normal request still works
    fine = await fake.invoke(mallory, "music", {"prompt": "fine", "seconds": 1})
    [wav] = await clips(fine, 1, timeout=60)
    assert frames(wav.data) == RATE
    assert await bot.stop() == 0
    assert "Traceback" not in bot.log and fake.token not in bot.log


def start_bot(env: dict[str, str], tmp_path: Path) -> tuple[int, str]:
    import subprocess

    full = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "MUSICGEN_"))}
    full.update(env, DATABASE_PATH=str(tmp_path / "db.sqlite3"), PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-m", "bot"], cwd=tmp_path, env=full, capture_output=True, text=True,
                          timeout=120)
    return done.returncode, done.stdout + done.stderr


def test_missing_token_is_one_clear_message(tmp_path: Path) -> None:
    code, output = start_bot({}, tmp_path)
    assert code == 2 and "DISCORD_TOKEN is not set" in output and "Traceback" not in output


def test_bad_model_path_is_one_clear_message(tmp_path: Path) -> None:
    code, output = start_bot({"DISCORD_TOKEN": "secret.token.value", "MUSICGEN_MODEL": str(tmp_path / "nope")},
                             tmp_path)
    assert code == 2 and output.count("could not load the model") == 1 and "MUSICGEN_MODEL" in output
    assert "Traceback" not in output and "secret.token.value" not in output


def db_rows(path: Path) -> dict[int, tuple[str, int]]:
    import sqlite3

    with sqlite3.connect(path) as db:
        return {row[0]: (row[1], row[2]) for row in db.execute("SELECT id, status, attempts FROM jobs")}


async def test_killed_while_jobs_are_queued_they_keep_their_order_and_pause(
        fake_discord: FakeDiscord, run_bot: Callable[..., Awaitable[BotProcess]], tiny_model: Path,
        tmp_path: Path) -> None:
    fake = fake_discord
    settings = dict(MUSICGEN_MODEL=str(tiny_model), COOLDOWN_SECONDS="0", MAX_BATCH="1", PROGRESS_INTERVAL_SECONDS="1")
    admin = fake.guild.add_member("root", admin=True)
    bot = await run_bot(**settings)
    long_one = await fake.invoke(fake.guild.add_member("long"), "music", {"prompt": "long drone", "seconds": 30})
    await long_one.wait(lambda i: says(i, "Generating"), 30)
    waiting = [await fake.invoke(fake.guild.add_member(f"q{n}"), "music", {"prompt": f"tune {n}", "seconds": 1})
               for n in range(3)]
    for n, interaction in enumerate(waiting, 1):
        await interaction.wait(lambda i, n=n: says(i, f"position **{n}**"), 10)
    for command in ("admin pause", "admin skip"):  # nothing starts, and the running one stops: all queued
        answered = await fake.invoke(admin, command)
        await answered.wait(lambda i: i.original is not None, 10)
    await long_one.wait(lambda i: says(i, "stopped by an admin"), 30)
    bot.kill()
    await bot.wait_exit()
    assert [status for status, _ in db_rows(tmp_path / "bot.sqlite3").values()] == ["cancelled"] + ["queued"] * 3

    again = await run_bot(**settings)
    await asyncio.sleep(1.0)
    assert all(audio(i.files) == [] for i in waiting)  # still paused after the restart
    resumed = await fake.invoke(admin, "admin resume")
    await resumed.wait(lambda i: i.original is not None, 10)
    for interaction in waiting:
        await clips(interaction, 1, timeout=60)
    await asyncio.sleep(0.5)
    assert [len(audio(i.files)) for i in waiting] == [1, 1, 1] and len(audio(fake.files)) == 3
    assert audio(long_one.files) == []
    arrival = [next(n for n, i in enumerate(waiting) if a in audio(i.files)) for a in audio(fake.files)]
    assert arrival == [0, 1, 2]
    assert await again.stop() == 0


async def test_pause_holds_requests_across_a_restart_and_close_refuses_them(
        fake_discord: FakeDiscord, run_bot: Callable[..., Awaitable[BotProcess]], tiny_model: Path,
        tmp_path: Path) -> None:
    fake = fake_discord
    settings = dict(MUSICGEN_MODEL=str(tiny_model), COOLDOWN_SECONDS="0", MAX_BATCH="1")
    admin = fake.guild.add_member("root", admin=True)
    one, two, late = (fake.guild.add_member(name) for name in ("one", "two", "late"))

    async def ask(user, command: str, options: dict | None = None) -> str:
        answered = await fake.invoke(user, command, options or {})
        await answered.wait(lambda i: i.original is not None, 10)
        return answered.original.content

    bot = await run_bot(**settings)
    assert "accepted and wait" in await ask(admin, "admin pause")
    held = []
    for user, prompt in [(one, "one first"), (one, "one second"), (two, "two first")]:
        interaction = await fake.invoke(user, "music", {"prompt": prompt, "seconds": 1})
        await interaction.wait(lambda i: says(i, "position"), 10)
        assert not interaction.ephemeral and says(interaction, "paused by an admin")  # accepted, and told why
        held.append(interaction)
    assert "paused by an admin" in await ask(one, "queue")
    assert "closed" in await ask(admin, "admin close")
    refused = await fake.invoke(late, "music", {"prompt": "knock knock", "seconds": 1})
    await refused.wait(lambda i: i.original is not None, 10)
    assert refused.ephemeral and "closed to new requests" in refused.original.content
    bot.kill()
    await bot.wait_exit()
    assert [status for status, _ in db_rows(tmp_path / "bot.sqlite3").values()] == ["queued"] * 3

    again = await run_bot(**settings)
    assert "paused and closed" in await ask(admin, "admin status")  # both states survive the restart
    await asyncio.sleep(1.0)
    assert audio(fake.files) == []
    assert "3 request(s) waiting" in await ask(admin, "admin resume")
    for interaction in held:
        await clips(interaction, 1, timeout=60)
    # served in fair order: one, two, then one's second request
    arrival = [next(n for n, i in enumerate(held) if a in audio(i.files)) for a in audio(fake.files)]
    assert arrival == [0, 2, 1]
    still_closed = await fake.invoke(late, "music", {"prompt": "knock again", "seconds": 1})
    await still_closed.wait(lambda i: i.original is not None, 10)
    assert still_closed.ephemeral and "closed" in still_closed.original.content
    assert "Open" in await ask(admin, "admin open")
    welcome = await fake.invoke(late, "music", {"prompt": "come in", "seconds": 1})
    [wav] = await clips(welcome, 1, timeout=60)
    assert frames(wav.data) == RATE
    assert await again.stop() == 0


async def test_sigterm_while_generating_finishes_the_clip_within_the_grace_period(
        fake_discord: FakeDiscord, run_bot: Callable[..., Awaitable[BotProcess]], tiny_model: Path,
        tmp_path: Path) -> None:
    import signal

    fake = fake_discord
    bot = await run_bot(MUSICGEN_MODEL=str(tiny_model), COOLDOWN_SECONDS="0", MAX_BATCH="1",
                        SHUTDOWN_GRACE_SECONDS="120", PROGRESS_INTERVAL_SECONDS="1")
    # long enough that the tiny model is still generating when the signal comes (it makes ~5 s of audio a second;
    # progress edits every second)
    running = await fake.invoke(fake.guild.add_member("long"), "music", {"prompt": "long drone", "seconds": 30})
    await running.wait(lambda i: says(i, "Generating"), 30)
    bot.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    late = await fake.invoke(fake.guild.add_member("late"), "music", {"prompt": "too late", "seconds": 1})
    await late.wait(lambda i: i.original is not None, 10)
    assert late.ephemeral and "restarting" in late.original.content
    assert await bot.wait_exit(120) == 0
    [wav] = audio(running.files)
    assert frames(wav.data) == 30 * RATE
    assert "shut down cleanly" in bot.log and "Traceback" not in bot.log
    assert list(db_rows(tmp_path / "bot.sqlite3").values()) == [("done", 1)]  # the refused one was never stored
    wal = tmp_path / "bot.sqlite3-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # flushed into the database file
    assert fake._ws is None or fake._ws.closed  # the gateway connection was closed by the bot


async def test_sigterm_with_a_short_grace_interrupts_and_the_next_start_delivers(
        fake_discord: FakeDiscord, run_bot: Callable[..., Awaitable[BotProcess]], tiny_model: Path,
        tmp_path: Path) -> None:
    fake = fake_discord
    settings = dict(MUSICGEN_MODEL=str(tiny_model), COOLDOWN_SECONDS="0", MAX_BATCH="1",
                    SHUTDOWN_GRACE_SECONDS="0.5", PROGRESS_INTERVAL_SECONDS="1")
    bot = await run_bot(**settings)
    running = await fake.invoke(fake.guild.add_member("long"), "music", {"prompt": "long drone", "seconds": 30})
    await running.wait(lambda i: says(i, "Generating"), 30)
    waiting = await fake.invoke(fake.guild.add_member("next"), "music", {"prompt": "short", "seconds": 1})
    await waiting.wait(lambda i: says(i, "position"), 10)
    assert await bot.stop(timeout=30) == 0
    assert "interrupted by shutdown" in bot.log and "shut down cleanly" in bot.log
    assert audio(running.files) == [] and audio(waiting.files) == []
    assert says(running, "Interrupted by a restart")
    rows = db_rows(tmp_path / "bot.sqlite3")
    assert sorted(status for status, _ in rows.values()) == ["queued", "queued"]

    again = await run_bot(**settings)
    for interaction in (running, waiting):
        await clips(interaction, 1, timeout=90)
    await asyncio.sleep(1.0)
    assert [len(audio(running.files)), len(audio(waiting.files))] == [1, 1] and len(audio(fake.files)) == 2
    assert frames(audio(running.files)[0].data) == 30 * RATE
    assert audio(fake.files)[0] is audio(running.files)[0]  # the interrupted job goes first
    assert [status for status, _ in db_rows(tmp_path / "bot.sqlite3").values()] == ["done", "done"]
    assert await again.stop() == 0
