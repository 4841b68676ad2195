"""Settings from the environment: defaults, clear errors, the token never shown."""

from __future__ import annotations

import os
from pathlib import Path

import discord.gateway
import discord.http
import pytest
import yarl

from bot.settings import Settings, SettingsError

TOKEN = "MTIz.secret-token.value"


def test_defaults():
    s = Settings.from_env({"DISCORD_TOKEN": TOKEN})
    assert s.discord_token == TOKEN
    assert (s.musicgen_model, s.musicgen_dtype) == ("facebook/musicgen-small", "float32")
    assert (s.discord_guild_ids, s.sync_commands) == ((), "first")
    assert (s.max_seconds, s.max_pending_per_user, s.max_queue_size, s.cooldown_seconds) == (60, 2, 50, 10.0)
    assert (s.admin_role_ids, s.admin_user_ids, s.owner_user_ids) == (frozenset(), frozenset(), frozenset())
    assert s.database_path == Path.cwd().resolve() / "var" / "bot.sqlite3"  # absolute: it must not follow chdir
    assert (s.max_batch, s.job_timeout_seconds, s.shutdown_grace_seconds) == (4, 600.0, 30.0)
    assert (s.progress_interval_seconds, s.log_level) == (2.0, "INFO")
    assert (s.extend_stride_seconds, s.memory_limit_mb) == (18.0, None)
    assert s.musicgen_quantize is None
    assert (s.discord_api_base, s.discord_gateway_url) == (None, None)


def test_values_are_parsed():
    s = Settings.from_env({
        "DISCORD_TOKEN": f"  {TOKEN}\n", "MUSICGEN_MODEL": "/models/small", "MUSICGEN_DTYPE": "BFloat16",
        "MUSICGEN_QUANTIZE": " 8 ",
        "DISCORD_GUILD_IDS": "111, 222", "MAX_SECONDS": "12", "MAX_PENDING_PER_USER": "3", "MAX_QUEUE_SIZE": "9",
        "COOLDOWN_SECONDS": "0", "ADMIN_ROLE_IDS": "5,6", "ADMIN_USER_IDS": "7", "OWNER_USER_IDS": "8, 9", "DATABASE_PATH": "/tmp/x.db",
        "MAX_BATCH": "8", "JOB_TIMEOUT_SECONDS": "60", "SHUTDOWN_GRACE_SECONDS": "5",
        "PROGRESS_INTERVAL_SECONDS": "1.5", "LOG_LEVEL": "debug", "DISCORD_API_BASE": "http://127.0.0.1:9/api/v10/",
        "DISCORD_GATEWAY_URL": "ws://127.0.0.1:9/", "EXTEND_STRIDE_SECONDS": "12.5", "MEMORY_LIMIT_MB": "2048",
    })
    assert s.discord_token == TOKEN
    assert (s.musicgen_model, s.musicgen_dtype, s.musicgen_quantize) == ("/models/small", "bfloat16", 8)
    assert (s.discord_guild_ids, s.sync_commands) == ((111, 222), "guilds")
    assert (s.max_seconds, s.max_pending_per_user, s.max_queue_size, s.cooldown_seconds) == (12, 3, 9, 0.0)
    assert (s.admin_role_ids, s.admin_user_ids) == (frozenset({5, 6}), frozenset({7}))
    assert s.owner_user_ids == frozenset({8, 9})
    assert s.database_path == Path("/tmp/x.db")
    assert (s.max_batch, s.job_timeout_seconds, s.shutdown_grace_seconds, s.progress_interval_seconds) == (8, 60, 5, 1.5)
    assert s.log_level == "DEBUG"
    assert (s.extend_stride_seconds, s.memory_limit_mb) == (12.5, 2048)
    assert s.discord_api_base == "http://127.0.0.1:9/api/v10"
    assert s.discord_gateway_url == "ws://127.0.0.1:9/"
    assert Settings.from_env({"DISCORD_TOKEN": TOKEN, "DISCORD_GUILD_IDS": "1", "SYNC_COMMANDS": "global"}
                             ).sync_commands == "global"


@pytest.mark.parametrize("env, message", [
    ({"DISCORD_TOKEN": ""}, "DISCORD_TOKEN is not set"),
    ({"DISCORD_TOKEN": "   "}, "DISCORD_TOKEN is not set"),
    ({"DISCORD_TOKEN": "two words"}, "DISCORD_TOKEN contains spaces"),
    ({"MAX_SECONDS": "ten"}, "MAX_SECONDS must be a whole number"),
    ({"MAX_SECONDS": "0"}, "MAX_SECONDS must be from 1 to 3600"),
    ({"MAX_PENDING_PER_USER": "-1"}, "MAX_PENDING_PER_USER must be at least 1"),
    ({"MAX_QUEUE_SIZE": "1.5"}, "MAX_QUEUE_SIZE must be a whole number"),
    ({"MAX_BATCH": "0"}, "MAX_BATCH must be from 1 to 64"),
    ({"COOLDOWN_SECONDS": "-3"}, "COOLDOWN_SECONDS must be a finite number of at least 0"),
    ({"COOLDOWN_SECONDS": "nan"}, "COOLDOWN_SECONDS must be a finite number"),
    ({"JOB_TIMEOUT_SECONDS": "inf"}, "JOB_TIMEOUT_SECONDS must be a finite number"),
    ({"PROGRESS_INTERVAL_SECONDS": "0.5"}, "PROGRESS_INTERVAL_SECONDS must be a finite number of at least 1"),
    ({"DISCORD_GUILD_IDS": "123,abc"}, "DISCORD_GUILD_IDS must be a comma-separated list"),
    ({"ADMIN_ROLE_IDS": "-5"}, "ADMIN_ROLE_IDS must be a comma-separated list"),
    ({"SYNC_COMMANDS": "always"}, "SYNC_COMMANDS must be one of guilds, global, first, none"),
    ({"SYNC_COMMANDS": "guilds"}, "SYNC_COMMANDS=guilds needs DISCORD_GUILD_IDS"),
    ({"MUSICGEN_DTYPE": "int8"}, "MUSICGEN_DTYPE must be one of"),
    ({"MUSICGEN_QUANTIZE": "16"}, "MUSICGEN_QUANTIZE must be one of none, 8, 4"),
    ({"MUSICGEN_QUANTIZE": "int8"}, "MUSICGEN_QUANTIZE must be one of"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL must be one of"),
    ({"MEMORY_LIMIT_MB": "0"}, "MEMORY_LIMIT_MB must be at least 1"),
    ({"MEMORY_LIMIT_MB": "lots"}, "MEMORY_LIMIT_MB must be a whole number"),
    ({"EXTEND_STRIDE_SECONDS": "0.5"}, "EXTEND_STRIDE_SECONDS must be a finite number of at least 1"),
    ({"DISCORD_API_BASE": "127.0.0.1:9"}, "DISCORD_API_BASE must be an http"),
    ({"DISCORD_GATEWAY_URL": "http://x/"}, "DISCORD_GATEWAY_URL must be a ws"),
    ({"NORMALIZE_AUDIO": "maybe"}, "NORMALIZE_AUDIO must be true or false"),
    ({"MUSICGEN_BLAS": "bogus"}, "MUSICGEN_BLAS must be one of auto, openblas, blis, reference or the path"),
    ({"MUSICGEN_BLAS": "/no/such/libblas.so"}, "MUSICGEN_BLAS must be one of"),
])
def test_bad_values_give_a_clear_error_without_the_token(env, message):
    environ = {"DISCORD_TOKEN": TOKEN, **env}
    with pytest.raises(SettingsError, match=message) as err:
        Settings.from_env(environ)
    assert TOKEN not in str(err.value)


def test_a_missing_token_is_a_clear_error():
    with pytest.raises(SettingsError, match="DISCORD_TOKEN is not set.*see .env.example"):
        Settings.from_env({"MAX_SECONDS": "5"})


def test_the_token_is_hidden_in_repr_and_str():
    s = Settings.from_env({"DISCORD_TOKEN": TOKEN})
    assert TOKEN not in repr(s) and TOKEN not in str(s) and TOKEN not in f"{s}"
    assert "max_seconds=60" in repr(s)


def test_discord_endpoints_are_replaced_only_when_set(monkeypatch):
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    original = discord.http.Route.BASE
    Settings.from_env({"DISCORD_TOKEN": TOKEN}).apply_discord_endpoints()
    assert discord.http.Route.BASE == original
    Settings.from_env({"DISCORD_TOKEN": TOKEN, "DISCORD_API_BASE": "http://127.0.0.1:1/api/v10",
                       "DISCORD_GATEWAY_URL": "ws://127.0.0.1:1/"}).apply_discord_endpoints()
    assert discord.http.Route.BASE == "http://127.0.0.1:1/api/v10"
    gateway = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    # discord.py calls .with_query on it, so it must be a URL, not a string
    assert isinstance(gateway, yarl.URL) and str(gateway) == "ws://127.0.0.1:1/"
    assert str(gateway.with_query(v=10, encoding="json")) == "ws://127.0.0.1:1/?v=10&encoding=json"


@pytest.mark.parametrize("raw, expected", [("true", True), ("YES", True), ("1", True), ("on", True),
                                           ("false", False), ("Off", False), ("0", False), ("no", False),
                                           ("", True)])
def test_normalize_audio_words(raw, expected):
    assert Settings.from_env({"DISCORD_TOKEN": TOKEN, "NORMALIZE_AUDIO": raw}).normalize_audio is expected


def test_blas_choices_and_library_paths_are_accepted(tmp_path):
    library = tmp_path / "libmyblas.so"
    library.write_bytes(b"")
    for choice in ("auto", "openblas", "blis", "reference", str(library), ""):
        Settings.from_env({"DISCORD_TOKEN": TOKEN, "MUSICGEN_BLAS": choice})


def test_relative_database_path_follows_the_env_folder(tmp_path):
    env = {"DISCORD_TOKEN": TOKEN, "DATABASE_PATH": "data/jobs.db"}
    assert Settings.from_env(env, base_dir=tmp_path).database_path == tmp_path.resolve() / "data" / "jobs.db"
    assert Settings.from_env(env).database_path == Path.cwd().resolve() / "data" / "jobs.db"
    env["DATABASE_PATH"] = "/srv/jobs.db"
    assert Settings.from_env(env, base_dir=tmp_path).database_path == Path("/srv/jobs.db")


# -- workers on several machines ----------------------------------------------------------------------------------
def test_the_job_store_defaults_to_sqlite_with_an_embedded_worker(tmp_path):
    s = Settings.from_env({"DISCORD_TOKEN": TOKEN}, base_dir=tmp_path)
    assert (s.redis_url, s.embedded_worker, s.job_lease_seconds) == (None, True, 30.0)
    assert (s.shard_count, s.shard_ids, s.worker_id) == (None, None, None)
    assert s.files_dir == tmp_path.resolve() / "var" / "clips"
    assert s.job_store_text == f"sqlite:///{tmp_path.resolve() / 'var' / 'bot.sqlite3'}"


def test_job_store_urls(tmp_path):
    relative = Settings.from_env({"DISCORD_TOKEN": TOKEN, "JOB_STORE": "sqlite:///data/x.db"}, base_dir=tmp_path)
    assert relative.database_path == tmp_path.resolve() / "data" / "x.db" and relative.redis_url is None
    absolute = Settings.from_env({"DISCORD_TOKEN": TOKEN, "JOB_STORE": "sqlite:////srv/x.db"}, base_dir=tmp_path)
    assert absolute.database_path == Path("/srv/x.db")
    redis = Settings.from_env({"DISCORD_TOKEN": TOKEN, "JOB_STORE": "redis://:hunter2@10.0.0.5:6380/3",
                               "FILES_DIR": "cache", "WORKER_ID": "mac-1", "JOB_LEASE_SECONDS": "12"},
                              base_dir=tmp_path)
    assert redis.redis_url == "redis://:hunter2@10.0.0.5:6380/3"
    assert (redis.embedded_worker, redis.worker_id, redis.worker_name, redis.job_lease_seconds) == (
        False, "mac-1", "mac-1", 12.0)
    assert redis.files_dir == tmp_path.resolve() / "cache"
    assert redis.job_store_text == "redis://:***@10.0.0.5:6380/3"
    assert "hunter2" not in repr(redis) and "hunter2" not in str(redis)
    both = Settings.from_env({"DISCORD_TOKEN": TOKEN, "JOB_STORE": "redis://r:6379/0", "EMBEDDED_WORKER": "yes"})
    assert both.embedded_worker is True
    assert Settings.from_env({"DISCORD_TOKEN": TOKEN}).worker_name.endswith(f"-{os.getpid()}")


def test_shards():
    s = Settings.from_env({"DISCORD_TOKEN": TOKEN, "SHARD_COUNT": "4", "SHARD_IDS": "0, 2"})
    assert (s.shard_count, s.shard_ids) == (4, (0, 2))
    assert Settings.from_env({"DISCORD_TOKEN": TOKEN, "SHARD_COUNT": "2"}).shard_ids is None


@pytest.mark.parametrize("env, message", [
    ({"JOB_STORE": "postgres://db/1"}, "JOB_STORE must be sqlite:///<path to the database file> or redis://"),
    ({"JOB_STORE": "mysql://root:hunter2@db/1"}, r"got 'mysql://root:\*\*\*@db/1'"),
    ({"EMBEDDED_WORKER": "false"}, "EMBEDDED_WORKER=false needs JOB_STORE=redis://"),
    ({"JOB_STORE": "redis://r/0", "EMBEDDED_WORKER": "sometimes"}, "EMBEDDED_WORKER must be true or false"),
    ({"JOB_LEASE_SECONDS": "1"}, "JOB_LEASE_SECONDS must be a finite number of at least 3"),
    ({"SHARD_IDS": "0,1"}, "SHARD_IDS needs SHARD_COUNT"),
    ({"SHARD_IDS": "0,2", "SHARD_COUNT": "2"}, "SHARD_IDS must be distinct numbers from 0 to 1"),
    ({"SHARD_IDS": "1,1", "SHARD_COUNT": "2"}, "SHARD_IDS must be distinct"),
    ({"SHARD_COUNT": "0"}, "SHARD_COUNT must be at least 1"),
    ({"WORKER_ID": "my worker"}, "WORKER_ID must be up to 64 letters"),
])
def test_bad_store_and_shard_settings(env, message):
    with pytest.raises(SettingsError, match=message) as err:
        Settings.from_env({"DISCORD_TOKEN": TOKEN, **env})
    assert "hunter2" not in str(err.value)
