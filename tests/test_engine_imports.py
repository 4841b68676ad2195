"""The bot's engine (jobs, store, queue, job_files, dispatcher, the Redis store, the gateway's remote dispatch) imports neither MLX, discord.py nor core: a process that
schedules jobs and never generates or talks to Discord itself needs none of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BLOCKER = """
import sys

class Blocked:
    '''Refuses mlx, discord and core (and anything under them), as if they were not installed.'''

    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('mlx', 'discord', 'core'):
            raise ModuleNotFoundError(f'{name} is blocked in this test', name=name)
        return None

sys.meta_path.insert(0, Blocked())
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_the_engine_imports_without_mlx_discord_or_core():
    done = run("import bot.jobs, bot.store, bot.queue, bot.job_files, bot.dispatcher, bot.remote, bot.redis_store\n"
               "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'discord', 'core'))\n"
               "assert not loaded, loaded\n"
               "print('ok')\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_blocker_blocks():
    """The check above can fail: the worker (the one module that touches the model) cannot be imported."""
    done = run("import bot.worker\n")
    assert done.returncode != 0 and "core is blocked" in done.stderr
