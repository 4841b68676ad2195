"""One way to answer a member politely: an ephemeral message, whether or not the interaction was answered yet."""

from __future__ import annotations

import logging

import discord

log = logging.getLogger(__name__)

SERVERS_ONLY = "I make music in servers only; please use my commands in a server channel."
RESTARTING = "I'm restarting right now; please try again in a minute."
OUR_FAULT = "Sorry, something went wrong on my side (it has been logged). Please try again."


async def reply(interaction: discord.Interaction, message: str) -> None:
    """An ephemeral answer, as a followup when the interaction was already answered; never raises for Discord."""
    try:
        if interaction.response.is_done():
            await interaction.followup.send(message, ephemeral=True, allowed_mentions=discord.AllowedMentions.none(),
                                            suppress_embeds=True)
        else:
            await interaction.response.send_message(message, ephemeral=True, suppress_embeds=True,
                                                    allowed_mentions=discord.AllowedMentions.none())
    except discord.HTTPException as exc:
        log.warning("could not answer interaction %s: %s", interaction.id, exc)
