"""One dedicated thread owns the MLX model: it loads it and runs every generation.

MLX streams are per thread (an array made in one thread cannot be evaluated in another), so the model must never
be touched from the event loop, ``asyncio.to_thread`` or an executor. The asyncio side hands a batch of jobs to
the thread and awaits an :class:`asyncio.Future`; progress and results come back with ``call_soon_threadsafe``.
Cancelling a job sets its :class:`threading.Event`, which the generator polls through ``should_stop(row)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.generation import Clip, GenerationRequest, GenerationStopped

from .jobs import Job, JobStatus, generation_request, run_requests

log = logging.getLogger(__name__)

ProgressCallback = Callable[[Job, int, int], Any]
PROGRESS_MIN_INTERVAL = 0.25  # seconds between progress hand-offs per row (the bot throttles edits further)
MEMORY_HEADROOM = 0.9  # use at most this share of the memory that is free (the estimate is rough)


class Generator(Protocol):
    """What the worker needs from a model: exactly :class:`core.MusicGen`'s batch API."""

    sampling_rate: int
    max_seconds: float
    channels: int

    def generate_batch(self, requests: Sequence[GenerationRequest], *,
                       on_progress: Callable[[int, int, int], Any] | None = None,
                       should_stop: Callable[[int], bool] | None = None) -> list[Clip | None]: ...


class WorkerError(RuntimeError):
    """The model could not be loaded, or the worker is not running."""


@dataclass
class JobResult:
    """How one job of a batch ended: ``DONE`` with a clip, ``FAILED`` with an error, or ``CANCELLED``."""

    job: Job
    status: JobStatus
    clip: Clip | None = None
    error: str | None = None
    elapsed: float = 0.0


@dataclass
class _Batch:
    jobs: list[Job]
    requests: list[GenerationRequest]
    events: list[threading.Event]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    on_progress: ProgressCallback | None
    abandoned: threading.Event = field(default_factory=threading.Event)


class GenerationWorker:
    """Runs generations on one thread. ``model_factory()`` is called on that thread to load the model.

    ``job_timeout`` stops a job that runs longer (through ``should_stop``); a generator that does not even poll
    ``should_stop`` is given up on ``hard_timeout_grace`` seconds later (its jobs fail, the thread is stalled).
    Counters ``completed``, ``failed``, ``cancelled`` and ``batches`` count finished jobs and batches.

    Memory: :meth:`fit_batch` shrinks a batch whose ``generator.estimate_batch_bytes(requests)`` exceeds
    ``memory_limit`` bytes, or (without a limit) what ``available_memory()`` reports: by default Linux's
    ``MemAvailable`` plus what MLX already holds (the weights, its cache).
    ``extend_stride`` (seconds) is passed to generators that take it (clips longer than the model's window).
    """

    def __init__(self, model_factory: Callable[[], Generator], *, max_batch: int = 4, job_timeout: float = 600.0,
                 hard_timeout_grace: float = 30.0, clear_cache: Callable[[], Any] | None = None,
                 memory_limit: int | None = None, available_memory: Callable[[], int | None] | None = None,
                 extend_stride: float | None = None, name: str = "musicgen-worker") -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model_factory = model_factory
        self.max_batch = max_batch
        self.job_timeout = job_timeout
        self.hard_timeout_grace = hard_timeout_grace
        self.memory_limit = memory_limit
        self.available_memory = available_memory or system_memory_available
        self.extend_stride = extend_stride
        self._request_extras: dict[str, Any] = {}
        self._batch_options: dict[str, Any] = {}
        self._clear_cache = clear_cache
        self._inbox: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._ready_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._load_error: BaseException | None = None
        self._generator: Generator | None = None
        self._events: dict[int, threading.Event] = {}
        self._busy = False
        self.stalled = False
        self.thread_ident: int | None = None
        self.completed = self.failed = self.cancelled = self.batches = 0

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread; it loads the model right away."""
        self._thread.start()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the model is loaded; raise :class:`WorkerError` with a clear message if loading failed."""
        if not self._thread.is_alive() and not self._ready.is_set():
            raise WorkerError("the generation worker was not started")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if not self._ready.is_set():
                self._ready_waiters.append((loop, future))
        if not self._ready.is_set():
            await asyncio.wait_for(future, timeout)
        if self._load_error is not None:
            raise WorkerError(f"could not load the model: {self._load_error}") from self._load_error

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._generator is not None

    @property
    def busy(self) -> bool:
        """A batch has been handed to the thread and has not come back yet."""
        return self._busy

    @property
    def generator(self) -> Generator:
        if self._generator is None:
            raise WorkerError("the model is not loaded")
        return self._generator

    @property
    def sampling_rate(self) -> int:
        return int(self.generator.sampling_rate)

    @property
    def max_seconds(self) -> float:
        return float(self.generator.max_seconds)

    @property
    def channels(self) -> int:
        return int(self.generator.channels)

    def stop(self, timeout: float | None = None, *, cancel_running: bool = False) -> bool:
        """Ask the thread to exit after the current batch (or stop that batch too); True if it has exited."""
        if cancel_running:
            for event in list(self._events.values()):
                event.set()
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the asyncio side ---------------------------------------------------------------------------------------
    def requests_for(self, jobs: Sequence[Job]) -> list[GenerationRequest]:
        """The generation requests for these jobs (each with its own prompt, length and seed)."""
        return [generation_request(j, **self._request_extras) for j in jobs]

    def memory_budget(self) -> int | None:
        """Bytes a batch may need: ``memory_limit``, else a share of the free memory; None when unknown."""
        if self.memory_limit is not None:
            return self.memory_limit
        available = self.available_memory()
        return None if available is None else int(available * MEMORY_HEADROOM)

    def fit_batch(self, jobs: Sequence[Job]) -> int:
        """How many of the first ``jobs`` (at most ``max_batch``) can be generated together without running out of
        memory, by the generator's ``estimate_batch_bytes``; at least 1 (a single job that does not fit is tried
        anyway and fails with a clear message if memory really runs out)."""
        n = min(len(jobs), self.max_batch)
        estimate = getattr(self._generator, "estimate_batch_bytes", None)
        if n <= 1 or estimate is None:
            return n
        budget = self.memory_budget()
        if budget is None:
            return n
        requests = self.requests_for(jobs[:n])
        try:
            while n > 1 and estimate(requests[:n]) > budget:
                n -= 1
        except Exception:  # noqa: BLE001 - an estimate must never stop the queue
            log.exception("could not estimate the memory of a batch; generating one job at a time")
            return 1
        if n < min(len(jobs), self.max_batch):
            log.info("batch shrunk to %d job(s) to fit in %.0f MiB", n, budget / 2**20)
        return n

    def cancel(self, job_id: int) -> bool:
        """Ask a job handed to the worker to stop at its next step; False if the worker does not have it."""
        event = self._events.get(job_id)
        if event is None:
            return False
        event.set()
        return True

    async def run_batch(self, jobs: Sequence[Job], *, on_progress: ProgressCallback | None = None) -> list[JobResult]:
        """Generate these jobs together (at most ``max_batch``) and return one :class:`JobResult` per job, in order.

        ``on_progress(job, step, total)`` is called on the event loop. If the awaiting task is cancelled the rows
        are told to stop and their jobs keep their stored state (a restart generates them again).
        """
        jobs = list(jobs)
        if not jobs:
            return []
        if len(jobs) > self.max_batch:
            raise ValueError(f"a batch holds at most {self.max_batch} jobs, got {len(jobs)}")
        await self.wait_ready()
        if not self._thread.is_alive():
            raise WorkerError("the generation worker has stopped")
        loop = asyncio.get_running_loop()
        requests = self.requests_for(jobs)
        events = [threading.Event() for _ in jobs]
        for job, event in zip(jobs, events, strict=True):
            self._events[job.id] = event
        batch = _Batch(jobs, requests, events, loop, loop.create_future(), on_progress)
        self._busy = True
        self._inbox.put(batch)
        try:
            limit = self.job_timeout + self.hard_timeout_grace
            return await asyncio.wait_for(asyncio.shield(batch.future), limit)
        except asyncio.TimeoutError:
            self.stalled = True
            batch.abandoned.set()
            for event in events:
                event.set()
            log.error("the generator did not answer within %.0f s; failing jobs %s", limit, [j.id for j in jobs])
            self.failed += len(jobs)
            return [JobResult(j, JobStatus.FAILED, error="The generator stopped responding; please try again later.")
                    for j in jobs]
        except asyncio.CancelledError:
            batch.abandoned.set()
            for event in events:
                event.set()
            raise
        finally:
            for job in jobs:
                self._events.pop(job.id, None)
            self._busy = False

    # -- the worker thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        self.thread_ident = threading.get_ident()
        try:
            started = time.monotonic()
            self._generator = self.model_factory()
            self._request_extras = self._extras(self._generator)
            log.info("model loaded in %.1f s on thread %s", time.monotonic() - started, threading.current_thread().name)
        except BaseException as exc:  # noqa: BLE001 - any failure to load is reported to wait_ready
            self._load_error = exc
            # wait_ready raises it with a clear message; the caller reports it once.
            log.debug("could not load the model", exc_info=exc)
        finally:
            with self._lock:
                self._ready.set()
                waiters, self._ready_waiters = self._ready_waiters, []
            for loop, future in waiters:
                _post(loop, _resolve, future, None)
        if self._load_error is not None:
            return
        while True:
            batch = self._inbox.get()
            if batch is None:
                break
            if batch.abandoned.is_set():
                continue
            results = self._generate(batch)
            self._release_memory()  # before answering, so the next batch never starts on a full cache
            _post(batch.loop, _resolve, batch.future, results)
        log.info("generation worker stopped")

    def _extras(self, generator: Generator) -> dict[str, Any]:
        """Request options this generator understands beyond the basic ones (``extend_stride`` for long clips)."""
        if self.extend_stride is None:
            return {}
        if "extend_stride" in {f.name for f in dataclasses.fields(GenerationRequest)}:
            return {"extend_stride": self.extend_stride}
        try:
            takes = "extend_stride" in inspect.signature(generator.generate_batch).parameters
        except (TypeError, ValueError):
            takes = False
        if takes:
            self._batch_options = {"extend_stride": self.extend_stride}
        return {}

    def _generate(self, batch: _Batch) -> list[JobResult]:
        jobs, events = batch.jobs, batch.events
        started = time.monotonic()
        deadline = started + self.job_timeout
        timed_out = [False] * len(jobs)
        last_progress = [0.0] * len(jobs)

        def should_stop(row: int) -> bool:
            if events[row].is_set():
                return True
            if time.monotonic() > deadline:
                timed_out[row] = True
                return True
            return False

        def on_progress(row: int, step: int, total: int) -> None:
            if batch.on_progress is None:
                return
            now = time.monotonic()
            if step < total and now - last_progress[row] < PROGRESS_MIN_INTERVAL:
                return
            last_progress[row] = now
            _post(batch.loop, _call_progress, batch.on_progress, jobs[row], step, total)

        log.info("batch of %d started: jobs %s", len(jobs), [j.id for j in jobs])
        clips: list[Clip | None]
        error: str | None = None
        try:
            # run_requests: plain rows batched through generate_batch; Extend/Continue rows load their files here
            clips = list(run_requests(self.generator, batch.requests, on_progress=on_progress,
                                      should_stop=should_stop, **self._batch_options))
            if len(clips) != len(jobs):
                raise RuntimeError(f"the generator returned {len(clips)} clips for {len(jobs)} requests")
        except GenerationStopped:
            clips = [None] * len(jobs)
        except MemoryError:
            log.exception("out of memory generating jobs %s", [j.id for j in jobs])
            clips, error = [None] * len(jobs), "The generator ran out of memory; please try a shorter clip."
        except Exception as exc:
            log.exception("generation failed for jobs %s", [j.id for j in jobs])
            clips, error = [None] * len(jobs), f"Generation failed ({type(exc).__name__}: {exc})."[:300]
        elapsed = time.monotonic() - started

        results = []
        for row, (job, clip) in enumerate(zip(jobs, clips, strict=True)):
            if events[row].is_set():
                results.append(JobResult(job, JobStatus.CANCELLED, error="Cancelled.", elapsed=elapsed))
            elif timed_out[row]:
                results.append(JobResult(job, JobStatus.FAILED, elapsed=elapsed,
                                         error=f"Generation took longer than {self.job_timeout:g} s and was stopped."))
            elif clip is not None and error is None:
                results.append(JobResult(job, JobStatus.DONE, clip=clip, elapsed=elapsed))
            else:
                results.append(JobResult(job, JobStatus.FAILED, elapsed=elapsed,
                                         error=error or "The generator returned no audio for this request."))
        for result in results:
            if result.status is JobStatus.DONE:
                self.completed += 1
            elif result.status is JobStatus.CANCELLED:
                self.cancelled += 1
            else:
                self.failed += 1
        self.batches += 1
        log.info("batch of %d finished in %.1f s: %s", len(jobs), elapsed,
                 ", ".join(f"{r.job.id}={r.status.value}" for r in results))
        return results

    def _release_memory(self) -> None:
        clear = self._clear_cache
        if clear is None:
            mx = sys.modules.get("mlx.core")
            clear = getattr(mx, "clear_cache", None)
        if clear is not None:
            try:
                clear()
            except Exception:  # noqa: BLE001 - freeing a cache must never stop the worker
                log.exception("could not clear the MLX cache")


def system_memory_available() -> int | None:
    """Bytes this process could use for a batch: Linux's ``MemAvailable`` plus what MLX already holds (active
    arrays such as the weights, and its buffer cache, both reused). None where ``/proc/meminfo`` does not exist."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    mx = sys.modules.get("mlx.core")
    for name in ("get_active_memory", "get_cache_memory"):
        try:
            available += int(getattr(mx, name)())
        except Exception:  # noqa: BLE001 - not MLX, or an MLX without this query
            pass
    return available


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _call_progress(callback: ProgressCallback, job: Job, step: int, total: int) -> None:
    try:
        callback(job, step, total)
    except Exception:  # noqa: BLE001 - a progress display must never break a generation
        log.exception("progress callback failed for job %d", job.id)
