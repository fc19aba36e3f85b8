"""Faults of storage and of jobs, caused for real: S3 unreachable for 30 s (its port closed, so
uploads are refused), and a poison job that gets its pool process killed every time it runs."""

from __future__ import annotations

import time

import pytest

from ops.localstack import client_for, start_worker, stop
from producer import JobState
from tests.helpers import wait_until

from .conftest import FaultCounts, kill_worker, stop_running
from .test_redis_and_worker_faults import RECOVERY_S, check, submit, wait_for_run

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]


def done_jobs(env: dict[str, str], run: str) -> int:
    with client_for(env) as client:
        return client.run(run).status().counts[JobState.DONE]


def test_s3_unreachable_30_s_mid_run(fault_env, s3_proxy, tmp_path):
    env = {**fault_env, "DEEPQUEUE_S3_ENDPOINT_URL": s3_proxy.url}
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        submit(env, "s3down", 32)
        wait_until(lambda: done_jobs(env, "s3down") > 0, 120, "a stored job")
        s3_proxy.cut()
        time.sleep(30)
        with client_for(env) as client:  # nothing failed while storage was down
            assert client.run("s3down").status().counts[JobState.FAILED] == 0
        s3_proxy.restore()
        fault_ended_at = time.time()
        wait_for_run(env, "s3down", 32, RECOVERY_S + 60)
        check(FaultCounts.measure(fault_env, {"s3down": 32}, fault_ended_at), "S3 unreachable 30 s", 32)
        assert log.read_text().count("storage unavailable") == 1
        assert worker.poll() is None
    finally:
        stop(worker)


def test_a_poison_job_fails_after_two_losses_counted_across_workers(fault_env, tmp_path):
    """The poison job outlives a 3 s batch time limit every time, so its pool process is killed
    each time it runs. Its first loss happens in one worker, which is then SIGKILLed; the second
    in the next worker, which fails it with the reason. Its peers all finish."""
    env = {**fault_env, "DEEPQUEUE_BATCH_TIMEOUT_S": "3"}
    first_log = tmp_path / "first.log"
    first = start_worker(env, first_log)
    second = None
    try:
        with client_for(env) as client:
            client.submit(["poison"], run="poison", steps=200, width=512, height=512, cache_interval=1)
        submit(env, "peers", 16, steps=2)
        wait_until(lambda: "retrying its jobs one by one" in first_log.read_text(), 120, "the first loss")
        kill_worker(first)
        fault_ended_at = time.time()
        second = start_worker(env, tmp_path / "second.log")
        wait_for_run(env, "poison", 1, RECOVERY_S + 60)
        wait_for_run(env, "peers", 16, RECOVERY_S + 60)
        counts = FaultCounts.measure(env, {"poison": 1, "peers": 16}, fault_ended_at)
        counts.report("poison job (pool process killed twice, in two workers)")
        assert (counts.done, counts.failed, counts.lost, counts.written_twice) == (16, 1, 0, 0)
        with client_for(env) as client:
            [poison] = list(client.run("poison").results())
        assert poison.reason == "generation failed: it timed out 2 times while running this job"
        assert second.poll() is None
    finally:
        stop_running(first, second)
