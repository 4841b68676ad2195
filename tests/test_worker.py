"""The generation worker with a fake generator: one dedicated thread, batches, cancel, faults and timeouts."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
import soundfile

from bot.audio import fit_wav, wav_bytes
from bot.jobs import Job, JobStatus
from bot.queue import JobQueue, Limits
from bot.store import SQLiteJobStore
from bot.worker import GenerationWorker, WorkerError
from tests.fakes import FakeGenerator


def make_job(job_id: int, user: int = 1, seconds: int = 1, seed: int = 7) -> Job:
    return Job(guild_id=1, channel_id=10, user_id=user, user_name=f"u{user}", prompt=f"p{job_id}",
               model_prompt=f"theme, p{job_id}", new_seconds=seconds, seed=seed, id=job_id)


@pytest.fixture
def fake() -> FakeGenerator:
    return FakeGenerator(sampling_rate=8000, step_delay=0.001)


@pytest.fixture
def make_worker(fake):
    workers = []

    def make(factory=None, **kw) -> GenerationWorker:
        worker = GenerationWorker(factory or (lambda: fake), **kw)
        worker.start()
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        assert worker.stop(timeout=5, cancel_running=True)


async def test_load_and_every_generation_run_on_one_dedicated_thread(make_worker):
    made: list[FakeGenerator] = []

    def factory() -> FakeGenerator:
        gen = FakeGenerator(sampling_rate=8000)
        made.append(gen)
        return gen

    worker = make_worker(factory, max_batch=2)
    await worker.wait_ready()
    loop_thread = threading.get_ident()
    for i in range(3):
        results = await worker.run_batch([make_job(2 * i + 1), make_job(2 * i + 2)])
        assert [r.status for r in results] == [JobStatus.DONE, JobStatus.DONE]
    (gen,) = made
    assert len(gen.thread_ids) == 4  # construction + three batches
    assert set(gen.thread_ids) == {worker.thread_ident}
    assert worker.thread_ident != loop_thread


async def test_clips_have_exactly_the_requested_length_and_the_job_seed(make_worker, fake):
    worker = make_worker()
    results = await worker.run_batch([make_job(1, seconds=3, seed=11), make_job(2, user=2, seconds=1, seed=12)])
    assert [r.clip.samples.shape for r in results] == [(24000, 1), (8000, 1)]
    assert [r.clip.seed for r in results] == [11, 12]
    assert [(r.prompt, r.seconds, r.seed) for r in fake.calls[0]] == [("theme, p1", 3, 11), ("theme, p2", 1, 12)]
    assert worker.completed == 2 and worker.batches == 1
    assert (worker.sampling_rate, worker.max_seconds, worker.channels) == (8000, 30.0, 1)


async def test_batches_are_taken_in_fair_order_up_to_max_batch(tmp_path, make_worker, fake):
    store = SQLiteJobStore(tmp_path / "db")
    queue = JobQueue(store, Limits(max_pending_per_user=10, cooldown_seconds=0))
    for _ in range(4):
        queue.submit(make_job(0, user=1))
    queue.submit(make_job(0, user=2))
    queue.submit(make_job(0, user=3))
    worker = make_worker(max_batch=4)
    expected = [j.id for j in queue.ordered()]
    first = queue.next_batch(worker.max_batch)
    results = await worker.run_batch(first)
    second = queue.next_batch(worker.max_batch)
    results += await worker.run_batch(second)
    assert [len(c) for c in fake.calls] == [4, 2]
    assert [r.job.id for r in results] == expected
    assert [r.job.user_id for r in results] == [1, 2, 3, 1, 1, 1]
    with pytest.raises(ValueError, match="at most 4"):
        await worker.run_batch([make_job(i) for i in range(5)])
    store.close()


async def test_cancelling_one_row_leaves_the_others(make_worker, fake):
    fake.step_delay = 0.01
    worker = make_worker()
    steps: dict[int, int] = {}
    started = asyncio.Event()

    def progress(job: Job, step: int, total: int) -> None:
        assert threading.get_ident() == loop_thread  # progress comes back on the event loop
        steps[job.id] = step
        started.set()

    loop_thread = threading.get_ident()
    jobs = [make_job(i, user=i, seconds=2) for i in (1, 2, 3)]
    task = asyncio.create_task(worker.run_batch(jobs, on_progress=progress))
    await started.wait()
    assert worker.busy
    assert worker.cancel(2)
    results = await task
    assert [r.status for r in results] == [JobStatus.DONE, JobStatus.CANCELLED, JobStatus.DONE]
    assert results[1].clip is None
    assert [r.clip.samples.shape[0] for r in (results[0], results[2])] == [16000, 16000]
    assert steps[1] == steps[3] == 100 and steps[2] < 100  # the others ran to the last step
    assert (worker.completed, worker.cancelled, worker.failed) == (2, 1, 0)
    assert not worker.busy and not worker.cancel(2)


async def test_a_job_cancelled_before_its_batch_starts_is_not_generated(make_worker, fake):
    block = threading.Event()
    fake.block = block
    worker = make_worker()
    first = asyncio.create_task(worker.run_batch([make_job(1)]))
    while not fake.calls:
        await asyncio.sleep(0.01)
    fake.block = None
    second = asyncio.create_task(worker.run_batch([make_job(2), make_job(3)]))
    await asyncio.sleep(0.05)
    assert worker.cancel(2)
    block.set()
    assert (await first)[0].status is JobStatus.DONE
    results = await second
    assert [r.status for r in results] == [JobStatus.CANCELLED, JobStatus.DONE]


@pytest.mark.parametrize("exc, message", [(MemoryError(), "ran out of memory"),
                                          (RuntimeError("boom"), "RuntimeError: boom")])
async def test_an_exception_fails_the_batch_and_the_worker_goes_on(make_worker, fake, exc, message):
    worker = make_worker()
    fake.fail_with = exc
    results = await worker.run_batch([make_job(1), make_job(2)])
    assert [r.status for r in results] == [JobStatus.FAILED, JobStatus.FAILED]
    assert all(message in r.error for r in results)
    results = await worker.run_batch([make_job(3)])
    assert results[0].status is JobStatus.DONE
    assert (worker.failed, worker.completed, worker.batches) == (2, 1, 2)


async def test_a_hung_generation_is_stopped_by_the_job_timeout(make_worker, fake):
    worker = make_worker(job_timeout=0.3)
    fake.hang = True
    results = await worker.run_batch([make_job(1), make_job(2)])
    assert [r.status for r in results] == [JobStatus.FAILED, JobStatus.FAILED]
    assert "longer than 0.3 s" in results[0].error
    assert results[0].elapsed >= 0.3
    fake.hang = False
    assert (await worker.run_batch([make_job(3)]))[0].status is JobStatus.DONE


async def test_a_generator_that_never_answers_is_given_up(make_worker, fake):
    block = threading.Event()
    fake.block = block
    worker = make_worker(job_timeout=0.1, hard_timeout_grace=0.2)
    results = await worker.run_batch([make_job(1)])
    assert results[0].status is JobStatus.FAILED and "stopped responding" in results[0].error
    assert worker.stalled
    block.set()  # let the thread go so the fixture can stop it


async def test_a_model_that_fails_to_load_is_reported_once_clearly(make_worker):
    def factory():
        raise FileNotFoundError("no such model folder: /nope")

    worker = make_worker(factory)
    with pytest.raises(WorkerError, match="could not load the model: no such model folder: /nope"):
        await worker.wait_ready(timeout=5)
    assert not worker.ready
    with pytest.raises(WorkerError):
        await worker.run_batch([make_job(1)])


async def test_wait_ready_before_start_is_an_error():
    worker = GenerationWorker(FakeGenerator)
    with pytest.raises(WorkerError, match="not started"):
        await worker.wait_ready()


async def test_memory_is_released_between_batches(make_worker):
    cleared = []
    worker = make_worker(clear_cache=lambda: cleared.append(threading.get_ident()))
    await worker.run_batch([make_job(1)])
    await worker.run_batch([make_job(2)])
    assert cleared == [worker.thread_ident] * 2


async def test_cancelling_the_awaiting_task_stops_the_rows(make_worker, fake):
    fake.step_delay = 0.01
    worker = make_worker()
    task = asyncio.create_task(worker.run_batch([make_job(1, seconds=30)]))
    while not fake.calls:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The row saw should_stop and the worker is free for the next batch long before the 15 s its 1500 steps would take.
    result = await asyncio.wait_for(worker.run_batch([make_job(2)]), 5)
    assert result[0].status is JobStatus.DONE


async def test_a_finished_clip_becomes_a_wav_of_exactly_its_length(make_worker, fake):
    fake.channels = 2
    worker = make_worker()
    (result,) = await worker.run_batch([make_job(1, seconds=3)])
    data = wav_bytes(result.clip)
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert rate == 8000 and samples.shape == (24000, 2)
    np.testing.assert_allclose(samples, result.clip.samples, atol=1 / 32767)
    # Too big for the limit: folded to mono, then split into parts that hold every sample once.
    (mono,) = fit_wav(result.clip, len(data) - 1)
    assert soundfile.info(io.BytesIO(mono)).channels == 1
    parts = fit_wav(result.clip, 20000)
    assert all(len(p) <= 20000 for p in parts) and len(parts) > 1
    frames = sum(soundfile.info(io.BytesIO(p)).frames for p in parts)
    assert frames == 24000


class HungryGenerator(FakeGenerator):
    """A fake whose memory estimate is large: ``base`` bytes plus ``per_row`` bytes per request."""

    def __init__(self, *, base: int, per_row: int, **kw) -> None:
        super().__init__(**kw)
        self.base, self.per_row = base, per_row
        self.estimated: list[int] = []

    def estimate_batch_bytes(self, requests) -> int:
        self.estimated.append(len(requests))
        return self.base + self.per_row * len(requests)


GiB = 2**30


@pytest.mark.parametrize("limit, fits", [(10 * GiB, 4), (3.5 * GiB, 2), (2.5 * GiB, 1), (0.5 * GiB, 1)])
async def test_a_batch_is_shrunk_to_fit_the_memory_limit(make_worker, limit, fits):
    gen = HungryGenerator(base=GiB, per_row=GiB, sampling_rate=8000)
    worker = make_worker(lambda: gen, max_batch=4, memory_limit=int(limit))
    await worker.wait_ready()
    jobs = [make_job(i, user=i) for i in range(1, 7)]
    assert worker.fit_batch(jobs) == fits
    assert worker.fit_batch(jobs[:1]) == 1 and worker.fit_batch([]) == 0
    results = await worker.run_batch(jobs[:fits])
    assert [r.status for r in results] == [JobStatus.DONE] * fits


async def test_without_a_limit_the_free_memory_decides(make_worker):
    gen = HungryGenerator(base=GiB, per_row=GiB, sampling_rate=8000)
    free = {"bytes": 100 * GiB}
    worker = make_worker(lambda: gen, max_batch=4, available_memory=lambda: free["bytes"])
    await worker.wait_ready()
    jobs = [make_job(i) for i in range(1, 5)]
    assert worker.fit_batch(jobs) == 4
    free["bytes"] = 4 * GiB  # 90 % of it is 3.6 GiB: base + 2 rows
    assert worker.fit_batch(jobs) == 2
    free["bytes"] = None  # unknown (not Linux): no shrinking
    assert worker.fit_batch(jobs) == 4


async def test_a_failing_estimate_means_one_job_at_a_time(make_worker):
    gen = HungryGenerator(base=0, per_row=0, sampling_rate=8000)
    gen.estimate_batch_bytes = lambda requests: 1 / 0
    worker = make_worker(lambda: gen, max_batch=4, memory_limit=GiB)
    await worker.wait_ready()
    assert worker.fit_batch([make_job(i) for i in range(1, 5)]) == 1


async def test_a_batch_that_fits_is_not_shrunk(make_worker, fake):
    worker = make_worker(max_batch=3, memory_limit=3 * fake.BYTES_PER_SECOND)  # three 1 s clips fit exactly
    await worker.wait_ready()
    assert worker.fit_batch([make_job(i) for i in range(1, 6)]) == 3
    assert worker.fit_batch([make_job(1, seconds=2), make_job(2, seconds=1)]) == 2
    assert worker.fit_batch([make_job(1, seconds=2), make_job(2, seconds=2)]) == 1
    extend = make_job(2, seconds=1)
    extend.prompt_seconds = 1.0  # the estimate counts the audio a row continues too
    assert worker.fit_batch([make_job(1), extend]) == 2 and worker.fit_batch([make_job(1, seconds=2), extend]) == 1


def test_system_memory_available_reads_meminfo():
    from bot.worker import system_memory_available

    free = system_memory_available()
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    assert free is not None and 0 < free < 2 * total


async def test_extend_stride_goes_into_every_request(make_worker, fake):
    worker = make_worker(extend_stride=18.0)
    results = await worker.run_batch([make_job(1), make_job(2, user=2)])
    assert [r.status for r in results] == [JobStatus.DONE] * 2
    assert [r.extend_stride for r in fake.calls[0]] == [18.0, 18.0]


async def test_extend_and_continue_rows_are_asked_for_their_total_length(make_worker, fake, tmp_path):
    """The one translation of a job: ``GenerationRequest.seconds`` is the audio continued plus the new part, and
    the continued audio's codes are the request's ``prompt_tokens`` (an upload is encoded on the model's thread)."""
    from bot.jobs import JobKind, save_tokens, save_upload

    tokens = np.arange(4 * 100, dtype=np.int32).reshape(4, 100) % 7  # 2 s at 50 frames/s
    extend = make_job(1, seconds=3)
    extend.kind, extend.prompt_tokens_path = JobKind.EXTEND, str(save_tokens(tmp_path, 99, tokens))
    upload = save_upload(tmp_path, np.zeros((8000 * 3 // 2, 1), np.float32), 8000)  # 1.5 s
    cont = make_job(2, user=2, seconds=1)
    cont.kind, cont.prompt_audio_path = JobKind.CONTINUE, str(upload)
    plain = make_job(3, user=3, seconds=2)
    results = await worker_run(make_worker, [extend, cont, plain])
    assert [r.status for r in results] == [JobStatus.DONE] * 3
    (requests,) = fake.calls
    assert [r.seconds for r in requests] == [5.0, 2.5, 2.0]
    np.testing.assert_array_equal(requests[0].prompt_tokens, tokens)
    assert requests[1].prompt_tokens.shape == (fake.NUM_CODEBOOKS, 75) and requests[2].prompt_tokens is None
    assert [r.clip.seconds for r in results] == [5.0, 2.5, 2.0]
    np.testing.assert_array_equal(results[0].clip.tokens[:, :100], tokens)


async def worker_run(make_worker, jobs):
    worker = make_worker(max_batch=len(jobs))
    return await worker.run_batch(jobs)


async def test_a_row_whose_files_are_gone_fails_alone(make_worker, fake, tmp_path):
    from bot.jobs import JobKind

    gone = make_job(1)
    gone.kind, gone.prompt_tokens_path = JobKind.EXTEND, str(tmp_path / "missing.npy")
    results = await worker_run(make_worker, [gone, make_job(2, user=2)])
    assert [r.status for r in results] == [JobStatus.FAILED, JobStatus.DONE]
    assert "gone" in results[0].error and len(fake.calls[0]) == 1


def test_the_generator_protocol_is_what_core_and_the_fake_implement():
    """Every member of :class:`bot.worker.Generator` exists on :class:`core.MusicGen` and on the fake, with the
    batch API's keyword arguments (the worker calls nothing else on a model)."""
    import inspect

    from bot.worker import Generator
    from core import MusicGen

    members = {name for name in vars(Generator) if not name.startswith("_")}
    properties = {"sampling_rate", "max_seconds", "channels", "frame_rate", "is_melody"}
    assert members == properties | {"encode_audio", "estimate_batch_bytes", "generate_batch"}
    for implementation in (MusicGen, FakeGenerator):
        for name in members - properties:
            expected = inspect.signature(getattr(Generator, name)).parameters
            actual = inspect.signature(getattr(implementation, name)).parameters
            assert list(actual)[:len(expected)] == list(expected), (implementation, name)
    fake = FakeGenerator()
    assert all(hasattr(fake, name) for name in members)
    assert all(isinstance(getattr(MusicGen, name), property) for name in properties)


async def test_a_melody_job_hands_its_tune_to_the_model(make_worker, fake, tmp_path):
    """``job.melody_path`` (the decoded /music melody:) becomes the request's ``melody``, read on the model's thread;
    a tune that is gone fails that row alone."""
    from bot.jobs import save_upload

    fake.is_melody = True
    tune = np.linspace(-0.5, 0.5, 8000 * 2, dtype=np.float32)[:, None]
    job = make_job(1)
    job.melody_path, job.melody_name = str(save_upload(tmp_path, tune, 8000)), "tune.wav"
    gone = make_job(2, user=2)
    gone.melody_path = str(tmp_path / "missing.npz")
    results = await worker_run(make_worker, [job, gone, make_job(3, user=3)])
    assert [r.status for r in results] == [JobStatus.DONE, JobStatus.FAILED, JobStatus.DONE]
    (requests,) = fake.calls
    samples, rate = requests[0].melody
    np.testing.assert_array_equal(samples, tune)
    assert rate == 8000 and requests[1].melody is None
