"""Faults of the queue itself, caused for real: Redis SIGKILLed and restarted mid-run, Redis
down 20 s, a worker's main process SIGKILLed. After each, every accepted job is done within 60 s
of the fault's end (default lease settings), each object written once."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest
import redis

from ops.localstack import client_for, start_worker, stop
from producer import JobState
from tests.helpers import lose_queue, wait_until

from .conftest import (
    DeliveryCutter,
    FaultCounts,
    kill_worker,
    stop_running,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

#: The goal of issue 6: seconds from a fault's end to the last job done.
RECOVERY_S = 60


def submit(env: dict[str, str], run: str, count: int, steps: int = 20):
    with client_for(env) as client:
        return client.submit([f"{run} {i}" for i in range(count)], run=run, steps=steps, width=64, height=64)


def running_jobs(env: dict[str, str], run: str) -> int:
    with client_for(env) as client:
        return client.run(run).status().counts[JobState.RUNNING]


def wait_for_run(env: dict[str, str], run: str, count: int, timeout: float) -> None:
    def finished() -> bool:
        with client_for(env) as client:
            return client.run(run).status().finished == count

    wait_until(finished, timeout, f"run {run} to finish", poll_s=0.5)


def check(counts: FaultCounts, fault: str, accepted: int) -> None:
    counts.report(fault)
    assert (counts.accepted, counts.done, counts.failed, counts.lost, counts.written_twice) == (
        accepted,
        accepted,
        0,
        0,
        0,
    )
    assert counts.recovery_s is not None and counts.recovery_s <= RECOVERY_S


def test_redis_killed_and_restarted_mid_run(fault_env, restartable_redis, tmp_path):
    worker = start_worker(fault_env, tmp_path / "worker.log")
    try:
        submit(fault_env, "restart", 24)
        wait_until(lambda: running_jobs(fault_env, "restart") > 0, 120, "a running batch")
        restartable_redis.kill()
        time.sleep(1)
        restartable_redis.start()
        fault_ended_at = time.time()
        wait_for_run(fault_env, "restart", 24, RECOVERY_S + 60)  # nothing resent by hand: no message is lost
        check(FaultCounts.measure(fault_env, {"restart": 24}, fault_ended_at), "redis kill -9 + restart", 24)
        assert worker.poll() is None
        log = (tmp_path / "worker.log").read_text()
        assert "Traceback" not in log, log[-5000:]  # a harmless blip reads as one: warnings, no tracebacks
    finally:
        stop(worker)


@pytest.mark.parametrize("drop", ["record", "reply"])
def test_connection_lost_between_taking_a_message_and_recording_it(fault_env, restartable_redis, tmp_path, drop):
    """A worker takes a message, then records it as unacked: a connection lost in between (a
    proxy drops the record, or Redis's reply to the pop, for 10 s) used to lose the message.
    It waits in the worker's taking list instead, and goes back on the queue at reconnect."""
    cutter = DeliveryCutter(restartable_redis.port, window_s=10, drop=drop)
    worker = start_worker({**fault_env, "DEEPQUEUE_BROKER_URL": cutter.url}, tmp_path / "worker.log")
    try:
        submit(fault_env, "record", 24)
        wait_until(lambda: cutter.first_cut_at is not None, 120, "a delivery through the proxy")
        wait_until(lambda: time.time() > cutter.first_cut_at + cutter.window_s, 30, "the end of the fault")
        fault_ended_at = time.time()
        wait_for_run(fault_env, "record", 24, RECOVERY_S + 60)
        check(FaultCounts.measure(fault_env, {"record": 24}, fault_ended_at), f"lost {drop} of a delivery", 24)
        assert cutter.cuts >= 1 and worker.poll() is None
        assert (
            "taken but never recorded (a lost connection): back on the queue" in (tmp_path / "worker.log").read_text()
        )
    finally:
        stop(worker)
        cutter.cut()


def generations_per_job(log: str) -> Counter[str]:
    """How many times each job went through a pipeline call, from a JSON worker log's batch lines."""
    counts: Counter[str] = Counter()
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # Celery's own lines before logging is set up
            continue
        if isinstance(record, dict) and record.get("jobs"):
            counts.update(record["jobs"].split(","))
    return counts


def test_every_connection_dropped_mid_run_generates_each_job_once(fault_env, restartable_redis, tmp_path):
    """A Redis blip (every client connection killed) while a batch runs and more wait in the
    worker's buffer: each message goes back to the queue once, by one party, so every job runs
    through the pipeline exactly once and nothing stays unacknowledged when the run is done.
    (kombu restored the reserved messages on the lost channel and the lease keeper put the same
    ones back again: 64 messages for 32 jobs, and the running batch generated twice.)"""
    log = tmp_path / "worker.log"
    worker = start_worker({**fault_env, "DEEPQUEUE_LOG_FORMAT": "json"}, log)
    broker = redis.Redis.from_url(fault_env["DEEPQUEUE_BROKER_URL"])
    try:
        submit(fault_env, "blip", 32)
        wait_until(lambda: running_jobs(fault_env, "blip") > 0, 120, "a running batch")
        assert broker.client_kill_filter(_type="normal", skipme=True) >= 1
        fault_ended_at = time.time()
        wait_for_run(fault_env, "blip", 32, RECOVERY_S + 60)
        check(FaultCounts.measure(fault_env, {"blip": 32}, fault_ended_at), "every connection killed", 32)
        wait_until(lambda: broker.hlen("unacked") == 0, 30, "every message acknowledged")
        assert broker.llen("deepqueue") == 0
        generations = generations_per_job(log.read_text())
        assert len(generations) == 32 and set(generations.values()) == {1}, generations
        assert worker.poll() is None
    finally:
        stop(worker)


def test_redis_down_20_s_mid_run(fault_env, restartable_redis, tmp_path):
    worker = start_worker(fault_env, tmp_path / "worker.log")
    try:
        submit(fault_env, "down", 24)
        wait_until(lambda: running_jobs(fault_env, "down") > 0, 120, "a running batch")
        restartable_redis.stop()  # SIGTERM: Redis writes its file and exits
        time.sleep(20)
        restartable_redis.start()
        fault_ended_at = time.time()
        wait_for_run(fault_env, "down", 24, RECOVERY_S + 60)
        check(FaultCounts.measure(fault_env, {"down": 24}, fault_ended_at), "redis down 20 s", 24)
        assert worker.poll() is None
    finally:
        stop(worker)


def test_worker_main_process_sigkilled(fault_env, tmp_path):
    first = start_worker(fault_env, tmp_path / "first.log")
    second = None
    try:
        submit(fault_env, "sigkill", 32)
        wait_until(lambda: running_jobs(fault_env, "sigkill") > 0, 120, "a running batch")
        os.kill(first.pid, signal.SIGKILL)  # its pool process is orphaned and ends on its own
        first.wait()
        fault_ended_at = time.time()
        second = start_worker(fault_env, tmp_path / "second.log")
        wait_for_run(fault_env, "sigkill", 32, RECOVERY_S + 60)
        check(FaultCounts.measure(fault_env, {"sigkill": 32}, fault_ended_at), "worker main process SIGKILL", 32)
    finally:
        stop_running(first, second)


def test_lost_messages_of_a_killed_worker_are_sent_again_by_retry(fault_env, tmp_path):
    """The worst case: the worker and its messages are both gone (a purge after a SIGKILL), so
    no lease can bring them back. Its jobs stay `running`; `retry` sends them again from the
    jobs kept in Redis, no prompt file needed."""
    first = start_worker(fault_env, tmp_path / "first.log")
    second = None
    try:
        submit(fault_env, "purged", 16)
        wait_until(lambda: running_jobs(fault_env, "purged") > 0, 120, "a running batch")
        kill_worker(first)
        broker = redis.Redis.from_url(fault_env["DEEPQUEUE_BROKER_URL"])
        lose_queue(broker)  # every message is lost
        broker.delete("unacked", "unacked_index")
        fault_ended_at = time.time()
        second = start_worker(fault_env, tmp_path / "second.log")
        with client_for(fault_env) as client:
            run = client.retry("purged", gone_after_s=0)  # count every worker gone: the first one is
            assert run.submitted == 16 - client.run("purged").status().counts[JobState.DONE]
        wait_for_run(fault_env, "purged", 16, RECOVERY_S + 60)
        check(FaultCounts.measure(fault_env, {"purged": 16}, fault_ended_at), "worker SIGKILL + messages lost", 16)
    finally:
        stop_running(first, second)
