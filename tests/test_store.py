"""The job store's contract, on every backend (SQLite and Redis, through the ``store`` and ``make_store`` fixtures):
round trips, queries, reopening, sessions and key/value state, compare-and-set, job files. The SQLite-only tests
(on-disk durability, migrations of old databases, a read-only file) are at the end, under their own heading."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from bot.jobs import Job, JobKind, JobStatus, Session, SessionStatus
from bot.queue import JobQueue, Limits
from bot.store import SQLiteJobStore


def make_job(user: int = 1, **kw) -> Job:
    fields = dict(guild_id=5, channel_id=10, user_id=user, user_name="Ada", prompt="lofi beats",
                  model_prompt="rain, lofi beats", new_seconds=8, seed=2**63 - 1)
    fields.update(kw)
    return Job(**fields)


def test_a_job_round_trips_with_every_field(store):
    job = make_job(interaction_id=123, interaction_token="tok", application_id=9, interaction_created_at=50.5,
                   status_message_id=77, session_id=None, format="wav")
    store.add(job)
    assert job.id == 1
    assert store.get(job.id) == job
    updated = store.update(job.id, status=JobStatus.DONE, delivered_message_id=88, delivered_url="https://x/y.wav",
                           finished_at=99.0)
    assert updated.status is JobStatus.DONE and updated.delivered_message_id == 88
    assert store.get(job.id) == updated
    assert store.get(999) is None
    with pytest.raises(ValueError, match="unknown job field"):
        store.update(job.id, colour="red")
    with pytest.raises(KeyError):
        store.update(999, status=JobStatus.DONE)
    assert store.get(999) is None  # the failed update made nothing


def test_every_field_round_trips_with_its_type_and_none_clears_a_field(store):
    job = store.add(make_job(guild_id=2**63 - 2, channel_id=2**62 + 3, user_id=2**60 + 1, user_name="Zoë 🎵",
                             prompt="", interaction_id=2**63 - 1, interaction_created_at=0.1 + 0.2,
                             created_at=1733390000.123456789, kind=JobKind.VARIATION, temperature=1.1,
                             prompt_seconds=4.5, error="", upload_limit=25 * 2**20, session_id=None))
    again = store.get(job.id)
    assert again == job
    assert type(again.created_at) is float and type(again.seed) is int and again.kind is JobKind.VARIATION
    cleared = store.update(job.id, interaction_id=None, error="boom", started_at=7)
    assert cleared.interaction_id is None and cleared.error == "boom" and cleared.started_at == 7.0


def test_queries_by_status_user_and_session_keep_creation_order(store):
    session = store.add_session(Session(guild_id=5, channel_id=10, thread_id=20, host_id=1, theme="rain"))
    a = store.add(make_job(1))
    b = store.add(make_job(2, session_id=session.id))
    c = store.add(make_job(1, session_id=session.id))
    store.update(b.id, status=JobStatus.RUNNING, started_at=10.0)
    assert [j.id for j in store.by_status(JobStatus.QUEUED)] == [a.id, c.id]
    assert [j.id for j in store.by_status()] == [a.id, b.id, c.id]
    assert [j.id for j in store.by_status(JobStatus.RUNNING, JobStatus.QUEUED)] == [a.id, b.id, c.id]
    assert [j.id for j in store.jobs_of(1)] == [a.id, c.id]
    assert [j.id for j in store.jobs_of(1, JobStatus.RUNNING)] == []
    assert [j.id for j in store.session_jobs(session.id)] == [b.id, c.id]
    assert [j.id for j in store.session_jobs(session.id, JobStatus.QUEUED)] == [c.id]
    assert store.count(JobStatus.QUEUED, JobStatus.RUNNING) == 3 and store.count() == 3
    assert store.last_started() == [(session.id, 2, 10.0)]
    assert store.last_created_at(1) == c.created_at
    assert store.last_created_at(42) is None
    store.update_many([a.id, c.id], status=JobStatus.CANCELLED)
    assert store.count(JobStatus.CANCELLED) == 2 and store.count(JobStatus.QUEUED) == 0
    assert [j.id for j in store.jobs_of(1, JobStatus.CANCELLED)] == [a.id, c.id]
    store.update_many([c.id, 999], status=JobStatus.DONE)  # an unknown id is skipped
    assert store.get(999) is None and store.get(c.id).status is JobStatus.DONE
    with pytest.raises(ValueError, match="unknown job field"):
        store.update_many([a.id], colour="red")


def test_update_if_compares_then_sets(store):
    job = store.add(make_job())
    claim = {"status": JobStatus.QUEUED, "worker_id": None}  # None matches a missing value
    won = store.update_if(job.id, claim, status=JobStatus.RUNNING, worker_id="w1", lease_until=100.5,
                          started_at=50.0)
    assert won is not None and won.worker_id == "w1" and won.lease_until == 100.5 and won == store.get(job.id)
    assert store.update_if(job.id, claim, status=JobStatus.RUNNING, worker_id="w2") is None
    assert store.get(job.id).worker_id == "w1"
    # a lease renewal and a take-over compare the lease as read (floats compare exactly)
    held = {"status": JobStatus.RUNNING, "worker_id": "w1", "lease_until": won.lease_until}
    assert store.update_if(job.id, held, lease_until=200.25).lease_until == 200.25
    assert store.update_if(job.id, held, worker_id="w2") is None  # the lease moved on
    assert store.update_if(job.id, {"attempts": 0}, attempts=1).attempts == 1
    assert store.update_if(job.id, {}, error="x").error == "x"  # nothing expected: a plain update
    assert store.update_if(999, {}, error="x") is None and store.get(999) is None
    with pytest.raises(ValueError, match="unknown job field"):
        store.update_if(job.id, {"colour": "red"}, error="y")
    with pytest.raises(ValueError, match="unknown job field"):
        store.update_if(job.id, {}, colour="red")
    assert [j.id for j in store.by_status(JobStatus.RUNNING)] == [job.id]  # the indexes follow every change
    assert store.by_status(JobStatus.QUEUED) == []


def test_sessions_open_close_and_survive_reopening(make_store):
    store = make_store()
    s1 = store.add_session(Session(guild_id=5, channel_id=10, thread_id=20, host_id=1, theme="synthwave",
                                   default_seconds=12))
    s2 = store.add_session(Session(guild_id=6, channel_id=11, thread_id=21, host_id=2))
    store.close()
    store = make_store()
    assert [s.id for s in store.open_sessions()] == [s1.id, s2.id]
    assert [s.id for s in store.open_sessions(guild_id=6)] == [s2.id]
    assert store.session_for_thread(20) == s1
    closed = store.close_session(s1.id)
    assert closed.status is SessionStatus.CLOSED and closed.closed_at is not None
    assert store.session_for_thread(20) is None
    assert [s.id for s in store.open_sessions()] == [s2.id]
    assert store.get_session(s1.id).theme == "synthwave"
    assert store.update_session(s2.id, theme="jazz", default_seconds=None) == store.get_session(s2.id)
    assert store.get_session(s2.id).default_seconds is None and store.get_session(99) is None
    with pytest.raises(KeyError):
        store.update_session(99, theme="x")
    with pytest.raises(ValueError, match="unknown session field"):
        store.update_session(s2.id, colour="red")


def test_key_value_state_survives_reopening(make_store):
    store = make_store()
    store.set_value("paused", True)
    store.set_value("limits", {"max_seconds": 12})
    store.set_value("paused", False)
    store.set_value("big", [2**63 - 1, 0.1 + 0.2, None, "é"])
    store.close()
    store = make_store()
    assert store.get_value("paused") is False
    assert store.get_value("limits") == {"max_seconds": 12}
    assert store.get_value("big") == [2**63 - 1, 0.1 + 0.2, None, "é"]
    assert store.get_value("missing", 3) == 3


def test_jobs_survive_reopening(make_store):
    store = make_store()
    job = store.add(make_job())
    store.update(job.id, status=JobStatus.RUNNING, started_at=3.0)
    store.close()
    store = make_store()
    assert store.get(job.id) == replace(job, status=JobStatus.RUNNING, started_at=3.0)
    assert store.last_started_by_guild() == [(5, None, 1, 3.0)]
    assert store.add(make_job()).id == job.id + 1


def test_the_interaction_token_is_not_in_a_jobs_repr():
    job = make_job(interaction_token="secret-token-value")
    assert "secret-token-value" not in repr(job)


def test_recent_done_lists_a_members_clips_newest_first(store):
    jobs = [store.add(make_job(user=1, prompt=f"p{i}")) for i in range(4)]
    store.add(make_job(user=2))
    for job in jobs[:3]:
        store.update(job.id, status=JobStatus.DONE)
    assert [j.prompt for j in store.recent_done(1)] == ["p2", "p1", "p0"]
    assert [j.prompt for j in store.recent_done(1, limit=2)] == ["p2", "p1"]
    assert store.recent_done(2) == []


def test_per_guild_queries(store):
    a = store.add(make_job(user=1, prompt="a", created_at=5.0, guild_id=100))
    b = store.add(make_job(user=1, prompt="b", created_at=7.0, guild_id=200))
    store.update_many([a.id, b.id], status=JobStatus.DONE, started_at=9.0)
    assert [j.prompt for j in store.recent_done_in(100, 1)] == ["a"] and store.recent_done_in(300, 1) == []
    assert store.last_created_in(100, 1) == 5.0 and store.last_created_in(200, 1) == 7.0
    assert store.last_created_in(100, 2) is None
    assert sorted(store.last_started_by_guild()) == [(100, None, 1, 9.0), (200, None, 1, 9.0)]
    assert [j.prompt for j in store.guild_jobs(200, JobStatus.DONE)] == ["b"]
    assert [j.prompt for j in store.guild_jobs(200)] == ["b"]
    assert store.guild_jobs(200, JobStatus.QUEUED) == []


def test_jobs_without_a_guild_are_their_own_guild(store):
    """``guild_id IS ?``: None is a value, the guild of jobs written before guilds were kept."""
    old = store.add(make_job(user=1, prompt="old", guild_id=None, created_at=3.0))
    new = store.add(make_job(user=1, prompt="new", guild_id=100, created_at=4.0))
    assert store.guild_jobs(None) == [old] and store.guild_jobs(100) == [new]
    assert store.guild_jobs(None, JobStatus.QUEUED) == [old]
    assert store.last_created_in(None, 1) == 3.0 and store.last_created_in(100, 1) == 4.0
    store.update(old.id, status=JobStatus.DONE, started_at=8.0)
    assert store.recent_done_in(None, 1) == [store.get(old.id)] and store.recent_done_in(100, 1) == []
    assert store.last_started_by_guild() == [(None, None, 1, 8.0)]
    store.update(new.id, guild_id=None)  # moving a job between guilds moves it between their indexes
    assert [j.id for j in store.guild_jobs(None)] == [old.id, new.id] and store.guild_jobs(100) == []


def test_the_fair_queue_state_keeps_each_members_latest_start(store):
    a = store.add(make_job(user=1, guild_id=7))
    b = store.add(make_job(user=1, guild_id=7))
    session = store.add_session(Session(guild_id=7, channel_id=10, thread_id=20, host_id=1))
    c = store.add(make_job(user=1, guild_id=7, session_id=session.id))
    store.update(a.id, status=JobStatus.RUNNING, started_at=20.0)
    store.update(b.id, status=JobStatus.RUNNING, started_at=10.0)  # started earlier: the latest stays
    store.update(c.id, status=JobStatus.RUNNING, started_at=15.0)
    assert sorted(store.last_started_by_guild(), key=repr) == sorted(
        [(7, None, 1, 20.0), (7, session.id, 1, 15.0)], key=repr)
    assert sorted(store.last_started(), key=repr) == sorted([(None, 1, 20.0), (session.id, 1, 15.0)], key=repr)


def test_files_in_use_and_jobs_since(store):
    a = store.add(make_job(prompt_audio_path="/clips/upload-1.npz", finished_at=None))
    b = store.add(make_job(melody_path="/clips/upload-1.npz"))
    c = store.add(make_job(prompt_tokens_path="/clips/3.npy"))
    assert store.file_in_use("/clips/upload-1.npz", besides=a.id)  # b names it too
    assert not store.file_in_use("/clips/3.npy", besides=c.id)
    assert not store.file_in_use("/clips/other.npz", besides=0)
    store.update(b.id, status=JobStatus.FAILED, finished_at=5.0)  # a job that ended without a clip needs no file
    assert not store.file_in_use("/clips/upload-1.npz", besides=a.id)
    store.update(b.id, status=JobStatus.DONE)
    assert store.file_in_use("/clips/upload-1.npz", besides=a.id)
    store.update(c.id, status=JobStatus.DONE, finished_at=100.0)
    store.update(b.id, finished_at=50.0)
    assert [j.id for j in store.jobs_since(60.0)] == [a.id, c.id]
    assert [j.id for j in store.jobs_since(10.0)] == [a.id, b.id, c.id]


def test_a_file_written_under_files_dir_is_shared_read_and_dropped(store):
    files = store.files_dir
    files.mkdir(parents=True, exist_ok=True)
    path = files / "upload-0a1b.npz"
    path.write_bytes(b"\x00audio\xff" * 100)
    store.share_file(path)
    local = store.local_file(str(path))
    assert local.read_bytes() == b"\x00audio\xff" * 100
    store.drop_file(str(path))
    assert not path.exists() and not store.local_file(str(path)).exists()  # gone everywhere


# -- SQLite only: the file on disk, its migrations, its permissions -----------------------------------------------
def test_sqlite_makes_the_folder_and_keeps_files_next_to_the_database(tmp_path):
    store = SQLiteJobStore(tmp_path / "nested" / "dir" / "bot.sqlite3")  # the parent folder is created
    assert store.add(make_job()).id == 1
    assert store.files_dir == tmp_path / "nested" / "dir" / "clips" and not store.shared
    store.close()


def test_every_write_is_on_disk_before_the_call_returns(tmp_path):
    path = tmp_path / "bot.sqlite3"
    store = SQLiteJobStore(path)
    job = store.add(make_job())
    store.update(job.id, status=JobStatus.RUNNING)
    # A second connection (another process after a kill) sees the committed rows without any close or flush.
    other = sqlite3.connect(path)
    assert other.execute("SELECT status FROM jobs WHERE id = ?", (job.id,)).fetchone() == ("running",)
    assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    other.close()
    store.close()


# The jobs table as the first release wrote it (``seconds``, none of the columns added since), kept verbatim.
FIRST_SCHEMA = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, guild_id INTEGER, channel_id INTEGER NOT NULL, user_id INTEGER NOT NULL,
    user_name TEXT NOT NULL, prompt TEXT NOT NULL, model_prompt TEXT NOT NULL, seconds INTEGER NOT NULL,
    seed INTEGER NOT NULL, session_id INTEGER REFERENCES sessions(id), status TEXT NOT NULL, created_at REAL NOT NULL,
    started_at REAL, finished_at REAL, interaction_id INTEGER, interaction_token TEXT, application_id INTEGER,
    interaction_created_at REAL, status_message_id INTEGER, delivered_message_id INTEGER, delivered_url TEXT,
    error TEXT, format TEXT NOT NULL DEFAULT 'wav'
);
CREATE INDEX jobs_by_status ON jobs (status, id);
CREATE INDEX jobs_by_user ON jobs (user_id, id);
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, guild_id INTEGER, channel_id INTEGER NOT NULL, thread_id INTEGER,
    host_id INTEGER NOT NULL, theme TEXT NOT NULL DEFAULT '', default_seconds INTEGER, status TEXT NOT NULL,
    created_at REAL NOT NULL, closed_at REAL
);
CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def test_a_database_written_by_the_first_schema_keeps_working(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(FIRST_SCHEMA)
    db.execute("INSERT INTO jobs (channel_id, user_id, user_name, prompt, model_prompt, seconds, seed, status, "
               "created_at) VALUES (10, 1, 'Ada', 'old', 'old', 5, 7, 'done', 1.0)")
    db.execute("INSERT INTO jobs (channel_id, user_id, user_name, prompt, model_prompt, seconds, seed, status, "
               "created_at) VALUES (10, 2, 'Bo', 'waiting', 'waiting', 12, 8, 'queued', 2.0)")
    db.commit()
    db.close()
    store = SQLiteJobStore(path)
    columns = {r[1] for r in store._db.execute("PRAGMA table_info(jobs)")}  # noqa: SLF001
    assert "seconds" not in columns and {"new_seconds", "prompt_seconds", "kind"} <= columns
    old = store.get(1)
    assert old is not None and old.prompt == "old" and old.status is JobStatus.DONE
    assert old.new_seconds == 5 and old.prompt_seconds == 0.0 and old.total_seconds == 5
    assert old.kind is JobKind.MUSIC and old.temperature == 1.0 and old.parent_id is None and old.attempts == 0
    waiting = store.get(2)
    assert waiting is not None and waiting.new_seconds == 12 and store.by_status(JobStatus.QUEUED) == [waiting]
    new = store.add(make_job(kind=JobKind.EXTEND, parent_id=1, temperature=1.1, prompt_tokens_path="clips/1.npy",
                             upload_limit=1024, format="flac", prompt_seconds=4.5))
    assert store.get(new.id) == new and new.total_seconds == 12.5
    assert store.recent_done(1) == [old]
    store.close()
    again = SQLiteJobStore(path)  # opening a migrated database again changes nothing
    assert again.get(1) == old and again.get(new.id) == new
    again.close()


def test_an_old_database_gets_per_guild_queues_and_its_jobs_still_run(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(FIRST_SCHEMA)
    db.execute("INSERT INTO jobs (channel_id, user_id, user_name, prompt, model_prompt, seconds, seed, status, "
               "created_at) VALUES (10, 2, 'Bo', 'waiting', 'waiting', 12, 8, 'queued', 2.0)")
    db.execute("INSERT INTO jobs (guild_id, channel_id, user_id, user_name, prompt, model_prompt, seconds, seed, "
               "status, created_at) VALUES (5, 10, 3, 'Cy', 'in a guild', 'in a guild', 4, 9, 'queued', 3.0)")
    db.execute("""INSERT INTO kv VALUES ('queue.limits', '{"max_seconds": 20, "cooldown_seconds": 0}')""")
    db.commit()
    db.close()
    store = SQLiteJobStore(path)
    indexes = {r[1] for r in store._db.execute("PRAGMA index_list(jobs)")}  # noqa: SLF001
    assert "jobs_by_guild" in indexes
    assert [j.prompt for j in store.guild_jobs(None, JobStatus.QUEUED)] == ["waiting"]  # NULL guild: its own
    assert [j.prompt for j in store.guild_jobs(5)] == ["in a guild"]
    queue = JobQueue(store, Limits(max_seconds=30))
    # limits stored before guilds had their own still apply, to every guild, until a guild's admins change them
    assert queue.limits_for(5).max_seconds == 20 and queue.limits_for(6).max_seconds == 20
    queue.set_limits(6, max_seconds=10)
    assert queue.limits_for(5).max_seconds == 20 and queue.limits_for(6).max_seconds == 10
    assert [j.prompt for j in queue.next_batch(4)] == ["waiting", "in a guild"]
    assert store.last_started_by_guild()[0][0] is None
    store.close()


def test_a_read_only_database_is_refused_when_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database that can be read but not written fails at open, not at the first request. SQLite's own read-only
    mode stands in for a file without write permission (which root, as on CI, could write anyway)."""
    from bot.startup import StartupError, open_sqlite

    path = tmp_path / "bot.sqlite3"
    SQLiteJobStore(path).close()
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda p, **kw: connect(f"file:{p}?mode=ro", uri=True, **kw))
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        SQLiteJobStore(path)
    with pytest.raises(StartupError, match="Cannot use the database .*DATABASE_PATH"):
        open_sqlite(path)
    monkeypatch.undo()
    store = SQLiteJobStore(path)  # the probe changed nothing
    assert store.count() == 0
    store.close()
