"""Records of the fake Discord: users, guilds, channels, messages, interactions, events.

Each record knows how to render itself as the JSON payload that Discord's API v10 would send, with just the
fields discord.py 2.7 reads. Tests read the records directly (``message.content``, ``attachment.data``).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import FakeDiscord

DISCORD_EPOCH_MS = 1420070400000

# permission bits (https://discord.com/developers/docs/topics/permissions)
CREATE_INSTANT_INVITE = 1 << 0
ADMINISTRATOR = 1 << 3
MANAGE_CHANNELS = 1 << 4
MANAGE_GUILD = 1 << 5
ADD_REACTIONS = 1 << 6
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
MANAGE_MESSAGES = 1 << 13
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
MENTION_EVERYONE = 1 << 17
USE_APPLICATION_COMMANDS = 1 << 31
MANAGE_THREADS = 1 << 34
CREATE_PUBLIC_THREADS = 1 << 35
CREATE_PRIVATE_THREADS = 1 << 36
SEND_MESSAGES_IN_THREADS = 1 << 38
ALL_PERMISSIONS = (1 << 51) - 1

EVERYONE_PERMISSIONS = (
    VIEW_CHANNEL | SEND_MESSAGES | EMBED_LINKS | ATTACH_FILES | READ_MESSAGE_HISTORY | ADD_REACTIONS
    | USE_APPLICATION_COMMANDS | CREATE_PUBLIC_THREADS | SEND_MESSAGES_IN_THREADS | CREATE_INSTANT_INVITE
)
BOT_PERMISSIONS = EVERYONE_PERMISSIONS | MANAGE_MESSAGES | MANAGE_THREADS | CREATE_PRIVATE_THREADS

# channel types
GUILD_TEXT = 0
DM = 1
PUBLIC_THREAD = 11
PRIVATE_THREAD = 12
THREAD_TYPES = (PUBLIC_THREAD, PRIVATE_THREAD)

# message flags
SUPPRESS_EMBEDS = 1 << 2
EPHEMERAL = 1 << 6
LOADING = 1 << 7

_counter = itertools.count(1)


def snowflake() -> int:
    """A fresh, increasing Discord snowflake (its timestamp is now)."""
    ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
    return (ms << 22) | (next(_counter) & 0x3FFFFF)


def iso_now() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass(eq=False)
class User:
    """A Discord user (a person or the bot)."""

    id: int
    name: str
    bot: bool = False

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id), "username": self.name, "global_name": self.name, "discriminator": "0",
            "avatar": None, "bot": self.bot, "public_flags": 0, "flags": 0,
        }

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"


@dataclass(eq=False)
class Role:
    id: int
    name: str
    permissions: int = 0
    position: int = 0

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id), "name": self.name, "permissions": str(self.permissions), "position": self.position,
            "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0,
        }

    @property
    def mention(self) -> str:
        return f"<@&{self.id}>"


@dataclass(eq=False)
class Member:
    """A user's membership in a guild, with its roles."""

    user: User
    guild: Guild
    roles: list[Role] = field(default_factory=list)
    nick: str | None = None
    joined_at: str = field(default_factory=iso_now)

    @property
    def id(self) -> int:
        return self.user.id

    @property
    def name(self) -> str:
        return self.user.name

    @property
    def mention(self) -> str:
        return self.user.mention

    @property
    def permissions(self) -> int:
        """Guild-level permissions: @everyone's plus every role's (all of them for admins and the owner)."""
        if self.user.id == self.guild.owner_id:
            return ALL_PERMISSIONS
        value = self.guild.everyone.permissions
        for role in self.roles:
            value |= role.permissions
        return ALL_PERMISSIONS if value & ADMINISTRATOR else value

    def payload(self, *, with_permissions: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "user": self.user.payload(), "roles": [str(r.id) for r in self.roles], "nick": self.nick,
            "joined_at": self.joined_at, "deaf": False, "mute": False, "flags": 0, "pending": False,
        }
        if with_permissions:
            data["permissions"] = str(self.permissions)
        return data


@dataclass(eq=False)
class Attachment:
    """A file uploaded by the bot; ``data`` holds its bytes."""

    id: int
    filename: str
    data: bytes
    content_type: str | None = None
    description: str | None = None
    url: str = ""

    @property
    def size(self) -> int:
        return len(self.data)

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": str(self.id), "filename": self.filename, "size": self.size, "url": self.url,
            "proxy_url": self.url, "content_type": self.content_type,
        }
        if self.description:
            out["description"] = self.description
        return out


@dataclass(eq=False)
class Message:
    """A message in a channel. ``history`` keeps every earlier version's payload dict (oldest first)."""

    id: int
    channel: Channel
    author: User
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    flags: int = 0
    webhook_id: int | None = None
    interaction: Interaction | None = None
    deleted: bool = False
    edited_at: str | None = None
    timestamp: str = field(default_factory=iso_now)
    history: list[dict[str, Any]] = field(default_factory=list)
    nonce: str | None = None
    created: float = field(default_factory=time.monotonic)

    @property
    def suppress_embeds(self) -> bool:
        """Whether link previews are off for this message (flag SUPPRESS_EMBEDS)."""
        return bool(self.flags & SUPPRESS_EMBEDS)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def loading(self) -> bool:
        """True while this is a deferred ("thinking…") response that was not edited yet."""
        return bool(self.flags & LOADING)

    @property
    def custom_ids(self) -> list[str]:
        """custom_id of every component (buttons, selects) on the message."""
        found: list[str] = []

        def walk(items: list[dict[str, Any]]) -> None:
            for item in items:
                if "custom_id" in item:
                    found.append(item["custom_id"])
                walk(item.get("components", []))

        walk(self.components)
        return found

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id), "channel_id": str(self.channel.id), "type": 0 if self.interaction is None else 20,
            "author": self.author.payload(), "content": self.content, "embeds": self.embeds,
            "components": self.components, "attachments": [a.payload() for a in self.attachments],
            "flags": self.flags, "timestamp": self.timestamp, "edited_timestamp": self.edited_at,
            "tts": False, "mention_everyone": False, "mentions": [], "mention_roles": [], "pinned": False,
        }
        if self.channel.guild is not None:
            data["guild_id"] = str(self.channel.guild.id)
        if self.nonce is not None:
            data["nonce"] = self.nonce
        if self.webhook_id is not None:
            data["webhook_id"] = str(self.webhook_id)
            data["application_id"] = str(self.webhook_id)
        if self.interaction is not None:
            data["interaction_metadata"] = {
                "id": str(self.interaction.id), "type": self.interaction.type,
                "user": self.interaction.user.payload(),
                "authorizing_integration_owners": {},
            }
        return data


@dataclass(eq=False)
class Channel:
    """A guild text channel, a thread (``parent`` set) or a DM (``recipient`` set)."""

    id: int
    name: str
    type: int = GUILD_TEXT
    guild: Guild | None = None
    parent: Channel | None = None
    owner_id: int | None = None
    recipient: User | None = None
    archived: bool = False
    locked: bool = False
    auto_archive_duration: int = 1440
    position: int = 0
    messages: list[Message] = field(default_factory=list)
    created_at: str = field(default_factory=iso_now)

    @property
    def is_thread(self) -> bool:
        return self.type in THREAD_TYPES

    @property
    def mention(self) -> str:
        return f"<#{self.id}>"

    @property
    def files(self) -> list[Attachment]:
        """Every attachment of every message in this channel, in order."""
        return [a for m in self.messages for a in m.attachments]

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": str(self.id), "type": self.type, "name": self.name, "flags": 0}
        if self.type == DM:
            data["recipients"] = [self.recipient.payload()] if self.recipient else []
            data["last_message_id"] = None
            return data
        assert self.guild is not None
        data.update(
            guild_id=str(self.guild.id), position=self.position, permission_overwrites=[], nsfw=False,
            rate_limit_per_user=0, last_message_id=str(self.messages[-1].id) if self.messages else None,
        )
        if self.is_thread:
            assert self.parent is not None
            data.update(
                parent_id=str(self.parent.id), owner_id=str(self.owner_id), message_count=len(self.messages),
                member_count=1, total_message_sent=len(self.messages),
                thread_metadata={
                    "archived": self.archived, "locked": self.locked, "archive_timestamp": self.created_at,
                    "auto_archive_duration": self.auto_archive_duration, "create_timestamp": self.created_at,
                },
            )
        else:
            data.update(topic=None, parent_id=None, default_auto_archive_duration=1440)
        return data


class Guild:
    """A guild with roles, channels and members. Build it with ``add_role``, ``add_channel``, ``add_member``."""

    def __init__(self, fake: FakeDiscord, name: str, *, attachment_size_limit: int = 10 * 1024 * 1024) -> None:
        self.fake = fake
        self.id = snowflake()
        self.name = name
        self.attachment_size_limit = attachment_size_limit
        self.roles: dict[int, Role] = {self.id: Role(self.id, "@everyone", EVERYONE_PERMISSIONS, 0)}
        self.channels: dict[int, Channel] = {}
        self.members: dict[int, Member] = {}
        self.owner_id: int = 0  # nobody by default: owners bypass every permission check

    @property
    def everyone(self) -> Role:
        return self.roles[self.id]

    @property
    def text_channels(self) -> list[Channel]:
        return [c for c in self.channels.values() if c.type == GUILD_TEXT]

    @property
    def threads(self) -> list[Channel]:
        return [c for c in self.channels.values() if c.is_thread]

    def add_role(self, name: str, permissions: int = 0) -> Role:
        role = Role(snowflake(), name, permissions, position=len(self.roles))
        self.roles[role.id] = role
        self.fake.dispatch_soon("GUILD_ROLE_CREATE", {"guild_id": str(self.id), "role": role.payload()})
        return role

    def add_channel(self, name: str) -> Channel:
        channel = Channel(snowflake(), name, GUILD_TEXT, guild=self, position=len(self.channels))
        self.channels[channel.id] = channel
        self.fake._channels[channel.id] = channel
        self.fake.dispatch_soon("CHANNEL_CREATE", channel.payload())
        return channel

    def add_member(
        self, name: str | None = None, *, user: User | None = None, roles: list[Role] | tuple[Role, ...] = (),
        admin: bool = False,
    ) -> Member:
        """Add a member (a new user unless ``user`` is given). ``admin=True`` gives a role with MANAGE_GUILD."""
        if user is None:
            user = self.fake.add_user(name or f"user{len(self.members)}")
        role_list = list(roles)
        if admin:
            admin_role = next((r for r in self.roles.values() if r.name == "Admin"), None)
            role_list.append(admin_role or self.add_role("Admin", MANAGE_GUILD))
        member = Member(user, self, role_list)
        self.members[user.id] = member
        if self.fake.intents is not None and self.fake.intents & (1 << 1):  # GUILD_MEMBERS
            self.fake.dispatch_soon("GUILD_MEMBER_ADD", {**member.payload(), "guild_id": str(self.id)})
        return member

    def set_roles(self, member: Member, roles: list[Role]) -> None:
        """Change a member's roles (the bot is told with GUILD_MEMBER_UPDATE)."""
        member.roles = list(roles)
        self.fake.dispatch_soon("GUILD_MEMBER_UPDATE", {**member.payload(), "guild_id": str(self.id)})

    def payload(self) -> dict[str, Any]:
        """The full GUILD_CREATE payload."""
        return {
            "id": str(self.id), "name": self.name, "icon": None, "owner_id": str(self.owner_id or self.fake.bot.id),
            "unavailable": False, "large": False, "member_count": len(self.members),
            "roles": [r.payload() for r in self.roles.values()],
            "channels": [c.payload() for c in self.channels.values() if not c.is_thread],
            "threads": [c.payload() for c in self.channels.values() if c.is_thread],
            "members": [m.payload() for m in self.members.values()],
            "features": [], "emojis": [], "stickers": [], "presences": [], "voice_states": [],
            "stage_instances": [], "guild_scheduled_events": [], "soundboard_sounds": [],
            "premium_tier": 0, "preferred_locale": "en-US", "joined_at": iso_now(), "system_channel_id": None,
            "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
            "mfa_level": 0, "nsfw_level": 0, "afk_timeout": 300, "premium_progress_bar_enabled": False,
        }


@dataclass(eq=False)
class Interaction:
    """One interaction sent to the bot and everything the bot did with it.

    ``callbacks`` holds each callback body (``{"type": 5, "data": {...}}``); ``original`` is the response
    message (created by a type 4/5 callback); ``followups`` are the webhook messages (as on Discord, the first
    followup after a deferral fills in the original, so it is both); ``edits`` every edit payload to the original
    or a followup. ``files`` gathers every attachment of the original and of the followups.
    """

    id: int
    token: str
    type: int  # 2 application command, 3 component
    user: User
    member: Member | None
    channel: Channel
    command: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    custom_id: str | None = None
    message: Message | None = None  # the message a component belongs to
    dispatched_at: float = field(default_factory=time.monotonic)
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    callback_at: float | None = None
    original: Message | None = None
    followups: list[Message] = field(default_factory=list)
    edits: list[dict[str, Any]] = field(default_factory=list)
    expired: bool = False
    fake: FakeDiscord | None = field(default=None, repr=False)

    @property
    def callback_type(self) -> int | None:
        return self.callbacks[0]["type"] if self.callbacks else None

    @property
    def deferred(self) -> bool:
        return self.callback_type in (5, 6)

    @property
    def ephemeral(self) -> bool:
        """Whether the first response was ephemeral (fixed at callback time, as on Discord)."""
        if not self.callbacks:
            return False
        return bool((self.callbacks[0].get("data") or {}).get("flags", 0) & EPHEMERAL)

    @property
    def latency(self) -> float | None:
        """Seconds between dispatch and the first callback."""
        return None if self.callback_at is None else self.callback_at - self.dispatched_at

    @property
    def messages(self) -> list[Message]:
        found = [self.original] if self.original else []
        return found + [m for m in self.followups if m is not self.original]

    @property
    def files(self) -> list[Attachment]:
        return [a for m in self.messages for a in m.attachments]

    @property
    def text(self) -> str:
        """All current message contents (original then followups), joined by newlines."""
        return "\n".join(m.content for m in self.messages if m.content)

    async def wait(self, predicate: Any, timeout: float = 10.0) -> None:
        """Wait until ``predicate(self)`` is true (checked after every recorded event)."""
        assert self.fake is not None
        await self.fake.wait_until(lambda: predicate(self), timeout)

    async def wait_callback(self, timeout: float = 10.0) -> dict[str, Any]:
        await self.wait(lambda i: i.callbacks, timeout)
        return self.callbacks[0]

    async def wait_files(self, count: int = 1, timeout: float = 10.0) -> list[Attachment]:
        await self.wait(lambda i: len(i.files) >= count, timeout)
        return self.files

    async def wait_followups(self, count: int = 1, timeout: float = 10.0) -> list[Message]:
        await self.wait(lambda i: len(i.followups) >= count, timeout)
        return self.followups


@dataclass
class Event:
    """One thing that happened, in order: ``kind`` is e.g. ``"callback"``, ``"followup"``, ``"message"``,
    ``"edit"``, ``"delete"``, ``"thread"``, ``"channel_edit"``, ``"commands"``, ``"identify"``, ``"resume"``,
    ``"heartbeat"``,
    ``"dispatch"``, ``"request"`` (every HTTP request: data = (method, path, status)), ``"unhandled"``."""

    kind: str
    data: Any
    at: float = field(default_factory=time.monotonic)
