"""End to end, issue 4: a killed bot delivers every job exactly once after a restart; hostile input gets clear
answers; bad start-up settings give one clear message and exit status 2."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import soundfile as sf

from tests.fake_discord import FakeDiscord, Interaction
from tests.fake_discord.process import REPO_ROOT, BotProcess
from tests.tiny_models import build_musicgen

pytestmark = pytest.mark.e2e

RATE = 32000


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-musicgen")
    build_musicgen(folder)
    return folder


def frames(data: bytes) -> int:
    return sf.info(io.BytesIO(data)).frames


def says(interaction: Interaction, text: str) -> bool:
    return interaction.original is not None and text in interaction.original.content


async def test_killed_while_generating_every_job_is_delivered_once_after_restart(
        fake_discord: FakeDiscord, run_bot: Callable[..., Awaitable[BotProcess]], tiny_model: Path) -> None:
    fake = fake_discord
    settings = dict(MUSICGEN_MODEL=str(tiny_model), COOLDOWN_SECONDS="0", MAX_BATCH="1")
    bot = await run_bot(**settings)
    long_one = await fake.invoke(fake.guild.add_member("long"), "music", {"prompt": "long drone", "seconds": 20})
    await long_one.wait(lambda i: says(i, "Generating"), 30)
    waiting = [await fake.invoke(fake.guild.add_member(f"m{n}"), "music", {"prompt": f"short {n}", "seconds": 1})
               for n in range(2)]
    for interaction in waiting:
        await interaction.wait(lambda i: says(i, "position"), 10)
    bot.kill()
    await bot.wait_exit()
    assert long_one.files == [] and all(i.files == [] for i in waiting)

    again = await run_bot(**settings)
    everyone = [long_one, *waiting]
    for interaction in everyone:
        await interaction.wait_files(1, timeout=90)
    await asyncio.sleep(1.0)  # anything delivered twice would arrive by now
    assert [len(i.files) for i in everyone] == [1, 1, 1]
    assert len(fake.files) == 3
    assert [frames(i.files[0].data) for i in everyone] == [20 * RATE, RATE, RATE]
    assert "recovered: queued again" in again.log
    assert await again.stop() == 0


async def test_hostile_input_gets_clear_ephemeral_answers(
        fake_discord: FakeDiscord, run_bot: Callable[..., Awaitable[BotProcess]], tiny_model: Path) -> None:
    fake = fake_discord
    bot = await run_bot(MUSICGEN_MODEL=str(tiny_model), COOLDOWN_SECONDS="0")
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
    [wav] = await fine.wait_files(1, timeout=60)
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
