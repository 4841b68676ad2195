"""Benchmark: clips per minute with 1, 2, 3… worker processes on one shared Redis, and what the shared store costs.

    python -m bench.scale_out --workers 1,2,3 --jobs 12 --seconds 2            # the tiny test model
    python -m bench.scale_out --shape small --workers 1,2 --jobs 4 --seconds 2  # musicgen-small-shaped weights

Everything is real except Discord: a ``redis-server`` on 127.0.0.1, a gateway (``python -m bot`` with
``JOB_STORE=redis://…``) and N workers (``python -m bot.worker``, ``MAX_BATCH=1`` so jobs spread over workers),
all talking to the fake Discord of the tests. ``--jobs`` requests from four members are queued while the queue is
paused, then released at once; the time is from the release to the last clip delivered. Then the store's share
of a job: the calls a worker makes around one job (claim, lease renewal, the delivery mark, finish), timed on
Redis and on SQLite. Needs the test extras (the fake Discord and the checkpoint builder live in ``tests/``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bot.jobs import Job, JobStatus
from bot.queue import JobQueue, Limits
from bot.redis_store import RedisJobStore
from bot.store import JobStore, SQLiteJobStore
from tests.e2e_helpers import audio
from tests.fake_discord import FakeDiscord
from tests.fake_discord.process import BotProcess, bot_env
from tests.redis_server import RedisServer

OPEN = Limits(max_seconds=60, max_pending_per_user=1000, max_queue_size=10000, cooldown_seconds=0)


def checkpoint(shape: str, cache: Path) -> Path:
    from tests.tiny_models import build_musicgen

    folder = cache / f"musicgen-{shape}-random"
    if not (folder / "model.safetensors").is_file():
        print(f"building {shape} random weights in {folder} (once)…", file=sys.stderr)
        if shape == "tiny":
            build_musicgen(folder)
        else:
            build_musicgen(folder, decoder=shape, text_encoder="t5-base", codec="real")
    return folder


async def clips_per_minute(model: Path, workers: int, jobs: int, seconds: int, folder: Path) -> float:
    """Serve ``jobs`` clips of ``seconds`` with ``workers`` worker processes; clips per minute of wall time."""
    with RedisServer(folder / "redis") as redis:
        async with FakeDiscord() as fake:
            common = dict(JOB_STORE=redis.url, MUSICGEN_MODEL=str(model), COOLDOWN_SECONDS="0", MAX_BATCH="1",
                          MAX_PENDING_PER_USER="1000", MAX_QUEUE_SIZE="10000")
            processes = []
            try:
                for n in range(workers):
                    worker = BotProcess(fake, bot_env(fake, folder, **common, WORKER_ID=f"w{n}",
                                                      FILES_DIR=str(folder / f"w{n}")),
                                        folder / f"w{n}.log", module="bot.worker")
                    processes.append(await worker.start())
                for worker in processes:
                    await worker.wait_log("ready", 600)
                gateway = BotProcess(fake, bot_env(fake, folder, **common, LOG_LEVEL="WARNING"),
                                     folder / "gateway.log")
                processes.append(await gateway.start())
                await gateway.wait_ready(120)
                admin = fake.guild.add_member("admin", admin=True)
                members = [fake.guild.add_member(f"m{n}") for n in range(4)]
                paused = await fake.invoke(admin, "admin pause")
                await paused.wait(lambda i: i.original is not None, 10)
                asked = [await fake.invoke(members[n % 4], "music", {"prompt": f"clip {n}", "seconds": seconds})
                         for n in range(jobs)]
                for interaction in asked:
                    await interaction.wait(lambda i: i.original is not None, 30)
                began = time.monotonic()
                await fake.invoke(admin, "admin resume")
                for interaction in asked:
                    await interaction.wait(lambda i: len(audio(i.files)) >= 1, 3600)
                elapsed = time.monotonic() - began
            finally:
                for process in processes:
                    await process.stop(60)
    return jobs / elapsed * 60


def job(user: int) -> Job:
    return Job(guild_id=1, channel_id=10, user_id=user, user_name=f"u{user}", prompt="p", model_prompt="p",
               new_seconds=5, seed=1)


def store_cost(store: JobStore, jobs: int) -> dict[str, float]:
    """Milliseconds per call of what a worker does around one job, median over ``jobs`` jobs."""
    queue = JobQueue(store, OPEN)
    for n in range(jobs):
        queue.submit(job(n))
    timings: dict[str, list[float]] = {"claim": [], "renew": [], "delivering mark": [], "finish": []}
    for _ in range(jobs):
        began = time.perf_counter()
        [claimed] = queue.next_batch(1, worker_id="w", lease_seconds=30)
        timings["claim"].append(time.perf_counter() - began)
        began = time.perf_counter()
        queue.renew("w", [claimed.id], 30)
        timings["renew"].append(time.perf_counter() - began)
        began = time.perf_counter()
        store.update_if(claimed.id, {"status": JobStatus.RUNNING, "worker_id": "w"}, delivering_at=time.time())
        timings["delivering mark"].append(time.perf_counter() - began)
        began = time.perf_counter()
        queue.finish(claimed.id, JobStatus.DONE, expected={"status": JobStatus.RUNNING, "worker_id": "w"})
        timings["finish"].append(time.perf_counter() - began)
    return {name: statistics.median(values) * 1000 for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,3", help="worker process counts to try, e.g. 1,2,3")
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument("--shape", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--cache", type=Path,  # shared with python -m bench (the same random weights)
                        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "musicgen-bench")
    parser.add_argument("--store-jobs", type=int, default=300, help="jobs for the store-cost part (0: skip it)")
    args = parser.parse_args()
    model = checkpoint(args.shape, args.cache)

    rows = []
    for count in (int(n) for n in args.workers.split(",") if n):
        with tempfile.TemporaryDirectory() as folder:
            rate = asyncio.run(clips_per_minute(model, count, args.jobs, args.seconds, Path(folder)))
        rows.append((count, rate))
        print(f"{count} worker(s): {rate:.1f} clips/min", file=sys.stderr)
    print(f"\n{args.jobs} clips of {args.seconds} s, {args.shape} model, MAX_BATCH=1 per worker\n")
    print("| workers | clips per minute | vs 1 worker |\n|---:|---:|---:|")
    for count, rate in rows:
        print(f"| {count} | {rate:.1f} | ×{rate / rows[0][1]:.2f} |")

    if args.store_jobs:
        with tempfile.TemporaryDirectory() as folder:
            with RedisServer(Path(folder) / "redis") as redis:
                on_redis = RedisJobStore.from_url(redis.url, files_dir=Path(folder) / "clips")
                redis_ms = store_cost(on_redis, args.store_jobs)
                on_redis.close()
            on_sqlite = SQLiteJobStore(Path(folder) / "bot.sqlite3")
            sqlite_ms = store_cost(on_sqlite, args.store_jobs)
            on_sqlite.close()
        print(f"\nstore calls around one job, median of {args.store_jobs} (ms)\n")
        print("| call | Redis | SQLite |\n|---|---:|---:|")
        for name in redis_ms:
            print(f"| {name} | {redis_ms[name]:.2f} | {sqlite_ms[name]:.2f} |")
        print(f"| **per job** | {sum(redis_ms.values()):.2f} | {sum(sqlite_ms.values()):.2f} |")


if __name__ == "__main__":
    main()
