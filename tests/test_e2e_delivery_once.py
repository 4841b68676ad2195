"""Issue 17 items 6 and 7, issue 18 (commands on a first start), end to end with ``python -m bot`` and the tiny
model: killed after Discord stored the clip but before the bot read the answer, the restarted bot posts nothing
twice; a database it cannot use is one line and exit status 2; a first start with no commands anywhere syncs
them globally once."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.e2e_helpers import audio, says
from tests.fake_discord import FakeDiscord
from tests.fake_discord.models import Message
from tests.fake_discord.process import BotProcess, bot_env

pytestmark = pytest.mark.e2e


def job_row(db: Path, job_id: int = 1) -> tuple[str, int | None, float | None]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT status, delivered_message_id, delivering_at FROM jobs WHERE id = ?",
                           (job_id,)).fetchone()


def kill_on_clip(bot: BotProcess) -> Callable[[Message], Awaitable[None]]:
    """A fake-Discord hook: when the bot's clip has been stored, SIGKILL the bot before it reads the answer."""

    async def hook(message: Message) -> None:
        if audio(message.attachments):
            bot.kill()
            await bot.wait_exit()

    return hook


@pytest.mark.parametrize("via", ["followup", "channel"])
async def test_killed_between_upload_and_record_the_clip_is_posted_once(
        fake_discord: FakeDiscord, run_bot: Callable[..., Awaitable[BotProcess]], tiny_model: Path, tmp_path: Path,
        via: str) -> None:
    fake = fake_discord
    settings = dict(MUSICGEN_MODEL=str(tiny_model), COOLDOWN_SECONDS="0")
    bot = await run_bot(**settings)
    fake.on_posted = kill_on_clip(bot)
    if via == "channel":
        # the token is gone, so the clip goes to the channel; and the history cannot be read after the restart,
        # so only the message's nonce (enforce_nonce) can stop a second post
        fake.fail("GET", "/channels/*/messages", 403, code=50001, message="Missing Access", times=100)
    interaction = await fake.invoke(fake.guild.add_member("alice"), "music", {"prompt": "calm piano", "seconds": 1})
    await interaction.wait(lambda i: says(i, "position") or says(i, "Generating"), 30)
    if via == "channel":
        fake.expire(interaction)
    assert await bot.wait_exit(90) != 0  # killed by the hook right after Discord stored the clip
    assert len(audio(fake.files)) == 1
    status, message_id, delivering_at = job_row(tmp_path / "bot.sqlite3")
    assert (status, message_id) == ("running", None) and delivering_at is not None  # "delivering" was recorded

    fake.on_posted = None
    again = await run_bot(**settings)
    await fake.wait_until(lambda: job_row(tmp_path / "bot.sqlite3")[0] == "done", 90)
    await asyncio.sleep(1.0)  # a second post would have arrived by now
    [clip] = audio(fake.files)
    [posted] = [m for m in fake.messages if clip in m.attachments]
    assert job_row(tmp_path / "bot.sqlite3")[1] == posted.id
    if via == "channel":
        assert posted.nonce == "clip-1" and fake.events_of("nonce_repeat")
    else:
        assert "already posted (message" in again.log
        assert "batch of 1 started" not in again.log  # found when claimed: not made again
    assert await again.stop() == 0


# -- a database the bot cannot use --------------------------------------------------------------------------
def start_bot(fake: FakeDiscord, tmp_path: Path, **env: str) -> tuple[int, str]:
    import subprocess
    import sys

    from tests.fake_discord.process import REPO_ROOT

    result = subprocess.run([sys.executable, "-m", "bot"], cwd=REPO_ROOT, env=bot_env(fake, tmp_path, **env),
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("case", ["folder", "under a file", "locked by another bot", "not a database"])
async def test_a_database_that_cannot_be_used_is_one_line_and_exit_2(
        fake_discord: FakeDiscord, tmp_path: Path, case: str) -> None:
    holder = None
    if case == "folder":
        path = tmp_path / "a-folder"
        path.mkdir()
    elif case == "under a file":
        (tmp_path / "plain").write_text("x")
        path = tmp_path / "plain" / "bot.sqlite3"
    elif case == "locked by another bot":
        path = tmp_path / "busy.sqlite3"
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock for as long as it likes
    else:
        path = tmp_path / "junk.sqlite3"
        path.write_bytes(b"this is not SQLite" * 100)
    try:
        code, output = await asyncio.to_thread(start_bot, fake_discord, tmp_path, DATABASE_PATH=str(path),
                                               MUSICGEN_MODEL="/nonexistent")
    finally:
        if holder is not None:
            holder.close()
    assert code == 2, output
    assert "Traceback" not in output
    [line] = [line for line in output.splitlines() if "ERROR" in line]
    assert "Cannot use the database" in line and "DATABASE_PATH" in line


# -- commands on a first start ------------------------------------------------------------------------------
async def test_a_first_start_without_guild_ids_syncs_commands_globally_once(
        fake_discord: FakeDiscord, run_bot: Callable[..., Awaitable[BotProcess]], tiny_model: Path) -> None:
    fake = fake_discord
    bot = await run_bot(MUSICGEN_MODEL=str(tiny_model), DISCORD_GUILD_IDS="")
    assert {c["name"] for c in fake.commands()} >= {"music", "queue", "continue"}  # global
    assert fake.guild_commands == {}
    assert "synced" in bot.log and "DISCORD_GUILD_IDS" in bot.log
    assert await bot.stop() == 0
    syncs = len(fake.events_of("commands"))

    again = await run_bot(MUSICGEN_MODEL=str(tiny_model), DISCORD_GUILD_IDS="", wait=False)
    await again.wait_ready(commands=False, log_line="already registered")
    assert len(fake.events_of("commands")) == syncs  # not synced again: they are there
    music = await fake.invoke(fake.guild.add_member("newcomer"), "music", {"prompt": "hello", "seconds": 1})
    await music.wait(lambda i: says(i, "position") or says(i, "Generating"), 30)
    assert await again.stop() == 0
