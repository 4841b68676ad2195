"""The dispatch loop: takes batches from the queue, hands them to a worker, records how each job ended and hands
the outcome to delivery. No MLX, no discord.py, no core: the worker and the delivery side are interfaces
(:class:`Runner`, :class:`Outbox`), so the loop can run in a process that never generates and never talks to
Discord itself.

Whenever the worker is idle and the queue is not paused it takes up to ``runner.max_batch`` jobs in fair order
(fewer when :meth:`Runner.fit_batch` says memory is short) and runs them together; each finished job is delivered
in its own task so the next batch starts at once.

The store can fail (a full disk, a locked or vanished file). The loop is supervised: when it dies it is logged and
started again with backoff, and jobs it had marked running but no longer holds are queued again. How a finished
job ended is written with retries and backoff for up to ``store_retry_seconds`` while its clip waits in memory; a
clip is delivered even when the store never comes back in that time (the member gets it, the log says it could not
be recorded).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol, TypeVar

from .jobs import ClipData, Job, JobResult, JobStatus
from .queue import DEFAULT_LEASE_SECONDS, LOCAL_WORKER, JobQueue
from .store import JobStore

log = logging.getLogger(__name__)

T = TypeVar("T")
_JOB_FIELD_NAMES = {f.name for f in fields(Job)}

BATCH_WINDOW_SECONDS = 0.3  # after the first job arrives at an idle worker, wait this long for more to batch
IDLE_POLL_SECONDS = 5.0  # look at the queue this often even without a wake-up
STORE_RETRY_SECONDS = 600.0  # how long a finished job's outcome (and its clip, in memory) waits for the store
STORE_BACKOFF_SECONDS = 0.5  # first wait after a refused store write; doubles up to MAX_BACKOFF_SECONDS
MAX_BACKOFF_SECONDS = 30.0


class Runner(Protocol):
    """What the dispatcher needs of a worker (:class:`bot.worker.GenerationWorker`)."""

    @property
    def max_batch(self) -> int: ...

    def fit_batch(self, jobs: Sequence[Job]) -> int:
        """How many of the first ``jobs`` fit in one batch (at least 1)."""
        ...

    async def run_batch(self, jobs: Sequence[Job], *,
                        on_progress: Callable[[Job, int, int], Any] | None = None) -> list[JobResult]:
        """Generate ``jobs`` together; one result per job, in order. ``on_progress`` runs on the event loop."""
        ...

    def cancel(self, job_id: int) -> bool:
        """Ask a running job to stop at its next step; False if the worker does not have it."""
        ...


@dataclass(frozen=True)
class Delivered:
    """Where a delivered clip landed."""

    message_id: int
    url: str
    via: str  # "interaction" or "channel"


class StoreUnavailable(Exception):
    """The store kept refusing a write for ``store_retry_seconds``."""


class DeliveryError(Exception):
    """The clip could not be delivered; the message is fit to record as the job's error."""


class Undeliverable(DeliveryError):
    """The destination is gone or closed to the bot (deleted channel or thread, missing permission)."""


class Outbox(Protocol):
    """Where the dispatcher tells members what happens to their jobs (Discord in the bot)."""

    def started(self, job: Job) -> None:
        """The job's generation starts (best effort, must not block)."""
        ...

    def progress(self, job: Job, step: int, total: int) -> None:
        """``step`` of ``total`` decoder steps are done (best effort, must not block; may be dropped)."""
        ...

    def interrupted(self, job: Job) -> None:
        """A shutdown stopped the job; it is queued again for the next start (best effort)."""
        ...

    async def notify(self, job: Job, text: str) -> None:
        """Tell the requester how the job ended when there is no clip (failed, cancelled). Never raises."""
        ...

    async def deliver(self, job: Job, clip: ClipData, *, generated_in: float) -> Delivered:
        """Send the finished clip; :class:`DeliveryError` (or :class:`Undeliverable`) when it cannot. A job whose
        ``delivering_at`` is set was being delivered before (a restart came between): the outbox looks for the
        message already posted and returns it instead of posting again."""
        ...

    async def delivered(self, job: Job) -> None:
        """The clip was delivered and recorded (``job.delivered_url`` is set). Never raises."""
        ...

    async def find_delivered(self, job: Job) -> Delivered | None:
        """For a job whose ``delivering_at`` is set (a worker stopped while posting it): the message already
        posted, or None. Never raises (None when it cannot tell)."""
        ...


class Dispatcher:
    """Feeds ``runner`` from ``queue`` and hands outcomes to ``outbox``; :meth:`start`, :meth:`wake`, :meth:`stop`.

    Use it only from the event-loop thread. ``batch_window`` (seconds) lets requests sent together share a batch.
    ``worker_id`` names this worker in the store: it claims jobs under that name with leases of ``lease_seconds``
    that it renews while it holds them. On a shared store (workers on several machines) it also takes over the jobs
    of workers whose lease ran out (:meth:`JobQueue.recover`), and it posts a clip only while it still holds the job.
    """

    def __init__(self, queue: JobQueue, store: JobStore, runner: Runner, outbox: Outbox, *,
                 batch_window: float = BATCH_WINDOW_SECONDS, store_retry_seconds: float = STORE_RETRY_SECONDS,
                 store_backoff: float = STORE_BACKOFF_SECONDS, worker_id: str = LOCAL_WORKER,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.queue = queue
        self.store = store
        self.runner = runner
        self.outbox = outbox
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.batch_window = batch_window
        self.store_retry_seconds = store_retry_seconds
        self.store_backoff = store_backoff
        self.stopping = False
        self.restarts = 0  # how many times the supervised loop died and was started again
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._lease_task: asyncio.Task | None = None
        self._batch_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._held: set[int] = set()  # ids of the jobs being generated or finished now
        queue.stop_running = runner.cancel

    def start(self) -> None:
        """Start the supervised loop (in the running event loop) and look at the queue at once."""
        self._loop_task = asyncio.create_task(self._supervise(), name="dispatcher")
        self._lease_task = asyncio.create_task(self._keep_leases(), name="leases")
        self.wake()

    def holds(self, job_id: int) -> bool:
        """Whether the job is being generated or delivered now (the store may still say "running" for a job a
        failure left behind until the loop has put it back in the queue)."""
        return job_id in self._held

    def wake(self) -> None:
        """There may be work (a job was queued, the queue resumed)."""
        self._wake.set()

    def cancel(self, job: Job, reason: str) -> Job | None:
        """Cancel a queued job (recorded now) or stop a running one (recorded, with ``reason``, when the worker
        lets go of it). None when the job had already ended."""
        return self.queue.cancel(job.id, reason=reason)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("finishing a job failed", exc_info=task.exception())

    # -- the loop -----------------------------------------------------------------------------------------------
    async def _supervise(self) -> None:
        """Run :meth:`_run`; when it dies, log it, wait (doubling up to MAX_BACKOFF_SECONDS) and start it again."""
        delay = self.store_backoff
        failed = False
        while not self.stopping:
            began = time.monotonic()
            try:
                if failed:
                    self._release_stale()
                await self._run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                if time.monotonic() - began > 2 * MAX_BACKOFF_SECONDS:  # it had been working: a new fault
                    delay = self.store_backoff
                self.restarts += 1
                log.exception("the dispatch loop failed; starting it again in %.1f s", delay)
                failed = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)

    def _release_stale(self) -> None:
        """Queue again the jobs the store says this worker is running but it no longer holds (a failure between
        marking a batch running and starting it)."""
        for job in self.queue.running():
            if job.worker_id == self.worker_id and job.id not in self._held:
                self.queue.requeue(job.id, count_attempt=False)
                log.warning("job %d was marked running but is not: queued again", job.id)

    async def _keep_leases(self) -> None:
        """Renew the leases of the held jobs a few times per lease; stop a job this worker lost (another worker
        took it over) or whose cancel was asked for while the message did not reach us. On a shared store also
        take over the jobs of workers whose lease ran out. Failures are logged and tried again next round."""
        while not self.stopping:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                self._renew()
                if self.store.shared:
                    self.queue.worker_alive(self.worker_id, self.lease_seconds)
                    if self.recover_expired():
                        self.wake()
            except Exception as exc:
                log.warning("could not renew leases or look for abandoned jobs: %s", exc)

    def _renew(self) -> None:
        held = [i for i in self._held]
        if not held:
            return
        kept = {job.id: job for job in self.queue.renew(self.worker_id, held, self.lease_seconds)}
        for job_id in held:
            job = kept.get(job_id)
            if job_id not in self._held:
                continue  # finished meanwhile
            if job is None:
                log.warning("job %d: this worker lost its lease (another worker took it over); stopping it", job_id)
                self.runner.cancel(job_id)
            elif job.error:  # a cancel recorded by the gateway (Dispatcher.cancel) whose message we missed
                self.runner.cancel(job_id)

    def recover_expired(self) -> list[Job]:
        """Queue again (or fail) the jobs whose worker is gone; returns them (see :meth:`JobQueue.recover`)."""
        touched = self.queue.recover()
        for job in touched:
            if job.status is JobStatus.FAILED:
                self._spawn(self.outbox.notify(job, f"Sorry, your clip could not be made: {job.error}"))
        return touched

    async def _run(self) -> None:
        while not self.stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=IDLE_POLL_SECONDS)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            while not self.stopping and not self.queue.paused and len(self.queue):
                if self.batch_window and len(self.queue) < self.runner.max_batch:
                    await asyncio.sleep(self.batch_window)  # let requests sent together share one batch
                    if self.stopping or self.queue.paused:
                        break
                size = self.runner.fit_batch(self.queue.runnable()[:self.runner.max_batch])
                batch = self.queue.next_batch(size, worker_id=self.worker_id, lease_seconds=self.lease_seconds)
                if not batch:
                    break
                batch = await self._skip_delivered(batch)
                if not batch:
                    continue
                self._batch_task = asyncio.create_task(self._run_batch(batch))
                try:
                    await asyncio.shield(self._batch_task)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("batch %s failed unexpectedly", [j.id for j in batch])
                finally:
                    self._batch_task = None

    async def _skip_delivered(self, batch: list[Job]) -> list[Job]:
        """Of a claimed batch, the jobs still to make: a job whose clip was being posted when its worker stopped
        (``delivering_at`` set) is recorded done, not made again, when the message is there."""
        todo = []
        for job in batch:
            found = await self.outbox.find_delivered(job) if job.delivering_at is not None else None
            if found is None:
                todo.append(job)
                continue
            log.info("job %d: its clip was already posted (message %s) before its worker stopped; recorded, not "
                     "made again", job.id, found.message_id)
            done = await self._end(job, JobStatus.DONE, delivered_message_id=found.message_id,
                                   delivered_url=found.url)
            if done is not None:
                self._spawn(self.outbox.delivered(done))
        return todo

    async def _run_batch(self, batch: list[Job]) -> None:
        self._held.update(j.id for j in batch)
        for job in batch:
            self.outbox.started(self._fresh(job))
        started = time.monotonic()
        try:
            batch = [self._with_local_files(job) for job in batch]
            results = await self.runner.run_batch(batch, on_progress=self._progress)
        except asyncio.CancelledError:
            self._held.difference_update(j.id for j in batch)
            raise
        except Exception as exc:  # the runner's own bug: fail the batch's jobs, not the loop
            log.exception("batch %s failed unexpectedly", [j.id for j in batch])
            results = [JobResult(j, JobStatus.FAILED, error=f"Generation failed ({exc.__class__.__name__}).")
                       for j in batch]
        elapsed = time.monotonic() - started
        if any(r.status is JobStatus.DONE for r in results):
            try:
                self.queue.record_timing(max(r.job.total_seconds for r in results), elapsed)
            except Exception as exc:  # only the wait estimate suffers
                log.warning("could not record the batch's timing: %s", exc)
        for result in results:
            self._spawn(self._finish(result))

    def _with_local_files(self, job: Job) -> Job:
        """The job with the files it reads (upload, tune, tokens to extend) at their paths on this machine,
        fetched from the store when another machine wrote them."""
        named = {"prompt_audio_path": job.prompt_audio_path, "melody_path": job.melody_path,
                 "prompt_tokens_path": job.prompt_tokens_path}
        local = {name: str(self.store.local_file(path)) for name, path in named.items() if path}
        return replace(job, **local) if local else job

    def _fresh(self, job: Job) -> Job:
        try:
            return self.store.get(job.id) or job
        except Exception as exc:  # a store that cannot be read: the copy in hand will do
            log.warning("job %d: could not read it from the store: %s", job.id, exc)
            return job

    async def _write(self, what: str, call: Callable[[], T]) -> T:
        """``call()`` (a store write), retried with backoff while it raises, for up to ``store_retry_seconds``
        (once when stopping); :class:`StoreUnavailable` after that."""
        delay = self.store_backoff
        deadline = time.monotonic() + self.store_retry_seconds
        while True:
            try:
                return call()
            except Exception as exc:
                if self.stopping or time.monotonic() + delay > deadline:
                    raise StoreUnavailable(f"{what}: the store refused it ({exc})") from exc
                log.warning("%s: the store refused it (%s); trying again in %.1f s", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)

    async def _end(self, job: Job, status: JobStatus, **changes: Any) -> Job | None:
        """Record how ``job`` ended (with retries); the job as it ended even when the store never took it; None
        when this worker no longer holds the job (its lease ran out and another worker took it: that one ends it)."""
        held = {"status": JobStatus.RUNNING, "worker_id": self.worker_id}
        try:
            return await self._write(f"job {job.id}: recording {status.value}",
                                     lambda: self.queue.finish(job.id, status, expected=held, **changes))
        except StoreUnavailable as exc:
            log.error("%s; the job stays marked running until the next start", exc)
            error = changes.pop("error", None)
            return replace(job, status=status, error=error, finished_at=time.time(),
                           **{k: v for k, v in changes.items() if k in _JOB_FIELD_NAMES})

    def _progress(self, job: Job, step: int, total: int) -> None:
        self.outbox.progress(self._fresh(job), step, total)

    async def _finish(self, result: JobResult) -> None:
        """Record how the job ended and hand it to the outbox; the job is held until then."""
        try:
            await self._finish_job(result)
        finally:
            self._held.discard(result.job.id)

    async def _finish_job(self, result: JobResult) -> None:
        """Record "delivering", deliver the clip, then record DONE (or record the failure and tell the member).
        A job this worker lost meanwhile (its lease ran out) is left to the worker that took it over."""
        job = self._fresh(result.job)
        if result.status is JobStatus.CANCELLED:
            ended = await self._end(job, JobStatus.CANCELLED, error=job.error or result.error)
            if ended is not None:
                await self.outbox.notify(ended, ended.error or "Cancelled.")
            return
        if result.status is JobStatus.FAILED or result.clip is None:
            error = result.error or "The generator returned no audio."
            ended = await self._end(job, JobStatus.FAILED, error=error)
            if ended is not None:
                await self.outbox.notify(ended, f"Sorry, your clip could not be made: {error}")
            return
        # "delivering" goes to the store before the upload: after a crash between the upload and the record
        # below, the next start knows to look for the message already posted (the earliest attempt is kept). It is
        # a compare-and-set on holding the job, so a worker that lost it never posts a second clip.
        held = {"status": JobStatus.RUNNING, "worker_id": self.worker_id}
        try:
            marked = await self._write(f"job {job.id}: recording delivering", lambda: self.store.update_if(
                job.id, held, delivering_at=job.delivering_at or time.time()))
        except StoreUnavailable as exc:
            log.error("%s; delivering the clip anyway", exc)
        else:
            if marked is None:
                log.warning("job %d: finished, but this worker no longer holds it (another worker took it over); "
                            "its clip is not posted from here", job.id)
                return
            job = marked
        try:
            delivered = await self.outbox.deliver(job, result.clip, generated_in=result.elapsed)
        except Undeliverable as exc:
            log.warning("job %d undeliverable: %s", job.id, exc)
            await self._end(job, JobStatus.UNDELIVERABLE, error=str(exc))
            return
        except DeliveryError as exc:
            log.warning("job %d delivery failed: %s", job.id, exc)
            ended = await self._end(job, JobStatus.FAILED, error=f"The clip could not be uploaded: {exc}")
            if ended is not None:
                await self.outbox.notify(ended, f"Sorry, your clip was made but could not be uploaded: {exc}")
            return
        ended = await self._end(job, JobStatus.DONE, delivered_message_id=delivered.message_id,
                                delivered_url=delivered.url)
        log.info("job %d delivered via %s in %.1f s of generation: %s", job.id, delivered.via, result.elapsed,
                 delivered.url)
        if ended is not None:
            await self.outbox.delivered(ended)

    # -- stopping -----------------------------------------------------------------------------------------------
    async def stop(self, grace: float) -> None:
        """Take no new batch; let the running one finish within ``grace`` seconds (else its jobs are queued again
        for the next start, without counting the attempt), then wait for deliveries in progress."""
        self.stopping = True
        self.wake()
        batch = self._batch_task
        if batch is not None and not batch.done():
            done, _ = await asyncio.wait({batch}, timeout=grace)
            if not done:
                interrupted = [j.id for j in self.queue.running()
                               if j.worker_id == self.worker_id and j.id in self._held]
                log.warning("jobs %s interrupted by shutdown; they will be generated again on the next start",
                            interrupted)
                batch.cancel()
                await asyncio.gather(batch, return_exceptions=True)
                for job_id in interrupted:
                    try:
                        job = self.queue.requeue(job_id, count_attempt=False)
                    except Exception as exc:  # the next start re-queues it anyway (it is still marked running)
                        log.warning("job %d interrupted by shutdown; could not queue it again now: %s", job_id, exc)
                        continue
                    log.info("job %d interrupted by shutdown: queued again for the next start", job_id)
                    self.outbox.interrupted(job)
        for task in (self._loop_task, self._lease_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._background:
            await asyncio.wait(set(self._background), timeout=max(grace, 5.0))
