"""``python -m bot`` as an operator first meets it: ``--help`` without a token, and no Discord to reach."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_musicgen import build

ROOT = Path(__file__).resolve().parent.parent


def bot(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "MUSICGEN_"))}
    environ.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf-home"), **env)
    return subprocess.run([sys.executable, "-m", "bot", *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=180)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_needs_no_token_and_loads_nothing(tmp_path, flag):
    result = bot(flag, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage: python -m bot")
    for name in ("DISCORD_TOKEN", "MUSICGEN_MODEL", "DATABASE_PATH", "NORMALIZE_AUDIO", "MUSICGEN_BLAS", ".env",
                 "/music", "/admin"):
        assert name in out
    assert "./var/bot.sqlite3" in out and "facebook/musicgen-small" in out
    assert result.stderr == ""
    assert not (tmp_path / "var").exists()  # no database was opened


def test_help_imports_no_mlx():
    code = ("import sys; sys.argv = ['python -m bot', '--help']; import bot.__main__ as m; m.main();"
            "assert not any(n.startswith('mlx') for n in sys.modules), 'mlx imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_unknown_argument_is_one_line(tmp_path):
    result = bot("--token", "x", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--help" in result.stderr


@pytest.mark.parametrize("env, message", [
    ({"NORMALIZE_AUDIO": "maybe"}, "NORMALIZE_AUDIO must be true or false"),
    ({"MUSICGEN_BLAS": "bogus"}, "MUSICGEN_BLAS must be one of auto, openblas, blis, reference"),
])
def test_bad_settings_are_one_line(tmp_path, env, message):
    result = bot(cwd=tmp_path, DISCORD_TOKEN="abc", **env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and "abc" not in result.stderr


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: connections are refused


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mono")
    build(folder, seed=5)
    return folder


@pytest.mark.parametrize("api_base", ["refused", "http://no-such-host.invalid/api/v10"])
def test_unreachable_discord_is_one_line(checkpoint, tmp_path, api_base):
    if api_base == "refused":
        api_base = f"http://127.0.0.1:{closed_port()}/api/v10"
    (tmp_path / ".env").write_text("DATABASE_PATH=data/bot.sqlite3\nMUSICGEN_BLAS=reference\n")
    result = bot(cwd=tmp_path, DISCORD_TOKEN="abc", MUSICGEN_MODEL=str(checkpoint), DISCORD_API_BASE=api_base,
                 DISCORD_GATEWAY_URL="ws://127.0.0.1:1/")
    assert result.returncode == 2, result.stderr
    log = result.stderr
    assert "Traceback" not in log and "aiohttp" not in log, log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Discord could not be reached" in errors[0], log
    assert len(log.splitlines()) < 15, log
    # the relative DATABASE_PATH follows the .env file, and the start-up log says where it is
    assert f"database: {tmp_path.resolve() / 'data' / 'bot.sqlite3'}" in log
    assert (tmp_path / "data" / "bot.sqlite3").exists()
    assert "BLAS: reference BLAS (MUSICGEN_BLAS=reference)" in log  # .env is read before the BLAS is chosen
