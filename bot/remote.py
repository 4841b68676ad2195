"""A gateway whose workers run elsewhere (``JOB_STORE=redis://…``, ``EMBEDDED_WORKER=false``).

The gateway answers interactions and enqueues; workers (``python -m bot.worker``) on other machines claim the jobs,
generate and deliver. What the gateway needs of them goes through the shared store and an events channel:

- :class:`ModelInfo`: what a worker's model can do (sampling rate, channels, longest clip, melody…). Each worker
  writes it to the store when its model is loaded; :class:`RemoteModel` reads it for the cogs (the length a member
  may ask for, how an upload is decoded, whether ``/music melody:`` exists).
- :class:`RemoteDispatch`: the gateway's stand-in for :class:`~bot.dispatcher.Dispatcher`: a queued job or a resumed
  queue publishes "wake"; cancelling a running job records it in the store (the worker also sees it when it renews
  its lease) and publishes "cancel <id>" so the worker stops within a step.

No MLX, no discord.py, no core: like the rest of the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from .jobs import Job, JobStatus
from .queue import JobQueue
from .store import JobStore

log = logging.getLogger(__name__)

MODEL_KEY = "workers.model"  # the ModelInfo of the last worker that loaded its model
MODEL_REFRESH_SECONDS = 30.0


@dataclass(frozen=True)
class ModelInfo:
    """What a worker's loaded model can do; the facts the cogs use (see :class:`ModelFacts`)."""

    model: str
    sampling_rate: int
    channels: int
    frame_rate: float
    max_seconds: float
    is_melody: bool
    max_batch: int
    worker_id: str = ""

    @classmethod
    def of(cls, model: ModelFacts, name: str, worker_id: str) -> ModelInfo:
        """What the loaded ``model`` (checkpoint ``name``) of worker ``worker_id`` can do."""
        return cls(model=name, sampling_rate=model.sampling_rate, channels=model.channels,
                   frame_rate=model.frame_rate, max_seconds=model.max_seconds, is_melody=model.is_melody,
                   max_batch=model.max_batch, worker_id=worker_id)

    def to_value(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_value(cls, value: Any) -> ModelInfo | None:
        """The info stored by a worker, or None when there is none or it is not readable (another version)."""
        if not isinstance(value, dict):
            return None
        try:
            return cls(model=str(value["model"]), sampling_rate=int(value["sampling_rate"]),
                       channels=int(value["channels"]), frame_rate=float(value["frame_rate"]),
                       max_seconds=float(value["max_seconds"]), is_melody=bool(value["is_melody"]),
                       max_batch=int(value["max_batch"]), worker_id=str(value.get("worker_id", "")))
        except (KeyError, TypeError, ValueError):
            return None


class ModelFacts(Protocol):
    """What the cogs need to know of the model (a local :class:`~bot.worker.GenerationWorker` or
    :class:`RemoteModel`)."""

    @property
    def sampling_rate(self) -> int: ...
    @property
    def channels(self) -> int: ...
    @property
    def frame_rate(self) -> float: ...
    @property
    def max_seconds(self) -> float: ...
    @property
    def is_melody(self) -> bool: ...
    @property
    def max_batch(self) -> int: ...


# Until a worker has said what it runs: MusicGen's own figures (every checkpoint is 32 kHz, 50 frames per second).
FALLBACK = ModelInfo(model="(no worker yet)", sampling_rate=32000, channels=1, frame_rate=50.0, max_seconds=30.0,
                     is_melody=False, max_batch=1)


class RemoteModel:
    """:class:`ModelFacts` read from the store, as the workers wrote them, when :meth:`refresh` is called (the bot
    does at start and every ``MODEL_REFRESH_SECONDS``).

    ``fallback_max_seconds`` (the configured ``MAX_SECONDS``) is the longest clip until a worker has said more.
    """

    def __init__(self, store: JobStore, *, fallback_max_seconds: float) -> None:
        self.store = store
        self._fallback = ModelInfo(**{**FALLBACK.to_value(), "max_seconds": float(fallback_max_seconds)})
        self._info: ModelInfo | None = None

    @property
    def info(self) -> ModelInfo:
        """The workers' model as last read (the fallback while none has reported)."""
        return self._info or self._fallback

    @property
    def reported(self) -> bool:
        """Whether a worker has said what model it runs."""
        return self.info is not self._fallback

    def refresh(self) -> ModelInfo | None:
        """Read what the workers wrote now (a store failure keeps the last value)."""
        try:
            info = ModelInfo.from_value(self.store.get_value(MODEL_KEY))
        except Exception as exc:  # the store is the engine's: its errors vary by backend
            log.warning("could not read the workers' model: %s", exc)
            return self._info
        if info is not None and info != self._info:
            log.info("workers run %s: %d Hz, %d channel(s), clips up to %g s%s", info.model, info.sampling_rate,
                     info.channels, info.max_seconds, ", follows melodies" if info.is_melody else "")
        self._info = info or self._info
        return self._info

    sampling_rate = property(lambda self: self.info.sampling_rate)
    channels = property(lambda self: self.info.channels)
    frame_rate = property(lambda self: self.info.frame_rate)
    max_seconds = property(lambda self: self.info.max_seconds)
    is_melody = property(lambda self: self.info.is_melody)
    max_batch = property(lambda self: self.info.max_batch)


class Events(Protocol):
    """The channel to the workers (:class:`bot.redis_store.RedisEvents`)."""

    async def publish_wake(self) -> None: ...
    async def publish_cancel(self, job_id: int) -> None: ...
    async def listen(self, on_wake: Callable[[], None], on_cancel: Callable[[int], None]) -> None:
        """Call ``on_wake`` / ``on_cancel(job_id)`` for each message until cancelled."""
        ...
    async def close(self) -> None: ...


class RemoteDispatch:
    """What the cogs use of a dispatcher (``wake``, ``cancel``, ``holds``, ``start``, ``stop``) when the workers are
    other processes: messages to them go through ``events``; the store is the truth."""

    def __init__(self, queue: JobQueue, store: JobStore, events: Events) -> None:
        self.queue = queue
        self.store = store
        self.events = events
        self._pending: set[asyncio.Task] = set()
        queue.stop_running = self._stop_running

    def start(self) -> None:
        """Tell idle workers to look at the queue (jobs may have waited while the gateway was down)."""
        self.wake()

    def holds(self, job_id: int) -> bool:
        """Whether a worker is generating the job now (its lease is in the store)."""
        job = self.store.get(job_id)
        return job is not None and job.status is JobStatus.RUNNING and job.worker_id is not None

    def wake(self) -> None:
        """There may be work: idle workers look now (they also look every few seconds on their own)."""
        self._send(self.events.publish_wake(), "wake")

    def cancel(self, job: Job, reason: str) -> Job | None:
        """Cancel a queued job now, or ask the worker running it to stop (recorded, with ``reason``, by the worker);
        None when the job had already ended."""
        return self.queue.cancel(job.id, reason=reason)

    def _stop_running(self, job_id: int) -> bool:
        self._send(self.events.publish_cancel(job_id), f"cancel {job_id}")
        return True

    def _send(self, message: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.get_running_loop().create_task(message)
        self._pending.add(task)
        task.add_done_callback(lambda t: self._sent(t, what))

    def _sent(self, task: asyncio.Task, what: str) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not tell the workers %r (they will see it within a lease): %s", what, task.exception())

    async def stop(self, grace: float) -> None:
        """Let the messages being sent go out (at most ``grace`` seconds, at least one)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=max(grace, 1.0))
