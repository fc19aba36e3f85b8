"""worker.metrics: what a worker's /metrics says.

The counting from what a pool process returns (made here by a real executor on the simulated
device, through the same ``_progress`` a pool call returns), the queue depth read from a real
Redis holding real kombu messages (the server: test_health.py). A whole worker process
is scraped in tests/integration/test_metrics_endpoint.py.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ops.localstack import free_port
from producer.contract import celery_config
from producer.enqueue import publish
from producer.entries import entries_of
from producer.job import Job
from producer.layout import WORKER_HELD_KEY, WORKER_QUEUES_KEY, WORKERS_KEY
from producer.settings import ClientSettings
from producer.storage import LocalStorage
from tests.helpers import local_worker_settings, lose_queue, make_job
from worker.embedded import MemoryReporter
from worker.metrics import (
    ERROR_KINDS,
    OUTCOMES,
    STAGES,
    QueueDepth,
    WorkerMetrics,
    call_error_kind,
    ended_as,
)
from worker.pipeline import pool
from worker.pipeline.engine import load_engine
from worker.pipeline.executor import BatchExecutor, Delivery


def sample(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def simulated_executor(tmp_path: Path) -> BatchExecutor:
    """The real executor, on the simulated device (no torch), a local folder and states in memory."""
    settings = local_worker_settings("simulated:a=0,b=0", tmp_path / "out", max_batch=4)
    return BatchExecutor(load_engine(settings), LocalStorage(settings.output_dir), MemoryReporter(), settings)


def delivery(index: int) -> Delivery:
    job = Job(run_id="metrics", index=index, prompt=f"cat {index}", seed=index, height=64, width=64, steps=2)
    return Delivery(job.job_id, job.model_dump(mode="json"), time.time() - 2.0, time.time())


def test_what_a_pool_call_returns_is_counted(tmp_path: Path) -> None:
    executor = simulated_executor(tmp_path)
    metrics = WorkerMetrics()
    decided = executor.submit([delivery(0), delivery(1), delivery(2), Delivery("not-a-job", {"prompt": 1})])
    metrics.record(pool._progress(decided + executor.collect(wait=True), executor))
    # The same job delivered again: an earlier delivery finished it.
    again = executor.submit([delivery(0)])
    metrics.record(pool._progress(again + executor.collect(wait=True), executor))
    executor.close()

    images = {outcome: sample(metrics, "deepqueue_images_total", outcome=outcome) for outcome in OUTCOMES}
    assert images == {"done": 3, "failed": 1, "skipped": 1, "cancelled": 0}
    assert sample(metrics, "deepqueue_errors_total", kind="invalid_job") == 1
    assert sum(sample(metrics, "deepqueue_errors_total", kind=kind) for kind in ERROR_KINDS) == 1
    assert sample(metrics, "deepqueue_batches_total") == 1
    assert sample(metrics, "deepqueue_batch_size_count") == 1 and sample(metrics, "deepqueue_batch_size_sum") == 3
    assert sample(metrics, "deepqueue_batch_size_bucket", le="2.0") == 0
    assert sample(metrics, "deepqueue_batch_size_bucket", le="3.0") == 1
    counts = {stage: sample(metrics, "deepqueue_stage_seconds_count", stage=stage) for stage in STAGES}
    assert counts == {"queue_wait": 3, "inference": 1, "encode": 3, "upload": 3}
    assert sample(metrics, "deepqueue_stage_seconds_sum", stage="queue_wait") >= 3 * 2.0  # enqueued 2 s before


@pytest.mark.parametrize(
    ("outcome", "label"),
    [
        ({"ok": True, "batch_size": 4}, "done"),
        ({"ok": True, "skipped": "done"}, "skipped"),
        ({"ok": True, "skipped": "cancelled"}, "cancelled"),
        ({"ok": False, "error": "storage"}, "failed"),
        ({"ok": False, "error": "state", "retry": True}, None),  # not final: it is delivered again
    ],
)
def test_how_an_outcome_ended(outcome: dict, label: str | None) -> None:
    assert ended_as(outcome) == label


def test_a_retried_job_counts_its_error_but_no_image() -> None:
    metrics = WorkerMetrics()
    metrics.record({"finished": [{"ok": False, "retry": True, "error": "state"}], "batches": []})
    metrics.record({"finished": [], "batches": [{"size": 8, "seconds": None, "error": "out_of_memory"}]})
    assert sample(metrics, "deepqueue_errors_total", kind="state") == 1
    assert sum(sample(metrics, "deepqueue_images_total", outcome=outcome) for outcome in OUTCOMES) == 0
    assert sample(metrics, "deepqueue_batch_failures_total", kind="out_of_memory") == 1
    assert sample(metrics, "deepqueue_batches_total") == 0


def test_the_kind_of_a_pool_call_that_raised() -> None:
    assert call_error_kind(WorkerLostError("signal 9")) == "process_lost"
    assert call_error_kind(TimeLimitExceeded(1800)) == "timeout"
    assert call_error_kind(pool.PipelineUnavailable("no GPU")) == "pipeline"
    assert call_error_kind(redis.ConnectionError("refused")) == "state"
    assert call_error_kind(ValueError("anything else")) == "internal"


def test_worker_info_says_what_the_pool_process_reported(tmp_path: Path) -> None:
    settings = local_worker_settings("simulated:a=0", tmp_path, cache_interval=5, cache_branch=1, max_batch=6)
    metrics = WorkerMetrics()
    metrics.describe_worker(settings, {})  # at start-up: the settings only
    report = {
        "worker": {"device": "cuda (NVIDIA H200)", "dtype": "float16", "acceleration": "graphs"},
        "load_s": 42.5,
        "warm_s": 61.0,
        "compiles": {"graphs": 6, "cache_hits": 6},
    }
    metrics.describe_worker(settings, report)
    metrics.call({"size": 3, "seconds": 1.0, "compiles": {"graphs": 2, "cache_misses": 2}})  # a new shape
    families = text_string_to_metric_families(generate_latest(metrics.registry).decode())
    (info,) = next(f for f in families if f.name == "deepqueue_worker_info").samples  # start-up series replaced
    assert info.value == 1
    assert info.labels == {
        "model": "simulated:a=0",
        "device": "cuda (NVIDIA H200)",
        "dtype": "float16",
        "acceleration": "graphs",
        "cache_interval": "5",
        "cache_branch": "1",
        "max_batch": "6",
        "queue": settings.queue,
    }
    assert sample(metrics, "deepqueue_model_load_seconds") == 42.5
    assert sample(metrics, "deepqueue_warmup_seconds") == 61.0
    compiles = {
        kind: sample(metrics, "deepqueue_compiles_total", kind=kind)
        for kind in ("graphs", "cache_hits", "cache_misses")
    }
    assert compiles == {"graphs": 8, "cache_hits": 6, "cache_misses": 2}


def test_in_flight_and_buffered_are_read_at_scrape_time() -> None:
    metrics = WorkerMetrics()
    held = {"a": [1, 2], "b": [3]}
    metrics.watch(lambda: sum(map(len, held.values())), lambda: 5)
    assert sample(metrics, "deepqueue_jobs_in_flight") == 3 and sample(metrics, "deepqueue_jobs_buffered") == 5
    held.clear()
    assert sample(metrics, "deepqueue_jobs_in_flight") == 0

    def resized() -> int:
        raise RuntimeError("dictionary changed size during iteration")

    metrics.watch(resized, lambda: 0)  # never settles: NaN, and the scrape still renders
    assert generate_latest(metrics.registry) and sample(metrics, "deepqueue_jobs_in_flight") != 0


def test_queue_depth_counts_waiting_and_reserved_jobs(redis_server: str) -> None:
    """Real kombu messages on a real Redis (one in a priority list), and what the queue's live
    workers hold as their lease renewals say; other queues' and gone workers' holdings left out.
    Then prompt batches: a message counts its jobs, waiting as held."""
    from kombu import Connection

    from worker.delivery.leases import Leases

    broker = f"{redis_server}/5"
    queue = f"metrics-{uuid.uuid4().hex[:8]}"
    options = celery_config(ClientSettings(broker_url=broker))["broker_transport_options"]
    depth = QueueDepth(broker, queue, options)
    registry = CollectorRegistry()
    registry.register(depth)
    client = redis.Redis.from_url(broker)
    client.delete(WORKERS_KEY, WORKER_QUEUES_KEY, WORKER_HELD_KEY)
    try:
        with Connection(broker, transport_options=options) as connection:
            simple = connection.SimpleQueue(queue, no_ack=False)
            for index in range(3):
                simple.put({"n": index})
            simple.put({"n": 3}, priority=9)
            assert depth.depth() == (4, 0)
            leases = Leases(broker, options, queue=queue, name="w1", renew_s=5, expiry_s=20)
            for tag in ("a", "b"):
                leases.hold(tag)
            leases.beat(connection.default_channel, 0.0)  # what the worker's lease thread does
            other = Leases(broker, options, queue=f"{queue}.sdxl", name="w2", renew_s=5, expiry_s=20)
            other.hold("c")
            other.beat(connection.default_channel, 0.0)
            client.hset(WORKERS_KEY, "gone", time.time() - 3600)
            client.hset(WORKER_QUEUES_KEY, "gone", queue)
            client.hset(WORKER_HELD_KEY, "gone", 50)
            assert depth.depth() == (4, 2)
            values = {
                s.labels["state"]: s.value
                for f in text_string_to_metric_families(generate_latest(registry).decode())
                for s in f.samples
                if s.name == "deepqueue_queue_jobs" and s.labels["queue"] == queue
            }
            assert values == {"waiting": 4, "reserved": 2}
            publish(client, queue, entries_of([make_job(index) for index in range(16)]), per_message=8)
            leases.hold("d", jobs=8)
            leases.beat(connection.default_channel, 0.0)
            assert depth.depth() == (4 + 16, 2 + 8)
            simple.close()
    finally:
        lose_queue(client, queue)
        client.delete(*depth.waiting_keys, WORKERS_KEY, WORKER_QUEUES_KEY, WORKER_HELD_KEY, "_kombu.binding." + queue)


def test_queue_depth_is_left_out_while_redis_is_down() -> None:
    metrics = WorkerMetrics()
    metrics.registry.register(QueueDepth(f"redis://127.0.0.1:{free_port()}/0", "deepqueue", {}))
    started = time.monotonic()
    text = generate_latest(metrics.registry).decode()
    assert time.monotonic() - started < 5
    assert "deepqueue_queue_jobs" not in text and "deepqueue_images_total" in text
