"""The dispatch loop with a scripted worker and a recording outbox: no model, no Discord."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from bot.dispatcher import Delivered, DeliveryError, Dispatcher, Undeliverable
from bot.jobs import ClipData, Job, JobResult, JobStatus
from bot.queue import JobQueue, Limits
from bot.store import SQLiteJobStore

OPEN = Limits(max_seconds=30, max_pending_per_user=100, max_queue_size=1000, cooldown_seconds=0)


class ScriptedRunner:
    """Runs batches by a script: ``outcome[prompt]`` is a status (DONE by default); ``gate`` holds every batch."""

    def __init__(self, max_batch: int = 2) -> None:
        self.max_batch = max_batch
        self.batches: list[list[str]] = []
        self.outcome: dict[str, JobStatus] = {}
        self.gate: asyncio.Event | None = None
        self.cancelled: list[int] = []

    def fit_batch(self, jobs: Sequence[Job]) -> int:
        return min(len(jobs), self.max_batch)

    async def run_batch(self, jobs: Sequence[Job], *,
                        on_progress: Callable[[Job, int, int], Any] | None = None) -> list[JobResult]:
        self.batches.append([j.prompt for j in jobs])
        for job in jobs:
            if on_progress is not None:
                on_progress(job, 1, 2)
        if self.gate is not None:
            await self.gate.wait()
        results = []
        for job in jobs:
            status = self.outcome.get(job.prompt, JobStatus.DONE)
            clip = ClipData(np.zeros((8, 1), np.float32), 8) if status is JobStatus.DONE else None
            results.append(JobResult(job, status, clip=clip, error=None if clip else "broken"))
        return results

    def cancel(self, job_id: int) -> bool:
        self.cancelled.append(job_id)
        return True


class RecordingOutbox:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.refuse: dict[str, DeliveryError] = {}

    def started(self, job: Job) -> None:
        self.events.append(("started", job.prompt))

    def progress(self, job: Job, step: int, total: int) -> None:
        self.events.append(("progress", job.prompt))

    def interrupted(self, job: Job) -> None:
        self.events.append(("interrupted", job.prompt))

    async def notify(self, job: Job, text: str) -> None:
        self.events.append(("notify", job.prompt))

    async def deliver(self, job: Job, clip: ClipData, *, generated_in: float) -> Delivered:
        if job.prompt in self.refuse:
            raise self.refuse[job.prompt]
        return Delivered(1000 + job.id, f"https://example.invalid/{job.id}", "channel")

    async def delivered(self, job: Job) -> None:
        assert job.status is JobStatus.DONE and job.delivered_url  # recorded before the outbox hears of it
        self.events.append(("delivered", job.prompt))

    async def find_delivered(self, job: Job) -> Delivered | None:
        self.events.append(("looked for", job.prompt))
        return None


@pytest.fixture
def store(tmp_path):
    s = SQLiteJobStore(tmp_path / "bot.sqlite3")
    yield s
    s.close()


def job(user: int, prompt: str) -> Job:
    return Job(guild_id=1, channel_id=10, user_id=user, user_name=f"u{user}", prompt=prompt, model_prompt=prompt,
               new_seconds=2, seed=1)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_batches_are_run_recorded_and_handed_to_the_outbox(store):
    queue, runner, outbox = JobQueue(store, OPEN), ScriptedRunner(max_batch=2), RecordingOutbox()
    dispatcher = Dispatcher(queue, store, runner, outbox, batch_window=0.0)
    jobs = [queue.submit(job(u, p)) for u, p in [(1, "ok"), (2, "fails"), (3, "gone"), (4, "refused")]]
    runner.outcome["fails"] = JobStatus.FAILED
    outbox.refuse["gone"] = Undeliverable("channel deleted")
    outbox.refuse["refused"] = DeliveryError("too large")
    dispatcher.start()
    await until(lambda: all(store.get(j.id).status.final for j in jobs))
    await dispatcher.stop(grace=1.0)
    assert runner.batches == [["ok", "fails"], ["gone", "refused"]]
    status = {j.prompt: store.get(j.id).status for j in jobs}
    assert status == {"ok": JobStatus.DONE, "fails": JobStatus.FAILED, "gone": JobStatus.UNDELIVERABLE,
                      "refused": JobStatus.FAILED}
    assert store.get(jobs[0].id).delivered_message_id == 1000 + jobs[0].id
    assert ("delivered", "ok") in outbox.events and ("notify", "fails") in outbox.events
    assert ("notify", "refused") in outbox.events and ("notify", "gone") not in outbox.events
    assert outbox.events[:4] == [("started", "ok"), ("started", "fails"), ("progress", "ok"), ("progress", "fails")]
    assert queue.rate != 4.0  # the batch's timing fed the estimate


async def test_cancelling_a_running_job_asks_the_worker_and_records_the_reason(store):
    queue, runner, outbox = JobQueue(store, OPEN), ScriptedRunner(), RecordingOutbox()
    runner.gate = asyncio.Event()
    dispatcher = Dispatcher(queue, store, runner, outbox, batch_window=0.0)
    running = queue.submit(job(1, "a"))
    dispatcher.start()
    await until(lambda: runner.batches == [["a"]])
    waiting = queue.submit(job(2, "b"))
    assert dispatcher.cancel(running, "Stopped by an admin.").status is JobStatus.RUNNING
    assert runner.cancelled == [running.id] and store.get(running.id).error == "Stopped by an admin."
    assert dispatcher.cancel(waiting, "Cancelled by you.").status is JobStatus.CANCELLED
    runner.outcome["a"] = JobStatus.CANCELLED
    runner.gate.set()
    await until(lambda: store.get(running.id).status is JobStatus.CANCELLED)
    assert store.get(running.id).error == "Stopped by an admin."
    await dispatcher.stop(grace=1.0)


async def test_a_stop_past_the_grace_requeues_the_running_batch(store):
    queue, runner, outbox = JobQueue(store, OPEN), ScriptedRunner(), RecordingOutbox()
    runner.gate = asyncio.Event()  # never set: the batch outlives the grace period
    dispatcher = Dispatcher(queue, store, runner, outbox, batch_window=0.0)
    stuck = queue.submit(job(1, "stuck"))
    dispatcher.start()
    await until(lambda: runner.batches == [["stuck"]])
    later = queue.submit(job(2, "later"))
    await dispatcher.stop(grace=0.05)
    again = store.get(stuck.id)
    assert again.status is JobStatus.QUEUED and again.attempts == 1  # a deliberate stop is not a new attempt
    assert [j.id for j in queue.ordered()] == [stuck.id, later.id]  # and it goes first on the next start
    assert ("interrupted", "stuck") in outbox.events


async def test_a_store_that_never_takes_the_outcome_still_lets_the_clip_through(store, monkeypatch, caplog):
    """Writes refused for longer than ``store_retry_seconds``: retried with backoff meanwhile, then the clip is
    delivered anyway, the failure logged, and the job no longer shown as being made."""
    queue, runner, outbox = JobQueue(store, OPEN), ScriptedRunner(), RecordingOutbox()
    runner.gate = asyncio.Event()
    dispatcher = Dispatcher(queue, store, runner, outbox, batch_window=0.0, store_retry_seconds=0.5,
                            store_backoff=0.05)
    made = queue.submit(job(1, "ok"))
    dispatcher.start()
    await until(lambda: runner.batches == [["ok"]])
    assert dispatcher.holds(made.id)
    refused = []

    def full(job_id, *expected, **changes):
        refused.append(changes)
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "update", full)
    monkeypatch.setattr(store, "update_if", full)
    runner.gate.set()
    await until(lambda: ("delivered", "ok") in outbox.events)
    assert len(refused) >= 4  # "delivering", then DONE, each retried with backoff
    assert not dispatcher.holds(made.id)
    assert "delivering the clip anyway" in caplog.text and "stays marked running" in caplog.text
    monkeypatch.undo()
    assert store.get(made.id).status is JobStatus.RUNNING  # the next start (or loop restart) sorts it out
    await dispatcher.stop(grace=1.0)
