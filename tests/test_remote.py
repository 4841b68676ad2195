"""The gateway's side of workers elsewhere (bot.remote): the model facts the workers publish, and the dispatch that
reaches them through the events channel, on both store backends."""

from __future__ import annotations

import asyncio

from bot.jobs import Job, JobStatus
from bot.queue import JobQueue, Limits
from bot.remote import MODEL_KEY, ModelInfo, RemoteDispatch, RemoteModel
from bot.store import JobStore

OPEN = Limits(max_seconds=30, max_pending_per_user=100, max_queue_size=1000, cooldown_seconds=0)
MELODY = ModelInfo(model="facebook/musicgen-melody", sampling_rate=32000, channels=2, frame_rate=50.0,
                   max_seconds=60.0, is_melody=True, max_batch=4, worker_id="mac-1")


class RecordingEvents:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed = False

    async def publish_wake(self) -> None:
        self.sent.append("wake")

    async def publish_cancel(self, job_id: int) -> None:
        self.sent.append(f"cancel {job_id}")

    async def close(self) -> None:
        self.closed = True


def job(user: int, seconds: int = 5) -> Job:
    return Job(guild_id=1, channel_id=10, user_id=user, user_name=f"u{user}", prompt="p", model_prompt="p",
               new_seconds=seconds, seed=1)


def test_model_info_round_trips_through_the_store_and_refuses_junk(store: JobStore) -> None:
    store.set_value(MODEL_KEY, MELODY.to_value())
    assert ModelInfo.from_value(store.get_value(MODEL_KEY)) == MELODY
    for junk in (None, "text", [1, 2], {"model": "x"}, {**MELODY.to_value(), "sampling_rate": "fast"}):
        assert ModelInfo.from_value(junk) is None


def test_remote_model_falls_back_until_a_worker_reports_then_follows_it(store: JobStore) -> None:
    model = RemoteModel(store, fallback_max_seconds=45)
    assert not model.reported
    assert (model.sampling_rate, model.channels, model.max_seconds, model.is_melody) == (32000, 1, 45.0, False)
    store.set_value(MODEL_KEY, MELODY.to_value())
    assert not model.reported  # read only when asked...
    assert model.refresh() == MELODY  # ...now
    assert model.reported
    assert (model.channels, model.max_seconds, model.is_melody, model.max_batch) == (2, 60.0, True, 4)
    store.set_value(MODEL_KEY, "garbage")
    assert model.refresh() == MELODY  # an unreadable report keeps the last good one


async def test_remote_dispatch_wakes_workers_and_cancels_queued_and_running_jobs(store: JobStore) -> None:
    events = RecordingEvents()
    queue = JobQueue(store, OPEN)
    dispatch = RemoteDispatch(queue, store, events)
    queued, running = queue.submit(job(1)), queue.submit(job(2))
    dispatch.start()
    dispatch.wake()
    [claimed] = queue.next_batch(1, worker_id="w1", lease_seconds=30)
    assert claimed.id == queued.id
    assert dispatch.holds(queued.id) and not dispatch.holds(running.id)

    cancelled = dispatch.cancel(running, "Cancelled by you.")  # still queued: cancelled at once
    assert cancelled is not None and cancelled.status is JobStatus.CANCELLED
    dispatch.cancel(claimed, "Cancelled by you.")  # running on w1: recorded, and w1 is told
    await dispatch.stop(1.0)
    assert events.sent == ["wake", "wake", f"cancel {claimed.id}"]
    after = store.get(claimed.id)
    assert after is not None and after.status is JobStatus.RUNNING and after.error == "Cancelled by you."
    # the worker's next lease renewal sees the recorded cancel even if the message was lost
    [renewed] = queue.renew("w1", [claimed.id], 30)
    assert renewed.error == "Cancelled by you."


async def test_a_failed_publish_is_logged_not_raised(store: JobStore, caplog) -> None:
    class Down(RecordingEvents):
        async def publish_wake(self) -> None:
            raise ConnectionError("redis is gone")

    dispatch = RemoteDispatch(JobQueue(store, OPEN), store, Down())
    dispatch.wake()
    await dispatch.stop(1.0)
    await asyncio.sleep(0)
    assert "could not tell the workers 'wake'" in caplog.text and "redis is gone" in caplog.text
