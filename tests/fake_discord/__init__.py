"""A fake Discord (REST v10 + gateway) for end-to-end tests of a real discord.py bot. See README.md."""

from .models import (
    ADMINISTRATOR,
    MANAGE_GUILD,
    Attachment,
    Channel,
    Event,
    Guild,
    Interaction,
    Member,
    Message,
    Role,
    User,
)
from .server import DiscordError, FakeDiscord, Fault

__all__ = [
    "ADMINISTRATOR", "MANAGE_GUILD", "Attachment", "Channel", "DiscordError", "Event", "FakeDiscord", "Fault",
    "Guild", "Interaction", "Member", "Message", "Role", "User",
]
