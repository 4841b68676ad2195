"""End to end, workers on several machines: a gateway (``python -m bot`` with ``JOB_STORE=redis://…``, no model)
and worker processes (``python -m bot.worker``) share one queue on a real ``redis-server``, through the fake
Discord. Each worker has its own folder for clip files, as on its own machine."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.e2e_helpers import audio, clips, frames, says
from tests.fake_discord import FakeDiscord
from tests.fake_discord.process import BotProcess, bot_env
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e

RATE = 32000
LONG = 30  # seconds: a clip the tiny model takes a few seconds to make (long enough to act while it generates)


@pytest.fixture
def redis_url(tmp_path: Path):
    """A redis-server of this test's own (nothing shared with other tests)."""
    with RedisServer(tmp_path / "redis") as server:
        yield server.url


@pytest.fixture
async def start(fake_discord: FakeDiscord, tmp_path: Path, redis_url: str, tiny_model: Path
                ) -> AsyncIterator[Callable[..., Awaitable[BotProcess]]]:
    """``await start("gateway")`` or ``await start("worker", WORKER_ID="w1")``: a process on the shared Redis,
    ready; extra keyword arguments become its environment. All are stopped after the test."""
    started: list[BotProcess] = []

    async def start_(role: str, **env: str) -> BotProcess:
        name = env.get("WORKER_ID", role)
        settings = dict(JOB_STORE=redis_url, MUSICGEN_MODEL=str(tiny_model), COOLDOWN_SECONDS="0",
                        MAX_BATCH="1", PROGRESS_INTERVAL_SECONDS="1", JOB_LEASE_SECONDS="3",
                        FILES_DIR=str(tmp_path / name / "clips"), DATABASE_PATH=str(tmp_path / name / "unused.db"))
        settings.update(env)
        process = BotProcess(fake_discord, bot_env(fake_discord, tmp_path, **settings), tmp_path / f"{name}.log",
                             module="bot" if role == "gateway" else "bot.worker")
        started.append(process)
        await process.start()
        if role == "gateway":
            await process.wait_ready(120)
        else:
            await process.wait_log(f"worker {name} ready", 120)
        return process

    yield start_
    for process in started:
        if process.returncode is None:
            await process.stop()


def jobs_started(worker: BotProcess) -> list[int]:
    """The ids of the jobs a worker started, from its log."""
    return [int(n) for batch in re.findall(r"batch of \d+ started: jobs \[([\d, ]+)\]", worker.log)
            for n in batch.split(",")]


def maps_mlx(pid: int) -> bool:
    """Whether the process has MLX's library mapped."""
    return "libmlx" in Path(f"/proc/{pid}/maps").read_text()


async def test_a_gateway_and_two_workers_serve_six_jobs_from_three_members_once_each(
        fake_discord: FakeDiscord, start: Callable[..., Awaitable[BotProcess]]) -> None:
    fake = fake_discord
    admin = fake.guild.add_member("boss", admin=True)
    workers = [await start("worker", WORKER_ID="w1"), await start("worker", WORKER_ID="w2")]
    gateway = await start("gateway")
    assert "workers run" in gateway.log  # it learnt the workers' model from the store

    # held while they arrive (pause reaches the workers: nothing starts), then let go at once: both workers claim
    paused = await fake.invoke(admin, "admin pause")
    await paused.wait(lambda i: i.original is not None, 10)
    members = [fake.guild.add_member(name) for name in ("ann", "bob", "cid")]
    asked = []
    for n in range(2):
        for m, member in enumerate(members):
            seconds = 2 + (n + m) % 3
            interaction = await fake.invoke(member, "music", {"prompt": f"{member.name} {n}", "seconds": seconds})
            asked.append((interaction, seconds))
    for interaction, _ in asked:
        await interaction.wait(lambda i: says(i, "position"), 10)
    await asyncio.sleep(1.5)  # a worker that ignored the pause would have started by now
    assert all(jobs_started(w) == [] for w in workers) and not any(says(i, "Generating") for i, _ in asked)
    resumed = await fake.invoke(admin, "admin resume")
    await resumed.wait(lambda i: i.original is not None, 10)

    for interaction, _ in asked:
        await clips(interaction, 1, timeout=120)
    await asyncio.sleep(1.0)  # anything delivered twice would arrive by now
    assert [len(audio(i.files)) for i, _ in asked] == [1] * 6
    assert len(audio(fake.files)) == 6
    assert [frames(audio(i.files)[0].data) for i, _ in asked] == [s * RATE for _, s in asked]
    started = [jobs_started(w) for w in workers]
    assert sorted(started[0] + started[1]) == list(range(1, 7)), started  # each job made once, by one worker
    assert all(started), f"one worker made them all: {started}"
    assert not maps_mlx(gateway.pid) and all(maps_mlx(w.pid) for w in workers)
    assert "loading model" not in gateway.log
    for process in (gateway, *workers):
        assert await process.stop() == 0, process.log
        assert "Traceback" not in process.log and fake.token not in process.log


async def test_a_worker_killed_mid_job_its_job_is_finished_by_the_other_and_delivered_once(
        fake_discord: FakeDiscord, start: Callable[..., Awaitable[BotProcess]]) -> None:
    fake = fake_discord
    gateway = await start("gateway")
    workers = {name: await start("worker", WORKER_ID=name) for name in ("w1", "w2")}
    member = fake.guild.add_member("dana")
    interaction = await fake.invoke(member, "music", {"prompt": "a long drone", "seconds": LONG})
    await interaction.wait(lambda i: says(i, "Generating"), 30)
    await fake.wait_until(lambda: any(jobs_started(w) for w in workers.values()), 10)
    [holder] = [name for name, w in workers.items() if jobs_started(w)]
    [other] = [name for name in workers if name != holder]
    workers[holder].kill()
    await workers[holder].wait_exit()

    [clip] = await clips(interaction, 1, timeout=120)
    assert frames(clip.data) == LONG * RATE
    await asyncio.sleep(1.0)
    assert len(audio(interaction.files)) == 1 and len(audio(fake.files)) == 1
    assert jobs_started(workers[other]) == [1]
    assert "recovered: queued again" in workers[other].log
    assert await workers[other].stop() == 0 and await gateway.stop() == 0


async def test_cancel_reaches_the_job_on_a_worker_and_a_restarted_gateway_loses_nothing(
        fake_discord: FakeDiscord, start: Callable[..., Awaitable[BotProcess]]) -> None:
    fake = fake_discord
    gateway = await start("gateway")
    worker = await start("worker", WORKER_ID="w1")
    carl, dora = fake.guild.add_member("carl"), fake.guild.add_member("dora")
    running = await fake.invoke(carl, "music", {"prompt": "endless", "seconds": LONG})
    await running.wait(lambda i: says(i, "Generating"), 30)
    waiting = await fake.invoke(dora, "music", {"prompt": "after it", "seconds": 1})
    await waiting.wait(lambda i: says(i, "position"), 10)

    assert await gateway.stop() == 0  # the gateway goes away and comes back; the queue is in Redis
    gateway = await start("gateway")
    cancel = await fake.invoke(carl, "cancel")
    await cancel.wait(lambda i: i.original is not None, 10)
    assert "Cancelled 1 request" in cancel.original.content
    await running.wait(lambda i: says(i, "Cancelled by you"), 30)  # the worker stopped it and said so

    [clip] = await clips(waiting, 1, timeout=60)  # the job queued before the gateway restarted is made
    assert frames(clip.data) == RATE
    await asyncio.sleep(0.5)
    assert audio(running.files) == [] and jobs_started(worker) == [1, 2]
    assert await worker.stop() == 0 and await gateway.stop() == 0


async def test_a_worker_needs_a_shared_store(tmp_path: Path, fake_discord: FakeDiscord) -> None:
    process = BotProcess(fake_discord, bot_env(fake_discord, tmp_path), tmp_path / "worker.log", module="bot.worker")
    await process.start()
    assert await process.wait_exit(60) == 2
    assert "JOB_STORE=redis://" in process.log and "Traceback" not in process.log


async def test_a_gateway_with_an_embedded_worker_generates_beside_other_workers(
        fake_discord: FakeDiscord, start: Callable[..., Awaitable[BotProcess]]) -> None:
    fake = fake_discord
    both = await start("gateway", EMBEDDED_WORKER="true", WORKER_ID="gw")
    assert "loading model" in both.log and maps_mlx(both.pid)
    interaction = await fake.invoke(fake.guild.add_member("eve"), "music", {"prompt": "here", "seconds": 2})
    [clip] = await clips(interaction, 1, timeout=60)
    assert frames(clip.data) == 2 * RATE and jobs_started(both) == [1]
    assert "worker=gw" in both.log  # claimed under its own name in the shared store
    assert await both.stop() == 0, both.log


async def test_files_cross_machines_an_upload_to_the_worker_and_tokens_back_for_extend(
        fake_discord: FakeDiscord, start: Callable[..., Awaitable[BotProcess]], tmp_path: Path) -> None:
    """/continue's upload is decoded on the gateway and generated from on the worker; the clip's tokens, kept by
    the worker, come back to the gateway (and a worker) through the store when the member clicks Extend."""
    fake = fake_discord
    worker = await start("worker", WORKER_ID="w1", MAX_SECONDS="3")
    gateway = await start("gateway", MAX_SECONDS="3")
    carol = fake.guild.add_member("carol")
    tone = 0.4 * np.sin(2 * np.pi * 330 * np.arange(44100) / 44100)
    out = io.BytesIO()
    sf.write(out, tone.astype(np.float32), 44100, format="WAV")
    upload = fake.upload("mine.wav", out.getvalue(), "audio/wav")
    interaction = await fake.invoke(carol, "continue", {"audio": upload, "prompt": "and then drums", "seconds": 2})
    [continued] = await clips(interaction, 1, timeout=60)
    n = frames(continued.data)
    assert abs(n - 3 * RATE) < 640  # 1 s of upload (to a whole EnCodec frame) + exactly 2 s
    assert list((tmp_path / "gateway" / "clips").glob("upload-*.npz"))  # written on the gateway...
    assert list((tmp_path / "w1" / "clips").glob("upload-*.npz"))  # ...read on the worker's machine
    assert (tmp_path / "w1" / "clips" / "1.npy").exists() and not (tmp_path / "gateway" / "clips" / "1.npy").exists()

    [message] = [m for m in interaction.followups if m.attachments]
    extend = await fake.click(message, "clip:extend:1", carol)
    [longer] = await clips(extend, 1, timeout=60)
    assert abs(frames(longer.data) - (n + 3 * RATE)) < 640  # the clip and 3 s more (MAX_SECONDS)
    assert (tmp_path / "gateway" / "clips" / "1.npy").exists()  # fetched by the gateway to size the extension
    assert jobs_started(worker) == [1, 2]
    assert await worker.stop() == 0 and await gateway.stop() == 0


async def test_a_gateway_connects_the_shards_it_is_given(
        fake_discord: FakeDiscord, start: Callable[..., Awaitable[BotProcess]]) -> None:
    await start("worker", WORKER_ID="w1")
    gateway = await start("gateway", SHARD_COUNT="2", SHARD_IDS="1")  # the other process would take shard 0
    [identify] = fake_discord.events_of("identify")
    assert identify.data["shard"] == [1, 2]
    assert await gateway.stop() == 0
