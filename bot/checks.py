"""Run-time permission checks for app commands.

``default_permissions`` only hides a command in the client (server admins can override it, and discord.py ignores
it on subcommands), so every admin action is checked again here: the member needs Manage Server in the channel, or
one of the configured admin roles, or to be a configured admin user.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import discord
from discord import app_commands

from .settings import Settings

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


def require_guild(interaction: discord.Interaction) -> None:
    """Raise :class:`NotInGuild` for an interaction from a DM."""
    if interaction.guild_id is None:
        raise NotInGuild()


def require_admin(interaction: discord.Interaction, settings: Settings) -> None:
    """Raise :class:`NotAdmin` unless :func:`is_admin`."""
    require_guild(interaction)
    if not is_admin(interaction, settings):
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
