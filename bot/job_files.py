"""The files that belong to jobs (no MLX, no discord.py): a /continue upload, a melody tune and the EnCodec tokens
kept for Extend, all in the store's ``files_dir``.

Files follow their job. When a job ends without a clip (cancelled, failed, undeliverable) :func:`release` deletes
its upload, its tune and its own tokens, unless another job still uses the same file (Regenerate, Variation and
Extend reuse their parent's files). After ``CLIP_FILES_DAYS`` :class:`FileSweeper` deletes the files of jobs that
finished that long ago, at start and once a day; a button on such a clip then answers that its data is gone.
Everything goes through the :class:`~bot.store.JobStore` protocol, so any store works.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from .jobs import Job, JobStatus, tokens_file
from .store import JobStore

log = logging.getLogger(__name__)

DAY_SECONDS = 24 * 60 * 60
SWEEP_INTERVAL_SECONDS = DAY_SECONDS
FILE_SUFFIXES = (".npy", ".npz")  # tokens; uploads and tunes


def _same_file(path: str | Path) -> str:
    return os.path.realpath(path)


def release(store: JobStore, job: Job) -> list[Path]:
    """Delete the files of ``job``, which ended without a clip: its upload and tune unless another job that is
    queued, running or done still uses them, and its own tokens (nothing can extend a clip never delivered).
    Returns what was deleted; never raises (a file left behind is swept later)."""
    if job.status is JobStatus.DONE or not job.status.final:
        return []
    deleted = []
    try:
        candidates = [p for p in (job.prompt_audio_path, job.melody_path)
                      if p and not store.file_in_use(p, besides=job.id)]
        if store.files_dir is not None:
            candidates.append(str(tokens_file(store.files_dir, job.id)))
        for path in map(Path, candidates):
            existed = path.exists()
            store.drop_file(path)  # here and, on a shared store, wherever it was shared
            if existed:
                deleted.append(path)
    except Exception as exc:  # noqa: BLE001 - the job has ended either way; the sweep retries
        log.warning("job %d: could not delete its files: %s", job.id, exc)
    if deleted:
        log.info("job %d %s: deleted %s", job.id, job.status.value, ", ".join(p.name for p in deleted))
    return deleted


def paths_used_by(jobs: list[Job], files_dir: Path) -> set[str]:
    """Every file these jobs need (real paths): uploads, tunes, the tokens they extend and their own tokens."""
    used = set()
    for job in jobs:
        for path in (job.prompt_audio_path, job.melody_path, job.prompt_tokens_path):
            if path:
                used.add(_same_file(path))
        used.add(_same_file(tokens_file(files_dir, job.id)))
    return used


def sweep(store: JobStore, days: float, *, now: float | None = None) -> list[Path]:
    """Delete the files in ``store.files_dir`` older than ``days`` that no job uses which is queued, running or
    finished within ``days``. ``days`` 0 keeps everything. Returns what was deleted."""
    files_dir = store.files_dir
    if days <= 0 or files_dir is None or not files_dir.is_dir():
        return []
    now = time.time() if now is None else now
    cutoff = now - days * DAY_SECONDS
    used = paths_used_by(store.jobs_since(cutoff), files_dir)
    deleted = []
    for path in files_dir.iterdir():
        if path.suffix not in FILE_SUFFIXES or _same_file(path) in used:
            continue
        try:
            if path.stat().st_mtime < cutoff:  # a newer file may belong to a job being queued right now
                path.unlink()
                deleted.append(path)
        except FileNotFoundError:
            continue
    if deleted:
        log.info("deleted %d file(s) of jobs finished over %g day(s) ago", len(deleted), days)
    return deleted


class FileSweeper:
    """Runs :func:`sweep` now and then every ``interval`` seconds on the event loop (the store's thread);
    :meth:`start` and :meth:`stop`. Does nothing when ``days`` is 0."""

    def __init__(self, store: JobStore, days: float, *, interval: float = SWEEP_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.days = days
        self.interval = interval
        self.clock = clock
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.days > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="file-sweeper")

    async def _run(self) -> None:
        while True:
            try:
                sweep(self.store, self.days, now=self.clock())
            except Exception:  # a store or disk error today; tomorrow's sweep tries again
                log.exception("sweeping old job files failed")
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
