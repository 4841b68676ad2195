"""Files follow their job: an upload, a tune and tokens are deleted when the job ends without a clip (unless another
job still uses them), and after CLIP_FILES_DAYS for finished clips; ``CLIP_FILES_DAYS`` is read and checked."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest

from bot import job_files
from bot.jobs import Job, JobKind, JobStatus, save_tokens, save_upload, tokens_file
from bot.queue import JobQueue, Limits
from bot.settings import Settings, SettingsError
from bot.store import SQLiteJobStore

OPEN = Limits(max_seconds=30, max_pending_per_user=100, max_queue_size=1000, cooldown_seconds=0)
DAY = job_files.DAY_SECONDS


@pytest.fixture
def store(tmp_path):
    s = SQLiteJobStore(tmp_path / "var" / "bot.sqlite3")
    yield s
    s.close()


@pytest.fixture
def queue(store):
    return JobQueue(store, OPEN)


def upload(store) -> str:
    return str(save_upload(store.files_dir, np.zeros((320, 1), np.float32), 32000))


def job(user: int = 1, **kw) -> Job:
    return Job(guild_id=1, channel_id=10, user_id=user, user_name=f"user{user}", prompt="p", model_prompt="p",
               new_seconds=2, seed=1, **kw)


def continue_job(path: str, **kw) -> Job:
    return job(kind=JobKind.CONTINUE, prompt_audio_path=path, prompt_seconds=0.01, **kw)


def done(queue: JobQueue, j: Job) -> Job:
    queue.next_batch(1)
    return queue.finish(j.id, JobStatus.DONE, delivered_message_id=1)


def age(path, days: float) -> None:
    when = os.stat(path).st_mtime - days * DAY
    os.utime(path, (when, when))


# -- a job that ends without a clip ----------------------------------------------------------------------------
def test_cancelling_a_queued_continue_deletes_its_upload(store, queue):
    path = upload(store)
    j = queue.submit(continue_job(path))
    assert os.path.exists(path)
    assert queue.cancel(j.id).status is JobStatus.CANCELLED
    assert not os.path.exists(path)


@pytest.mark.parametrize("end", ["remove", "clear", "failed", "undeliverable"])
def test_every_end_without_a_clip_deletes_the_upload_and_the_tune(store, queue, end):
    path, tune = upload(store), upload(store)
    j = queue.submit(continue_job(path, melody_path=tune))
    if end == "remove":
        queue.remove(1, 1)
    elif end == "clear":
        assert [c.id for c in queue.clear(1)] == [j.id]
    else:
        queue.next_batch(1)
        save_tokens(store.files_dir, j.id, np.zeros((4, 5), np.int64))  # written before an upload that failed
        queue.finish(j.id, JobStatus(end), error="no")
        assert not tokens_file(store.files_dir, j.id).exists()
    assert not os.path.exists(path) and not os.path.exists(tune)


def test_a_delivered_clip_keeps_its_files(store, queue):
    path = upload(store)
    j = queue.submit(continue_job(path))
    queue.next_batch(1)
    save_tokens(store.files_dir, j.id, np.zeros((4, 5), np.int64))
    done(queue, j)
    assert os.path.exists(path) and tokens_file(store.files_dir, j.id).exists()


def test_a_child_still_using_the_parents_upload_keeps_it(store, queue):
    path = upload(store)
    parent = done(queue, queue.submit(continue_job(path)))
    child = queue.submit(continue_job(path, parent_id=parent.id))
    other = queue.submit(continue_job(path, parent_id=parent.id))
    queue.cancel(child.id)
    assert os.path.exists(path)  # the parent's clip (and the other child) still need it
    assert store.file_in_use(path, besides=child.id)
    # the parent's row gone from the picture: only the other child, still queued, keeps it
    store.update(parent.id, status=JobStatus.CANCELLED)
    assert store.file_in_use(path, besides=child.id)
    queue.cancel(other.id)
    assert not os.path.exists(path)


def test_an_extend_child_ending_without_a_clip_leaves_the_parents_tokens(store, queue):
    parent = queue.submit(job())
    queue.next_batch(1)
    tokens = save_tokens(store.files_dir, parent.id, np.zeros((4, 5), np.int64))
    done(queue, parent)
    child = queue.submit(job(kind=JobKind.EXTEND, parent_id=parent.id, prompt_tokens_path=str(tokens)))
    queue.cancel(child.id)
    assert tokens.exists()


def test_release_never_raises_when_the_store_fails(store, queue, monkeypatch):
    path = upload(store)
    j = queue.submit(continue_job(path))

    def broken(*args, **kwargs):
        raise OSError("disk I/O error")

    monkeypatch.setattr(store, "file_in_use", broken)
    assert queue.cancel(j.id).status is JobStatus.CANCELLED
    assert os.path.exists(path)  # kept, for the sweep to take later


# -- retention ----------------------------------------------------------------------------------------------
def test_retention_deletes_old_files_only(store, queue):
    now = 1_000 * DAY
    old_upload, new_upload, pending_upload, orphan, fresh_orphan = (upload(store) for _ in range(5))
    old = done(queue, queue.submit(continue_job(old_upload)))
    old_tokens = save_tokens(store.files_dir, old.id, np.zeros((4, 5), np.int64))
    recent = done(queue, queue.submit(continue_job(new_upload)))
    recent_tokens = save_tokens(store.files_dir, recent.id, np.zeros((4, 5), np.int64))
    pending = queue.submit(continue_job(pending_upload))
    store.update(old.id, finished_at=now - 31 * DAY)
    store.update(recent.id, finished_at=now - 29 * DAY)
    store.update(pending.id, created_at=now - 40 * DAY)
    for path in (old_upload, new_upload, pending_upload, orphan, old_tokens, recent_tokens):
        age(path, (time.time() - now) / DAY + 40)  # every file written 40 days before "now"
    age(fresh_orphan, (time.time() - now) / DAY + 1)

    deleted = {str(p) for p in job_files.sweep(store, 30, now=now)}

    assert deleted == {old_upload, str(old_tokens), orphan}
    for path in (new_upload, recent_tokens, pending_upload, fresh_orphan):
        assert os.path.exists(path)
    assert job_files.sweep(store, 0, now=now + 1000 * DAY) == []  # 0 keeps for ever


def test_retention_keeps_a_parents_files_while_a_recent_child_uses_them(store, queue):
    now = 1_000 * DAY
    path = upload(store)
    parent = done(queue, queue.submit(continue_job(path)))
    tokens = save_tokens(store.files_dir, parent.id, np.zeros((4, 5), np.int64))
    child = done(queue, queue.submit(job(kind=JobKind.EXTEND, parent_id=parent.id, prompt_tokens_path=str(tokens))))
    regen = done(queue, queue.submit(continue_job(path, parent_id=parent.id)))
    store.update(parent.id, finished_at=now - 60 * DAY)
    store.update(child.id, finished_at=now - 2 * DAY)
    store.update(regen.id, finished_at=now - 2 * DAY)
    for p in (path, tokens):
        age(p, (time.time() - now) / DAY + 60)
    assert job_files.sweep(store, 30, now=now) == []
    store.update(child.id, finished_at=now - 31 * DAY)
    store.update(regen.id, finished_at=now - 31 * DAY)
    assert {str(p) for p in job_files.sweep(store, 30, now=now)} == {path, str(tokens)}


async def test_the_sweeper_runs_at_start_and_then_every_interval(store, queue):
    path = upload(store)
    age(path, 40)
    sweeper = job_files.FileSweeper(store, 30, interval=0.05)
    sweeper.start()
    await asyncio.sleep(0.02)
    assert not os.path.exists(path)  # at start
    later = upload(store)
    age(later, 40)
    await asyncio.sleep(0.15)
    assert not os.path.exists(later)  # and again
    await sweeper.stop()
    off = job_files.FileSweeper(store, 0)
    off.start()
    last = upload(store)
    age(last, 40)
    await asyncio.sleep(0.02)
    assert os.path.exists(last)
    await off.stop()


def test_clip_files_days_setting():
    env = {"DISCORD_TOKEN": "t"}
    assert Settings.from_env(env).clip_files_days == 30
    assert Settings.from_env({**env, "CLIP_FILES_DAYS": "0"}).clip_files_days == 0
    with pytest.raises(SettingsError, match="CLIP_FILES_DAYS"):
        Settings.from_env({**env, "CLIP_FILES_DAYS": "-1"})
