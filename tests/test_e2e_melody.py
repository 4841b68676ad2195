"""End to end: ``/music prompt seconds melody:<wav>`` with a tiny random melody checkpoint, through the real
discord.py client and the fake Discord: the option is offered, the clip has the exact length and names its melody,
Regenerate keeps the melody, and the job (with its tune) is in the database."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.test_e2e_extras import audio_of, delivered, frames

pytestmark = [pytest.mark.e2e]

RATE = 32000


def _tune() -> bytes:
    t = np.arange(2 * 22050) / 22050
    notes = np.where(t < 1, 261.63, 392.0)
    out = io.BytesIO()
    sf.write(out, (0.4 * np.sin(2 * np.pi * notes * t)).astype(np.float32), 22050, format="WAV")
    return out.getvalue()


async def test_music_follows_a_melody_attachment(run_bot, fake_discord, tiny_melody_model: Path, tmp_path: Path):
    bot = await run_bot(MUSICGEN_MODEL=str(tiny_melody_model), MAX_SECONDS="2", COOLDOWN_SECONDS="0")
    fake = fake_discord
    options = {o["name"]: o for o in fake.command("music")["options"]}
    assert options["melody"]["type"] == 11 and not options["melody"].get("required")  # an optional attachment

    dana = fake.guild.add_member("dana")
    upload = fake.upload("my tune.wav", _tune(), "audio/wav")
    interaction = await fake.invoke(dana, "music", {"prompt": "tiny synth", "seconds": 2, "melody": upload})
    message = await delivered(interaction)
    assert frames(audio_of(message)) == (2 * RATE, RATE)
    assert "**Melody:** my tune.wav" in message.content
    parent_id = int(message.custom_ids[0].rsplit(":", 1)[1])

    regen = await delivered(await fake.click(message, f"clip:regen:{parent_id}", dana))
    assert frames(audio_of(regen)) == (2 * RATE, RATE)
    assert "**Melody:** my tune.wav" in regen.content  # the same tune

    plain = await delivered(await fake.invoke(dana, "music", {"prompt": "tiny synth", "seconds": 1}))
    assert frames(audio_of(plain)) == (RATE, RATE) and "Melody" not in plain.content  # text alone

    with sqlite3.connect(tmp_path / "bot.sqlite3") as db:
        rows = db.execute("SELECT id, melody_path, melody_name FROM jobs ORDER BY id").fetchall()
    assert rows[0][2] == rows[1][2] == "my tune.wav" and rows[0][1] == rows[1][1]  # Regenerate shares the file
    assert Path(rows[0][1]).is_file() and rows[2][1] is None
    assert await bot.stop() == 0
    assert "Traceback" not in bot.log, bot.log
