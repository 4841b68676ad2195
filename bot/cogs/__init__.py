"""Slash-command cogs, one feature each: music (/music, /queue, /cancel), sessions (/session) and admin (/admin)."""

from __future__ import annotations

import dataclasses

from discord import app_commands


def set_max_value(command: app_commands.Command, parameter: str, value: int) -> None:
    """Set an integer option's ``max_value`` at run time (e.g. from settings and the model's maximum length).

    Each cog instance has its own copy of the command's parameter table, so the class-level command is untouched.
    """
    params = command._params  # noqa: SLF001 - discord.py has no public way to change a bound after definition
    params[parameter] = dataclasses.replace(params[parameter], max_value=value)


def remove_option(command: app_commands.Command, parameter: str) -> None:
    """Leave an optional option out of this cog instance's command (e.g. ``melody`` when the model takes none):
    it is not synced, and the callback gets its default."""
    command._params.pop(parameter)  # noqa: SLF001 - as set_max_value
