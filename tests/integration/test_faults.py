"""Faults a worker must survive without losing or duplicating work, caused for real:
SIGKILL of the pool process mid-batch, and a warm shutdown with jobs still buffered."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import redis

from ops.localstack import client_for, moto_s3_client, start_worker, stop, worker_env
from producer import Client, ClientSettings, JobState
from tests.helpers import queued_jobs, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]


def object_count(endpoint: str, bucket: str, run: str) -> int:
    """Images and sidecars stored for one run (not the write check, nor the manifest parts)."""
    return moto_s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix=f"{run}/images/").get("KeyCount", 0)


def pool_process(worker: subprocess.Popen) -> int:
    """The pid of a worker's one pool process."""
    [child] = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
    return int(child)


def test_killed_pool_process_sends_its_batch_back_at_once(s3_worker_env, tmp_path):
    log = tmp_path / "worker.log"
    worker = start_worker(s3_worker_env, log)
    try:
        with client_for(s3_worker_env) as client:
            run = client.submit([f"kill {i}" for i in range(16)], run="kill", steps=60, width=64, height=64)
            wait_until(lambda: run.status().counts[JobState.RUNNING] > 0, 120, "a running batch")
            os.kill(pool_process(worker), signal.SIGKILL)
            # Far below the 3600 s visibility timeout: the batch is requeued, not left unacked.
            status = run.wait(timeout=300)
        assert status.counts[JobState.DONE] == 16
        assert (
            object_count(s3_worker_env["DEEPQUEUE_S3_ENDPOINT_URL"], s3_worker_env["DEEPQUEUE_S3_BUCKET"], "kill") == 32
        )  # once each
        assert "WorkerLostError" in log.read_text()
    finally:
        stop(worker)


def test_warm_shutdown_returns_buffered_jobs_to_the_queue(s3_worker_env, tmp_path):
    worker = start_worker(s3_worker_env, tmp_path / "first.log")
    broker = redis.Redis.from_url(s3_worker_env["DEEPQUEUE_BROKER_URL"])
    with client_for(s3_worker_env) as client:
        run = client.submit([f"stop {i}" for i in range(24)], run="stop", steps=30, width=64, height=64)
        wait_until(lambda: run.status().counts[JobState.DONE] > 0, 120, "a finished batch")
        stop(worker)  # SIGTERM: the running batch finishes, the buffered jobs go back
        done = run.status().counts[JobState.DONE]
        assert done < 24, "the shutdown came too late to test anything"
        assert broker.hlen("unacked") == 0
        # Buffered jobs go back; so do the messages of the last batch, which the pool process
        # stored (state done) while exiting but could no longer report for acknowledgement.
        queued = len(queued_jobs(broker))
        assert 24 - done <= queued <= 24 - done + 8
        worker = start_worker(s3_worker_env, tmp_path / "second.log")
        try:
            assert run.wait(timeout=300).counts[JobState.DONE] == 24
        finally:
            stop(worker)
    # Written once: the done ones were only acknowledged again.
    assert object_count(s3_worker_env["DEEPQUEUE_S3_ENDPOINT_URL"], s3_worker_env["DEEPQUEUE_S3_BUCKET"], "stop") == 48


def test_a_batch_past_its_time_limit_is_retried_alone_then_failed(s3_worker_env, tmp_path):
    """A hung pipeline call, caused for real: 200 steps at 512x512 (about a minute on the tiny
    model) against a 3 s batch time limit, which the fast jobs' batch (well under a second)
    stays inside even on a loaded machine."""
    worker = start_worker({**s3_worker_env, "DEEPQUEUE_BATCH_TIMEOUT_S": "3"}, tmp_path / "worker.log")
    try:
        with client_for(s3_worker_env) as client:
            slow = client.submit(["slow a", "slow b"], run="slow", steps=200, width=512, height=512, cache_interval=1)
            fast = client.submit(["fast a", "fast b"], run="fast", steps=2, width=64, height=64)
            assert fast.wait(timeout=120).counts[JobState.DONE] == 2
            assert slow.wait(timeout=120).counts[JobState.FAILED] == 2
            reasons = {result.reason for result in slow.results()}
        assert reasons == {"generation failed: it timed out 2 times while running this job"}
        assert worker.poll() is None, "the worker must survive its hung batches"
    finally:
        stop(worker)


def test_malformed_messages_do_not_stop_the_worker(s3_worker_env, tmp_path):
    """Hand-made messages of the wrong shape: each fails alone, the worker keeps serving."""
    from producer.contract import TASK_NAME
    from producer.enqueue import producer_app
    from producer.settings import ClientSettings

    worker = start_worker(s3_worker_env, tmp_path / "worker.log")
    try:
        app = producer_app(ClientSettings(broker_url=s3_worker_env["DEEPQUEUE_BROKER_URL"]))
        with app.producer_or_acquire() as producer:
            app.send_task(TASK_NAME, args=[["a", "list"]], kwargs={"enqueued_at": "yesterday"}, producer=producer)
            app.send_task(TASK_NAME, args=[], producer=producer)
            app.send_task(TASK_NAME, args=[{"run_id": "odd", "x": 1}], kwargs={"unexpected": [1]}, producer=producer)
        with client_for(s3_worker_env) as client:
            run = client.submit(["after the bad ones"], run="after", steps=2, width=64, height=64)
            assert run.wait(timeout=120).counts[JobState.DONE] == 1
            odd = list(client.run("odd").results())
        assert worker.poll() is None
        assert [result.state for result in odd] == [JobState.FAILED] and "invalid job" in odd[0].reason
    finally:
        stop(worker)


def test_jobs_being_stored_by_a_killed_pool_process_run_again(redis_urls, tiny_model, tmp_path):
    """The pool process dies while its images wait on S3 (a private moto server stopped with
    SIGSTOP: uploads hang, a real fault). Those jobs were generated and unacknowledged: they must
    run again, and every object is still written once."""
    from ops.localstack import start_moto

    moto, endpoint = start_moto()
    try:
        moto_s3_client(endpoint).create_bucket(Bucket="stored")
        broker, backend = redis_urls
        env = worker_env(
            broker_url=broker,
            result_backend=backend,
            model=str(tiny_model),
            s3_endpoint=endpoint,
            bucket="stored",
            device="cpu",
            max_wait_s=0.5,
        )
        log = tmp_path / "worker.log"
        worker = start_worker(env, log)
        try:
            # The client keeps the jobs it sends in a folder: the S3 server is stopped before the submit.
            local = ClientSettings(storage="local", output_dir=tmp_path / "client")
            with Client(broker, backend, settings=local) as client:
                os.kill(moto.pid, signal.SIGSTOP)
                run = client.submit([f"stored {i}" for i in range(16)], run="stored", steps=2, width=64, height=64)
                # Both batches generated: their 16 images now wait on the stopped S3 server.
                wait_until(lambda: log.read_text().count("steps, deepcache") >= 2, 120, "two generated batches")
                os.kill(pool_process(worker), signal.SIGKILL)
                os.kill(moto.pid, signal.SIGCONT)
                status = run.wait(timeout=300)
            assert status.counts[JobState.DONE] == 16
            assert "were being stored by a pool process that died" in log.read_text()
            assert object_count(endpoint, "stored", "stored") == 32  # image + sidecar per job, once each
        finally:
            stop(worker)
    finally:
        os.kill(moto.pid, signal.SIGCONT)
        stop(moto)
