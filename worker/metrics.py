"""Prometheus metrics of a worker, counted and served by its main process.

The server (``GET /metrics``, with the health probes) is ``worker.health``'s; this module holds
what it serves: ``WorkerMetrics``, one ``CollectorRegistry`` of the worker's own families (nothing
is registered globally), and ``QueueDepth``, read from Redis at scrape time.

Where the numbers come from. The pool process generates, encodes and uploads; the main process
holds the consumer, the batch buffer and the server. The pool process returns its measurements
with the results it returns anyway: each job's ``Outcome`` carries how it ended, the kind of
error when one ended or sent it back, and its image's stage seconds (queue wait, encode,
upload); each call's result carries the pipeline calls made since the last one (size and
seconds, or the error that split the batch); the readiness report carries the pipeline's load
time and description. The main process counts all of it, and what it decides itself (lost
processes, timeouts, revoked jobs), in ordinary metrics of one ``CollectorRegistry``. Why not
prometheus_client's multiprocess mode: it needs a folder of mmap files shared by the processes,
wiped at every start and marked per dead pid, and a merge mode per gauge, for numbers that
already travel to the main process. What this loses: the measurements of a pool process that
dies before its call returns (its jobs count as ``process_lost`` instead).

``deepqueue_queue_jobs`` is read from Redis at scrape time (``QueueDepth``): ``waiting`` is the
jobs in the queue's list plus kombu's priority lists (their messages times the jobs of the next
few out: a message carries a prompt batch), ``reserved`` the jobs the queue's live workers hold
(buffered, generating, being stored: in kombu's ``unacked`` hash, where ``LLEN`` and Flower do
not look), as their last lease renewal counted them. Every worker reports the same figures:
aggregate them with ``max``, not ``sum``. While Redis does not answer (one second's timeout) the
family is absent from the scrape; the rest is served as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import redis
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from kombu.transport import redis as kombu_redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from producer.contract import WORKER_GONE_S, serving_workers
from producer.fair import TOKEN
from producer.layout import WORKER_HELD_KEY, WORKER_QUEUES_KEY, WORKERS_KEY, fair_key
from worker.delivery.transport import jobs_in_entry
from worker.pipeline.acceleration import COMPILE_COUNTERS
from worker.pipeline.pool import PipelineUnavailable
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

#: How a job ended here (``deepqueue_images_total{outcome}``).
OUTCOMES = ("done", "failed", "skipped", "cancelled")
#: ``deepqueue_stage_seconds{stage}``: queue_wait, encode and upload per image, inference per pipeline call.
STAGES = ("queue_wait", "inference", "encode", "upload")
#: ``deepqueue_errors_total{kind}``, one per job that failed or went back to the queue for it:
#: invalid_job (not a job), unsupported (a job this worker cannot run: scheduler, DeepCache
#: settings, eta), generation and out_of_memory (its pipeline call failed with the job alone),
#: storage (encode or upload), state (Redis), process_lost (its pool process died), timeout
#: (its batch outlived DEEPQUEUE_BATCH_TIMEOUT_S), pipeline (no pipeline in the pool process),
#: revoked (revoked or expired before it ran), internal (a pool call failed otherwise).
ERROR_KINDS = (
    "invalid_job",
    "unsupported",
    "generation",
    "out_of_memory",
    "storage",
    "state",
    "process_lost",
    "timeout",
    "pipeline",
    "revoked",
    "internal",
)
#: ``deepqueue_batch_failures_total{kind}``: pipeline calls that raised (the batch runs again in parts).
CALL_ERROR_KINDS = ("out_of_memory", "generation")
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
#: ``deepqueue_compiles_total{kind}`` (``worker.pipeline.acceleration``).
COMPILE_KINDS = tuple(COMPILE_COUNTERS)
INFO_LABELS = ("model", "device", "dtype", "acceleration", "cache_interval", "cache_branch", "max_batch", "queue")
#: Seconds a scrape waits for Redis before it leaves out the queue depth.
REDIS_TIMEOUT_S = 1.0


def ended_as(outcome: Mapping[str, Any]) -> str | None:
    """The ``outcome`` label of a job's outcome (an ``Outcome`` as a dict); None: not final."""
    if outcome.get("retry"):
        return None
    skipped = outcome.get("skipped")
    if skipped:
        return "cancelled" if skipped == "cancelled" else "skipped"
    return "done" if outcome.get("ok") else "failed"


def call_error_kind(error: BaseException) -> str:
    """The error kind of a pool call that raised instead of returning outcomes."""
    if isinstance(error, WorkerLostError):
        return "process_lost"
    if isinstance(error, TimeLimitExceeded):
        return "timeout"
    if isinstance(error, PipelineUnavailable):
        return "pipeline"
    if isinstance(error, redis.RedisError):
        return "state"
    return "internal"


class WorkerMetrics:
    """Every metric family of a worker, in its own registry (nothing is registered globally)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.images = Counter(
            "deepqueue_images",
            "Jobs that ended here, by outcome: done, failed, skipped (an earlier delivery finished it), "
            "cancelled (its run was cancelled or deleted)",
            ["outcome"],
            registry=registry,
        )
        self.batches = Counter("deepqueue_batches", "Pipeline calls that generated images", registry=registry)
        self.batch_size = Histogram(
            "deepqueue_batch_size", "Images per pipeline call", buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.stage_seconds = Histogram(
            "deepqueue_stage_seconds",
            "Seconds per stage: queue_wait (enqueued to its batch's start), encode and upload per image; "
            "inference per pipeline call",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "deepqueue_errors",
            "Jobs that failed or went back to the queue, by kind of error",
            ["kind"],
            registry=registry,
        )
        self.batch_failures = Counter(
            "deepqueue_batch_failures",
            "Pipeline calls that raised, by kind: the batch ran again in parts, or its one job failed",
            ["kind"],
            registry=registry,
        )
        self.model_load = Gauge(
            "deepqueue_model_load_seconds",
            "Seconds the pool process took to build its pipeline (storage check and model load)",
            registry=registry,
        )
        self.info = Gauge(
            "deepqueue_worker_info",
            "This worker's model, device and DeepCache settings",
            INFO_LABELS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "deepqueue_jobs_in_flight", "Jobs handed to the pool process and not final yet", registry=registry
        )
        self.buffered = Gauge("deepqueue_jobs_buffered", "Jobs waiting in the batch buffer", registry=registry)
        self.ready = Gauge("deepqueue_ready", "1 when the worker is ready (what /readyz says)", registry=registry)
        self.compiles = Counter(
            "deepqueue_compiles",
            "Compile events in the pool process (acceleration compile or graphs): graphs = graphs dynamo "
            "compiled (a recompile adds one), cache_hits / cache_misses = kernels read from / written to the "
            "compile cache",
            ["kind"],
            registry=registry,
        )
        self.warmup = Gauge(
            "deepqueue_warmup_seconds",
            "Seconds the pool process took to compile DEEPQUEUE_WARM_SHAPES before the worker said ready",
            registry=registry,
        )
        for outcome in OUTCOMES:  # every series present from the start: rate() needs no first event
            self.images.labels(outcome)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        for kind in COMPILE_KINDS:
            self.compiles.labels(kind)
        for kind in CALL_ERROR_KINDS:
            self.batch_failures.labels(kind)

    def record(self, progress: Mapping[str, Any]) -> None:
        """What a pool call returned (``worker.pipeline.pool.execute_batch``): outcomes and pipeline calls."""
        for outcome in progress.get("finished", ()):
            self.job(outcome)
        for call in progress.get("batches", ()):
            self.call(call)

    def job(self, outcome: Mapping[str, Any]) -> None:
        """One job's outcome (an ``Outcome`` as a dict)."""
        if outcome.get("error"):
            self.errors.labels(outcome["error"]).inc()
        ended = ended_as(outcome)
        if ended:
            self.images.labels(ended).inc()
        for stage, seconds in (outcome.get("seconds") or {}).items():
            self.stage_seconds.labels(stage).observe(max(0.0, seconds))  # queue wait: clocks may disagree

    def call(self, call: Mapping[str, Any]) -> None:
        """One pipeline call (a ``BatchCall`` as a dict)."""
        if call.get("error"):
            self.batch_failures.labels(call["error"]).inc()
            return
        self.count_compiles(call.get("compiles") or {})
        self.batches.inc()
        self.batch_size.observe(call["size"])
        if call.get("seconds") is not None:
            self.stage_seconds.labels("inference").observe(call["seconds"])

    def error(self, kind: str, jobs: int = 1) -> None:
        """Errors decided in the main process (lost processes, timeouts, revoked jobs)."""
        if jobs:
            self.errors.labels(kind).inc(jobs)

    def ended(self, outcome: str, jobs: int = 1) -> None:
        """Jobs that ended in the main process (failed after being lost twice, revoked)."""
        if jobs:
            self.images.labels(outcome).inc(jobs)

    def describe_worker(self, settings: WorkerSettings, report: Mapping[str, Any]) -> None:
        """``deepqueue_worker_info`` and the load time; ``report``: the pool process's readiness
        report (``worker.pipeline.pool.PoolProcess.report``), or empty before it arrives."""
        worker = report.get("worker") or {}
        self.info.clear()
        self.info.labels(
            model=settings.model,
            device=str(worker.get("device", settings.device)),
            dtype=str(worker.get("dtype", settings.dtype)),
            acceleration=str(worker.get("acceleration", settings.acceleration)),
            cache_interval=str(settings.cache_interval),
            cache_branch=str(settings.cache_branch),
            max_batch=str(settings.max_batch),
            queue=settings.serving_queue,
        ).set(1)
        if report.get("load_s") is not None:
            self.model_load.set(report["load_s"])
        if report.get("warm_s") is not None:
            self.warmup.set(report["warm_s"])
        self.count_compiles(report.get("compiles") or {})

    def count_compiles(self, counts: Mapping[str, int]) -> None:
        """Compile counts since the pool process last reported (``Accelerator.take_compile_counts``)."""
        for kind, count in counts.items():
            if kind in COMPILE_KINDS and count > 0:
                self.compiles.labels(kind).inc(count)

    def watch(self, in_flight: Callable[[], int], buffered: Callable[[], int]) -> None:
        """Read the in-flight and buffered job counts at scrape time (the strategy's own state)."""
        self.in_flight.set_function(_tolerant(in_flight))
        self.buffered.set_function(_tolerant(buffered))


def _tolerant(count: Callable[[], int]) -> Callable[[], float]:
    """``count`` read from the server's thread while the worker's loop changes what it counts:
    a dict resized under it raises RuntimeError; the next try reads a settled one."""

    def read() -> float:
        for _ in range(3):
            try:
                return float(count())
            except RuntimeError:
                continue
        return float("nan")

    return read


#: Messages next out of a queue's list whose jobs are counted to estimate the jobs waiting in it.
NEXT_OUT = 8


def waiting_jobs(length: int, next_out: list[bytes], tokens: int = 0) -> int:
    """Jobs of the messages waiting in a list of ``length`` entries, ``tokens`` of which stand for
    messages in runs' lists (``producer.fair``, counted there), estimated from the entries
    ``next_out``: exact while its producers send one size of prompt batch (``producer.message``)."""
    messages = [entry for entry in next_out if entry != TOKEN]
    if not messages:
        return 0
    return round(max(length - tokens, 0) * sum(map(jobs_in_entry, messages)) / len(messages))


class QueueDepth(Collector):
    """``deepqueue_queue_jobs{queue, state}`` read from the broker's Redis at scrape time:
    waiting in the queue's lists and its runs' lists (``producer.fair``), and reserved by its
    live workers (as their last lease renewal counted: kombu's ``unacked`` hash mixes every queue
    of the database, so one model's backlog would scale another's workers)."""

    def __init__(self, broker_url: str, queue: str, transport_options: Mapping[str, Any]) -> None:
        self.broker_url = broker_url
        self.queue = queue
        prefix = transport_options.get("global_keyprefix", "")
        steps = transport_options.get("priority_steps", kombu_redis.PRIORITY_STEPS)
        separator = transport_options.get("sep", kombu_redis.Channel.sep)
        # kombu's lists for one queue: its own (priority 0) and one per other priority step.
        self.waiting_keys = [prefix + queue] + [f"{prefix}{queue}{separator}{step}" for step in steps if step]
        self._client: redis.Redis | None = None

    def depth(self) -> tuple[int, int]:
        """(waiting, reserved); raises redis.RedisError (or ValueError: a URL redis-py cannot read)."""
        if self._client is None:
            self._client = redis.Redis.from_url(
                self.broker_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
            )
        pipe = self._client.pipeline(transaction=False)
        for key in self.waiting_keys:
            pipe.llen(key).lrange(key, -NEXT_OUT, -1)
        pipe.hmget(fair_key(self.queue), ["messages", "jobs"])
        for key in (WORKERS_KEY, WORKER_QUEUES_KEY, WORKER_HELD_KEY):
            pipe.hgetall(key)
        *lists, (tokens, fair_jobs), renewed, queues, held = pipe.execute()
        # The tokens stand on the queue's own list; kombu's priority lists hold messages only.
        (length, next_out), *prioritised = zip(lists[0::2], lists[1::2], strict=True)
        waiting = int(fair_jobs or 0) + waiting_jobs(length, next_out, int(tokens or 0))
        waiting += sum(waiting_jobs(length, next_out) for length, next_out in prioritised)
        serving = serving_workers(renewed, queues, time.time() - WORKER_GONE_S, self.queue)
        return waiting, sum(int(held.get(name.encode(), 0)) for name in serving)

    def collect(self) -> Iterator[Metric]:
        try:
            waiting, reserved = self.depth()
        except (redis.RedisError, ValueError) as error:
            logger.debug("queue depth left out of the scrape: %r", error)
            return
        family = GaugeMetricFamily(
            "deepqueue_queue_jobs",
            "Jobs of the queue in Redis: waiting (in its lists) and reserved (held by the workers serving it)",
            labels=["queue", "state"],
        )
        family.add_metric([self.queue, "waiting"], waiting)
        family.add_metric([self.queue, "reserved"], reserved)
        yield family
