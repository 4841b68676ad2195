"""Small helpers shared by the end-to-end tests that read what the bot sent to the fake Discord."""

from __future__ import annotations

import io

import soundfile as sf

from tests.fake_discord import Interaction

AUDIO = (".wav", ".ogg", ".mp3", ".flac", ".opus")


def frames(data: bytes) -> int:
    """Samples per channel in an encoded audio file."""
    return sf.info(io.BytesIO(data)).frames


def audio(files) -> list:
    """The audio attachments among ``files`` (a delivery may also carry a picture of the waveform)."""
    return [a for a in files if a.filename.endswith(AUDIO)]


async def clips(interaction: Interaction, n: int = 1, timeout: float = 60.0) -> list:
    """Wait until ``n`` audio files reached this interaction and return them."""
    await interaction.wait(lambda i: len(audio(i.files)) >= n, timeout)
    return audio(interaction.files)


def says(interaction: Interaction, text: str) -> bool:
    """Whether the interaction's original response currently contains ``text``."""
    return interaction.original is not None and text in interaction.original.content
