"""The fair job queue: round-robin between guilds, then between lanes, then between the members of a session,
FIFO per member.

Each guild (server) has its own queue as its members and admins see it: positions, limits, pause and close are
per guild, and nothing of one guild is listed to another. The one worker takes turns between guilds the same way
as between lanes. A *lane* is one open session (all its members share it) or one member's requests outside
sessions. The next job comes from the lane served least recently (a lane never served comes first, lanes that tie
in arrival order), so a lane that was just served goes to the back: round-robin in which a newcomer does not wait
behind a member whose clip is already being made. Inside a session lane the members take turns the same way. The
queue keeps no jobs in memory: the store is the single source of truth, so the order, the pause and close state and
the limits survive a restart.

*Pause* holds a guild's queue (requests are accepted and wait, nothing of it starts); *close* refuses new requests.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from typing import Any

from . import job_files
from .jobs import Job, JobStatus
from .store import JobStore

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a job interrupted this many times (a crash or a kill mid-generation) is failed, not retried
DEFAULT_RATE = 4.0  # seconds of compute per second of audio until the first job has been measured
RATE_SMOOTHING = 0.3
LOCAL_WORKER = "local"  # the worker id of the embedded worker (one process owns the store)
DEFAULT_LEASE_SECONDS = 30.0  # how long a claimed job is held without its worker renewing the lease

# Stored state. ``queue.paused`` and ``queue.limits`` predate guilds: the first is the owners' pause of every guild,
# the second the limits every guild starts from; each guild's own are ``<key>.guild.<id>``.
_PAUSED_KEY = "queue.paused"
_CLOSED_KEY = "queue.closed"
_LIMITS_KEY = "queue.limits"
_RATE_KEY = "queue.rate"
_WORKERS_KEY = "workers.seen"  # {worker id: when it last said it is alive} (a shared store's workers)


class QueueRefused(Exception):
    """A request was not queued; ``reason`` is a short, polite sentence to show the member."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """One guild's limits (per member, and for the guild's queue); the settings give every guild's defaults and
    each guild's admins can change theirs at run time (persisted in the store)."""

    max_seconds: int = 30
    max_pending_per_user: int = 2
    max_queue_size: int = 50
    cooldown_seconds: float = 10.0

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        """The configured limits (:meth:`JobQueue.set_model_max` lowers ``max_seconds`` to the model's)."""
        return cls(max_seconds=settings.max_seconds, max_pending_per_user=settings.max_pending_per_user,
                   max_queue_size=settings.max_queue_size, cooldown_seconds=settings.cooldown_seconds)

    def check(self, ceiling: int | None = None) -> None:
        """Raise ValueError (message fit for an admin) when a value is out of range."""
        if self.max_seconds < 1 or (ceiling is not None and self.max_seconds > ceiling):
            raise ValueError(f"The maximum length must be from 1 to {ceiling} seconds.")
        if self.max_pending_per_user < 1:
            raise ValueError("Each member must be allowed at least 1 pending request.")
        if self.max_queue_size < 1:
            raise ValueError("The queue must hold at least 1 request.")
        if not 0 <= self.cooldown_seconds <= 86400:
            raise ValueError("The cooldown must be from 0 to 86400 seconds.")


def parse_seconds(value: object, max_seconds: int) -> int:
    """A length in whole seconds from 1 to ``max_seconds`` from whatever a client sent (an int, a whole float, a
    string of ASCII digits); :class:`QueueRefused` with a polite reason otherwise."""
    bad = QueueRefused(f"The length must be a whole number of seconds from 1 to {max_seconds}.")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        value = value.strip()
        if not value.isascii() or not value.isdigit() or len(value) > 12:
            raise bad
        value = int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise bad
        value = int(value)
    if not isinstance(value, int) or not 1 <= value <= max_seconds:
        raise bad
    return value


class Scope(Enum):
    """A scope wider than one guild: every guild (the owners' view, the dispatcher's order)."""

    ALL = "all"


ALL = Scope.ALL
GuildScope = int | None | Scope  # a guild id, None for jobs without a guild (legacy rows), or ALL


def guild_key(guild_id: int | None) -> str:
    """The guild's part of a stored key: its id, or ``none`` for jobs without a guild (legacy rows)."""
    return "none" if guild_id is None else str(int(guild_id))


@dataclass(frozen=True)
class QueueState:
    """Whether a guild's queue holds (``paused``: requests wait, nothing starts) and whether it takes new requests
    (``closed``: they are refused); ``paused_everywhere`` is an owner's pause of every guild."""

    paused: bool = False
    closed: bool = False
    paused_everywhere: bool = False

    @property
    def holding(self) -> bool:
        """Nothing of this guild starts now."""
        return self.paused or self.paused_everywhere

    def describe(self) -> str:
        """One line for members and admins: which of pause and close is in force."""
        if self.holding and self.closed:
            return "The queue is paused and closed: waiting requests are held, new ones are refused for now."
        if self.closed:
            return "The queue is closed to new requests for now; waiting requests are still being made."
        if self.paused_everywhere:
            return "The queue is paused by the bot's owner: requests are accepted and held, nothing new starts."
        if self.paused:
            return "The queue is paused by an admin: requests are accepted and held, nothing new starts."
        return "The queue is running."


class JobQueue:
    """Fair scheduling, limits, pause and positions over a :class:`~bot.store.JobStore`, per guild.

    Every guild (server) has its own queue view, limits, pause and close state; the one worker serves them
    round-robin: guilds take turns, then the lanes inside a guild (sessions, members), FIFO per member. Jobs
    without a guild (rows written before guilds were kept) form one more guild, ``None``, served like any other.

    Use it only from the event-loop thread. ``limits`` are the configured defaults: an admin's changes stored
    for a guild take precedence there, and ``limits.max_seconds`` is the ceiling nobody can raise ``max_seconds``
    above; :meth:`set_model_max` lowers that ceiling to the model's longest clip. :meth:`check_length` is the one
    check of a requested length, used by every way in (commands, buttons, :meth:`submit`).
    ``stop_running``, when set (e.g. to ``worker.cancel``), is called with the id of a running job that is
    cancelled so its generation stops.
    """

    def __init__(self, store: JobStore, limits: Limits | None = None, *, batch_size: int = 1,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.batch_size = batch_size
        self.stop_running: Callable[[int], Any] | None = None
        self._defaults = limits or Limits()
        self.max_seconds_ceiling = self._defaults.max_seconds  # settings ∧ model: admins choose limits up to it
        self.model_max_seconds: float | None = None  # the longest clip (continued audio included) the model makes
        # When each guild, each lane of a guild and each member inside a session was last served (fair share).
        self._guild_served: dict[int | None, float] = {}
        self._lane_served: dict[tuple[int | None, tuple[str, int]], float] = {}
        self._member_served: dict[tuple[int, int], float] = {}
        self._read_served()

    def _read_served(self) -> None:
        """The fair state as the store has it (every worker's starts)."""
        for guild_id, session_id, user_id, started in self.store.last_started_by_guild():
            lane = (guild_id, ("session", session_id) if session_id is not None else ("user", user_id))
            self._lane_served[lane] = max(self._lane_served.get(lane, started), started)
            self._guild_served[guild_id] = max(self._guild_served.get(guild_id, started), started)
            if session_id is not None:
                self._member_served[(session_id, user_id)] = max(self._member_served.get((session_id, user_id),
                                                                                         started), started)

    # -- limits -------------------------------------------------------------------------------------------------
    @property
    def limits(self) -> Limits:
        """The limits of a guild whose admins changed none: the settings, then limits stored before guilds had
        their own (they applied to every guild then, so they still do)."""
        return self._read_limits(self._defaults, self.store.get_value(_LIMITS_KEY))

    def limits_for(self, guild_id: int | None) -> Limits:
        """The limits in force in one guild."""
        return self._read_limits(self.limits, self.store.get_value(_guild_limits_key(guild_id)))

    def _read_limits(self, base: Limits, saved: Any) -> Limits:
        known = {f.name for f in fields(Limits)}
        merged = replace(base, **{k: v for k, v in (saved or {}).items() if k in known})
        merged = replace(merged, max_seconds=min(merged.max_seconds, self.max_seconds_ceiling))
        try:
            merged.check(self.max_seconds_ceiling)
        except (ValueError, TypeError):
            log.warning("stored queue limits %s are invalid; using the configured ones", saved)
            return replace(self._defaults, max_seconds=min(self._defaults.max_seconds, self.max_seconds_ceiling))
        return merged

    def set_limits(self, guild_id: int | None, **changes: Any) -> Limits:
        """Change some limits of one guild (ValueError with a readable message when out of range) and return
        them; other guilds keep theirs."""
        value = replace(self.limits_for(guild_id), **changes)
        value.check(self.max_seconds_ceiling)
        self.store.set_value(_guild_limits_key(guild_id), asdict(value))
        log.info("queue limits of guild %s set to %s", guild_key(guild_id), value)
        return value

    def set_model_max(self, model_max_seconds: float) -> None:
        """The model is loaded: no clip may be longer than ``model_max_seconds`` in all (the continued audio
        included), and the ceiling of ``max_seconds`` becomes the lower of the configured one and the model's
        (stored limits above it are lowered when read)."""
        self.model_max_seconds = float(model_max_seconds)
        self.max_seconds_ceiling = max(1, min(self.max_seconds_ceiling, int(model_max_seconds)))

    def max_seconds(self, guild_id: int | None = None) -> int:
        """The most new seconds a member of ``guild_id`` may ask for now (settings ∧ model ∧ the admins' limit)."""
        return self.limits_for(guild_id).max_seconds

    def room(self, prompt_seconds: float = 0.0, *, guild_id: int | None = None) -> int:
        """The most new seconds a clip continuing ``prompt_seconds`` of audio may get (below 1: none)."""
        most = self.max_seconds(guild_id)
        if self.model_max_seconds is None:
            return most
        return min(most, int(self.model_max_seconds - prompt_seconds + 1e-6))

    def check_length(self, new_seconds: object, prompt_seconds: float = 0.0, *, guild_id: int | None = None) -> int:
        """``new_seconds`` as whole seconds if a clip in ``guild_id`` may add that much to ``prompt_seconds`` of
        audio (the one length check); :class:`QueueRefused` with a polite reason otherwise."""
        room = self.room(prompt_seconds, guild_id=guild_id)
        if prompt_seconds > 0 and room < 1:
            raise QueueRefused(f"That audio is already {prompt_seconds:.1f} s long; I can make clips of at most "
                               f"{self.model_max_seconds:g} s in all, so there is no room to continue it.")
        seconds = parse_seconds(new_seconds, self.max_seconds(guild_id))
        if seconds > room:
            raise QueueRefused(f"That audio is {prompt_seconds:.1f} s long, so I can add at most {room} s to it "
                               f"(at most {self.model_max_seconds:g} s in all).")
        return seconds

    # -- pause (hold) and close (refuse new) ----------------------------------------------------------------------
    def state(self, guild_id: int | None) -> QueueState:
        """Pause and close state of one guild (the owners' pause of every guild included)."""
        key = guild_key(guild_id)
        return QueueState(paused=bool(self.store.get_value(f"{_PAUSED_KEY}.guild.{key}", False)),
                          closed=bool(self.store.get_value(f"{_CLOSED_KEY}.guild.{key}", False)),
                          paused_everywhere=self.paused)

    @property
    def paused(self) -> bool:
        """Paused everywhere (by an owner): no job of any guild starts."""
        return bool(self.store.get_value(_PAUSED_KEY, False))

    def pause(self, guild_id: int | None) -> None:
        """Hold one guild's queue: its requests are still accepted and wait; none of them starts (a running batch
        finishes). Other guilds go on."""
        self.store.set_value(f"{_PAUSED_KEY}.guild.{guild_key(guild_id)}", True)
        log.info("queue of guild %s paused", guild_key(guild_id))

    def resume(self, guild_id: int | None) -> None:
        """Let one guild's held requests start again, in their fair order."""
        self.store.set_value(f"{_PAUSED_KEY}.guild.{guild_key(guild_id)}", False)
        log.info("queue of guild %s resumed", guild_key(guild_id))

    def pause_everywhere(self, paused: bool = True) -> None:
        """Hold (or, with ``False``, release) every guild's queue at once: for the bot's owners."""
        self.store.set_value(_PAUSED_KEY, bool(paused))
        log.info("queue %s everywhere", "paused" if paused else "resumed")

    def close(self, guild_id: int | None, closed: bool = True) -> None:
        """Refuse (or, with ``False``, accept again) new requests in one guild; waiting ones are still made."""
        self.store.set_value(f"{_CLOSED_KEY}.guild.{guild_key(guild_id)}", bool(closed))
        log.info("queue of guild %s %s", guild_key(guild_id), "closed" if closed else "opened")

    # -- submitting ---------------------------------------------------------------------------------------------
    def submit(self, job: Job, *, exempt: bool = False) -> Job:
        """Check the limits of the job's guild, write the job as queued and return it with its id, or raise
        :class:`QueueRefused`. A paused queue accepts the job (it waits); a closed one refuses it.

        ``exempt`` skips the per-member, cooldown and queue-size limits (but not close or the length).
        """
        guild_id = job.guild_id
        if self.state(guild_id).closed:
            raise QueueRefused("The queue is closed to new requests by an admin right now. "
                               "Please try again a bit later.")
        limits = self.limits_for(guild_id)
        job.new_seconds = self.check_length(job.new_seconds, job.prompt_seconds, guild_id=guild_id)
        now = self.clock()
        if not exempt:
            if len(self.store.guild_jobs(guild_id, JobStatus.QUEUED)) >= limits.max_queue_size:
                raise QueueRefused(f"The queue is full ({limits.max_queue_size} requests). "
                                   "Please try again in a few minutes.")
            pending = len(self.jobs_of(job.user_id, guild_id))
            if pending >= limits.max_pending_per_user:
                noun = "request" if limits.max_pending_per_user == 1 else "requests"
                raise QueueRefused(f"You already have {pending} pending {noun} (the limit is "
                                   f"{limits.max_pending_per_user}). You can add another when one is done, "
                                   "or /cancel one.")
            last = self.store.last_created_in(guild_id, job.user_id)
            if last is not None and now - last < limits.cooldown_seconds:
                wait = max(1, round(limits.cooldown_seconds - (now - last)))
                raise QueueRefused(f"Please wait {wait} s before your next request.")
        job.status = JobStatus.QUEUED
        job.created_at = now
        job.started_at = job.finished_at = None
        self.store.add(job)
        log.info("job %d queued: guild=%s user=%s new_seconds=%d seed=%d session=%s", job.id, guild_key(guild_id),
                 job.user_id, job.new_seconds, job.seed, job.session_id)
        return job

    # -- order and positions ------------------------------------------------------------------------------------
    def ordered(self, guild_id: GuildScope = ALL) -> list[Job]:
        """Queued jobs in the order they will run once nothing is held (jobs interrupted by a restart first):
        round-robin between guilds, then between lanes inside a guild. With a guild: only its jobs, in that
        order. On a shared store the fair state is read anew: other workers start jobs too."""
        if self.store.shared:
            self._read_served()
        queued = self.store.by_status(JobStatus.QUEUED)
        resumed = [j for j in queued if j.attempts > 0]
        guilds: dict[int | None, list[Job]] = defaultdict(list)
        for job in queued:
            if job.attempts == 0:
                guilds[job.guild_id].append(job)
        streams = []
        for guild, jobs in guilds.items():
            guild_order = self._guild_order(guild, jobs)
            key = (self._guild_served.get(guild, float("-inf")), min(j.created_at for j in jobs),
                   min(j.id for j in jobs))
            streams.append((key, guild_order))
        streams.sort(key=lambda s: s[0])
        order = resumed + _interleave([jobs for _, jobs in streams])
        return order if guild_id is ALL else [j for j in order if j.guild_id == guild_id]

    def runnable(self) -> list[Job]:
        """:meth:`ordered` without the jobs of held (paused) guilds: what may start now, in order."""
        if self.paused:
            return []
        held: dict[int | None, bool] = {}
        order = []
        for job in self.ordered():
            if job.guild_id not in held:
                held[job.guild_id] = self.state(job.guild_id).paused
            if not held[job.guild_id]:
                order.append(job)
        return order

    def _guild_order(self, guild_id: int | None, jobs: list[Job]) -> list[Job]:
        lanes: dict[tuple[str, int], list[Job]] = defaultdict(list)
        for job in jobs:
            lanes[job.lane].append(job)
        streams = []
        for lane, lane_jobs in lanes.items():
            if lane[0] == "session":
                lane_jobs = self._session_order(lane[1], lane_jobs)
            key = (self._lane_served.get((guild_id, lane), float("-inf")), lane_jobs[0].created_at, lane_jobs[0].id)
            streams.append((key, lane_jobs))
        streams.sort(key=lambda s: s[0])
        return _interleave([lane_jobs for _, lane_jobs in streams])

    def _session_order(self, session_id: int, jobs: list[Job]) -> list[Job]:
        members: dict[int, list[Job]] = defaultdict(list)
        for job in jobs:
            members[job.user_id].append(job)
        streams = sorted(members.items(), key=lambda m: (
            self._member_served.get((session_id, m[0]), float("-inf")), m[1][0].created_at, m[1][0].id))
        return _interleave([member_jobs for _, member_jobs in streams])

    def position(self, job_id: int) -> int | None:
        """1-based place of a queued job among its guild's queued jobs (what /queue shows that guild), or None
        when it is not queued."""
        job = self.store.get(job_id)
        if job is None or job.status is not JobStatus.QUEUED:
            return None
        for i, queued in enumerate(self.ordered(job.guild_id), 1):
            if queued.id == job_id:
                return i
        return None

    def running(self, guild_id: GuildScope = ALL) -> list[Job]:
        """Jobs being generated now (of one guild, or of all)."""
        running = self.store.by_status(JobStatus.RUNNING)
        return running if guild_id is ALL else [j for j in running if j.guild_id == guild_id]

    def jobs_of(self, user_id: int, guild_id: GuildScope = ALL) -> list[Job]:
        """A member's running jobs, then their queued jobs in run order (in one guild, or in all)."""
        running = [j for j in self.running(guild_id) if j.user_id == user_id]
        return running + [j for j in self.ordered(guild_id) if j.user_id == user_id]

    def waiting(self, guild_id: GuildScope = ALL) -> int:
        """How many jobs are queued (in one guild, or in all), held ones included."""
        if guild_id is ALL:
            return self.store.count(JobStatus.QUEUED)
        return len(self.store.guild_jobs(guild_id, JobStatus.QUEUED))

    def guilds(self) -> list[int | None]:
        """Every guild with a queued or running job (for the owners' overview)."""
        seen: dict[int | None, None] = {}
        for job in self.store.by_status(JobStatus.RUNNING, JobStatus.QUEUED):
            seen.setdefault(job.guild_id)
        return list(seen)

    def __len__(self) -> int:
        """Queued jobs that may start now (those of held guilds are not counted)."""
        return len(self.runnable())

    # -- taking work --------------------------------------------------------------------------------------------
    def next_batch(self, n: int, *, worker_id: str = LOCAL_WORKER, lease_seconds: float = DEFAULT_LEASE_SECONDS
                   ) -> list[Job]:
        """Claim the first ``n`` jobs in fair order that may start (none while paused) for ``worker_id``: each is
        marked running, held by a lease of ``lease_seconds`` that the worker renews (:meth:`renew`). A claim is a
        compare-and-set on the job still being queued, so workers sharing a store never take the same job; one
        taken by another worker meanwhile is passed over."""
        if n < 1:
            return []
        batch: list[Job] = []
        for job in self.runnable():
            if len(batch) == n:
                break
            now = self.clock()
            claimed = self.store.update_if(job.id, {"status": JobStatus.QUEUED, "attempts": job.attempts},
                                           status=JobStatus.RUNNING, started_at=now, attempts=job.attempts + 1,
                                           worker_id=worker_id, lease_until=now + lease_seconds)
            if claimed is None:
                log.debug("job %d was taken or changed meanwhile; passed over", job.id)
                continue
            batch.append(claimed)
            self._served(claimed, now)
            log.info("job %d started: guild=%s user=%s new_seconds=%d attempt=%d worker=%s", claimed.id,
                     guild_key(claimed.guild_id), claimed.user_id, claimed.new_seconds, claimed.attempts, worker_id)
        return batch

    def _served(self, job: Job, now: float) -> None:
        self._guild_served[job.guild_id] = now
        self._lane_served[(job.guild_id, job.lane)] = now
        if job.session_id is not None:
            self._member_served[(job.session_id, job.user_id)] = now

    def renew(self, worker_id: str, job_ids: list[int], lease_seconds: float = DEFAULT_LEASE_SECONDS) -> list[Job]:
        """Extend the leases ``worker_id`` holds on these running jobs; returns the jobs it still holds (a job it
        lost, because its lease ran out and another worker took it, or that ended, is not among them)."""
        held = []
        for job_id in job_ids:
            job = self.store.update_if(job_id, {"status": JobStatus.RUNNING, "worker_id": worker_id},
                                       lease_until=self.clock() + lease_seconds)
            if job is not None:
                held.append(job)
        return held

    def worker_alive(self, worker_id: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        """Record that ``worker_id`` is serving the queue now (workers on a shared store say so every few seconds;
        the wait estimate counts the workers heard from within three leases)."""
        seen = self._live_workers(lease_seconds)
        seen[worker_id] = self.clock()
        self.store.set_value(_WORKERS_KEY, seen)  # a write lost to a race is made again within a few seconds

    def workers(self, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> int:
        """How many workers serve the queue (1 on a store one process owns)."""
        if not self.store.shared:
            return 1
        return max(1, len(self._live_workers(lease_seconds)))

    def _live_workers(self, lease_seconds: float) -> dict[str, float]:
        """The workers heard from within three leases, with when."""
        now = self.clock()
        seen = self.store.get_value(_WORKERS_KEY) or {}
        return {w: t for w, t in seen.items() if isinstance(t, (int, float)) and now - t < 3 * lease_seconds}

    def expired(self) -> list[Job]:
        """Running jobs whose lease ran out: their worker died or lost the store (a shared store's take-over)."""
        now = self.clock()
        return [j for j in self.store.by_status(JobStatus.RUNNING) if j.lease_until is None or j.lease_until < now]

    def finish(self, job_id: int, status: JobStatus, *, error: str | None = None,
               expected: dict[str, Any] | None = None, **changes: Any) -> Job | None:
        """Record the end of a job (done, failed, cancelled or undeliverable) with any other fields to store; a job
        that ended without a clip lets go of its files (:func:`bot.job_files.release`).

        With ``expected`` the end is recorded only if the job still has those values (e.g. ``{"worker_id": me}``:
        the worker still holds it); None when it did not. Without, it always returns the job."""
        status = JobStatus(status)
        if not status.final:
            raise ValueError(f"{status.value} is not a final status")
        fields_ = dict(status=status, error=error, finished_at=self.clock(), lease_until=None, **changes)
        if expected is None:
            job = self.store.update(job_id, **fields_)
        else:
            job = self.store.update_if(job_id, expected, **fields_)
            if job is None:
                log.info("job %d: not recorded as %s, it changed meanwhile (expected %s)", job_id, status.value,
                         expected)
                return None
        job_files.release(self.store, job)
        took = f"{job.finished_at - job.started_at:.1f}s" if job.started_at else "-"
        if status is JobStatus.FAILED:
            log.warning("job %d failed after %s: %s", job_id, took, error)
        else:
            log.info("job %d %s after %s", job_id, status.value, took)
        return job

    def requeue(self, job_id: int, *, count_attempt: bool = True) -> Job:
        """Put a running job back at the front (e.g. shutdown interrupted it); it keeps its seed.

        ``count_attempt=False`` (a deliberate stop, such as a graceful shutdown) does not count the interrupted
        run towards ``MAX_ATTEMPTS``; it still goes first on the next start.
        """
        changes: dict[str, Any] = {"status": JobStatus.QUEUED, "started_at": None, "worker_id": None,
                                   "lease_until": None}
        if not count_attempt:
            job = self.store.get(job_id)
            if job is not None and job.attempts > 1:
                changes["attempts"] = job.attempts - 1
        return self.store.update(job_id, **changes)

    # -- cancelling ---------------------------------------------------------------------------------------------
    def cancel(self, job_id: int, *, reason: str = "Cancelled.") -> Job | None:
        """Cancel a queued job (returned as cancelled) or ask a running one to stop (returned still running, with
        ``reason`` recorded as its error: the worker reports it cancelled, and a worker elsewhere that missed the
        message sees it when it renews its lease). Returns None for unknown or finished jobs. A job a worker claims
        at the same moment is stopped as a running one (both cases are compare-and-sets)."""
        for _ in range(3):
            job = self.store.get(job_id)
            if job is None or job.status.final:
                return None
            if job.status is JobStatus.QUEUED:
                cancelled = self.finish(job_id, JobStatus.CANCELLED, error=reason,
                                        expected={"status": JobStatus.QUEUED})
                if cancelled is not None:
                    return cancelled
                continue  # claimed (or ended) meanwhile: look again
            running = self.store.update_if(job_id, {"status": JobStatus.RUNNING}, error=reason)
            if running is None:
                continue  # ended or queued again meanwhile: look again
            if self.stop_running is not None:
                self.stop_running(job_id)
            return running
        return self.store.get(job_id)

    def remove(self, guild_id: int | None, position: int) -> Job:
        """Cancel the queued job at a 1-based position of one guild's queue; IndexError when there is none."""
        order = self.ordered(guild_id)
        if not 1 <= position <= len(order):
            raise IndexError(f"There is no request at position {position} (the queue has {len(order)}).")
        job = order[position - 1]
        removed = self.finish(job.id, JobStatus.CANCELLED, error="Removed from the queue by an admin.",
                              expected={"status": JobStatus.QUEUED})
        if removed is None:
            raise IndexError(f"The request at position {position} has just started; use skip to stop it.")
        return removed

    def clear(self, guild_id: GuildScope) -> list[Job]:
        """Cancel every queued job of one guild (or of all; running ones go on) and return them in the order they
        would have run (a job a worker claims meanwhile is not cleared: it runs)."""
        reason = "The queue was cleared by an admin."
        cleared = []
        for job in self.ordered(guild_id):
            done = self.store.update_if(job.id, {"status": JobStatus.QUEUED}, status=JobStatus.CANCELLED,
                                        error=reason, finished_at=self.clock())
            if done is not None:
                job_files.release(self.store, done)
                cleared.append(done)
        log.info("queue of guild %s cleared: %d job(s) cancelled",
                 "all" if guild_id is ALL else guild_key(guild_id), len(cleared))
        return cleared

    # -- restart recovery ---------------------------------------------------------------------------------------
    def recover(self) -> list[Job]:
        """Jobs left running by a worker that is gone are queued again, in front and in their order.

        On a store one process owns (SQLite) that is every running job, at start. On a shared store (Redis) it is
        the jobs whose lease ran out (:meth:`expired`): their worker died; the others are being made now. A job
        already interrupted ``MAX_ATTEMPTS`` times is failed instead (it may be what kills the worker). Each take-over
        is a compare-and-set on the lease, so two workers never take the same job. Returns every job it touched;
        check ``status`` to tell re-queued from failed.
        """
        touched = []
        left = self.expired() if self.store.shared else self.store.by_status(JobStatus.RUNNING)
        for job in left:
            held = {"status": JobStatus.RUNNING, "worker_id": job.worker_id, "lease_until": job.lease_until}
            if job.attempts >= MAX_ATTEMPTS:
                failed = self.finish(job.id, JobStatus.FAILED, expected=held,
                                     error="Generation was interrupted too many times; giving up on it.")
                if failed is not None:
                    touched.append(failed)
                continue
            requeued = self.store.update_if(job.id, held, status=JobStatus.QUEUED, started_at=None, worker_id=None,
                                            lease_until=None)
            if requeued is not None:
                touched.append(requeued)
                log.info("job %d recovered: queued again (attempt %d by worker %s was interrupted)", job.id,
                         job.attempts, job.worker_id)
        return touched

    # -- estimates ----------------------------------------------------------------------------------------------
    @property
    def rate(self) -> float:
        """Moving average of seconds of compute per second of audio (per batch: the longest clip counts)."""
        return float(self.store.get_value(_RATE_KEY, DEFAULT_RATE))

    def record_timing(self, audio_seconds: float, compute_seconds: float) -> None:
        """Feed the estimate with one finished batch: its longest clip and the wall time it took."""
        if audio_seconds <= 0 or compute_seconds <= 0:
            return
        sample = compute_seconds / audio_seconds
        old = self.store.get_value(_RATE_KEY)
        self.store.set_value(_RATE_KEY, sample if old is None else (1 - RATE_SMOOTHING) * old + RATE_SMOOTHING * sample)

    def estimated_wait(self, job_id: int | None = None) -> float:
        """Seconds until a queued job starts (or, without an id, until a new request would start)."""
        rate, now = self.rate, self.clock()
        running = self.running()
        wait = 0.0
        if running:
            started = min(j.started_at or now for j in running)
            wait = max(0.0, rate * max(j.total_seconds for j in running) - (now - started))
        order = self.runnable()
        if job_id is not None and all(j.id != job_id for j in order):
            order = self.ordered()  # a held job: the wait once its guild resumes
        if job_id is not None:
            ids = [j.id for j in order]
            if job_id not in ids:
                return 0.0 if any(j.id == job_id for j in running) else wait
            order = order[:ids.index(job_id) - ids.index(job_id) % self.batch_size]
        else:
            order = order[:len(order) - len(order) % self.batch_size]
        ahead = 0.0
        for i in range(0, len(order), self.batch_size):
            ahead += rate * max(j.total_seconds for j in order[i:i + self.batch_size])
        return wait + ahead / self.workers()  # several workers take the batches ahead side by side


def _guild_limits_key(guild_id: int | None) -> str:
    return f"{_LIMITS_KEY}.guild.{guild_key(guild_id)}"


def _interleave(streams: list[list[Job]]) -> list[Job]:
    """Round-robin merge: first of each stream, then second of each, ..."""
    out = []
    depth = max((len(s) for s in streams), default=0)
    for i in range(depth):
        out.extend(s[i] for s in streams if i < len(s))
    return out
