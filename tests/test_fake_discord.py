"""The fake Discord against a real discord.py client: a minimal bot defined here, run in the test's loop."""

from __future__ import annotations

import asyncio
import io
import logging

import discord
import pytest
from discord import app_commands

from tests.fake_discord import FakeDiscord, Interaction
from tests.fake_discord.client import use_fake

WAV = b"RIFF" + bytes(range(256)) * 8


class Again(discord.ui.View):
    def __init__(self) -> None:
        super().__init__(timeout=None)

    @discord.ui.button(label="Again", custom_id="again")
    async def again(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.send_message(f"again for {interaction.user.name}", ephemeral=True)


class TinyBot(discord.Client):
    """A minimal slash-command bot: ``/music`` defers then sends a file; ``/admin remove`` checks permissions."""

    def __init__(self, guild_id: int) -> None:
        super().__init__(intents=discord.Intents.default(), guild_ready_timeout=0.05)
        self.guild_id = guild_id
        self.tree = app_commands.CommandTree(self)
        self.errors: list[BaseException] = []
        self.seen: list[discord.Interaction] = []

        @self.tree.command(name="music", description="Make music")
        @app_commands.describe(prompt="what to play", seconds="how long")
        async def music(interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 300],
                        seconds: app_commands.Range[int, 1, 30] = 5) -> None:
            self.seen.append(interaction)
            await interaction.response.defer(thinking=True)
            try:
                await interaction.followup.send(
                    f"{interaction.user.mention} {prompt} ({seconds} s, limit {interaction.filesize_limit})",
                    file=discord.File(io.BytesIO(WAV), "clip.wav"), view=Again())
            except discord.HTTPException as exc:
                self.errors.append(exc)

        admin = app_commands.Group(name="admin", description="Admin tools",
                                   default_permissions=discord.Permissions(manage_guild=True))

        @admin.command(name="remove", description="Remove a job")
        async def remove(interaction: discord.Interaction, position: app_commands.Range[int, 1, 100]) -> None:
            allowed = interaction.permissions.manage_guild
            await interaction.response.send_message(f"removed {position}" if allowed else "not allowed",
                                                    ephemeral=not allowed)

        @self.tree.command(name="where", description="Where am I")
        async def where(interaction: discord.Interaction) -> None:
            channel = interaction.channel
            thread = await self._make_thread(interaction) if isinstance(channel, discord.TextChannel) else None
            await interaction.response.send_message(f"{type(channel).__name__} {thread.id if thread else ''}")

        @self.tree.command(name="whois", description="Who is that")
        async def whois(interaction: discord.Interaction, who: discord.Member) -> None:
            await interaction.response.send_message(f"{who.name} manage_guild={who.guild_permissions.manage_guild}")

        self.tree.add_command(admin)

    async def _make_thread(self, interaction: discord.Interaction) -> discord.Thread:
        assert isinstance(interaction.channel, discord.TextChannel)
        thread = await interaction.channel.create_thread(name="session", type=discord.ChannelType.public_thread)
        await thread.send("welcome")
        await thread.edit(archived=True, locked=True)
        return thread

    async def setup_hook(self) -> None:
        self.add_view(Again())
        self.tree.copy_global_to(guild=discord.Object(self.guild_id))
        await self.tree.sync(guild=discord.Object(self.guild_id))


@pytest.fixture
async def fake() -> FakeDiscord:
    async with FakeDiscord() as server:
        yield server


@pytest.fixture
async def bot(fake: FakeDiscord) -> TinyBot:
    with use_fake(fake):
        client = TinyBot(fake.guild.id)
        task = asyncio.create_task(client.start(fake.token))
        try:
            await fake.wait_ready(timeout=10)
            await asyncio.wait_for(client.wait_until_ready(), 10)
            yield client
        finally:
            await client.close()
            await asyncio.wait_for(task, 10)


async def test_login_and_command_sync(fake: FakeDiscord, bot: TinyBot) -> None:
    paths = [e.data[:2] for e in fake.events_of("request")]
    assert paths[:2] == [("GET", "/users/@me"), ("GET", "/oauth2/applications/@me")]
    assert bot.user is not None and bot.user.id == fake.bot.id
    assert bot.get_guild(fake.guild.id) is not None
    assert fake.commands(None) == []
    music = fake.command("music")
    assert music["guild_id"] == str(fake.guild.id)
    opts = {o["name"]: o for o in music["options"]}
    assert opts["prompt"]["type"] == 3 and opts["prompt"]["required"] and opts["prompt"]["max_length"] == 300
    assert opts["seconds"]["type"] == 4 and (opts["seconds"]["min_value"], opts["seconds"]["max_value"]) == (1, 30)
    assert not opts["seconds"].get("required", False)
    assert fake.command("admin")["default_member_permissions"] == str(1 << 5)
    # ids are stable across a re-sync, as on Discord
    first = {c["name"]: c["id"] for c in fake.commands(fake.guild)}
    await bot.tree.sync(guild=discord.Object(fake.guild.id))
    assert {c["name"]: c["id"] for c in fake.commands(fake.guild)} == first


async def test_deferred_followup_with_file(fake: FakeDiscord, bot: TinyBot) -> None:
    alice = fake.guild.add_member("alice")
    interaction = await fake.invoke(alice, "music", {"prompt": "synthwave", "seconds": 2})
    assert isinstance(interaction, Interaction)
    callback = await interaction.wait_callback()
    assert callback["type"] == 5 and not interaction.ephemeral
    assert interaction.latency is not None and interaction.latency < 3
    files = await interaction.wait_files()
    assert [f.filename for f in files] == ["clip.wav"] and files[0].data == WAV
    message = interaction.followups[0]
    assert message is interaction.original and not message.loading  # the followup filled in "thinking..."
    assert message.content == f"{alice.mention} synthwave (2 s, limit {10 * 1024 * 1024})"
    assert message.custom_ids == ["again"]
    assert fake.channel.files == files and fake.files == files
    # the bot saw the right user, options and channel
    seen = bot.seen[0]
    assert seen.user.id == alice.id and seen.channel_id == fake.channel.id and seen.guild_id == fake.guild.id
    # and the attachment URL serves the bytes
    async with discord.http.aiohttp.ClientSession() as session, session.get(files[0].url) as response:
        assert await response.read() == WAV


async def test_client_side_validation(fake: FakeDiscord, bot: TinyBot) -> None:
    alice = fake.guild.add_member("alice")
    with pytest.raises(ValueError, match="out of"):
        await fake.invoke(alice, "music", {"prompt": "x", "seconds": 31})
    with pytest.raises(ValueError, match="required"):
        await fake.invoke(alice, "music", {"seconds": 3})
    with pytest.raises(KeyError):
        await fake.invoke(alice, "nope", {})


async def test_subcommand_and_permissions(fake: FakeDiscord, bot: TinyBot) -> None:
    admin = fake.guild.add_member("root", admin=True)
    plain = fake.guild.add_member("bob")
    ok = await fake.invoke(admin, ("admin", "remove"), {"position": 2})
    refused = await fake.invoke(plain, "admin remove", {"position": 2})
    await ok.wait(lambda i: i.original is not None)
    await refused.wait(lambda i: i.original is not None)
    assert ok.original.content == "removed 2" and not ok.ephemeral
    assert refused.original.content == "not allowed" and refused.ephemeral and refused.original.ephemeral


async def test_expired_token_answers_401_50027(fake: FakeDiscord, bot: TinyBot) -> None:
    alice = fake.guild.add_member("alice")
    fake.token_lifetime = 0.0  # the defer still makes it (callbacks have their own 3 s deadline); the followup not
    interaction = await fake.invoke(alice, "music", {"prompt": "late"})
    await fake.wait_until(lambda: bot.errors, 10)
    error = bot.errors[0]
    assert isinstance(error, discord.HTTPException) and error.status == 401 and error.code == 50027
    assert interaction.files == [] and interaction.deferred and interaction.original.loading
    # expire() kills a token on demand: edits of a delivered response fail too
    fake.token_lifetime = None
    done = await fake.invoke(alice, "music", {"prompt": "on time"})
    await done.wait_files()
    fake.expire(done)
    with pytest.raises(discord.HTTPException) as info:
        await bot.seen[-1].edit_original_response(content="too late")
    assert (info.value.status, info.value.code) == (401, 50027)
    assert done.edits == []


async def test_callback_after_the_deadline_is_refused(fake: FakeDiscord, bot: TinyBot) -> None:
    fake.callback_deadline = 0.0
    late = await fake.invoke(fake.guild.add_member("alice"), "admin remove", {"position": 1})
    await fake.wait_for(lambda e: e.kind == "late_callback" and e.data is late)
    assert late.callbacks == [] and late.original is None


async def test_invoke_needs_a_connected_bot(fake: FakeDiscord) -> None:
    with pytest.raises(RuntimeError, match="no bot"):
        await fake.invoke(fake.guild.add_member("alice"), "music", {"prompt": "x"})


async def test_injected_500_is_retried(fake: FakeDiscord, bot: TinyBot) -> None:
    alice = fake.guild.add_member("alice")
    fault = fake.fail("POST", "/webhooks/*", 500, times=1)
    interaction = await fake.invoke(alice, "music", {"prompt": "retry"})
    await interaction.wait_files(timeout=15)
    assert fault.hits == 1 and bot.errors == []
    statuses = [e.data[2] for e in fake.events_of("request") if e.data[1].startswith("/webhooks/")]
    assert statuses == [500, 200]


async def test_injected_429_waits_retry_after(fake: FakeDiscord, bot: TinyBot, caplog) -> None:
    alice = fake.guild.add_member("alice")
    fake.fail("POST", "/webhooks/*", 429, retry_after=0.2)
    with caplog.at_level(logging.WARNING, logger="discord"):
        interaction = await fake.invoke(alice, "music", {"prompt": "slow down"})
        await interaction.wait_files()
    assert any("rate limited" in r.getMessage() for r in caplog.records)


async def test_injected_413_and_404_reach_the_bot(fake: FakeDiscord, bot: TinyBot) -> None:
    alice = fake.guild.add_member("alice")
    fake.fail("POST", "/webhooks/*", 413)
    await fake.invoke(alice, "music", {"prompt": "big"})
    await fake.wait_until(lambda: bot.errors, 10)
    assert (bot.errors[0].status, bot.errors[0].code) == (413, 40005)
    fake.fail("POST", f"/channels/{fake.channel.id}/messages", 404)
    with pytest.raises(discord.NotFound) as info:
        await bot.get_channel(fake.channel.id).send("hello")
    assert info.value.code == 10003
    await bot.get_channel(fake.channel.id).send("hello again")
    assert [m.content for m in fake.channel.messages if m.interaction is None] == ["hello again"]


async def test_upload_over_the_size_limit_is_413(fake: FakeDiscord, bot: TinyBot) -> None:
    fake.guild.attachment_size_limit = 100
    with pytest.raises(discord.HTTPException) as info:
        await bot.get_channel(fake.channel.id).send(file=discord.File(io.BytesIO(WAV), "big.wav"))
    assert (info.value.status, info.value.code) == (413, 40005)


async def test_component_click(fake: FakeDiscord, bot: TinyBot) -> None:
    alice, bob = fake.guild.add_member("alice"), fake.guild.add_member("bob")
    interaction = await fake.invoke(alice, "music", {"prompt": "loop"})
    await interaction.wait_files()
    click = await fake.click(interaction.followups[0], "again", bob)
    await click.wait(lambda i: i.original is not None)
    assert click.callback_type == 4 and click.original.content == "again for bob" and click.ephemeral
    with pytest.raises(KeyError):
        await fake.click(interaction.followups[0], "missing", bob)


async def test_threads_and_channel_messages(fake: FakeDiscord, bot: TinyBot) -> None:
    alice = fake.guild.add_member("alice")
    interaction = await fake.invoke(alice, "where")
    await interaction.wait(lambda i: i.original is not None)
    thread = fake.guild.threads[0]
    assert thread.parent is fake.channel and thread.name == "session"
    assert [m.content for m in thread.messages] == ["welcome"]
    assert thread.archived and thread.locked
    assert interaction.original.content == f"TextChannel {thread.id}"
    dispatched = [e.data[0] for e in fake.events_of("dispatch")]
    assert "THREAD_CREATE" in dispatched and "THREAD_UPDATE" in dispatched
    # a command used inside the thread, and in a DM
    thread.archived = thread.locked = False
    inside = await fake.invoke(alice, "where", channel=thread)
    await inside.wait(lambda i: i.original is not None)
    assert inside.original.content.startswith("Thread") and inside.original.channel is thread
    dm = await fake.invoke(alice, "where", channel=fake.dm_channel(alice))
    await dm.wait(lambda i: i.original is not None)
    assert dm.original.content.startswith("DMChannel")


async def test_resume_after_a_dropped_gateway(fake: FakeDiscord, bot: TinyBot) -> None:
    alice = fake.guild.add_member("alice")
    await fake.drop_gateway(4000)
    await fake.wait_for(lambda e: e.kind == "resume", timeout=15)
    interaction = await fake.invoke(alice, "music", {"prompt": "back"})
    await interaction.wait_files()


# ---------------------------------------------------------------- the subprocess helper (conftest's run_bot)


async def test_run_bot_reports_a_failed_start_with_its_log(fake_discord: FakeDiscord, run_bot, tmp_path) -> None:
    with pytest.raises(RuntimeError, match="exited with 2") as info:
        await run_bot(MUSICGEN_MODEL=str(tmp_path / "no-such-model"), timeout=60)
    assert "MUSICGEN_MODEL" in str(info.value)
    assert fake_discord.events_of("identify") == []


@pytest.mark.e2e
async def test_run_bot_starts_stops_and_kills(fake_discord: FakeDiscord, run_bot, tmp_path) -> None:
    from tests.tiny_models import build_musicgen

    build_musicgen(tmp_path / "model")
    bot = await run_bot(MUSICGEN_MODEL=str(tmp_path / "model"), timeout=120)
    assert fake_discord.intents is not None and "music" in {c["name"] for c in fake_discord.commands(fake_discord.guild)}
    assert await bot.stop() == 0
    mark = len(fake_discord.events)
    again = await run_bot(MUSICGEN_MODEL=str(tmp_path / "model"), timeout=120)
    assert fake_discord.is_ready(after=mark)
    again.kill()
    assert await again.wait_exit() == -9


async def test_member_option_is_resolved(fake: FakeDiscord, bot: TinyBot) -> None:
    alice, root = fake.guild.add_member("alice"), fake.guild.add_member("root", admin=True)
    interaction = await fake.invoke(alice, "whois", {"who": root})
    await interaction.wait(lambda i: i.original is not None)
    assert interaction.original.content == "root manage_guild=True"


async def test_editing_the_original_replaces_attachments_and_keeps_history(fake: FakeDiscord, bot: TinyBot) -> None:
    interaction = await fake.invoke(fake.guild.add_member("alice"), "music", {"prompt": "v1"})
    [first] = await interaction.wait_files()
    await bot.seen[-1].edit_original_response(content="v2", attachments=[discord.File(io.BytesIO(b"new"), "b.wav")])
    original = interaction.original
    assert original.content == "v2" and [(a.filename, a.data) for a in original.attachments] == [("b.wav", b"new")]
    assert original.history[-1]["attachments"][0]["filename"] == "clip.wav" and interaction.edits
    await bot.seen[-1].edit_original_response(content="v3")  # no attachments field: files stay
    assert original.content == "v3" and [a.filename for a in original.attachments] == ["b.wav"]
    assert first.data == WAV and fake.files == original.attachments


async def test_world_changes_reach_a_connected_bot(fake: FakeDiscord, bot: TinyBot) -> None:
    other = fake.add_guild("Other")
    lounge = fake.guild.add_channel("lounge")
    dj = fake.guild.add_role("DJ", 1 << 5)
    await fake.wait_until(lambda: bot.get_guild(other.id) and bot.get_channel(lounge.id)
                          and bot.get_guild(fake.guild.id).get_role(dj.id), 5)
    assert [c.name for c in bot.get_guild(other.id).text_channels] == ["general"]


async def test_heartbeats_are_acknowledged() -> None:
    async with FakeDiscord(heartbeat_interval=0.05) as fake:
        with use_fake(fake):
            client = TinyBot(fake.guild.id)
            task = asyncio.create_task(client.start(fake.token))
            try:
                await fake.wait_for(lambda e: len(fake.events_of("heartbeat")) >= 4, timeout=10)
                assert len(fake.events_of("identify")) == 1 and fake.events_of("resume") == []
                assert client.latency < 1
            finally:
                await client.close()
                await asyncio.wait_for(task, 10)


async def test_enforce_nonce_returns_the_message_already_posted_and_flags_are_kept(
        fake: FakeDiscord, bot: TinyBot) -> None:
    channel = bot.get_channel(fake.channel.id)
    first = await channel.send("clip", nonce="clip-7", suppress_embeds=True)  # discord.py adds enforce_nonce
    again = await channel.send("clip", nonce="clip-7")
    other = await channel.send("clip", nonce="clip-8")
    assert first.id == again.id != other.id and len(fake.events_of("nonce_repeat")) == 1
    [stored, _] = [m for m in fake.channel.messages if m.interaction is None]
    assert stored.nonce == "clip-7" and stored.suppress_embeds and first.flags.suppress_embeds
    fake.nonce_window = 0.0  # past Discord's few minutes the nonce is forgotten
    late = await channel.send("clip", nonce="clip-7")
    assert late.id != first.id
    history = [m.id async for m in channel.history(limit=10)]
    assert history == [late.id, other.id, first.id]
