"""Point an in-process discord.py client at a FakeDiscord (for tests that run a bot in the test's loop)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

from .server import FakeDiscord


@contextlib.contextmanager
def use_fake(fake: FakeDiscord) -> Iterator[None]:
    """Within the block, discord.py's REST base and gateway URL are the fake's (restored afterwards).

    A bot run as a subprocess does the same from ``DISCORD_API_BASE`` / ``DISCORD_GATEWAY_URL``.
    """
    old_base, old_gateway = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    Route.BASE = fake.api_base
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
    try:
        yield
    finally:
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = old_base, old_gateway


__all__ = ["use_fake"]
