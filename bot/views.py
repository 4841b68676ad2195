"""Buttons under every delivered clip: Regenerate, Extend and Variation.

They are :class:`discord.ui.DynamicItem` buttons whose custom_id holds the action and the clip's job id
(``clip:extend:42``), registered once with ``bot.add_dynamic_items``: a click is understood from the custom_id
alone, so the buttons keep working after a restart without any view being stored. What a click does is in
:func:`bot.intake.follow_up` (same queue and limits as /music).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, cast

import discord

from . import intake

if TYPE_CHECKING:
    from .client import MusicBot

log = logging.getLogger(__name__)

# action -> (label, emoji, style)
ACTIONS: dict[str, tuple[str, str, discord.ButtonStyle]] = {
    "regen": ("Regenerate", "🔁", discord.ButtonStyle.secondary),
    "extend": ("Extend", "⏩", discord.ButtonStyle.primary),
    "vary": ("Variation", "🎲", discord.ButtonStyle.secondary),
}


def custom_id(action: str, job_id: int) -> str:
    return f"clip:{action}:{job_id}"


TEMPLATE = r"clip:(?P<action>regen|extend|vary):(?P<job_id>[0-9]{1,19})"


class ClipButton(discord.ui.DynamicItem[discord.ui.Button], template=TEMPLATE):
    """One of the three buttons of a clip; survives restarts (the custom_id carries everything)."""

    def __init__(self, action: str, job_id: int) -> None:
        label, emoji, style = ACTIONS[action]
        super().__init__(discord.ui.Button(label=label, emoji=emoji, style=style,
                                           custom_id=custom_id(action, job_id)))
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button,
                             match: re.Match[str], /) -> ClipButton:
        return cls(match["action"], int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        # the buttons are registered by the bot itself (cogs/music.py), so the client is always a MusicBot
        await intake.follow_up(cast("MusicBot", interaction.client), interaction, self.action, self.job_id)


def clip_view(job_id: int) -> discord.ui.View:
    """The buttons for a delivered clip (no timeout: the dynamic items answer clicks forever)."""
    view = discord.ui.View(timeout=None)
    for action in ACTIONS:
        view.add_item(ClipButton(action, job_id))
    return view
