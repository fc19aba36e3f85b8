"""Start-up checks: bounded retries that say what they wait for, against real Redis and S3
servers; the retry policy itself on a given clock (no waiting)."""

from __future__ import annotations

import logging
import threading

import pytest
import redis

from producer.errors import StorageError
from tests.helpers import FakeClock
from worker.settings import WorkerSettings
from worker.startup import (
    ReadyDeadline,
    StartupCheckFailed,
    ping_redis,
    redis_failure_passes,
    storage_name,
    wait_for,
    wait_for_redis,
    wait_for_storage,
)


def test_a_failure_that_passes_is_retried_with_a_line_naming_what_is_awaited(caplog):
    clock, tries = FakeClock(), []

    def call() -> str:
        tries.append(clock.now)
        if len(tries) < 3:
            raise ConnectionRefusedError("refused")
        return "answered"

    with caplog.at_level(logging.WARNING, logger="worker.startup"):
        result = wait_for("storage s3://b", call, retry_s=60, clock=clock, sleep=clock.sleep, jitter=lambda: 1.0)
    assert result == "answered" and len(tries) == 3
    assert clock.sleeps == [0.5, 1.0]  # doubling from 0.5 s
    assert [record.getMessage().split(";")[0] for record in caplog.records] == [
        "waiting for storage s3://b: ConnectionRefusedError: refused"
    ] * 2


def test_the_budget_bounds_the_retries_and_the_error_names_the_service_and_the_cause():
    clock = FakeClock()

    def call() -> None:
        clock.now += 2.0  # each try takes its timeout
        raise TimeoutError("read timed out")

    with pytest.raises(StartupCheckFailed) as failed:
        wait_for("Redis (broker redis://h:1/0)", call, retry_s=10, clock=clock, sleep=clock.sleep, jitter=lambda: 1.0)
    assert str(failed.value).startswith("Redis (broker redis://h:1/0) did not answer within 10 s")
    assert str(failed.value).endswith("TimeoutError: read timed out")
    assert clock.now <= 10 + 2.0, "no sleep goes past the budget; only the last try's own timeout may"


def test_a_failure_that_does_not_pass_stops_at_once():
    clock = FakeClock()

    def call() -> None:
        raise StorageError("bucket s3://nope does not exist (DEEPQUEUE_S3_BUCKET): create it first")

    with pytest.raises(StartupCheckFailed, match="storage s3://nope: StorageError: bucket s3://nope does not exist"):
        wait_for("storage s3://nope", call, retry_s=60, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == []


def test_a_redis_that_never_answers_times_out_and_passes(silent_port):
    with pytest.raises(redis.exceptions.TimeoutError) as timed_out:
        ping_redis(f"redis://127.0.0.1:{silent_port}/0", 0.2)
    assert redis_failure_passes(timed_out.value)
    assert not redis_failure_passes(redis.exceptions.AuthenticationError("invalid username-password pair"))


def test_redis_and_storage_that_answer_pass_the_checks(redis_urls, s3_endpoint, s3_bucket):
    broker, backend = redis_urls
    settings = WorkerSettings(
        broker_url=broker, result_backend=backend, s3_bucket=s3_bucket, s3_endpoint_url=s3_endpoint
    )
    wait_for_redis(settings)
    wait_for_storage(settings)
    assert storage_name(settings) == f"s3://{s3_bucket} at {s3_endpoint}"
    assert storage_name(WorkerSettings(storage="local", output_dir="out")) == "local folder out"


def test_storage_that_never_answers_fails_within_the_budget(silent_port, aws_env):
    settings = WorkerSettings(
        s3_bucket="b", s3_endpoint_url=f"http://127.0.0.1:{silent_port}", startup_timeout_s=0.2, startup_retry_s=0.5
    )
    with pytest.raises(StartupCheckFailed, match=rf"storage s3://b at http://127.0.0.1:{silent_port} did not answer"):
        wait_for_storage(settings)


def test_the_ready_deadline_reports_what_was_awaited_unless_ready_came_first():
    expired: list[str] = []
    done = threading.Event()

    def on_expiry(reason: str) -> None:
        expired.append(reason)
        done.set()

    late = ReadyDeadline(0.0, on_expiry)
    late.waiting_for("the model m to load")
    late.start()
    assert done.wait(30)
    assert expired == ["not ready after 0 s (DEEPQUEUE_LOAD_TIMEOUT_S): still waiting for the model m to load"]

    in_time = ReadyDeadline(0.0, on_expiry)
    in_time.ready()
    in_time.start()
    for thread in threading.enumerate():
        if thread.name == "deepqueue-ready-deadline":
            thread.join(30)
    assert len(expired) == 1, "ready before the deadline: nothing reported"


def test_startup_retries_must_end_before_the_load_timeout():
    with pytest.raises(ValueError, match=r"startup_retry_s \(600.0\) must be below load_timeout_s \(600.0\)"):
        WorkerSettings(startup_retry_s=600)
    assert WorkerSettings().startup_retry_s < WorkerSettings().load_timeout_s
