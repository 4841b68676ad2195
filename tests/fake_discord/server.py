"""An aiohttp server on 127.0.0.1 that speaks enough of Discord's REST v10 and gateway v10 for a real
discord.py client: log in, connect, sync application commands, receive interactions, answer them.

Everything the bot does is recorded (see ``models.Event``); tests play users with ``invoke`` and ``click``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .models import (
    BOT_PERMISSIONS,
    DM,
    EPHEMERAL,
    LOADING,
    PRIVATE_THREAD,
    PUBLIC_THREAD,
    SUPPRESS_EMBEDS,
    Attachment,
    Channel,
    Event,
    Guild,
    Interaction,
    Member,
    Message,
    User,
    snowflake,
)

log = logging.getLogger(__name__)

API_PREFIX = re.compile(r"^/api/v(9|10)(/.*)$")

# gateway opcodes
DISPATCH, HEARTBEAT, IDENTIFY, PRESENCE, VOICE, RESUME, RECONNECT, REQUEST_MEMBERS = 0, 1, 2, 3, 4, 6, 7, 8
INVALID_SESSION, HELLO, HEARTBEAT_ACK = 9, 10, 11

# application command option types
SUB_COMMAND, SUB_COMMAND_GROUP, STRING, INTEGER, BOOLEAN, USER, CHANNEL, ROLE, MENTIONABLE, NUMBER = range(1, 11)
ATTACHMENT = 11


class DiscordError(Exception):
    """An error answer: HTTP status plus Discord's JSON error body."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status, self.code, self.message = status, code, message


def unknown_channel() -> DiscordError:
    return DiscordError(404, 10003, "Unknown Channel")


def unknown_message() -> DiscordError:
    return DiscordError(404, 10008, "Unknown Message")


def invalid_token() -> DiscordError:
    return DiscordError(401, 50027, "Invalid Webhook Token")


@dataclass
class Fault:
    """The next ``times`` requests matching ``method`` and the glob ``path`` are answered with ``status``."""

    method: str
    path: str
    status: int
    times: int = 1
    retry_after: float = 0.05
    code: int | None = None
    message: str | None = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and (self.method in ("*", method)) and fnmatch.fnmatchcase(path, self.path)

    def error(self) -> tuple[int, dict[str, Any], dict[str, str]]:
        headers: dict[str, str] = {}
        if self.status == 429:
            body: dict[str, Any] = {
                "message": self.message or "You are being rate limited.", "retry_after": self.retry_after,
                "global": False, "code": self.code or 0,
            }
            # discord.py treats a 429 without ``Via`` as a Cloudflare ban
            headers = {
                "Via": "1.1 google", "Retry-After": f"{self.retry_after:.3f}", "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "0", "X-RateLimit-Reset-After": f"{self.retry_after:.3f}",
                "X-RateLimit-Reset": f"{time.time() + self.retry_after:.3f}", "X-RateLimit-Scope": "user",
            }
        else:
            defaults = {
                500: (0, "500: Internal Server Error"), 502: (0, "502: Bad Gateway"),
                413: (40005, "Request entity too large"), 404: (10003, "Unknown Channel"),
                403: (50013, "Missing Permissions"), 401: (50027, "Invalid Webhook Token"),
                400: (50035, "Invalid Form Body"),
            }
            code, message = defaults.get(self.status, (0, f"{self.status}: Error"))
            body = {"message": self.message or message, "code": self.code if self.code is not None else code}
        return self.status, body, headers


@dataclass
class Body:
    """A request body: the JSON payload (``payload_json`` for multipart) and uploaded ``files[n]``."""

    json: Any = None
    files: dict[int, tuple[str, str | None, bytes]] = field(default_factory=dict)


Handler = Callable[..., Awaitable[Any]]


class FakeDiscord:
    """A fake Discord server for one bot. Use as ``async with FakeDiscord() as fake:``.

    Point the bot at ``api_base`` and ``gateway_url`` (see ``env()``), build the guild with
    ``fake.guild.add_member(...)``, then ``await fake.wait_ready()`` and play users with ``invoke``/``click``.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        bot_name: str = "MusicBot",
        guild_name: str = "Test Guild",
        attachment_size_limit: int = 10 * 1024 * 1024,
        callback_deadline: float | None = 3.0,
        token_lifetime: float | None = 15 * 60,
        heartbeat_interval: float = 41.25,
        nonce_window: float = 5 * 60,
    ) -> None:
        self.token = token or f"fake.{secrets.token_hex(12)}"
        self.callback_deadline = callback_deadline
        self.token_lifetime = token_lifetime  # seconds of webhook (followup/edit) life; None = forever
        self.heartbeat_interval = heartbeat_interval
        self.nonce_window = nonce_window  # seconds a nonce sent with enforce_nonce is remembered
        # awaited with each message the bot posts (channel message or followup), after it is stored and before the
        # bot gets the answer: a test can kill the bot there
        self.on_posted: Callable[[Message], Awaitable[None]] | None = None
        self.application_id = snowflake()
        self.bot = User(self.application_id, bot_name, bot=True)
        self.owner = User(snowflake(), "app-owner")
        self.users: dict[int, User] = {self.bot.id: self.bot, self.owner.id: self.owner}
        self._channels: dict[int, Channel] = {}
        self.guilds: dict[int, Guild] = {}
        self._identified = False
        self.global_commands: list[dict[str, Any]] = []
        self.guild_commands: dict[int, list[dict[str, Any]]] = {}
        self.interactions: dict[int, Interaction] = {}
        self.uploads: list[Attachment] = []  # files members attach to command options (see ``upload``)
        self._by_token: dict[str, Interaction] = {}
        self.events: list[Event] = []
        self.faults: list[Fault] = []
        self.intents: int | None = None

        self._changed = asyncio.Event()
        self._ws: web.WebSocketResponse | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self._session_id: str | None = None
        self._seq = 0
        self._sent: list[dict[str, Any]] = []  # dispatches of the current session, for RESUME
        self._pending: list[tuple[str, dict[str, Any]]] = []  # from dispatch_soon
        self._send_lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._routes: list[tuple[str, re.Pattern[str], Handler, str]] = []
        self._build_routes()

        self.guild = self.add_guild(guild_name, attachment_size_limit=attachment_size_limit)
        self.channel = self.guild.add_channel("general")
        self.guild.add_member(user=self.bot, roles=[self.guild.add_role(bot_name, BOT_PERMISSIONS)])

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> FakeDiscord:
        app = web.Application(client_max_size=512 * 1024 * 1024)
        app.router.add_get("/", self._gateway)
        app.router.add_get("/attachments/{channel}/{id}/{filename}", self._serve_attachment)
        app.router.add_route("*", "/api/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[union-attr]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("fake Discord listening on %s", self.base_url)
        return self

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        """Value for ``DISCORD_API_BASE`` (``discord.http.Route.BASE``)."""
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        """Value for ``DISCORD_GATEWAY_URL`` (``DiscordWebSocket.DEFAULT_GATEWAY``)."""
        return f"ws://127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        """Environment variables that point a bot at this server."""
        return {
            "DISCORD_TOKEN": self.token, "DISCORD_API_BASE": self.api_base, "DISCORD_GATEWAY_URL": self.gateway_url,
            "DISCORD_GUILD_IDS": ",".join(str(g) for g in self.guilds),
        }

    # ------------------------------------------------------------------ world building

    def add_user(self, name: str) -> User:
        user = User(snowflake(), name)
        self.users[user.id] = user
        return user

    def add_guild(self, name: str, *, attachment_size_limit: int = 10 * 1024 * 1024) -> Guild:
        """Add a guild (before the bot connects, or it is sent as GUILD_CREATE at once)."""
        guild = Guild(self, name, attachment_size_limit=attachment_size_limit)
        self.guilds[guild.id] = guild
        if hasattr(self, "guild"):  # not the default guild: it gets the bot now, the defaults' way
            guild.add_member(user=self.bot, roles=[guild.add_role(self.bot.name, BOT_PERMISSIONS)])
            guild.add_channel("general")
            self._pending = [p for p in self._pending if p[1].get("guild_id") != str(guild.id)]
            self.dispatch_soon("GUILD_CREATE", guild.payload())
        return guild

    def dm_channel(self, user: User | Member) -> Channel:
        """The DM channel between ``user`` and the bot (created on first use)."""
        user = user.user if isinstance(user, Member) else user
        for channel in self._channels.values():
            if channel.type == DM and channel.recipient is user:
                return channel
        channel = Channel(snowflake(), "", DM, recipient=user)
        self._channels[channel.id] = channel
        return channel

    def get_channel(self, channel_id: int) -> Channel | None:
        return self._channels.get(int(channel_id))

    @property
    def channels(self) -> list[Channel]:
        return list(self._channels.values())

    @property
    def messages(self) -> list[Message]:
        """Every message in every channel (including ephemeral interaction responses), in creation order."""
        return sorted((m for c in self._channels.values() for m in c.messages), key=lambda m: m.id)

    @property
    def channel_messages(self) -> list[Message]:
        """Messages the bot posted with ``POST /channels/{id}/messages`` (not interaction responses)."""
        return [m for m in self.messages if m.interaction is None and m.webhook_id is None]

    def upload(self, filename: str, data: bytes, content_type: str | None = None) -> Attachment:
        """A file a member attaches to a command option: pass it as the option's value in ``invoke``. It is
        served from the fake CDN at its ``url`` like a real attachment."""
        attachment = Attachment(snowflake(), filename, data, content_type)
        attachment.url = f"{self.base_url}/attachments/0/{attachment.id}/{filename}"
        self.uploads.append(attachment)
        return attachment

    @property
    def files(self) -> list[Attachment]:
        """Every attachment of every message."""
        return [a for m in self.messages for a in m.attachments]

    def commands(self, guild: Guild | int | None = None) -> list[dict[str, Any]]:
        """Registered command schemas: global (``guild=None``) or for a guild."""
        if guild is None:
            return self.global_commands
        return self.guild_commands.get(guild if isinstance(guild, int) else guild.id, [])

    def command(self, name: str, guild: Guild | int | None = None) -> dict[str, Any]:
        """One registered command by name: the guild's first (default guild), then global."""
        gid = (guild if isinstance(guild, int) else guild.id) if guild is not None else self.guild.id
        for cmd in self.guild_commands.get(gid, []) + self.global_commands:
            if cmd["name"] == name:
                return cmd
        raise KeyError(f"command {name!r} is not registered (have {[c['name'] for c in self.all_commands()]})")

    def all_commands(self) -> list[dict[str, Any]]:
        return self.global_commands + [c for cmds in self.guild_commands.values() for c in cmds]

    # ------------------------------------------------------------------ events and waiting

    def record(self, kind: str, data: Any) -> Event:
        event = Event(kind, data)
        self.events.append(event)
        self._changed.set()
        return event

    def events_of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    async def wait_until(self, condition: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Wait until ``condition()`` is truthy (re-checked after every event) and return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                recent = [(e.kind, repr(e.data)[:300]) for e in self.events[-8:]]
                raise TimeoutError(f"condition not met within {timeout} s; last events: {recent}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.25))
            except asyncio.TimeoutError:
                pass

    async def wait_for(self, predicate: Callable[[Event], Any], timeout: float = 10.0) -> Event:
        """Wait for the first event (past or future) for which ``predicate(event)`` is truthy."""

        def first() -> Event | None:
            return next((e for e in self.events if predicate(e)), None)

        return await self.wait_until(first, timeout)

    def is_ready(self, *, commands: bool = True, after: int = 0) -> bool:
        """Whether a bot identified (and, if ``commands``, synced commands) in ``events[after:]``."""
        kinds = {e.kind for e in self.events[after:]}
        return "identify" in kinds and ("commands" in kinds or not commands)

    async def wait_ready(self, timeout: float = 60.0, *, commands: bool = True, after: int = 0) -> None:
        """Wait until the bot has identified on the gateway and (if ``commands``) synced its commands.

        ``after`` is an index into ``events``: pass ``len(fake.events)`` taken before a restart to wait for the
        new process rather than the old one.
        """
        await self.wait_until(lambda: self.is_ready(commands=commands, after=after), timeout)

    # ------------------------------------------------------------------ fault injection and tokens

    def fail(
        self, method: str, path: str, status: int, *, times: int = 1, retry_after: float = 0.05,
        code: int | None = None, message: str | None = None,
    ) -> Fault:
        """Answer the next ``times`` requests matching ``method`` ("*" for any) and the glob ``path`` (after
        ``/api/v10``, e.g. ``"/webhooks/*"``) with ``status`` (500, 429, 413, 404 unknown channel, ...)."""
        fault = Fault(method.upper(), path, status, times, retry_after, code, message)
        self.faults.append(fault)
        return fault

    def expire(self, interaction: Interaction) -> None:
        """Expire the interaction's token now: webhook calls answer 401 50027, callbacks 404 10062.
        (Set ``token_lifetime`` to expire every token that many seconds after dispatch, callbacks excepted.)"""
        interaction.expired = True

    def _token_expired(self, interaction: Interaction) -> bool:
        if self.token_lifetime is not None and time.monotonic() - interaction.dispatched_at > self.token_lifetime:
            interaction.expired = True
        return interaction.expired

    # ------------------------------------------------------------------ playing users

    async def invoke(
        self,
        user: Member | User,
        command: str | tuple[str, ...],
        options: dict[str, Any] | None = None,
        *,
        channel: Channel | None = None,
        validate: bool = True,
        locale: str = "en-US",
    ) -> Interaction:
        """Send an application command interaction, as ``user`` typing ``/command`` in ``channel``.

        ``command`` is ``"music"`` or a subcommand path, ``"admin remove"`` / ``("admin", "remove")``.
        Option types come from the registered schema; with ``validate`` the options are checked as the Discord
        client would (required, choices, ranges, lengths); ``validate=False`` sends them as given.
        """
        self._require_bot()
        path = tuple(command.split()) if isinstance(command, str) else tuple(command)
        channel = channel or self.channel
        guild = self._guild_of(channel)
        schema = self.command(path[0], guild)
        node = schema
        for name in path[1:]:
            node = next((o for o in node.get("options", []) if o["name"] == name and o["type"] in (1, 2)), None)
            if node is None:
                raise KeyError(f"/{' '.join(path)} is not registered")
        if any(o["type"] in (SUB_COMMAND, SUB_COMMAND_GROUP) for o in node.get("options", [])):
            raise ValueError(f"/{' '.join(path)} needs a subcommand")
        resolved: dict[str, Any] = {}
        leaf = self._build_options(node, options or {}, validate, resolved, guild)
        for name in reversed(path[1:]):
            sub_type = next(o["type"] for o in self._walk(schema, path) if o["name"] == name)
            leaf = [{"name": name, "type": sub_type, "options": leaf}]
        data: dict[str, Any] = {"id": schema["id"], "name": path[0], "type": schema.get("type", 1), "options": leaf}
        if schema.get("guild_id"):
            data["guild_id"] = schema["guild_id"]
        if resolved:
            data["resolved"] = resolved
        interaction = self._new_interaction(2, user, channel, command=path, options=dict(options or {}))
        await self.dispatch("INTERACTION_CREATE", self._interaction_payload(interaction, data))
        return interaction

    async def click(self, message: Message, custom_id: str, user: Member | User, *, values: list[str] | None = None
                    ) -> Interaction:
        """Send a component interaction: ``user`` clicks the button (or picks ``values`` in the select)
        ``custom_id`` on ``message``."""
        self._require_bot()
        component = self._find_component(message.components, custom_id)
        if component is None:
            raise KeyError(f"no component {custom_id!r} on message {message.id} (have {message.custom_ids})")
        if component.get("disabled"):
            raise ValueError(f"component {custom_id!r} is disabled")
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component["type"]}
        if values is not None:
            data["values"] = values
        interaction = self._new_interaction(3, user, message.channel, custom_id=custom_id, message=message)
        payload = self._interaction_payload(interaction, data)
        payload["message"] = message.payload()
        await self.dispatch("INTERACTION_CREATE", payload)
        return interaction

    def _require_bot(self) -> None:
        if self._ws is None or self._ws.closed:
            raise RuntimeError("no bot is connected to the fake gateway (wait_ready() first?)")

    def _walk(self, schema: dict[str, Any], path: tuple[str, ...]) -> list[dict[str, Any]]:
        found, node = [], schema
        for name in path[1:]:
            node = next(o for o in node.get("options", []) if o["name"] == name)
            found.append(node)
        return found

    @staticmethod
    def _find_component(items: list[dict[str, Any]], custom_id: str) -> dict[str, Any] | None:
        for item in items:
            if item.get("custom_id") == custom_id:
                return item
            found = FakeDiscord._find_component(item.get("components", []), custom_id)
            if found is not None:
                return found
        return None

    def _guild_of(self, channel: Channel) -> Guild | None:
        return channel.guild

    def _build_options(
        self, node: dict[str, Any], given: dict[str, Any], validate: bool, resolved: dict[str, Any],
        guild: Guild | None,
    ) -> list[dict[str, Any]]:
        schema = {o["name"]: o for o in node.get("options", [])}
        if validate:
            unknown = set(given) - set(schema)
            if unknown:
                raise ValueError(f"unknown options {sorted(unknown)}; the command has {sorted(schema)}")
            for name, opt in schema.items():
                if opt.get("required") and name not in given:
                    raise ValueError(f"option {name!r} is required")
        out = []
        for name, value in given.items():
            opt = schema.get(name, {"type": STRING})
            kind = opt["type"]
            if validate:
                self._check_option(name, opt, value)
            if kind in (USER, MENTIONABLE) and isinstance(value, (User, Member)):
                user = value.user if isinstance(value, Member) else value
                resolved.setdefault("users", {})[str(user.id)] = user.payload()
                if guild is not None and user.id in guild.members:
                    member = guild.members[user.id].payload(with_permissions=True)
                    member.pop("user")
                    resolved.setdefault("members", {})[str(user.id)] = member
                value = str(user.id)
            elif kind == CHANNEL and isinstance(value, Channel):
                resolved.setdefault("channels", {})[str(value.id)] = {
                    "id": str(value.id), "name": value.name, "type": value.type, "permissions": str(BOT_PERMISSIONS)}
                value = str(value.id)
            elif kind == ATTACHMENT and isinstance(value, Attachment):
                resolved.setdefault("attachments", {})[str(value.id)] = value.payload()
                value = str(value.id)
            elif kind == ROLE and hasattr(value, "permissions") and hasattr(value, "position"):
                resolved.setdefault("roles", {})[str(value.id)] = value.payload()
                value = str(value.id)
            out.append({"name": name, "type": kind, "value": value})
        return out

    @staticmethod
    def _check_option(name: str, opt: dict[str, Any], value: Any) -> None:
        kind = opt["type"]
        if kind == STRING:
            if not isinstance(value, str):
                raise ValueError(f"option {name!r} must be a string")
            if not opt.get("min_length", 0) <= len(value) <= opt.get("max_length", 6000):
                raise ValueError(f"option {name!r}: length {len(value)} out of range")
        elif kind in (INTEGER, NUMBER):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    kind == INTEGER and not isinstance(value, int)):
                raise ValueError(f"option {name!r} must be {'an integer' if kind == INTEGER else 'a number'}")
            if "min_value" in opt and value < opt["min_value"] or "max_value" in opt and value > opt["max_value"]:
                raise ValueError(f"option {name!r}: {value} out of [{opt.get('min_value')}, {opt.get('max_value')}]")
        elif kind == BOOLEAN and not isinstance(value, bool):
            raise ValueError(f"option {name!r} must be a boolean")
        choices = opt.get("choices")
        if choices and value not in [c["value"] for c in choices]:
            raise ValueError(f"option {name!r}: {value!r} is not one of the choices")

    def _new_interaction(self, kind: int, user: Member | User, channel: Channel, **kwargs: Any) -> Interaction:
        guild = channel.guild
        member: Member | None = None
        if guild is not None:
            base = user.user if isinstance(user, Member) else user
            member = guild.members.get(base.id)
            if member is None:
                raise ValueError(f"{base.name} is not a member of {guild.name}")
        plain = user.user if isinstance(user, Member) else user
        interaction = Interaction(snowflake(), f"itok-{secrets.token_urlsafe(24)}", kind, plain, member, channel,
                                  fake=self, **kwargs)
        self.interactions[interaction.id] = interaction
        self._by_token[interaction.token] = interaction
        return interaction

    def _interaction_payload(self, interaction: Interaction, data: dict[str, Any]) -> dict[str, Any]:
        channel = interaction.channel
        guild = channel.guild
        payload: dict[str, Any] = {
            "id": str(interaction.id), "application_id": str(self.application_id), "type": interaction.type,
            "data": data, "token": interaction.token, "version": 1, "channel_id": str(channel.id),
            "channel": channel.payload(), "locale": "en-US", "entitlements": [],
            "attachment_size_limit": guild.attachment_size_limit if guild else self.guild.attachment_size_limit,
        }
        if guild is not None:
            assert interaction.member is not None
            bot_member = guild.members.get(self.bot.id)
            payload.update(
                guild_id=str(guild.id), guild={"id": str(guild.id), "locale": "en-US", "features": []},
                guild_locale="en-US", member=interaction.member.payload(with_permissions=True),
                app_permissions=str(bot_member.permissions if bot_member else BOT_PERMISSIONS),
                authorizing_integration_owners={"0": str(guild.id)}, context=0,
            )
        else:
            payload.update(
                user=interaction.user.payload(), app_permissions=str(BOT_PERMISSIONS), context=1,
                authorizing_integration_owners={"0": str(self.owner.id)},
            )
        return payload

    # ------------------------------------------------------------------ gateway

    def dispatch_soon(self, event: str, data: dict[str, Any]) -> None:
        """Queue a DISPATCH (from synchronous code); it goes out before any later ``dispatch``."""
        if not self._identified:
            return  # the bot will get the whole state in READY / GUILD_CREATE
        self._pending.append((event, data))
        try:
            asyncio.get_running_loop().create_task(self._flush())
        except RuntimeError:
            pass  # no loop: flushed by the next dispatch

    async def _flush(self) -> None:
        async with self._send_lock:
            while self._pending:
                await self._send_dispatch(*self._pending.pop(0))

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a DISPATCH to the connected bot (kept for RESUME if the socket is down)."""
        await self._flush()
        async with self._send_lock:
            await self._send_dispatch(event, data)

    async def _send_dispatch(self, event: str, data: dict[str, Any]) -> None:
        self._seq += 1
        frame = {"op": DISPATCH, "t": event, "s": self._seq, "d": data}
        self._sent.append(frame)
        self.record("dispatch", (event, data))
        if self._ws is not None and not self._ws.closed:
            try:
                await self._ws.send_str(json.dumps(frame))
            except (ConnectionResetError, RuntimeError) as exc:  # resent on RESUME
                log.warning("gateway send of %s failed: %s", event, exc)
        else:
            log.warning("no gateway connection: %s queued for RESUME", event)

    async def drop_gateway(self, code: int = 4000) -> None:
        """Close the bot's gateway connection (4000 lets it RESUME; 4004 means a bad token)."""
        if self._ws is not None:
            await self._ws.close(code=code)

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
        await ws.prepare(request)
        self._sockets.add(ws)
        self.record("connect", dict(request.query))
        try:
            await ws.send_str(json.dumps({"op": HELLO, "d": {"heartbeat_interval": int(self.heartbeat_interval * 1000)}}))
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                await self._on_frame(ws, frame)
        finally:
            self._sockets.discard(ws)
            if self._ws is ws:
                self._ws = None
        return ws

    async def _on_frame(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        op, d = frame.get("op"), frame.get("d")
        if op == HEARTBEAT:
            self.record("heartbeat", d)
            await ws.send_str(json.dumps({"op": HEARTBEAT_ACK}))
        elif op == IDENTIFY:
            if d.get("token") != self.token:
                await ws.close(code=4004, message=b"Authentication failed.")
                return
            self.intents = d.get("intents")
            self._ws = ws
            self._session_id = secrets.token_hex(16)
            self._seq, self._sent, self._pending = 0, [], []
            self.record("identify", {"intents": self.intents, "shard": d.get("shard")})
            shard = {"shard": d["shard"]} if d.get("shard") else {}  # Discord echoes the shard it was given
            await self.dispatch("READY", {**shard,
                "v": 10, "user": {**self.bot.payload(), "verified": True, "mfa_enabled": False},
                "guilds": [{"id": str(g), "unavailable": True} for g in self.guilds],
                "session_id": self._session_id, "resume_gateway_url": self.gateway_url,
                "application": {"id": str(self.application_id), "flags": 0}, "private_channels": [],
                "relationships": [], "presences": [], "guild_join_requests": [], "geo_ordered_rtc_regions": [],
            })
            for guild in self.guilds.values():
                await self.dispatch("GUILD_CREATE", guild.payload())
            self._identified = True
            self._changed.set()
        elif op == RESUME:
            if d.get("token") != self.token or d.get("session_id") != self._session_id:
                await ws.send_str(json.dumps({"op": INVALID_SESSION, "d": False}))
                return
            self._ws = ws
            self.record("resume", {"seq": d.get("seq")})
            for sent in self._sent:
                if sent["s"] > (d.get("seq") or 0):
                    await ws.send_str(json.dumps(sent))
            self._seq += 1
            await ws.send_str(json.dumps({"op": DISPATCH, "t": "RESUMED", "s": self._seq, "d": {}}))
        elif op == REQUEST_MEMBERS:
            guild = self.guilds.get(int(d["guild_id"]))
            members = [m.payload() for m in guild.members.values()] if guild else []
            await self.dispatch("GUILD_MEMBERS_CHUNK", {
                "guild_id": d["guild_id"], "members": members, "chunk_index": 0, "chunk_count": 1,
                "not_found": [], "nonce": d.get("nonce"),
            })

    # ------------------------------------------------------------------ REST plumbing

    def _route(self, method: str, pattern: str, handler: Handler, auth: str = "bot") -> None:
        regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
        self._routes.append((method, regex, handler, auth))

    def _build_routes(self) -> None:
        r = self._route
        r("GET", "/users/@me", self._get_me)
        r("GET", "/oauth2/applications/@me", self._get_app)
        r("GET", "/applications/@me", self._get_app)
        r("GET", "/gateway", self._get_gateway, auth="none")
        r("GET", "/gateway/bot", self._get_gateway)
        r("GET", "/applications/{app}/commands", self._get_commands)
        r("PUT", "/applications/{app}/commands", self._put_commands)
        r("GET", "/applications/{app}/guilds/{guild}/commands", self._get_commands)
        r("PUT", "/applications/{app}/guilds/{guild}/commands", self._put_commands)
        r("POST", "/interactions/{iid}/{token}/callback", self._callback, auth="none")
        r("POST", "/webhooks/{app}/{token}", self._followup, auth="none")
        r("GET", "/webhooks/{app}/{token}/messages/{mid}", self._webhook_get, auth="none")
        r("PATCH", "/webhooks/{app}/{token}/messages/{mid}", self._webhook_edit, auth="none")
        r("DELETE", "/webhooks/{app}/{token}/messages/{mid}", self._webhook_delete, auth="none")
        r("GET", "/channels/{cid}", self._get_channel)
        r("PATCH", "/channels/{cid}", self._edit_channel)
        r("GET", "/channels/{cid}/messages", self._history)
        r("POST", "/channels/{cid}/messages", self._post_message)
        r("GET", "/channels/{cid}/messages/{mid}", self._get_message)
        r("PATCH", "/channels/{cid}/messages/{mid}", self._edit_message)
        r("DELETE", "/channels/{cid}/messages/{mid}", self._delete_message)
        r("POST", "/channels/{cid}/threads", self._create_thread)
        r("POST", "/channels/{cid}/messages/{mid}/threads", self._create_thread)
        r("PUT", "/channels/{cid}/thread-members/{uid}", self._no_content)
        r("DELETE", "/channels/{cid}/thread-members/{uid}", self._no_content)
        r("POST", "/channels/{cid}/typing", self._no_content)
        r("PUT", "/channels/{cid}/messages/{mid}/reactions/{emoji}/@me", self._no_content)
        r("POST", "/users/@me/channels", self._create_dm)
        r("GET", "/users/{uid}", self._get_user)
        r("GET", "/guilds/{gid}", self._get_guild)
        r("GET", "/guilds/{gid}/channels", self._get_guild_channels)
        r("GET", "/guilds/{gid}/members/{uid}", self._get_member)
        r("GET", "/guilds/{gid}/roles", self._get_roles)

    @staticmethod
    def _headers(path: str) -> dict[str, str]:
        bucket = format(abs(hash(path)) & 0xFFFFFFFF, "08x")
        return {
            "X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "49", "X-RateLimit-Reset-After": "1.000",
            "X-RateLimit-Reset": f"{time.time() + 1:.3f}", "X-RateLimit-Bucket": bucket,
        }

    @staticmethod
    def _json(status: int, data: Any, headers: dict[str, str]) -> web.Response:
        # discord.py parses JSON only when Content-Type is exactly application/json (no charset)
        return web.Response(status=status, body=json.dumps(data).encode(),
                            headers={**headers, "Content-Type": "application/json"})

    async def _read_body(self, request: web.Request) -> Body:
        body = Body()
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, aiohttp.BodyPartReader):
                    continue
                if part.name == "payload_json":
                    body.json = json.loads(await part.text())
                else:
                    match = re.fullmatch(r"files\[(\d+)\]|file(\d*)", part.name or "")
                    if match is None:
                        continue
                    index = int(match.group(1) or match.group(2) or 0)
                    content_type = part.headers.get("Content-Type")
                    body.files[index] = (part.filename or f"file{index}", content_type, bytes(await part.read()))
        elif request.can_read_body:
            raw = await request.read()
            body.json = json.loads(raw) if raw else None
        return body

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        match = API_PREFIX.match(request.path)
        path = match.group(2) if match else request.path
        method = request.method
        headers = self._headers(path)
        status, data = 404, {"message": "404: Not Found", "code": 0}
        try:
            fault = next((f for f in self.faults if f.matches(method, path)), None)
            if fault is not None:
                fault.times -= 1
                fault.hits += 1
                status, data, extra = fault.error()
                headers.update(extra)
                self.record("fault", (method, path, status))
                return self._json(status, data, headers)
            for route_method, regex, handler, auth in self._routes:
                found = regex.match(path) if route_method == method else None
                if found is None:
                    continue
                if auth == "bot" and request.headers.get("Authorization") != f"Bot {self.token}":
                    status, data = 401, {"message": "401: Unauthorized", "code": 0}
                    return self._json(status, data, headers)
                body = await self._read_body(request)
                result = await handler(request, body, **found.groupdict())
                if result is None:
                    status = 204
                    return web.Response(status=204, headers=headers)
                status, data = 200, result
                return self._json(status, data, headers)
            log.warning("fake Discord has no route for %s %s", method, path)
            self.record("unhandled", (method, path))
            return self._json(status, data, headers)
        except DiscordError as exc:
            status, data = exc.status, {"message": exc.message, "code": exc.code}
            return self._json(status, data, headers)
        finally:
            self.record("request", (method, path, status))

    async def _serve_attachment(self, request: web.Request) -> web.Response:
        aid = int(request.match_info["id"])
        for attachment in [*self.files, *self.uploads]:
            if attachment.id == aid:
                return web.Response(body=attachment.data,
                                    headers={"Content-Type": attachment.content_type or "application/octet-stream"})
        return web.Response(status=404)

    async def _no_content(self, request: web.Request, body: Body, **_: str) -> None:
        return None

    # ------------------------------------------------------------------ REST: identity, commands

    async def _get_me(self, request: web.Request, body: Body) -> dict[str, Any]:
        return {**self.bot.payload(), "verified": True, "mfa_enabled": False}

    async def _get_app(self, request: web.Request, body: Body) -> dict[str, Any]:
        return {
            "id": str(self.application_id), "name": self.bot.name, "description": "", "icon": None,
            "bot_public": True, "bot_require_code_grant": False, "owner": self.owner.payload(),
            "verify_key": "00" * 32, "flags": 0, "summary": "", "team": None, "bot": self.bot.payload(),
        }

    async def _get_gateway(self, request: web.Request, body: Body) -> dict[str, Any]:
        return {"url": self.gateway_url.rstrip("/"), "shards": 1,
                "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}}

    def _check_app(self, app: str) -> None:
        if app != str(self.application_id):
            raise DiscordError(403, 50001, "Missing Access")

    async def _get_commands(self, request: web.Request, body: Body, app: str, guild: str | None = None
                            ) -> list[dict[str, Any]]:
        self._check_app(app)
        return self.global_commands if guild is None else self.guild_commands.get(int(guild), [])

    async def _put_commands(self, request: web.Request, body: Body, app: str, guild: str | None = None
                            ) -> list[dict[str, Any]]:
        self._check_app(app)
        if guild is not None and int(guild) not in self.guilds:
            raise DiscordError(404, 10004, "Unknown Guild")
        if not isinstance(body.json, list):
            raise DiscordError(400, 50035, "Invalid Form Body")
        old = {c["name"]: c for c in self.commands(int(guild) if guild else None)}
        stored = []
        for cmd in body.json:
            if not re.fullmatch(r"[-_\w]{1,32}", cmd.get("name", "")) or len(cmd.get("options", [])) > 25:
                raise DiscordError(400, 50035, f"Invalid Form Body (command {cmd.get('name')!r})")
            record = {
                "type": 1, "default_member_permissions": None, "dm_permission": True, "nsfw": False,
                "contexts": None, "integration_types": [0], **cmd,
                "id": old[cmd["name"]]["id"] if cmd["name"] in old else str(snowflake()),
                "application_id": str(self.application_id), "version": str(snowflake()),
            }
            if record["default_member_permissions"] is not None:  # Discord answers with a string
                record["default_member_permissions"] = str(record["default_member_permissions"])
            if guild is not None:
                record["guild_id"] = guild
            stored.append(record)
        if guild is None:
            self.global_commands = stored
        else:
            self.guild_commands[int(guild)] = stored
        self.record("commands", {"guild_id": int(guild) if guild else None, "commands": stored})
        return stored

    # ------------------------------------------------------------------ REST: messages

    def _channel(self, cid: str) -> Channel:
        channel = self._channels.get(int(cid)) if cid.isdigit() else None
        if channel is None:
            raise unknown_channel()
        return channel

    def _message(self, channel: Channel, mid: str) -> Message:
        for message in channel.messages:
            if str(message.id) == mid and not message.deleted:
                return message
        raise unknown_message()

    def _new_attachments(self, channel: Channel, body: Body, wanted: list[dict[str, Any]] | None
                         ) -> list[Attachment]:
        limit = channel.guild.attachment_size_limit if channel.guild else self.guild.attachment_size_limit
        if len(body.files) > 10:
            raise DiscordError(400, 50035, "Invalid Form Body: at most 10 files per message")
        out = []
        for index, (filename, content_type, data) in sorted(body.files.items()):
            if len(data) > limit:
                raise DiscordError(413, 40005, "Request entity too large")
            meta = next((a for a in wanted or [] if str(a.get("id")) == str(index)), {})
            aid = snowflake()
            name = meta.get("filename") or filename
            url = f"{self.base_url}/attachments/{channel.id}/{aid}/{name}"
            out.append(Attachment(aid, name, data, content_type, meta.get("description"), url))
        return out

    def _create_message(self, channel: Channel, body: Body, *, author: User | None = None,
                        interaction: Interaction | None = None, webhook: bool = False, flags: int = 0) -> Message:
        payload = body.json or {}
        content = payload.get("content") or ""
        if len(content) > 2000:
            raise DiscordError(400, 50035, "Invalid Form Body: content must be 2000 or fewer in length.")
        if not (content or payload.get("embeds") or body.files or payload.get("components") or flags & LOADING):
            raise DiscordError(400, 50006, "Cannot send an empty message")
        if channel.is_thread and channel.archived:
            if channel.locked:
                raise DiscordError(400, 50083, "Thread is archived")
            channel.archived = False  # sending into an archived, unlocked thread unarchives it
        message = Message(
            snowflake(), channel, author or self.bot, content=content, embeds=payload.get("embeds") or [],
            components=payload.get("components") or [],
            flags=flags | (payload.get("flags") or 0) & (EPHEMERAL | SUPPRESS_EMBEDS),
            webhook_id=self.application_id if webhook else None, interaction=interaction,
        )
        message.attachments = self._new_attachments(channel, body, payload.get("attachments"))
        channel.messages.append(message)
        return message

    def _edit(self, message: Message, body: Body) -> Message:
        payload = body.json or {}
        message.history.append(message.payload())
        if "content" in payload:
            content = payload["content"] or ""
            if len(content) > 2000:
                raise DiscordError(400, 50035, "Invalid Form Body: content must be 2000 or fewer in length.")
            message.content = content
        if "embeds" in payload:
            message.embeds = payload["embeds"] or []
        if "components" in payload:
            message.components = payload["components"] or []
        if payload.get("flags") is not None:  # of the flags, an edit can only set or clear SUPPRESS_EMBEDS
            message.flags = message.flags & ~SUPPRESS_EMBEDS | payload["flags"] & SUPPRESS_EMBEDS
        new = self._new_attachments(message.channel, body, payload.get("attachments"))
        if "attachments" in payload:
            keep = {str(a.get("id")) for a in payload["attachments"] or []}
            message.attachments = [a for a in message.attachments if str(a.id) in keep]
        message.attachments += new
        message.flags &= ~LOADING
        message.edited_at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        return message

    async def _get_channel(self, request: web.Request, body: Body, cid: str) -> dict[str, Any]:
        return self._channel(cid).payload()

    async def _history(self, request: web.Request, body: Body, cid: str) -> list[dict[str, Any]]:
        channel = self._channel(cid)
        limit = int(request.query.get("limit", 50))
        visible = [m for m in channel.messages if not m.deleted and not m.ephemeral]
        if "before" in request.query:
            visible = [m for m in visible if m.id < int(request.query["before"])]
        if "after" in request.query:
            visible = [m for m in visible if m.id > int(request.query["after"])]
        return [m.payload() for m in reversed(visible)][:limit]

    async def _post_message(self, request: web.Request, body: Body, cid: str) -> dict[str, Any]:
        channel = self._channel(cid)
        payload = body.json or {}
        nonce = payload.get("nonce")
        if nonce is not None and (not isinstance(nonce, (str, int)) or len(str(nonce)) > 25):
            raise DiscordError(400, 50035, "Invalid Form Body: nonce")
        if nonce is not None and payload.get("enforce_nonce"):
            # as on Discord: a repeat of a recent nonce by the same author returns the message already created
            for earlier in channel.messages:
                if (earlier.nonce == str(nonce) and earlier.author.id == self.bot.id
                        and time.monotonic() - earlier.created < self.nonce_window):
                    self.record("nonce_repeat", earlier)
                    return earlier.payload()
        message = self._create_message(channel, body)
        message.nonce = None if nonce is None else str(nonce)
        self.record("message", message)
        if self.on_posted is not None:
            await self.on_posted(message)
        return message.payload()

    async def _get_message(self, request: web.Request, body: Body, cid: str, mid: str) -> dict[str, Any]:
        return self._message(self._channel(cid), mid).payload()

    async def _edit_message(self, request: web.Request, body: Body, cid: str, mid: str) -> dict[str, Any]:
        message = self._edit(self._message(self._channel(cid), mid), body)
        self.record("edit", message)
        return message.payload()

    async def _delete_message(self, request: web.Request, body: Body, cid: str, mid: str) -> None:
        message = self._message(self._channel(cid), mid)
        message.deleted = True
        self.record("delete", message)

    async def _create_thread(self, request: web.Request, body: Body, cid: str, mid: str | None = None
                             ) -> dict[str, Any]:
        parent = self._channel(cid)
        if parent.type != 0 or parent.guild is None:
            raise DiscordError(400, 50024, "Cannot execute action on this channel type")
        payload = body.json or {}
        if mid is not None:
            starter = self._message(parent, mid)
            if any(c.id == starter.id for c in self._channels.values()):
                raise DiscordError(400, 160004, "A thread has already been created for this message")
            thread_id, kind = starter.id, PUBLIC_THREAD
        else:
            thread_id, kind = snowflake(), payload.get("type") or PRIVATE_THREAD
        name = payload.get("name") or ""
        if not 1 <= len(name) <= 100:
            raise DiscordError(400, 50035, "Invalid Form Body: name")
        thread = Channel(thread_id, name, kind, guild=parent.guild, parent=parent, owner_id=self.bot.id,
                         auto_archive_duration=payload.get("auto_archive_duration") or 1440)
        parent.guild.channels[thread.id] = thread
        self._channels[thread.id] = thread
        self.record("thread", thread)
        data = {**thread.payload(), "newly_created": True}
        await self.dispatch("THREAD_CREATE", data)
        return thread.payload()

    async def _edit_channel(self, request: web.Request, body: Body, cid: str) -> dict[str, Any]:
        channel = self._channel(cid)
        payload = body.json or {}
        for key in ("name", "archived", "locked", "auto_archive_duration"):
            if key in payload:
                if key in ("archived", "locked") and not channel.is_thread:
                    raise DiscordError(400, 50024, "Cannot execute action on this channel type")
                setattr(channel, key, payload[key])
        self.record("channel_edit", (channel, payload))
        if channel.is_thread:
            await self.dispatch("THREAD_UPDATE", channel.payload())
        return channel.payload()

    async def _create_dm(self, request: web.Request, body: Body) -> dict[str, Any]:
        user = self.users.get(int((body.json or {}).get("recipient_id", 0)))
        if user is None:
            raise DiscordError(404, 10013, "Unknown User")
        return self.dm_channel(user).payload()

    async def _get_user(self, request: web.Request, body: Body, uid: str) -> dict[str, Any]:
        user = self.users.get(int(uid)) if uid.isdigit() else None
        if user is None:
            raise DiscordError(404, 10013, "Unknown User")
        return user.payload()

    def _guild(self, gid: str) -> Guild:
        guild = self.guilds.get(int(gid)) if gid.isdigit() else None
        if guild is None:
            raise DiscordError(404, 10004, "Unknown Guild")
        return guild

    async def _get_guild(self, request: web.Request, body: Body, gid: str) -> dict[str, Any]:
        return self._guild(gid).payload()

    async def _get_guild_channels(self, request: web.Request, body: Body, gid: str) -> list[dict[str, Any]]:
        return [c.payload() for c in self._guild(gid).channels.values() if not c.is_thread]

    async def _get_member(self, request: web.Request, body: Body, gid: str, uid: str) -> dict[str, Any]:
        member = self._guild(gid).members.get(int(uid)) if uid.isdigit() else None
        if member is None:
            raise DiscordError(404, 10007, "Unknown Member")
        return member.payload()

    async def _get_roles(self, request: web.Request, body: Body, gid: str) -> list[dict[str, Any]]:
        return [r.payload() for r in self._guild(gid).roles.values()]

    # ------------------------------------------------------------------ REST: interactions and webhooks

    async def _callback(self, request: web.Request, body: Body, iid: str, token: str) -> dict[str, Any]:
        interaction = self._by_token.get(token)
        if interaction is None or str(interaction.id) != iid:
            raise DiscordError(404, 10062, "Unknown interaction")
        late = (self.callback_deadline is not None
                and time.monotonic() - interaction.dispatched_at > self.callback_deadline)
        if interaction.expired or late:
            self.record("late_callback", interaction)
            raise DiscordError(404, 10062, "Unknown interaction")
        if interaction.callbacks:
            raise DiscordError(400, 40060, "Interaction has already been acknowledged.")
        payload = body.json or {}
        kind, data = payload.get("type"), payload.get("data") or {}
        resource: dict[str, Any] = {"type": kind}
        channel = interaction.channel
        if kind == 4:
            interaction.original = self._create_message(channel, Body(data, body.files), interaction=interaction,
                                                        webhook=True)
            resource["message"] = interaction.original.payload()
        elif kind == 5:
            interaction.original = self._create_message(channel, Body({"flags": data.get("flags", 0)}),
                                                        interaction=interaction, webhook=True, flags=LOADING)
            resource["message"] = interaction.original.payload()
        elif kind in (6, 7):
            if interaction.message is None:
                raise DiscordError(400, 40004, "Interaction callback type is only valid for component interactions")
            if kind == 7:
                self._edit(interaction.message, Body(data, body.files))
                resource["message"] = interaction.message.payload()
        elif kind not in (1, 8, 9):
            raise DiscordError(400, 50035, f"Invalid interaction callback type {kind}")
        interaction.callbacks.append(payload)
        interaction.callback_at = time.monotonic()
        self.record("callback", interaction)
        original = interaction.original
        return {
            "interaction": {
                "id": str(interaction.id), "type": interaction.type,
                "response_message_id": str(original.id) if original else None,
                "response_message_loading": kind == 5, "response_message_ephemeral": bool(original and original.ephemeral),
            },
            "resource": resource,
        }

    def _webhook_interaction(self, app: str, token: str) -> Interaction:
        interaction = self._by_token.get(token)
        if app != str(self.application_id) or interaction is None or self._token_expired(interaction):
            raise invalid_token()
        return interaction

    def _webhook_message(self, interaction: Interaction, mid: str) -> Message:
        if mid == "@original":
            if interaction.original is None:
                raise unknown_message()
            return interaction.original
        for message in interaction.messages:
            if str(message.id) == mid:
                return message
        raise unknown_message()

    async def _followup(self, request: web.Request, body: Body, app: str, token: str) -> dict[str, Any] | None:
        interaction = self._webhook_interaction(app, token)
        if not interaction.callbacks:
            raise DiscordError(400, 10015, "Unknown Webhook")  # followups need an acknowledged interaction
        flags = (body.json or {}).get("flags") or 0
        if interaction.callback_type == 5 and interaction.original and interaction.original.loading:
            # the first followup after a deferral edits the "thinking" original, with its ephemerality
            message = self._edit(interaction.original, body)
            interaction.followups.append(message)
            self.record("followup", message)
        else:
            message = self._create_message(interaction.channel, body, interaction=interaction, webhook=True,
                                           flags=flags & EPHEMERAL)
            interaction.followups.append(message)
            self.record("followup", message)
        if self.on_posted is not None:
            await self.on_posted(message)
        wait = request.query.get("wait", "").lower() in ("1", "true")
        return message.payload() if wait else None

    async def _webhook_get(self, request: web.Request, body: Body, app: str, token: str, mid: str
                           ) -> dict[str, Any]:
        return self._webhook_message(self._webhook_interaction(app, token), mid).payload()

    async def _webhook_edit(self, request: web.Request, body: Body, app: str, token: str, mid: str
                            ) -> dict[str, Any]:
        interaction = self._webhook_interaction(app, token)
        message = self._edit(self._webhook_message(interaction, mid), body)
        interaction.edits.append(body.json or {})
        self.record("edit", message)
        return message.payload()

    async def _webhook_delete(self, request: web.Request, body: Body, app: str, token: str, mid: str) -> None:
        message = self._webhook_message(self._webhook_interaction(app, token), mid)
        message.deleted = True
        self.record("delete", message)
