"""Faults a worker must survive without losing or duplicating work, caused for real:
SIGKILL of the pool process mid-batch, and a warm shutdown with jobs still buffered."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import pytest
import redis

from ops.localstack import moto_s3_client, start_worker, stop, worker_env
from producer import Client, JobState

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def env(redis_urls, s3_endpoint, tiny_model) -> dict[str, str]:
    bucket = f"dq-{uuid.uuid4().hex[:12]}"
    moto_s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    broker, backend = redis_urls
    return worker_env(
        broker_url=broker,
        result_backend=backend,
        s3_endpoint=s3_endpoint,
        bucket=bucket,
        model=str(tiny_model),
        device="cpu",
        max_wait_s=0.5,
    )


def object_count(env: dict[str, str]) -> int:
    listing = moto_s3_client(env["DEEPQUEUE_S3_ENDPOINT_URL"]).list_objects_v2(Bucket=env["DEEPQUEUE_S3_BUCKET"])
    return listing.get("KeyCount", 0)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_killed_pool_process_sends_its_batch_back_at_once(env, tmp_path):
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        with Client(env["DEEPQUEUE_BROKER_URL"], env["DEEPQUEUE_RESULT_BACKEND"]) as client:
            run = client.submit([f"kill {i}" for i in range(16)], run="kill", steps=60, width=64, height=64)
            wait_until(lambda: run.status().counts[JobState.RUNNING] > 0, 120, "a running batch")
            [child] = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
            os.kill(int(child), signal.SIGKILL)
            # Far below the 3600 s visibility timeout: the batch is requeued, not left unacked.
            status = run.wait(timeout=300)
        assert status.counts[JobState.DONE] == 16
        assert object_count(env) == 32  # every job once, image + sidecar
        assert "WorkerLostError" in log.read_text()
    finally:
        stop(worker)


def test_warm_shutdown_returns_buffered_jobs_to_the_queue(env, tmp_path):
    worker = start_worker(env, tmp_path / "first.log")
    broker = redis.Redis.from_url(env["DEEPQUEUE_BROKER_URL"])
    with Client(env["DEEPQUEUE_BROKER_URL"], env["DEEPQUEUE_RESULT_BACKEND"]) as client:
        run = client.submit([f"stop {i}" for i in range(24)], run="stop", steps=30, width=64, height=64)
        wait_until(lambda: run.status().counts[JobState.DONE] > 0, 120, "a finished batch")
        stop(worker)  # SIGTERM: the running batch finishes, the buffered jobs go back
        done = run.status().counts[JobState.DONE]
        assert done < 24, "the shutdown came too late to test anything"
        assert broker.hlen("unacked") == 0
        assert broker.llen("deepqueue") == 24 - done
        worker = start_worker(env, tmp_path / "second.log")
        try:
            assert run.wait(timeout=300).counts[JobState.DONE] == 24
        finally:
            stop(worker)
    assert object_count(env) == 48
