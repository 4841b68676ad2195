"""Run-time permission checks for app commands.

``default_permissions`` only hides a command in the client (server admins can override it, and discord.py ignores
it on subcommands), so every admin action is checked again here: the member needs Manage Server in the channel, or
one of the configured admin roles, or to be a configured admin user, or to be one of the bot's owners
(``OWNER_USER_IDS``, or the application's owner or team). An admin acts on the server the command comes from only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import discord
from discord import app_commands
from discord.ext import commands

from .settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


class UserError(Exception):
    """An expected failure (bad option, wrong place, not allowed); the message is shown to the member as is."""


class NotAdmin(app_commands.CheckFailure):
    """The member may not use an admin action."""

    def __init__(self, message: str = "Only server managers and the bot's admins can do that.") -> None:
        super().__init__(message)


class NotInGuild(app_commands.NoPrivateMessage):
    """The command was used outside a server (a DM or a group DM)."""

    def __init__(self) -> None:
        super().__init__("This command works in a server, not in direct messages.")


def is_admin(interaction: discord.Interaction, settings: Settings) -> bool:
    """Whether the member who sent the interaction is an admin of the bot in this server."""
    user = interaction.user
    if user.id in settings.admin_user_ids:
        return True
    if interaction.guild_id is None or not isinstance(user, discord.Member):
        return False
    if interaction.permissions.manage_guild or interaction.permissions.administrator:
        return True
    return any(role.id in settings.admin_role_ids for role in user.roles)


async def is_owner(interaction: discord.Interaction, settings: Settings) -> bool:
    """Whether the member is one of the bot's owners: in ``OWNER_USER_IDS``, or the application's owner (or a
    member of the team that owns it, as discord.py's :meth:`~discord.ext.commands.Bot.is_owner` reads it)."""
    if interaction.user.id in settings.owner_user_ids:
        return True
    client = interaction.client
    if not isinstance(client, commands.bot.BotBase):  # Bot and AutoShardedBot
        return False
    try:
        return await client.is_owner(interaction.user)
    except discord.HTTPException as exc:  # the application's details could not be read: not an owner this time
        log.warning("could not read the application's owner: %s", exc)
        return False


async def is_admin_here(interaction: discord.Interaction, settings: Settings) -> bool:
    """:func:`is_admin`, or one of the bot's owners (who are admins in every server)."""
    return is_admin(interaction, settings) or await is_owner(interaction, settings)


def require_guild(interaction: discord.Interaction) -> None:
    """Raise :class:`NotInGuild` for an interaction from a DM."""
    if interaction.guild_id is None:
        raise NotInGuild()


def require_admin(interaction: discord.Interaction, settings: Settings) -> None:
    """Raise :class:`NotAdmin` unless :func:`is_admin`."""
    require_guild(interaction)
    if not is_admin(interaction, settings):
        raise NotAdmin()


async def require_admin_here(interaction: discord.Interaction, settings: Settings) -> None:
    """Raise :class:`NotAdmin` unless :func:`is_admin_here` (in a server)."""
    require_guild(interaction)
    if not await is_admin_here(interaction, settings):
        raise NotAdmin()


def admin_only() -> Callable[[T], T]:
    """Decorator for a command: hidden from non-managers (``default_permissions``) *and* checked at run time.

    The settings are read from ``interaction.client.settings``.
    """

    def predicate(interaction: discord.Interaction) -> bool:
        require_admin(interaction, interaction.client.settings)  # type: ignore[attr-defined]
        return True

    def decorator(func: T) -> T:
        func = app_commands.default_permissions(manage_guild=True)(func)
        return app_commands.check(predicate)(func)

    return decorator
