"""Benchmark 1: how fast jobs reach the queue, five ways, side by side on one redis-server.

- ``send_task loop``: ``app.send_task`` per job, no ``producer.batch()`` (what an
  ``apply_async`` loop does): one Redis round trip per message.
- ``kombu batch``: ``app.send_task`` through kombu's pipelined batch producer (deepqueue's
  publish path until it built its messages itself).
- ``publish``: ``producer.enqueue.publish``: messages built as kombu stores them, 500 per LPUSH,
  one job each.
- ``publish, prompt batches``: the same, 8 jobs of a shape per message (``producer.message``).
- ``Client.submit``: the full path: the check of every job, job ids, grouping by shape, claiming
  in the state store (one Lua call per 500 jobs), keeping the jobs as sent in the run's storage
  (a local folder here), then ``publish`` in prompt batches of 8.

The first four send the same pre-validated jobs; ``Client.submit`` starts from plain prompt
strings. Both Redis
databases are flushed before every measurement, and the variants are interleaved (their order
rotates each round) so slow phases of a shared machine hit all of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from ops.bench.report import ratio, summarize
from producer import Client
from producer.contract import TASK_NAME
from producer.enqueue import message_args, producer_app, publish
from producer.entries import Entry, entries_of
from producer.fair import FairQueue
from producer.settings import ClientSettings
from worker.metrics import waiting_jobs

logger = logging.getLogger(__name__)

#: Recipe of the benchmark jobs: a typical SD1.5 job (the size does not change the message much).
RECIPE = {"height": 512, "width": 512, "steps": 25}
LABELS = {
    "send_task_loop": "`app.send_task` loop (no `producer.batch()`)",
    "kombu_batch": "`app.send_task` in kombu's `producer.batch()`",
    "publish": "`producer.enqueue.publish` (built messages, 500 per LPUSH, a job each)",
    "publish_batches": "`producer.enqueue.publish`, prompt batches of 8 jobs a message",
    "client_submit": "`Client.submit` (validate + mark queued + publish)",
}
WARMUP_JOBS = 200


def prompts(count: int) -> list[str]:
    return [f"benchmark prompt number {i}, a photo of a red fox in the snow" for i in range(count)]


def send_task_loop(app: Any, jobs: Sequence[Entry]) -> None:
    """The baseline: one publish (one Redis round trip) per job, as an apply_async loop does."""
    for job in jobs:
        args, kwargs = message_args([job], time.time())
        app.send_task(TASK_NAME, args=args, kwargs=kwargs, task_id=job.job_id)


def kombu_batch(app: Any, jobs: Sequence[Entry]) -> None:
    """Celery's messages through kombu's batch producer: 500 publishes per pipeline flush."""
    with app.producer_or_acquire() as producer, producer.batch(max_size=500):
        for job in jobs:
            args, kwargs = message_args([job], time.time())
            app.send_task(TASK_NAME, args=args, kwargs=kwargs, task_id=job.job_id, producer=producer)


def bench_enqueue(redis_url: str, storage_dir: Path, *, jobs: int, rounds: int) -> dict[str, Any]:
    """``storage_dir``: where ``Client.submit`` keeps the jobs it sends (local storage)."""
    settings = ClientSettings(
        broker_url=f"{redis_url}/0", result_backend=f"{redis_url}/1", storage="local", output_dir=storage_dir
    )
    databases = [redis.Redis.from_url(settings.broker_url), redis.Redis.from_url(settings.result_backend)]
    client = Client(settings=settings)
    app = producer_app(settings)
    texts = prompts(jobs)
    prepared = entries_of(client.prepare(texts, run="bench-enqueue", seed=0, **RECIPE))
    variants: dict[str, Callable[[int], None]] = {
        "send_task_loop": lambda n: send_task_loop(app, prepared[:n]),
        "kombu_batch": lambda n: kombu_batch(app, prepared[:n]),
        "publish": lambda n: publish(databases[0], settings.queue, prepared[:n]),
        "publish_batches": lambda n: publish(databases[0], settings.queue, prepared[:n], per_message=8),
        "client_submit": lambda n: client.submit(texts[:n], run="bench-enqueue", seed=0, **RECIPE),
    }

    def measure(name: str, count: int) -> float:
        for db in databases:
            db.flushdb()
        started = time.perf_counter()
        variants[name](count)
        seconds = time.perf_counter() - started
        entries = databases[0].lrange(settings.queue, 0, -1)
        tokens, fair_jobs = FairQueue(databases[0], settings.queue).waiting()
        queued = fair_jobs + waiting_jobs(len(entries), entries, tokens)
        if queued != count:
            raise RuntimeError(f"{name}: {queued} jobs in the queue after sending {count}")
        return count / seconds

    try:
        for name in variants:  # connections, scripts, first-call imports: not measured
            measure(name, WARMUP_JOBS)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for round_ in range(rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                rates[name].append(measure(name, jobs))
                logger.info("enqueue round %d %s: %.0f jobs/s", round_ + 1, name, rates[name][-1])
    finally:
        for db in databases:
            db.flushdb()
        client.close()
        app.close()
    summaries = {name: summarize(values) for name, values in rates.items()}
    return {
        "jobs": jobs,
        "rounds": rounds,
        "recipe": RECIPE,
        "variants": {
            name: {
                "label": LABELS[name],
                "jobs_per_s": summaries[name],
                "vs_baseline": ratio(summaries[name], summaries["send_task_loop"]),
                "vs_baseline_per_round": [a / b for a, b in zip(rates[name], rates["send_task_loop"], strict=True)],
            }
            for name in variants
        },
    }
