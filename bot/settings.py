"""Settings read from the environment (and a ``.env`` file loaded by ``__main__``); see ``.env.example``."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from core.options import DEFAULT_MODEL, blas_choice_problem

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
QUANTIZE_MODES = ("none", "8", "4")
SYNC_MODES = ("guilds", "global", "first", "none")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")

# (variable, default, meaning) for ``python -m bot --help``; .env.example and the README say the same at length.
VARIABLES = (
    ("DISCORD_TOKEN", "(required)", "the bot token (Developer Portal → your app → Bot → Reset Token)"),
    ("MUSICGEN_MODEL", DEFAULT_MODEL, "hub id or local checkpoint folder"),
    ("MUSICGEN_DTYPE", "float32", "decoder weights: float32, float16 or bfloat16"),
    ("MUSICGEN_QUANTIZE", "none", "decoder linear layers quantized at load: none, 8 or 4 (bits)"),
    ("DISCORD_GUILD_IDS", "", "comma-separated server ids whose slash commands are synced at start"),
    ("SYNC_COMMANDS", "guilds if ids set, else first", "where commands are synced at start: guilds, global, "
                                                        "first (globally when none are registered yet), none"),
    ("MAX_SECONDS", "60", "longest clip a member may ask for"),
    ("MAX_PENDING_PER_USER", "2", "requests one member may have waiting or running in one server"),
    ("MAX_QUEUE_SIZE", "50", "requests one server's queue may hold"),
    ("COOLDOWN_SECONDS", "10", "seconds between two requests of one member"),
    ("ADMIN_ROLE_IDS", "", "role ids allowed to use /admin (besides Manage Server)"),
    ("ADMIN_USER_IDS", "", "user ids allowed to use /admin (in any server they use it in, for that server)"),
    ("OWNER_USER_IDS", "", "the bot's owners (besides the application's owner or team): admins in every server, "
                           "and /admin pause everywhere"),
    ("JOB_STORE", "sqlite:///var/bot.sqlite3", "where jobs live: sqlite:///<path> (one machine, this process "
                                               "generates) or redis://host:port/db (workers on several machines)"),
    ("EMBEDDED_WORKER", "true with SQLite, false with Redis", "whether `python -m bot` loads the model and "
                                                               "generates itself (else it is a gateway only)"),
    ("JOB_LEASE_SECONDS", "30", "how long a worker's hold on a running job lasts (renewed every third of it); a "
                                "job whose worker was silent this long is taken over by another"),
    ("WORKER_ID", "host-pid", "this worker's name in the store and the logs (python -m bot.worker)"),
    ("FILES_DIR", "DATABASE_PATH's folder/clips", "with Redis: this machine's copy of clip files"),
    ("SHARD_COUNT", "Discord's recommendation", "gateway shards in all (several gateway processes: each the same)"),
    ("SHARD_IDS", "all", "comma-separated shard ids this gateway process connects (needs SHARD_COUNT)"),
    ("DATABASE_PATH", "./var/bot.sqlite3", "SQLite file for jobs, sessions, pause state and limits; a relative "
                                          "path is taken from the .env file's folder (or the current folder)"),
    ("CLIP_FILES_DAYS", "30", "days the files of finished clips (uploads, tunes, tokens for Extend) are kept; "
                             "0 keeps them for ever"),
    ("MAX_BATCH", "4", "clips generated together in one batch"),
    ("MEMORY_LIMIT_MB", "free memory", "memory a batch may use; batches shrink to fit"),
    ("JOB_TIMEOUT_SECONDS", "600", "a generation running longer is stopped"),
    ("SHUTDOWN_GRACE_SECONDS", "30", "time the running batch may take to finish on SIGINT/SIGTERM"),
    ("PROGRESS_INTERVAL_SECONDS", "2", "seconds between progress edits (at least 1)"),
    ("EXTEND_STRIDE_SECONDS", "18", "window stride for clips longer than the model's window"),
    ("NORMALIZE_AUDIO", "true", "peak-normalise clips to -1 dBFS with a 50 ms fade-out (true/false)"),
    ("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    ("MUSICGEN_BLAS", "auto", "Linux: auto, openblas, blis, reference or a BLAS library path"),
    ("DISCORD_API_BASE", "", "tests and self-hosted gateways: Discord's REST base URL"),
    ("DISCORD_GATEWAY_URL", "", "tests and self-hosted gateways: the gateway URL"),
)


class SettingsError(ValueError):
    """A setting is missing or has a bad value; the message names the variable and never holds the token."""


@dataclass(frozen=True)
class Settings:
    """Everything the bot reads from its environment. Field names are the variable names in lower case."""

    discord_token: str = field(repr=False)
    musicgen_model: str = DEFAULT_MODEL
    musicgen_dtype: str = "float32"
    musicgen_quantize: int | None = None  # bits of the decoder's quantized linear layers, None for none
    discord_guild_ids: tuple[int, ...] = ()
    sync_commands: str = "none"
    max_seconds: int = 60
    max_pending_per_user: int = 2
    max_queue_size: int = 50
    cooldown_seconds: float = 10.0
    admin_role_ids: frozenset[int] = frozenset()
    admin_user_ids: frozenset[int] = frozenset()
    owner_user_ids: frozenset[int] = frozenset()
    database_path: Path = Path("./var/bot.sqlite3")
    clip_files_days: int = 30  # 0: keep for ever
    max_batch: int = 4
    job_timeout_seconds: float = 600.0
    shutdown_grace_seconds: float = 30.0
    progress_interval_seconds: float = 2.0
    extend_stride_seconds: float = 18.0
    memory_limit_mb: int | None = None
    normalize_audio: bool = True  # peak-normalise clips and fade their last 50 ms out
    log_level: str = "INFO"
    discord_api_base: str | None = None
    discord_gateway_url: str | None = None
    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    embedded_worker: bool = True
    job_lease_seconds: float = 30.0
    worker_id: str | None = None  # None: host-pid (see ``worker_name``)
    files_dir: Path | None = None  # None: DATABASE_PATH's folder / clips
    shard_count: int | None = None
    shard_ids: tuple[int, ...] | None = None

    def __str__(self) -> str:
        return repr(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, base_dir: Path | None = None) -> Settings:
        """Read and check every variable; raise :class:`SettingsError` with a message fit for an operator.

        A relative ``DATABASE_PATH`` is taken from ``base_dir`` (the ``.env`` file's folder; default the current
        folder), so the database does not move with the folder the bot happens to be started from.
        """
        env = {k: v.strip() for k, v in (os.environ if environ is None else environ).items() if isinstance(v, str)}

        def get(name: str) -> str | None:
            value = env.get(name)
            return value if value else None

        token = get("DISCORD_TOKEN")
        if token is None:
            raise SettingsError("DISCORD_TOKEN is not set: put the bot token in the environment or in .env "
                                "(see .env.example).")
        if any(c.isspace() for c in token):
            raise SettingsError("DISCORD_TOKEN contains spaces: paste only the token itself.")

        guild_ids = tuple(_id_list(env, "DISCORD_GUILD_IDS"))
        sync = (get("SYNC_COMMANDS") or ("guilds" if guild_ids else "first")).lower()
        if sync not in SYNC_MODES:
            raise SettingsError(f"SYNC_COMMANDS must be one of {', '.join(SYNC_MODES)} (got {sync!r}).")
        if sync == "guilds" and not guild_ids:
            raise SettingsError("SYNC_COMMANDS=guilds needs DISCORD_GUILD_IDS (comma-separated server ids).")

        dtype = (get("MUSICGEN_DTYPE") or "float32").lower()
        if dtype not in DTYPES:
            raise SettingsError(f"MUSICGEN_DTYPE must be one of {', '.join(DTYPES)} (got {dtype!r}).")
        quantize = (get("MUSICGEN_QUANTIZE") or "none").strip().lower()
        if quantize not in QUANTIZE_MODES:
            raise SettingsError(f"MUSICGEN_QUANTIZE must be one of {', '.join(QUANTIZE_MODES)} (got {quantize!r}).")
        level = (get("LOG_LEVEL") or "INFO").upper()
        if level not in LOG_LEVELS:
            raise SettingsError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)} (got {level!r}).")

        normalize = (get("NORMALIZE_AUDIO") or "true").lower()
        if normalize not in TRUE_WORDS + FALSE_WORDS:
            raise SettingsError(f"NORMALIZE_AUDIO must be true or false (got {normalize!r}).")
        blas_problem = blas_choice_problem(get("MUSICGEN_BLAS"))
        if blas_problem:
            raise SettingsError(blas_problem)
        base = (base_dir if base_dir is not None else Path.cwd()).resolve()
        database = Path(get("DATABASE_PATH") or "./var/bot.sqlite3").expanduser()
        redis_url = None
        job_store = get("JOB_STORE")
        if job_store is not None:
            if job_store.startswith("sqlite:///") and len(job_store) > len("sqlite:///"):
                database = Path(job_store[len("sqlite:///"):]).expanduser()  # sqlite:////abs or sqlite:///relative
            elif job_store.startswith(("redis://", "rediss://", "unix://")):
                redis_url = job_store
            else:
                raise SettingsError("JOB_STORE must be sqlite:///<path to the database file> or "
                                    f"redis://host:port/db (got {_without_password(job_store)!r}).")
        if not database.is_absolute():
            database = base / database
        embedded = (get("EMBEDDED_WORKER") or ("false" if redis_url else "true")).lower()
        if embedded not in TRUE_WORDS + FALSE_WORDS:
            raise SettingsError(f"EMBEDDED_WORKER must be true or false (got {embedded!r}).")
        if redis_url is None and embedded in FALSE_WORDS:
            raise SettingsError("EMBEDDED_WORKER=false needs JOB_STORE=redis://…: with SQLite no other process "
                                "can take the jobs.")
        files_dir = Path(get("FILES_DIR")).expanduser() if get("FILES_DIR") else database.parent / "clips"
        if not files_dir.is_absolute():
            files_dir = base / files_dir
        worker_id = get("WORKER_ID")
        if worker_id is not None and (len(worker_id) > 64 or not all(c.isalnum() or c in "-_.:" for c in worker_id)):
            raise SettingsError(f"WORKER_ID must be up to 64 letters, digits, '-', '_', '.' or ':' (got {worker_id!r}).")
        shard_count = _int(env, "SHARD_COUNT", 0, minimum=1) or None
        shard_ids = tuple(_id_list(env, "SHARD_IDS", allow_zero=True)) or None
        if shard_ids is not None:
            if shard_count is None:
                raise SettingsError("SHARD_IDS needs SHARD_COUNT (the number of shards in all).")
            if max(shard_ids) >= shard_count or len(set(shard_ids)) != len(shard_ids):
                raise SettingsError(f"SHARD_IDS must be distinct numbers from 0 to {shard_count - 1} "
                                    f"(SHARD_COUNT={shard_count}).")

        api_base = get("DISCORD_API_BASE")
        if api_base is not None and not api_base.startswith(("http://", "https://")):
            raise SettingsError(f"DISCORD_API_BASE must be an http(s) URL (got {api_base!r}).")
        gateway = get("DISCORD_GATEWAY_URL")
        if gateway is not None and not gateway.startswith(("ws://", "wss://")):
            raise SettingsError(f"DISCORD_GATEWAY_URL must be a ws(s) URL (got {gateway!r}).")

        return cls(
            discord_token=token,
            musicgen_model=get("MUSICGEN_MODEL") or DEFAULT_MODEL,
            musicgen_dtype=dtype,
            musicgen_quantize=None if quantize == "none" else int(quantize),
            discord_guild_ids=guild_ids,
            sync_commands=sync,
            max_seconds=_int(env, "MAX_SECONDS", 60, minimum=1, maximum=3600),
            max_pending_per_user=_int(env, "MAX_PENDING_PER_USER", 2, minimum=1),
            max_queue_size=_int(env, "MAX_QUEUE_SIZE", 50, minimum=1),
            cooldown_seconds=_float(env, "COOLDOWN_SECONDS", 10.0, minimum=0.0),
            admin_role_ids=frozenset(_id_list(env, "ADMIN_ROLE_IDS")),
            admin_user_ids=frozenset(_id_list(env, "ADMIN_USER_IDS")),
            owner_user_ids=frozenset(_id_list(env, "OWNER_USER_IDS")),
            database_path=database,
            clip_files_days=_int(env, "CLIP_FILES_DAYS", 30, minimum=0, maximum=36500),
            max_batch=_int(env, "MAX_BATCH", 4, minimum=1, maximum=64),
            job_timeout_seconds=_float(env, "JOB_TIMEOUT_SECONDS", 600.0, minimum=1.0),
            shutdown_grace_seconds=_float(env, "SHUTDOWN_GRACE_SECONDS", 30.0, minimum=0.0),
            progress_interval_seconds=_float(env, "PROGRESS_INTERVAL_SECONDS", 2.0, minimum=1.0),
            extend_stride_seconds=_float(env, "EXTEND_STRIDE_SECONDS", 18.0, minimum=1.0),
            memory_limit_mb=_int(env, "MEMORY_LIMIT_MB", 0, minimum=1) or None,
            normalize_audio=normalize in TRUE_WORDS,
            log_level=level,
            discord_api_base=api_base.rstrip("/") if api_base else None,
            discord_gateway_url=gateway,
            redis_url=redis_url,
            embedded_worker=embedded in TRUE_WORDS,
            job_lease_seconds=_float(env, "JOB_LEASE_SECONDS", 30.0, minimum=3.0),
            worker_id=worker_id,
            files_dir=files_dir,
            shard_count=shard_count,
            shard_ids=shard_ids,
        )

    @property
    def job_store_text(self) -> str:
        """Where the jobs are, for the log (a Redis password is left out)."""
        if self.redis_url:
            return _without_password(self.redis_url)
        return f"sqlite:///{self.database_path}"

    @property
    def worker_name(self) -> str:
        """``WORKER_ID``, else this machine's name and the process id (unique among running workers)."""
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"

    def apply_discord_endpoints(self) -> None:
        """Point discord.py at ``DISCORD_API_BASE`` / ``DISCORD_GATEWAY_URL`` when they are set (tests, self-hosted)."""
        if self.discord_api_base:
            import discord.http

            discord.http.Route.BASE = self.discord_api_base
            log.info("Discord REST base: %s", self.discord_api_base)
        if self.discord_gateway_url:
            import discord.gateway
            import yarl

            # discord.py calls ``.with_query`` on it: it must be a URL object, not a string.
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.discord_gateway_url)
            log.info("Discord gateway: %s", self.discord_gateway_url)


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number (got {raw!r}).") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise SettingsError(f"{name} must be {bounds} (got {value}).")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number of seconds (got {raw!r}).") from None
    if not value >= minimum or value == float("inf"):
        raise SettingsError(f"{name} must be a finite number of at least {minimum:g} (got {raw!r}).")
    return value


def _without_password(url: str) -> str:
    """``url`` with the password of ``user:password@`` (or a lone ``secret@``) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0] + ":" if ":" in credentials else ""
    return f"{scheme}{sep}{user}***@{host}"


def _id_list(env: Mapping[str, str], name: str, *, allow_zero: bool = False) -> list[int]:
    raw = env.get(name) or ""
    ids = []
    for part in raw.replace(" ", ",").split(","):
        if not part:
            continue
        if not part.isdigit() or int(part) < (0 if allow_zero else 1):
            raise SettingsError(f"{name} must be a comma-separated list of numeric Discord ids (bad entry {part!r}).")
        ids.append(int(part))
    return ids
