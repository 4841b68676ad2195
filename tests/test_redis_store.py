"""What only the Redis store has: several writers at once, exact values in Redis, files shared between machines,
persistence across a crash of Redis, a clear error when Redis is not there, and the events channel.

The contract both backends share is in ``test_store.py`` and ``test_queue.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bot.jobs import Job, JobStatus, Session
from bot.redis_store import RedisEvents, RedisJobStore, RedisUnavailable, parse_event
from bot.store import JobStore
from tests.redis_server import RedisServer, free_port


def make_job(user: int = 1, **kw) -> Job:
    fields = dict(guild_id=5, channel_id=10, user_id=user, user_name="Ada", prompt="lofi", model_prompt="lofi",
                  new_seconds=8, seed=1)
    fields.update(kw)
    return Job(**fields)


@pytest.fixture
def prefix(redis_server: RedisServer) -> Iterator[str]:
    prefix = f"t-{secrets.token_hex(4)}:"
    yield prefix
    client = redis_server.client()
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def connect(server: RedisServer, prefix: str, files_dir: Path | None = None) -> RedisJobStore:
    return RedisJobStore.from_url(server.url, files_dir=files_dir, prefix=prefix)


def test_it_has_every_call_of_the_interface_with_the_same_parameters():
    for name, member in vars(JobStore).items():
        if name.startswith("_"):
            continue
        ours = getattr(RedisJobStore, name)
        if isinstance(member, property):
            assert isinstance(ours, property), name
        else:
            assert inspect.signature(ours).parameters.keys() == inspect.signature(member).parameters.keys(), name


# -- several writers -----------------------------------------------------------------------------------------------
def test_two_workers_racing_for_the_same_jobs_claim_each_exactly_once(redis_server, prefix):
    setup = connect(redis_server, prefix)
    ids = [setup.add(make_job(user=i % 7)).id for i in range(200)]
    start = threading.Barrier(2)
    won: dict[str, list[int]] = {}

    def claim_all(worker: str) -> None:
        store = connect(redis_server, prefix)  # a connection of its own, as another machine has
        start.wait()
        won[worker] = [i for i in ids if store.update_if(i, {"status": JobStatus.QUEUED, "worker_id": None},
                                                         status=JobStatus.RUNNING, worker_id=worker) is not None]
        store.close()

    threads = [threading.Thread(target=claim_all, args=(w,)) for w in ("w1", "w2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(won["w1"] + won["w2"]) == ids  # every job claimed, none twice
    for worker, claimed in won.items():
        assert all(setup.get(i).worker_id == worker for i in claimed)
    assert setup.count(JobStatus.QUEUED) == 0 and [j.id for j in setup.by_status(JobStatus.RUNNING)] == ids
    setup.close()


def test_stores_with_different_prefixes_share_one_redis_without_seeing_each_other(redis_server, prefix):
    a = connect(redis_server, prefix)
    b = connect(redis_server, prefix + "other:")
    a.add(make_job())
    a.set_value("paused", True)
    assert b.count() == 0 and b.get(1) is None and b.get_value("paused") is None
    assert b.add(make_job()).id == 1
    a.close()
    b.close()


# -- exact values ----------------------------------------------------------------------------------------------
def test_discord_ids_and_floats_are_kept_exactly_as_decimal_strings(redis_server, prefix):
    store = connect(redis_server, prefix)
    big = 2**63 - 1  # past 2**53: a double (or Lua's cjson) would round it
    tiny, huge, third = 5e-324, 1.7976931348623157e308, 0.1 + 0.2
    job = store.add(make_job(guild_id=big, user_id=big - 1, interaction_id=big - 2, created_at=third,
                             interaction_created_at=tiny, lease_until=huge, worker_id="", error="line\nbreak"))
    raw = redis_server.client()
    stored = raw.hgetall(f"{prefix}job:{job.id}")
    assert stored[b"guild_id"] == str(big).encode() and stored[b"created_at"] == repr(third).encode()
    assert b"session_id" not in stored and stored[b"status"] == b"queued"  # None: no field; enums by value
    again = store.get(job.id)
    assert again == job
    assert (again.guild_id, again.user_id, again.interaction_id) == (big, big - 1, big - 2)
    assert (again.created_at, again.interaction_created_at, again.lease_until) == (third, tiny, huge)
    assert again.worker_id == "" and again.error == "line\nbreak"  # an empty string is not None
    store.update(job.id, started_at=third)
    assert store.last_started_by_guild() == [(big, None, big - 1, third)]
    assert store.update_if(job.id, {"lease_until": huge, "guild_id": big}, lease_until=tiny).lease_until == tiny
    assert [j.id for j in store.guild_jobs(big, JobStatus.QUEUED)] == [job.id]
    raw.close()
    store.close()


# -- files across machines -----------------------------------------------------------------------------------------
def test_a_file_written_on_one_machine_is_read_on_another_and_dropped_everywhere(redis_server, prefix, tmp_path):
    gateway = connect(redis_server, prefix, tmp_path / "gateway")
    worker = connect(redis_server, prefix, tmp_path / "worker")
    gateway.files_dir.mkdir(parents=True)
    written = gateway.files_dir / "upload-5f3a.npz"
    data = secrets.token_bytes(200_000)
    written.write_bytes(data)
    gateway.share_file(written)
    ttl = redis_server.client().ttl(f"{prefix}file:upload-5f3a.npz")
    assert 29 * 86400 < ttl <= 30 * 86400

    here = worker.local_file(str(written))  # the job names the gateway's path; only the base name travels
    assert here == tmp_path / "worker" / "upload-5f3a.npz" and here.read_bytes() == data
    assert sorted(p.name for p in here.parent.iterdir()) == ["upload-5f3a.npz"]  # no partial file left
    assert gateway.local_file(str(written)) == written  # already here: no download

    missing = worker.local_file("/elsewhere/clips/7.npy")
    assert missing == tmp_path / "worker" / "7.npy" and not missing.exists()  # the caller reports it gone

    worker.drop_file(str(written))
    assert not here.exists() and redis_server.client().exists(f"{prefix}file:upload-5f3a.npz") == 0
    third = connect(redis_server, prefix, tmp_path / "third")
    assert not third.local_file(str(written)).exists()
    with pytest.raises(ValueError):
        third.local_file("/clips/..")
    for store in (gateway, worker, third):
        store.close()


def test_a_file_is_in_use_by_its_base_name_whichever_machine_wrote_it(redis_server, prefix):
    store = connect(redis_server, prefix)
    a = store.add(make_job(prompt_audio_path="/srv/gateway/clips/upload-9c.npz"))
    assert store.file_in_use("/home/worker/clips/upload-9c.npz", besides=0)
    assert not store.file_in_use("/home/worker/clips/upload-9c.npz", besides=a.id)
    assert not store.file_in_use("/srv/gateway/clips/upload-9d.npz", besides=0)
    store.update(a.id, prompt_audio_path=None)
    assert not store.file_in_use("upload-9c.npz", besides=0)
    store.close()


# -- persistence -----------------------------------------------------------------------------------------------
def test_every_acknowledged_write_survives_a_crash_of_redis_with_aof_always(tmp_path):
    server = RedisServer(tmp_path / "redis", appendonly=True, appendfsync="always").start()
    try:
        store = RedisJobStore.from_url(server.url, files_dir=None)
        jobs = [store.add(make_job(user=i)) for i in range(50)]
        for job in jobs[:20]:
            store.update_if(job.id, {"status": JobStatus.QUEUED}, status=JobStatus.RUNNING, worker_id="w",
                            started_at=100.0 + job.id)
        session = store.add_session(Session(guild_id=5, channel_id=10, thread_id=20, host_id=1, theme="rain"))
        store.set_value("paused", True)
        expected = store.by_status()
        store.close()

        server.kill()  # SIGKILL: no shutdown, no final write
        server.start()
        store = RedisJobStore.from_url(server.url, files_dir=None)
        assert store.by_status() == expected and len(expected) == 50
        assert [j.id for j in store.by_status(JobStatus.RUNNING)] == [j.id for j in jobs[:20]]
        assert store.get_session(session.id) == session and store.get_value("paused") is True
        assert (5, None, 19, 120.0) in store.last_started_by_guild()
        assert store.add(make_job()).id == 51  # the id counter survived too
        store.close()
    finally:
        server.stop()


# -- errors ----------------------------------------------------------------------------------------------------
def test_an_unreachable_redis_is_a_clear_error_at_open():
    port = free_port()  # nothing listens there
    with pytest.raises(RedisUnavailable) as caught:
        RedisJobStore.from_url(f"redis://127.0.0.1:{port}/0", files_dir=None)
    message = str(caught.value)
    assert f"127.0.0.1:{port}/0" in message and "JOB_STORE" in message and "\n" not in message


# -- events ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", [b"wake up", b"WAKE", b"cancel", b"cancel ", b"cancel x", b"cancel -3",
                                     b"cancel 0", b"cancel 1.5", b"cancel 99999999999999999999", b"cancel \xd9\xa3",
                                     b"\xff\xfe", b"", b"cancel 1" + b"0" * 100, None, 12])
def test_malformed_events_are_not_understood(payload):
    assert parse_event(payload) is None


def test_well_formed_events_are_understood():
    assert parse_event(b"wake") == ("wake", None) and parse_event("wake") == ("wake", None)
    assert parse_event(b"cancel 42") == ("cancel", 42) and parse_event(b"cancel 9223372036854775807")[1] == 2**63 - 1


class Recorder:
    """Callbacks for :meth:`RedisEvents.listen` that record what arrived and let a test wait for a count."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int | None]] = []
        self.arrived = asyncio.Event()

    def on_wake(self) -> None:
        self.events.append(("wake", None))
        self.arrived.set()

    def on_cancel(self, job_id: int) -> None:
        self.events.append(("cancel", job_id))
        self.arrived.set()

    async def wait_for(self, n: int) -> None:
        while len(self.events) < n:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), timeout=20)


async def until_subscribed(events: RedisEvents) -> None:
    """Publish wakes until one reaches a listener (a message sent before it subscribed reaches nobody)."""
    while await events.publish_wake() == 0:
        await asyncio.sleep(0.01)


async def test_wake_and_cancel_reach_a_listener_and_malformed_messages_are_ignored(redis_server, prefix):
    events = RedisEvents.from_url(redis_server.url, prefix=prefix)
    got = Recorder()
    listener = asyncio.create_task(events.listen(got.on_wake, got.on_cancel))
    await until_subscribed(events)
    await got.wait_for(1)
    raw = redis.asyncio.Redis.from_url(redis_server.url)
    for junk in (b"cancel x", b"wake up", b"\xff", b"cancel 99999999999999999999", b""):
        assert await raw.publish(f"{prefix}events", junk) == 1
    assert await events.publish_cancel(7) == 1
    assert await events.publish_wake() == 1
    await got.wait_for(3)
    assert got.events == [("wake", None), ("cancel", 7), ("wake", None)]  # in order, the junk skipped
    listener.cancel()
    with pytest.raises(asyncio.CancelledError):
        await listener
    await raw.aclose()
    await events.close()


async def test_a_failing_handler_is_logged_and_listening_goes_on(redis_server, prefix, caplog):
    events = RedisEvents.from_url(redis_server.url, prefix=prefix)
    got = Recorder()

    def broken_cancel(job_id: int) -> None:
        raise RuntimeError("handler bug")

    listener = asyncio.create_task(events.listen(got.on_wake, broken_cancel))
    await until_subscribed(events)
    with caplog.at_level(logging.ERROR, logger="bot.redis_store"):
        await events.publish_cancel(3)
        await events.publish_wake()
        await got.wait_for(2)
    assert "cancel handler failed" in caplog.text
    listener.cancel()
    with pytest.raises(asyncio.CancelledError):
        await listener
    await events.close()


async def test_the_listener_subscribes_again_after_redis_restarts(tmp_path, caplog):
    server = RedisServer(tmp_path / "redis").start()
    try:
        events = RedisEvents.from_url(server.url)
        events.max_backoff = 0.2
        got = Recorder()
        listener = asyncio.create_task(events.listen(got.on_wake, got.on_cancel))
        await until_subscribed(events)
        await got.wait_for(1)
        with caplog.at_level(logging.WARNING, logger="bot.redis_store"):
            await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)
            while True:  # the publisher's own connection was lost too: its next call connects again
                try:
                    if await events.publish_cancel(11) == 1:
                        break
                except redis.ConnectionError:
                    pass
                await asyncio.sleep(0.02)
            await got.wait_for(2)
        assert got.events[-1] == ("cancel", 11)
        assert "lost the connection to Redis" in caplog.text
        listener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listener
        await events.close()
    finally:
        server.stop()
