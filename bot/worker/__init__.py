"""One dedicated thread owns the MLX model: it loads it and runs every generation.

MLX streams are per thread (an array made in one thread cannot be evaluated in another), so the model must never
be touched from the event loop, ``asyncio.to_thread`` or an executor. The asyncio side hands a batch of jobs to
the thread and awaits an :class:`asyncio.Future`; progress and results come back with ``call_soon_threadsafe``.
Cancelling a job sets its :class:`threading.Event`, which the generator polls through ``should_stop(row)``.

This is the bot's one module that imports ``core``: a :class:`~bot.jobs.Job` becomes a
:class:`core.GenerationRequest` here only (:func:`generation_request`), and a clip comes back as the engine's
:class:`~bot.jobs.ClipData`. :class:`Generator` is everything it uses of a model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from core import Clip, GenerationRequest, GenerationStopped

from ..jobs import ClipData, ClipDataGone, Job, JobResult, JobStatus, load_tokens, load_upload

log = logging.getLogger(__name__)

ProgressCallback = Callable[[Job, int, int], Any]
PROGRESS_MIN_INTERVAL = 0.25  # seconds between progress hand-offs per row (the bot throttles edits further)
THREAD_EXIT_SECONDS = 2.0  # how long stop() waits for the OS thread to end after its Python code has
MEMORY_HEADROOM = 0.9  # use at most this share of the memory that is free (the estimate is rough)


class Generator(Protocol):
    """Everything the worker uses of a model: :class:`core.MusicGen` implements it (tests/fakes.py too)."""

    @property
    def sampling_rate(self) -> int: ...
    @property
    def max_seconds(self) -> float: ...
    @property
    def channels(self) -> int: ...
    @property
    def frame_rate(self) -> float: ...
    @property
    def is_melody(self) -> bool: ...

    def encode_audio(self, audio: np.ndarray, sampling_rate: int) -> np.ndarray:
        """Audio ``(samples, channels)`` at any rate -> EnCodec codes ``(codebooks, frames)``."""
        ...

    def estimate_batch_bytes(self, requests: Sequence[GenerationRequest]) -> int:
        """Rough peak memory in bytes to generate ``requests`` together."""
        ...

    def generate_batch(self, requests: Sequence[GenerationRequest], *,
                       on_progress: Callable[[int, int, int], Any] | None = None,
                       should_stop: Callable[[int], bool] | None = None) -> list[Clip | None]:
        """One clip per request (None for a row ``should_stop(row)`` stopped); ``on_progress(row, step, total)``."""
        ...


class WorkerError(RuntimeError):
    """The model could not be loaded, or the worker is not running."""


@dataclass
class _Batch:
    jobs: list[Job]
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
    ``extend_stride`` (seconds) goes into every request (how far each window moves in clips longer than the
    model's window). :func:`generation_request` is the one place a :class:`Job` becomes what the model is asked.
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

    @property
    def is_melody(self) -> bool:
        """Whether the model follows a melody (``/music melody:``)."""
        return bool(self.generator.is_melody)

    @property
    def frame_rate(self) -> float:
        """EnCodec frames per second (a clip's tokens are this many frames per second of audio)."""
        return float(self.generator.frame_rate)

    def stop(self, timeout: float | None = None, *, cancel_running: bool = False) -> bool:
        """Ask the thread to exit after the current batch (or stop that batch too); True if it has exited."""
        if cancel_running:
            for event in list(self._events.values()):
                event.set()
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        _wait_until_gone(self._thread.native_id, THREAD_EXIT_SECONDS)
        return True

    # -- the asyncio side ---------------------------------------------------------------------------------------
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
        if n <= 1 or self._generator is None:
            return n
        budget = self.memory_budget()
        if budget is None:
            return n
        # lengths and prompts are all the estimate needs: no file is read on the event loop
        requests = [generation_request(j, frame_rate=self.frame_rate, extend_stride=self.extend_stride)
                    for j in jobs[:n]]
        try:
            while n > 1 and self._generator.estimate_batch_bytes(requests[:n]) > budget:
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
        events = [threading.Event() for _ in jobs]
        for job, event in zip(jobs, events, strict=True):
            self._events[job.id] = event
        batch = _Batch(jobs, events, loop, loop.create_future(), on_progress)
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
        clips: list[Clip | None] = [None] * len(jobs)
        gone: dict[int, str] = {}
        rows: list[int] = []
        requests: list[GenerationRequest] = []
        error: str | None = None
        try:
            for row, job in enumerate(jobs):  # the files a row continues are read here, on the model's thread
                try:
                    requests.append(generation_request(
                        job, prompt_tokens=prompt_tokens(self.generator, job), frame_rate=self.frame_rate,
                        extend_stride=self.extend_stride, melody=load_upload(job.melody_path) if job.melody_path
                        else None))
                    rows.append(row)
                except ClipDataGone as exc:
                    log.warning("job %d: %s", job.id, exc)
                    gone[row] = f"The audio this clip is made from is gone ({exc})."
                except ValueError as exc:  # an upload the model cannot encode: the message is fit for a member
                    log.warning("job %d: %s", job.id, exc)
                    gone[row] = str(exc)[:300]
            if requests:
                made = list(self.generator.generate_batch(
                    requests, on_progress=lambda i, step, total: on_progress(rows[i], step, total),
                    should_stop=lambda i: should_stop(rows[i])))
                if len(made) != len(requests):
                    raise RuntimeError(f"the generator returned {len(made)} clips for {len(requests)} requests")
                for row, clip in zip(rows, made, strict=True):
                    clips[row] = clip
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
                results.append(JobResult(job, JobStatus.DONE, clip=_clip_data(clip), elapsed=elapsed))
            else:
                results.append(JobResult(job, JobStatus.FAILED, elapsed=elapsed, error=error or gone.get(row)
                                         or "The generator returned no audio for this request."))
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
        if clear is None and "mlx.core" in sys.modules:  # the model imported MLX; no model, nothing to free
            clear = sys.modules["mlx.core"].clear_cache
        if clear is not None:
            try:
                clear()
            except Exception:  # noqa: BLE001 - freeing a cache must never stop the worker
                log.exception("could not clear the MLX cache")


def _wait_until_gone(native_id: int | None, timeout: float) -> None:
    """Wait (Linux; up to ``timeout`` s) until the OS thread ``native_id`` has really ended. ``join`` returns when
    its Python code is done, but the thread then runs MLX's thread-local destructors, which take the GIL: if the
    interpreter is finalizing by then (the process exits right after a stop) they abort the process."""
    task = Path(f"/proc/self/task/{native_id}")
    if native_id is None or not task.parent.is_dir():
        return
    deadline = time.monotonic() + timeout
    while task.exists() and time.monotonic() < deadline:
        time.sleep(0.005)


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
    if mx is not None:  # MLX is loaded (by the model): what it holds is reused for the next batch
        available += int(mx.get_active_memory()) + int(mx.get_cache_memory())
    return available


def prompt_tokens(generator: Generator, job: Job) -> np.ndarray | None:
    """The codes ``(codebooks, frames)`` of the audio ``job`` continues: the parent's tokens (Extend, and
    Regenerate/Variation of an extended clip) or the member's upload encoded (/continue); None for a fresh clip.
    Reads files and runs the model: call it on the model's thread. :class:`ClipDataGone` when the files are gone."""
    if job.prompt_tokens_path:
        return load_tokens(job.prompt_tokens_path)
    if job.prompt_audio_path:
        samples, rate = load_upload(job.prompt_audio_path)
        return generator.encode_audio(samples, rate)
    return None


def generation_request(job: Job, *, frame_rate: float, prompt_tokens: np.ndarray | None = None,
                       extend_stride: float | None = None,
                       melody: tuple[np.ndarray, int] | None = None) -> GenerationRequest:
    """What the model is asked for ``job``: the one translation of a job. ``GenerationRequest.seconds`` is the
    total: the audio continued (``prompt_tokens``' length; without them the job's own record of it) plus
    ``job.new_seconds``. ``melody`` is the job's tune (``job.melody_path`` read on the model's thread; the memory
    estimate goes without it)."""
    prompt_seconds = job.prompt_seconds if prompt_tokens is None else prompt_tokens.shape[1] / frame_rate
    return GenerationRequest(job.model_prompt, prompt_seconds + job.new_seconds, seed=job.seed,
                             temperature=job.temperature, prompt_tokens=prompt_tokens, extend_stride=extend_stride,
                             melody=melody)


def _clip_data(clip: Clip) -> ClipData:
    return ClipData(clip.samples, clip.sampling_rate, seed=clip.seed, tokens=clip.tokens)


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
