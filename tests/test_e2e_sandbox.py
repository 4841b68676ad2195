"""End to end, members' uploads as an attacker would send them: playlists that point at a local listener and at a
local file, decompression bombs, a many-channel high-rate file, and a child that never answers while others use
the bot. ``python -m bot`` with a tiny random MusicGen through the fake Discord; its ``ffprobe`` is a stand-in on
PATH that reports its environment and hangs on request, and otherwise runs the real one."""

from __future__ import annotations

import asyncio
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import soundfile as sf

from tests.fake_discord import FakeDiscord, Interaction
from tests.fake_discord.process import BotProcess, bot_env
from tests.sandbox_helpers import (
    HANG_MARKER,
    Recorder,
    fake_ffprobe,
    ffconcat,
    ffmpeg_file,
    flac_claiming,
    hls_playlist,
    listener,
)

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]


@dataclass
class World:
    fake: FakeDiscord
    tmp: Path
    bot: BotProcess
    recorder: Recorder


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("e2e-sandbox")
    recorder = Recorder(tmp / "rec.sock")
    fake_ffprobe(tmp / "bin", recorder.path)
    async with FakeDiscord() as fake:
        env = bot_env(fake, tmp, MUSICGEN_MODEL=str(tiny_model), COOLDOWN_SECONDS="0", MAX_PENDING_PER_USER="4",
                      MAX_SECONDS="3", PATH=f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}")
        bot = BotProcess(fake, env, tmp / "bot.log")
        await bot.start()
        await bot.wait_ready(120)
        yield World(fake, tmp, bot, recorder)
        assert await bot.stop() == 0, bot.log
        assert "Traceback" not in bot.log, bot.log
    recorder.close()


async def ephemeral_answer(interaction: Interaction, timeout: float = 10.0) -> str:
    callback = await interaction.wait_callback(timeout)
    assert callback["type"] == 4 and interaction.ephemeral, callback
    return interaction.original.content


def wav(seconds: float) -> bytes:
    t = np.arange(int(44100 * seconds)) / 44100
    out = io.BytesIO()
    sf.write(out, (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 44100, format="WAV")
    return out.getvalue()


async def test_playlists_reach_neither_the_network_nor_local_files(world: World) -> None:
    secret = world.tmp / "secret.wav"
    secret.write_bytes(wav(1.0))
    alice = world.fake.guild.add_member("alice")
    async with listener() as (url, contacted):
        for name, data in (("hls.mp3", hls_playlist(url, secret)), ("concat.mp3", ffconcat(url, secret))):
            upload = world.fake.upload(name, data, "audio/mpeg")
            i = await world.fake.invoke(alice, "continue", {"audio": upload, "prompt": "more", "seconds": 1})
            assert "I can only read WAV, FLAC" in await ephemeral_answer(i)
        await asyncio.sleep(0.5)
    assert contacted == []
    assert not world.fake.files  # nothing came back as a clip


async def test_a_bomb_is_refused_and_a_wide_file_kept_at_the_model_rate(world: World) -> None:
    bob = world.fake.guild.add_member("bob")
    bomb = flac_claiming(world.tmp / "bomb.flac", 44100 * 36000)  # 10 hours, says a small FLAC
    wide = ffmpeg_file(world.tmp / "wide.flac", "-f", "lavfi", "-i", "anullsrc=r=384000:cl=7.1", "-t", "29")
    upload = world.fake.upload("bomb.flac", bomb, "audio/flac")
    i = await world.fake.invoke(bob, "continue", {"audio": upload, "prompt": "more", "seconds": 1})
    assert "too long (36000.0 s" in await ephemeral_answer(i)
    # 356 MB as float32 at its own rate; decoded while streaming to 29 s of the model's 32 kHz mono, and kept so
    wide_upload = world.fake.upload("wide.flac", wide, "audio/flac")
    i = await world.fake.invoke(bob, "continue", {"audio": wide_upload, "prompt": "more", "seconds": 1})
    await i.wait_files(2, timeout=60)
    kept = list((world.tmp / "clips").glob("upload-*"))
    assert kept and all(p.stat().st_size <= 30 * 32000 * 4 + 4096 for p in kept), kept


async def test_a_hanging_child_is_refused_while_others_are_served(world: World) -> None:
    fake = world.fake
    mallory, carol, dave = (fake.guild.add_member(n) for n in ("mallory", "carol", "dave"))
    hang = wav(0.5) + HANG_MARKER
    started = time.monotonic()
    hanging = [await fake.invoke(mallory, "continue", {"audio": fake.upload(f"h{n}.wav", hang, "audio/wav"),
                                                       "prompt": "x", "seconds": 1}) for n in range(3)]
    music = await fake.invoke(carol, "music", {"prompt": "tiny synth", "seconds": 1})
    good = await fake.invoke(dave, "continue", {"audio": fake.upload("mine.wav", wav(1.0), "audio/wav"),
                                                "prompt": "and then drums", "seconds": 1})
    for i in hanging:
        assert "took too long to read" in await ephemeral_answer(i)
    assert time.monotonic() - started < 10
    await music.wait_files(2, timeout=60)
    await good.wait_files(2, timeout=60)
    # the children saw none of the bot's environment (DISCORD_TOKEN is in it)
    records = [r for r in world.recorder.records() if "env" in r]
    assert records and all(r["env"] == {"OPENBLAS_NUM_THREADS": "1"} for r in records)
    grandchildren = [r["grandchild"] for r in world.recorder.records() if "grandchild" in r]
    assert grandchildren
    for pid in grandchildren:  # killed with the child's process group
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        except FileNotFoundError:
            continue
        assert state == "Z", state
