"""Best-effort coroutines (status edits, notices) run in the background of a bot or a worker: kept until they end,
their failures logged, and waited for at shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Background:
    """The running background tasks of one process; :meth:`spawn`, then :meth:`wait` at shutdown."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run ``coro`` in the background, keeping a reference and logging its failure."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def wait(self, timeout: float) -> None:
        """Let the running tasks end, for at most ``timeout`` seconds."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)
