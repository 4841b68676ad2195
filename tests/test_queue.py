"""The fair queue: order, limits, positions, cancel/remove/clear, pause, persistence and restart recovery."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bot.jobs import Job, JobStatus, Session
from bot.queue import (
    DEFAULT_LEASE_SECONDS,
    MAX_ATTEMPTS,
    JobQueue,
    Limits,
    QueueRefused,
    QueueState,
    parse_seconds,
)
from bot.redis_store import RedisJobStore
from bot.store import JobStore, SQLiteJobStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, dt: float = 1.0) -> float:
        self.now += dt
        return self.now


OPEN = Limits(max_seconds=30, max_pending_per_user=100, max_queue_size=1000, cooldown_seconds=0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_job(user: int, prompt: str = "", *, session: int | None = None, seconds: int = 5, seed: int = 1,
             guild: int | None = 1) -> Job:
    prompt = prompt or f"u{user}"
    return Job(guild_id=guild, channel_id=10, user_id=user, user_name=f"user{user}", prompt=prompt, model_prompt=prompt,
               new_seconds=seconds, seed=seed, session_id=session)


def submit(queue: JobQueue, clock: Clock, user: int, prompt: str = "", **kw) -> Job:
    clock.tick()
    return queue.submit(make_job(user, prompt, **kw))


def prompts(jobs) -> list[str]:
    return [j.prompt for j in jobs]


def worker_died(store, clock: Clock) -> None:
    """The process that held the running jobs is gone. A store one process owns (SQLite) recovers every running job
    at start; on a shared store (Redis) a job is taken over once its lease ran out (until then its worker may still
    be making it), so the clock moves past the lease there."""
    if store.shared:
        clock.tick(DEFAULT_LEASE_SECONDS + 1)


def test_one_member_flooding_is_interleaved_with_another(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    for i in range(4):
        submit(q, clock, 1, f"a{i}")
    submit(q, clock, 2, "b0")
    submit(q, clock, 2, "b1")
    assert prompts(q.ordered()) == ["a0", "b0", "a1", "b1", "a2", "a3"]
    # FIFO for each member, whatever happens to the others
    assert [j.prompt for j in q.ordered() if j.user_id == 1] == ["a0", "a1", "a2", "a3"]


def test_round_robin_follows_service_a_served_member_goes_to_the_back(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    submit(q, clock, 1, "a0")
    submit(q, clock, 1, "a1")
    clock.tick()
    assert prompts(q.next_batch(1)) == ["a0"]
    submit(q, clock, 2, "b0")  # arrives after a0 started: member 1 was served, so member 2 goes first
    assert prompts(q.ordered()) == ["b0", "a1"]
    submit(q, clock, 3, "c0")  # not served yet either: ahead of member 1's second request
    assert prompts(q.ordered()) == ["b0", "c0", "a1"]
    assert prompts(q.next_batch(2)) == ["b0", "c0"]
    submit(q, clock, 2, "b1")  # member 1 was served longest ago, so a1 is next, then b1
    assert prompts(q.ordered()) == ["a1", "b1"]


def test_sessions_are_lanes_and_members_take_turns_inside(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    s1 = store.add_session(Session(guild_id=1, channel_id=10, thread_id=11, host_id=1, theme="jazz")).id
    # A busy session of three members and two members outside any session.
    submit(q, clock, 1, "s-a0", session=s1)
    submit(q, clock, 1, "s-a1", session=s1)
    submit(q, clock, 1, "s-a2", session=s1)
    submit(q, clock, 2, "s-b0", session=s1)
    submit(q, clock, 3, "s-c0", session=s1)
    submit(q, clock, 3, "s-c1", session=s1)
    submit(q, clock, 4, "d0")
    submit(q, clock, 5, "e0")
    submit(q, clock, 5, "e1")
    order = prompts(q.ordered())
    # Lanes alternate: session, d, e, session, e, session, ... ; inside the session a, b, c, a, c, a.
    assert order == ["s-a0", "d0", "e0", "s-b0", "e1", "s-c0", "s-a1", "s-c1", "s-a2"]
    session_order = [p for p in order if p.startswith("s-")]
    assert session_order == ["s-a0", "s-b0", "s-c0", "s-a1", "s-c1", "s-a2"]


def test_two_sessions_share_the_worker_fairly(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    s1 = store.add_session(Session(guild_id=1, channel_id=10, thread_id=11, host_id=1)).id
    s2 = store.add_session(Session(guild_id=1, channel_id=10, thread_id=12, host_id=2)).id
    for i in range(3):
        submit(q, clock, 10 + i, f"x{i}", session=s1)
    for i in range(3):
        submit(q, clock, 20 + i, f"y{i}", session=s2)
    assert prompts(q.ordered()) == ["x0", "y0", "x1", "y1", "x2", "y2"]


def test_member_served_in_a_session_waits_behind_session_members_not_yet_served(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    s1 = store.add_session(Session(guild_id=1, channel_id=10, thread_id=11, host_id=1)).id
    submit(q, clock, 1, "a0", session=s1)
    submit(q, clock, 1, "a1", session=s1)
    q.next_batch(1)
    submit(q, clock, 2, "b0", session=s1)
    assert prompts(q.ordered()) == ["b0", "a1"]


def test_positions_are_one_based_and_follow_the_fair_order(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    a0, a1 = submit(q, clock, 1), submit(q, clock, 1)
    b0 = submit(q, clock, 2)
    assert [q.position(j.id) for j in (a0, b0, a1)] == [1, 2, 3]
    q.next_batch(1)
    assert q.position(a0.id) is None  # running, not queued
    assert q.position(b0.id) == 1
    assert q.position(12345) is None
    assert len(q) == 2


@pytest.mark.parametrize("seconds", [0, -1, 31, 10**9])
def test_length_outside_the_limit_is_refused(store, clock, seconds):
    q = JobQueue(store, OPEN, clock=clock)
    with pytest.raises(QueueRefused, match="from 1 to 30"):
        q.submit(make_job(1, seconds=seconds))
    assert store.count() == 0


def test_non_integer_length_is_refused(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    with pytest.raises(QueueRefused):
        q.submit(make_job(1, seconds=2.5))  # type: ignore[arg-type]
    with pytest.raises(QueueRefused):
        q.submit(make_job(1, seconds=True))  # type: ignore[arg-type]


def test_pending_per_member_limit_counts_running_jobs(store, clock):
    q = JobQueue(store, Limits(max_pending_per_user=2, cooldown_seconds=0), clock=clock)
    submit(q, clock, 1)
    submit(q, clock, 1)
    with pytest.raises(QueueRefused, match="You already have 2 pending requests") as err:
        submit(q, clock, 1)
    assert "/cancel" in err.value.reason
    submit(q, clock, 2)  # another member is not affected
    q.next_batch(1)  # member 1's first job runs: still pending
    with pytest.raises(QueueRefused):
        submit(q, clock, 1)
    q.finish(q.running()[0].id, JobStatus.DONE)
    submit(q, clock, 1)


def test_queue_size_limit(store, clock):
    q = JobQueue(store, Limits(max_queue_size=3, cooldown_seconds=0, max_pending_per_user=10), clock=clock)
    for user in range(3):
        submit(q, clock, user)
    with pytest.raises(QueueRefused, match=r"queue is full \(3 requests\)"):
        submit(q, clock, 99)
    assert q.submit(make_job(99), exempt=True).id  # an exempt submit (e.g. an admin) still goes in


def test_cooldown(store, clock):
    q = JobQueue(store, Limits(cooldown_seconds=10, max_pending_per_user=10), clock=clock)
    q.submit(make_job(1))
    clock.tick(4)
    with pytest.raises(QueueRefused, match="wait 6 s"):
        q.submit(make_job(1))
    q.submit(make_job(2))  # the cooldown is per member
    clock.tick(6)
    q.submit(make_job(1))


def test_refused_requests_are_not_stored(store, clock):
    q = JobQueue(store, Limits(max_pending_per_user=1, cooldown_seconds=0), clock=clock)
    submit(q, clock, 1)
    with pytest.raises(QueueRefused):
        submit(q, clock, 1)
    assert store.count() == 1


def test_pause_holds_requests_and_resume_serves_them_in_fair_order(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    submit(q, clock, 1, "a0")
    q.pause(1)
    assert q.state(1).paused and q.state(1).holding and not q.state(1).closed and "held" in q.state(1).describe()
    # accepted while paused: written to the store with a position, nothing starts
    for user, prompt in [(1, "a1"), (2, "b0"), (3, "c0"), (2, "b1")]:
        job = submit(q, clock, user, prompt)
        assert store.get(job.id).status is JobStatus.QUEUED and q.position(job.id) is not None
    assert q.next_batch(4) == [] and len(q) == 0 and q.waiting(1) == 5
    q.resume(1)
    assert not q.state(1).holding
    assert prompts(q.next_batch(5)) == ["a0", "b0", "c0", "a1", "b1"]


def test_close_refuses_new_requests_and_keeps_serving_the_waiting_ones(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    submit(q, clock, 1, "a0")
    q.close(1)
    with pytest.raises(QueueRefused, match="closed"):
        submit(q, clock, 2)
    with pytest.raises(QueueRefused, match="closed"):
        q.submit(make_job(2), exempt=True)
    assert store.count() == 1 and "closed" in q.state(1).describe()
    assert prompts(q.next_batch(4)) == ["a0"]  # closed, not paused: the waiting job still runs
    q.pause(1)
    assert "paused and closed" in q.state(1).describe()
    q.close(1, False)
    submit(q, clock, 2, "b0")
    assert q.next_batch(4) == []


def test_cancel_queued_and_running(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    stopped = []
    q.stop_running = stopped.append
    a0, a1 = submit(q, clock, 1), submit(q, clock, 1)
    cancelled = q.cancel(a1.id)
    assert cancelled.status is JobStatus.CANCELLED and store.get(a1.id).finished_at is not None
    assert q.cancel(a1.id) is None  # already final
    q.next_batch(1)
    running = q.cancel(a0.id)
    assert running.status is JobStatus.RUNNING and stopped == [a0.id]
    assert running.error == "Cancelled." and store.get(a0.id).error == "Cancelled."  # seen by a lease renewal
    assert q.cancel(999) is None


def test_jobs_of_lists_running_then_queued(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    a0, a1, a2 = (submit(q, clock, 1) for _ in range(3))
    submit(q, clock, 2)
    q.next_batch(1)
    assert [j.id for j in q.jobs_of(1)] == [a0.id, a1.id, a2.id]
    assert [j.status for j in q.jobs_of(1)] == [JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.QUEUED]


def test_remove_by_position_and_clear(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    a0, a1 = submit(q, clock, 1), submit(q, clock, 1)
    b0 = submit(q, clock, 2)
    removed = q.remove(1, 2)
    assert removed.id == b0.id and removed.status is JobStatus.CANCELLED and "admin" in removed.error
    with pytest.raises(IndexError, match="position 3"):
        q.remove(1, 3)
    with pytest.raises(IndexError):
        q.remove(1, 0)
    q.next_batch(1)
    cleared = q.clear(1)
    assert [j.id for j in cleared] == [a1.id]
    assert store.get(a1.id).status is JobStatus.CANCELLED
    assert q.ordered() == [] and q.running()[0].id == a0.id  # the running job goes on


def test_limits_are_validated_and_capped(store, clock):
    q = JobQueue(store, Limits(max_seconds=20), clock=clock)
    assert q.set_limits(1, max_seconds=10).max_seconds == 10
    with pytest.raises(ValueError, match="from 1 to 20"):
        q.set_limits(1, max_seconds=25)
    with pytest.raises(ValueError):
        q.set_limits(1, max_pending_per_user=0)
    assert q.limits_for(1).max_seconds == 10


def test_state_survives_a_reopened_store(make_store, clock):
    store = make_store()
    q = JobQueue(store, OPEN, clock=clock)
    session = store.add_session(Session(guild_id=1, channel_id=10, thread_id=11, host_id=7, theme="lofi",
                                        default_seconds=8))
    for i in range(3):
        submit(q, clock, 1, f"a{i}")
    submit(q, clock, 2, "b0")
    submit(q, clock, 3, "s0", session=session.id)
    q.next_batch(1)  # a0 runs: member 1 was served
    submit(q, clock, 4, "d0")
    q.set_limits(1, max_pending_per_user=5, cooldown_seconds=3)
    q.pause(1)
    q.close(1)
    order = prompts(q.ordered())
    store.close()

    store2 = make_store()
    q2 = JobQueue(store2, OPEN, clock=clock)
    assert prompts(q2.ordered()) == order == ["b0", "s0", "d0", "a1", "a2"]
    assert q2.state(1) == QueueState(paused=True, closed=True)
    assert q2.limits_for(1) == Limits(max_seconds=30, max_pending_per_user=5, max_queue_size=1000, cooldown_seconds=3)
    s = store2.session_for_thread(11)
    assert (s.id, s.theme, s.default_seconds, s.host_id, s.open) == (session.id, "lofi", 8, 7, True)
    store2.close()


def test_stored_max_seconds_is_capped_by_a_lower_configured_maximum(store, clock):
    JobQueue(store, Limits(max_seconds=30), clock=clock).set_limits(1, max_seconds=25)
    assert JobQueue(store, Limits(max_seconds=10), clock=clock).limits_for(1).max_seconds == 10
    store.close()


def test_recover_requeues_running_jobs_first_in_their_order(make_store, clock):
    store = make_store()
    q = JobQueue(store, OPEN, clock=clock)
    jobs = {p: submit(q, clock, user, p) for user, p in [(1, "a0"), (2, "b0"), (3, "c0"), (1, "a1"), (4, "d0")]}
    taken = q.next_batch(2)
    assert prompts(taken) == ["a0", "b0"]
    store.close()  # the process dies mid-generation

    store2 = make_store()
    worker_died(store2, clock)
    q2 = JobQueue(store2, OPEN, clock=clock)
    recovered = q2.recover()
    assert [j.id for j in recovered] == [jobs["a0"].id, jobs["b0"].id]
    assert all(j.status is JobStatus.QUEUED and j.started_at is None for j in recovered)
    assert prompts(q2.ordered()) == ["a0", "b0", "c0", "d0", "a1"]
    again = q2.next_batch(2)
    assert [(j.prompt, j.seed, j.attempts) for j in again] == [("a0", 1, 2), ("b0", 1, 2)]
    store2.close()


def test_recover_gives_up_on_a_job_that_keeps_killing_the_process(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    job = submit(q, clock, 1)
    for _ in range(MAX_ATTEMPTS - 1):
        q.next_batch(1)
        worker_died(store, clock)
        assert q.recover()[0].status is JobStatus.QUEUED
    q.next_batch(1)
    worker_died(store, clock)
    (failed,) = q.recover()
    assert failed.id == job.id and failed.status is JobStatus.FAILED and "interrupted" in failed.error
    assert q.ordered() == []


def test_estimated_wait_uses_the_measured_rate_and_batches(store, clock):
    q = JobQueue(store, OPEN, batch_size=2, clock=clock)
    q.record_timing(10.0, 20.0)  # 2 s of compute per second of audio
    assert q.rate == pytest.approx(2.0)
    a = submit(q, clock, 1, seconds=10)
    b = submit(q, clock, 2, seconds=4)
    c = submit(q, clock, 3, seconds=5)
    assert q.estimated_wait(a.id) == 0
    assert q.estimated_wait(b.id) == 0  # same batch as a
    assert q.estimated_wait(c.id) == pytest.approx(20.0)  # after the batch (a, b): longest 10 s
    q.next_batch(2)
    clock.tick(5)
    assert q.estimated_wait(c.id) == pytest.approx(15.0)
    q.record_timing(10.0, 40.0)
    assert q.rate == pytest.approx(0.7 * 2.0 + 0.3 * 4.0)


def test_the_wait_counts_the_workers_serving_a_shared_store(store, clock):
    q = JobQueue(store, OPEN, batch_size=1, clock=clock)
    q.record_timing(10.0, 20.0)
    jobs = [submit(q, clock, n, seconds=5) for n in range(1, 4)]
    assert q.estimated_wait(jobs[2].id) == pytest.approx(20.0)  # two 10 s batches ahead, one worker
    q.worker_alive("w1", 30)
    q.worker_alive("w2", 30)
    if not store.shared:  # one process owns SQLite: one worker, whatever is recorded
        assert q.workers() == 1 and q.estimated_wait(jobs[2].id) == pytest.approx(20.0)
        return
    assert q.workers(30) == 2
    assert q.estimated_wait(jobs[2].id) == pytest.approx(10.0)  # the two batches ahead go side by side
    clock.tick(100)
    q.worker_alive("w1", 30)  # w2 silent for three leases: no longer counted
    assert q.workers(30) == 1 and q.estimated_wait(jobs[2].id) == pytest.approx(20.0)


def test_the_model_lowers_the_ceiling_and_bounds_the_total_length(store, clock):
    q = JobQueue(store, Limits(max_seconds=60, cooldown_seconds=0, max_pending_per_user=10), clock=clock)
    assert q.max_seconds(1) == 60 and q.room(50.0) == 60  # no model yet: only the limit
    q.set_model_max(30.5)
    assert (q.max_seconds_ceiling, q.max_seconds(1), q.model_max_seconds) == (30, 30, 30.5)
    assert q.check_length(30) == 30 and q.check_length("12") == 12 and q.check_length(4.0) == 4
    assert q.room(25.0) == 5 and q.room(30.0) == 0
    assert q.check_length(5, 25.0) == 5
    with pytest.raises(QueueRefused, match="add at most 5 s"):
        q.check_length(6, 25.0)
    with pytest.raises(QueueRefused, match="no room to continue"):
        q.check_length(1, 30.0)
    with pytest.raises(ValueError):
        q.set_limits(1, max_seconds=31)
    extend = make_job(1, seconds=6)
    extend.prompt_seconds = 25.0
    with pytest.raises(QueueRefused, match="add at most 5 s"):
        q.submit(extend)
    extend.new_seconds = 5
    assert q.submit(extend).total_seconds == 30.0


@given(st.integers(1, 30))
def test_parse_seconds_accepts_whole_seconds_in_range(n):
    assert parse_seconds(n, 30) == n
    assert parse_seconds(str(n), 30) == n
    assert parse_seconds(float(n), 30) == n


@example("+5")
@example("٥")
@given(st.one_of(st.integers(max_value=0), st.integers(min_value=31), st.floats().filter(lambda f: not (
        f.is_integer() and 1 <= f <= 30)), st.booleans(), st.none(), st.text().filter(
        lambda s: not (s.strip().isascii() and s.strip().isdigit() and 1 <= int(s.strip()) <= 30)),
        st.just(10**100), st.just("9" * 5000)))
def test_parse_seconds_refuses_everything_else_politely(value):
    with pytest.raises(QueueRefused, match="whole number of seconds from 1 to 30"):
        parse_seconds(value, 30)


# -- one queue per guild ----------------------------------------------------------------------------------------
def test_guilds_take_turns_then_lanes_inside_each_guild(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    for i in range(3):
        submit(q, clock, 1, f"A1.{i}", guild=100)  # guild A floods first, with two members
    submit(q, clock, 2, "A2.0", guild=100)
    submit(q, clock, 3, "B3.0", guild=200)
    submit(q, clock, 3, "B3.1", guild=200)
    submit(q, clock, 4, "C4.0", guild=300)
    # A, B, C in turn; inside A its members in turn; FIFO per member
    assert prompts(q.ordered()) == ["A1.0", "B3.0", "C4.0", "A2.0", "B3.1", "A1.1", "A1.2"]
    assert prompts(q.ordered(100)) == ["A1.0", "A2.0", "A1.1", "A1.2"]
    assert prompts(q.ordered(200)) == ["B3.0", "B3.1"]
    assert prompts(q.next_batch(1)) == ["A1.0"]
    submit(q, clock, 5, "A5.0", guild=100)  # A was just served: it goes behind B and C
    assert prompts(q.ordered()) == ["B3.0", "C4.0", "A2.0", "B3.1", "A5.0", "A1.1", "A1.2"]
    served = []
    for _ in range(5):
        clock.tick()
        served += prompts(q.next_batch(1))
    assert served == ["B3.0", "C4.0", "A2.0", "B3.1", "A5.0"]


def test_the_order_across_guilds_survives_a_restart(make_store, clock):
    store = make_store()
    q = JobQueue(store, OPEN, clock=clock)
    for g, user in [(100, 1), (100, 1), (200, 2), (200, 2)]:
        submit(q, clock, user, f"{g}", guild=g)
    q.next_batch(1)  # guild 100 served
    order = [j.id for j in q.ordered()]
    store.close()
    store2 = make_store()
    assert [j.id for j in JobQueue(store2, OPEN, clock=clock).ordered()] == order
    assert prompts(JobQueue(store2, OPEN, clock=clock).ordered()) == ["200", "100", "200"]
    store2.close()


def test_positions_are_per_guild_and_the_estimate_counts_every_guild(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    q.record_timing(1.0, 1.0)  # 1 s of compute per second of audio
    a = submit(q, clock, 1, guild=100, seconds=5)
    b = submit(q, clock, 2, guild=200, seconds=5)
    a2 = submit(q, clock, 3, guild=100, seconds=5)
    assert [q.position(j.id) for j in (a, b, a2)] == [1, 1, 2]
    assert q.estimated_wait(a2.id) == pytest.approx(10.0)  # behind a and b: the worker serves both guilds


def test_limits_are_per_guild(store, clock):
    q = JobQueue(store, Limits(max_seconds=30, max_pending_per_user=1, max_queue_size=2, cooldown_seconds=0),
                 clock=clock)
    q.set_limits(100, max_seconds=5, max_queue_size=1)
    assert q.limits_for(100).max_seconds == 5 and q.limits_for(200).max_seconds == 30
    with pytest.raises(QueueRefused, match="from 1 to 5"):
        q.submit(make_job(1, seconds=6, guild=100))
    q.submit(make_job(1, seconds=20, guild=200))  # another guild keeps the defaults
    q.submit(make_job(1, seconds=5, guild=100))  # one pending per member *per guild*
    with pytest.raises(QueueRefused, match=r"full \(1 requests\)"):
        q.submit(make_job(2, guild=100))
    q.submit(make_job(2, guild=200))  # guild 200's queue holds 2


def test_the_cooldown_is_per_guild(store, clock):
    q = JobQueue(store, Limits(cooldown_seconds=10, max_pending_per_user=10), clock=clock)
    q.submit(make_job(1, guild=100))
    q.submit(make_job(1, guild=200))
    with pytest.raises(QueueRefused, match="wait"):
        q.submit(make_job(1, guild=100))


def test_a_paused_guild_holds_only_its_own_jobs(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    submit(q, clock, 1, "A0", guild=100)
    submit(q, clock, 2, "B0", guild=200)
    submit(q, clock, 2, "B1", guild=200)
    q.pause(100)
    assert not q.state(200).holding
    assert prompts(q.runnable()) == ["B0", "B1"] and len(q) == 2
    assert prompts(q.next_batch(4)) == ["B0", "B1"]
    q.resume(100)
    assert prompts(q.next_batch(4)) == ["A0"]


def test_an_owners_pause_holds_every_guild_and_their_own_pause_stays(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    submit(q, clock, 1, "A0", guild=100)
    submit(q, clock, 2, "B0", guild=200)
    q.pause(100)
    q.pause_everywhere()
    assert q.paused and q.state(200).holding and "owner" in q.state(200).describe()
    submit(q, clock, 3, "B1", guild=200)  # still accepted: held
    assert q.next_batch(4) == []
    q.pause_everywhere(False)
    assert prompts(q.next_batch(4)) == ["B0", "B1"]  # guild 100 is still paused by its own admins


def test_clear_and_remove_touch_one_guild_only(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    a = submit(q, clock, 1, "A0", guild=100)
    b = submit(q, clock, 2, "B0", guild=200)
    b1 = submit(q, clock, 3, "B1", guild=200)
    with pytest.raises(IndexError):
        q.remove(100, 2)
    assert q.remove(200, 2).id == b1.id
    assert [j.id for j in q.clear(200)] == [b.id]
    assert [j.id for j in q.ordered()] == [a.id]
    assert q.jobs_of(1, 200) == [] and [j.id for j in q.jobs_of(1, 100)] == [a.id]


def test_jobs_without_a_guild_are_one_more_guild_and_still_run(store, clock):
    q = JobQueue(store, OPEN, clock=clock)
    old = make_job(1, "legacy", guild=None)  # a row written before guilds were kept
    old.created_at = clock.now - 100
    store.add(old)
    submit(q, clock, 2, "A0", guild=100)
    assert prompts(q.ordered(None)) == ["legacy"] and q.position(old.id) == 1
    assert set(q.guilds()) == {None, 100}
    assert prompts(q.next_batch(2)) == ["legacy", "A0"]


def fresh_store(backend: str, tmp_path_factory, request) -> JobStore:
    """An empty store for one hypothesis example (the function-scoped ``store`` fixture is one per test)."""
    folder = tmp_path_factory.mktemp("rr")
    if backend == "sqlite":
        return SQLiteJobStore(folder / "bot.sqlite3")
    server = request.getfixturevalue("redis_server")
    return RedisJobStore.from_url(server.url, files_dir=folder, prefix=f"rr-{secrets.token_hex(6)}:")


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), min_size=1, max_size=30))
def test_any_arrivals_are_served_one_guild_at_a_time_in_rounds(tmp_path_factory, request, backend, arrivals):
    store = fresh_store(backend, tmp_path_factory, request)
    clock = Clock()
    q = JobQueue(store, OPEN, clock=clock)
    for guild, user in arrivals:  # members are per guild here: user ids do not repeat across guilds
        submit(q, clock, 10 * guild + user, guild=guild)
    order = q.ordered()
    rounds = [[j.id for j in order if j.guild_id == g].index(job.id) for job in order for g in [job.guild_id]]
    assert rounds == sorted(rounds)  # every guild's first job, then every guild's second, ...
    for guild in {g for g, _ in arrivals}:
        assert [j.id for j in order if j.guild_id == guild] == [j.id for j in q.ordered(guild)]
    for user in {10 * g + u for g, u in arrivals}:
        ids = [j.id for j in order if j.user_id == user]
        assert ids == sorted(ids)  # FIFO per member
    store.close()
