"""worker.output.store_retry: the backoff schedule, which errors pass, and one job's retry budget.

The schedule and the budget run on a fake clock (no real sleeping); the classifier is checked on
errors built like botocore builds them and on real ones from a real client (a closed port, a
missing bucket on the moto server). Only the stop and wake-up tests wait for real, on threads.
"""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from producer.errors import StorageError
from producer.storage import LocalStorage, S3Storage
from tests.helpers import FakeClock, wait_until
from worker.output.store_retry import (
    MAX_DELAY_S,
    RetriesExhausted,
    StoreInterrupted,
    StoreRetry,
    backoff_delay,
    is_transient,
)

botocore_exceptions = pytest.importorskip("botocore.exceptions")
boto3 = pytest.importorskip("boto3")
ClientError = botocore_exceptions.ClientError

WAIT_S = 30  # only a bound on a hang


def client_error(code: str, status: int) -> Exception:
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "PutObject")


def wrapped(cause: Exception) -> StorageError:
    """As S3Storage.put raises it: a StorageError naming the object, raised from the cause."""
    try:
        raise StorageError(f"upload of s3://b/k failed: {cause}") from cause
    except StorageError as error:
        return error


def error_id(error: Exception) -> str:
    if isinstance(error, ClientError):
        return error.response["Error"]["Code"]
    return type(error).__name__


class Uploads:
    """An upload that raises each of ``errors`` in turn, then returns True; counts its attempts."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.attempts = 0

    def __call__(self) -> bool:
        self.attempts += 1
        if self.errors:
            raise self.errors.pop(0)
        return True


def closed_port() -> int:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the schedule --------------------------------------------------------------------------------


def test_backoff_doubles_from_half_a_second_to_the_cap_with_full_jitter() -> None:
    highest = [backoff_delay(retry, jitter=lambda: 1.0) for retry in range(10)]
    assert highest == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert [backoff_delay(retry, jitter=lambda: 0.5) for retry in range(3)] == [0.25, 0.5, 1.0]
    assert backoff_delay(3, jitter=lambda: 0.0) == 0.0  # full jitter: anywhere from zero
    assert backoff_delay(100_000, jitter=lambda: 1.0) == MAX_DELAY_S  # no overflow, however long
    assert backoff_delay(2, first_s=1.0, max_s=3.0, jitter=lambda: 1.0) == 3.0
    assert all(0 <= backoff_delay(retry) < 30 for retry in range(50))


# --- the classifier ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("timed out"),
        botocore_exceptions.EndpointConnectionError(endpoint_url="http://s3:9000/b/k"),
        botocore_exceptions.ConnectTimeoutError(endpoint_url="http://s3:9000/b/k"),
        botocore_exceptions.ReadTimeoutError(endpoint_url="http://s3:9000/b/k"),
        botocore_exceptions.ConnectionClosedError(endpoint_url="http://s3:9000/b/k"),
        client_error("SlowDown", 503),
        client_error("ServiceUnavailable", 503),
        client_error("InternalError", 500),
        client_error("RequestTimeout", 400),
        client_error("Throttling", 400),
        client_error("TooManyRequests", 429),
        client_error("ConditionalRequestConflict", 409),
        client_error("BadGateway", 502),
    ],
    ids=error_id,
)
def test_errors_that_pass_are_transient(error: Exception) -> None:
    assert is_transient(error)
    assert is_transient(wrapped(error))  # through the StorageError that keeps it as its cause


@pytest.mark.parametrize(
    "error",
    [
        client_error("AccessDenied", 403),
        client_error("NoSuchBucket", 404),
        client_error("InvalidAccessKeyId", 403),
        client_error("SignatureDoesNotMatch", 403),
        client_error("InvalidArgument", 400),
        client_error("EntityTooLarge", 400),
        botocore_exceptions.NoCredentialsError(),
        ValueError("cannot encode mode RGBA as JPEG"),  # an encode error
        PermissionError(13, "Permission denied"),  # a local folder
        StorageError("upload failed: injected"),  # no cause to go by
    ],
    ids=error_id,
)
def test_other_errors_are_permanent(error: Exception) -> None:
    assert not is_transient(error)
    assert not is_transient(wrapped(error))


def test_real_errors_of_a_real_client(s3_endpoint: str, s3_bucket: str, aws_env, tmp_path) -> None:
    """Not built by hand: what S3Storage and LocalStorage really raise."""
    from botocore.config import Config

    config = Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=2)
    down = S3Storage(boto3.client("s3", endpoint_url=f"http://127.0.0.1:{closed_port()}", config=config), "b")
    with pytest.raises(StorageError) as refused:
        down.put("k/a.png", b"x", content_type="image/png", metadata={})
    assert "Could not connect" in str(refused.value) and is_transient(refused.value)

    missing = S3Storage(boto3.client("s3", endpoint_url=s3_endpoint), "no-such-bucket-deepqueue")
    with pytest.raises(StorageError) as no_bucket:
        missing.put("k/a.png", b"x", content_type="image/png", metadata={})
    assert "NoSuchBucket" in str(no_bucket.value) and not is_transient(no_bucket.value)

    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(StorageError) as local:
        LocalStorage(tmp_path).put("blocker/a.png", b"x", content_type="image/png", metadata={})
    assert not is_transient(local.value)


# --- one job's budget (fake clock) ---------------------------------------------------------------


def fake_policy(budget_s: float, clock: FakeClock) -> StoreRetry:
    return StoreRetry(budget_s, clock=clock, sleep=clock.sleep, jitter=lambda: 1.0)


def test_transient_failures_are_retried_on_the_schedule_until_the_upload_succeeds(caplog) -> None:
    clock = FakeClock(1000.0)
    policy = fake_policy(600, clock)
    down = wrapped(ConnectionRefusedError(111, "Connection refused"))
    upload = Uploads(*[down] * 8)
    with caplog.at_level(logging.INFO, logger="worker.output.store_retry"):
        assert policy.job().call(upload) is True
    assert upload.attempts == 9
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert policy.available
    # One line when storage went away, one when it came back: not one per attempt.
    messages = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert messages == [
        ("WARNING", f"storage unavailable ({down}): retrying, new batches wait"),
        ("INFO", "storage available again after 91.5 s"),  # 0.5 + 1 + 2 + 4 + 8 + 16 + 30 + 30
    ]


def test_the_budget_runs_out_and_the_reason_keeps_the_cause() -> None:
    clock = FakeClock(1000.0)
    policy = fake_policy(5, clock)
    upload = Uploads(*[wrapped(client_error("SlowDown", 503))] * 100)
    with pytest.raises(
        RetriesExhausted, match=r"^after 5 s of retries: upload of s3://b/k failed: .*SlowDown"
    ) as caught:
        policy.job().call(upload)
    assert isinstance(caught.value, StorageError) and caught.value.__cause__ is not None
    # 0.5 + 1 + 2 waited, then only what was left of the budget (1.5 s), then one last attempt.
    assert clock.sleeps == [0.5, 1.0, 2.0, 1.5] and upload.attempts == 5
    assert not policy.available


def test_a_zero_budget_fails_at_the_first_transient_error() -> None:
    clock = FakeClock(1000.0)
    upload = Uploads(TimeoutError("timed out"))
    with pytest.raises(RetriesExhausted, match="after 0 s of retries: timed out"):
        fake_policy(0, clock).job().call(upload)
    assert clock.sleeps == [] and upload.attempts == 1


def test_a_permanent_error_is_raised_at_once(caplog) -> None:
    clock = FakeClock(1000.0)
    policy = fake_policy(600, clock)
    denied = wrapped(client_error("AccessDenied", 403))
    with caplog.at_level(logging.INFO, logger="worker.output.store_retry"), pytest.raises(StorageError) as caught:
        policy.job().call(Uploads(denied))
    assert caught.value is denied and clock.sleeps == [] and caplog.records == []
    assert policy.available


def test_both_uploads_of_a_job_share_one_budget_counted_from_its_first_failure() -> None:
    clock = FakeClock(1000.0)
    policy = fake_policy(10, clock)
    down = ConnectionResetError(104, "reset")
    job = policy.job()
    clock.now += 1000  # time before the first failure does not count
    assert job.call(Uploads(down, down)) is True  # the image: waited 0.5 + 1
    with pytest.raises(RetriesExhausted):
        job.call(Uploads(*[down] * 100))  # the sidecar: the 8.5 s left, then no more
    assert sum(clock.sleeps) == pytest.approx(10.0)
    fresh = policy.job()  # another job starts its own budget
    assert fresh.call(Uploads(down)) is True


# --- waiting for real: stop and wake-up (threads) ------------------------------------------------


class Outage:
    """A storage that is down until ``back()``; signals its first failed attempt."""

    def __init__(self) -> None:
        self.up = False
        self.failed = threading.Event()

    def back(self) -> None:
        self.up = True

    def __call__(self) -> bool:
        if not self.up:
            self.failed.set()
            raise ConnectionRefusedError(111, "Connection refused")
        return True


def run_in_thread(target) -> tuple[threading.Thread, list]:
    result: list = []

    def run() -> None:
        try:
            result.append(target())
        except Exception as error:  # handed to the test thread
            result.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_stop_ends_a_waiting_retry_at_once() -> None:
    policy = StoreRetry(600, first_delay_s=3600, max_delay_s=3600)  # would wait an hour
    outage = Outage()
    thread, result = run_in_thread(lambda: policy.job().call(outage))
    assert outage.failed.wait(WAIT_S)
    policy.stop()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    (error,) = result
    assert isinstance(error, StoreInterrupted) and "interrupted by shutdown" in str(error)
    with pytest.raises(StoreInterrupted):  # after stop, a failure is not retried at all
        policy.job().call(Outage())


def test_the_first_upload_that_succeeds_wakes_the_waiting_ones() -> None:
    policy = StoreRetry(600, first_delay_s=3600, max_delay_s=3600)
    outage = Outage()
    thread, result = run_in_thread(lambda: policy.job().call(outage))
    wait_until(lambda: not policy.available, WAIT_S, "the first failure")
    outage.back()
    assert policy.job().call(outage) is True  # another job's upload gets through
    thread.join(WAIT_S)
    assert not thread.is_alive() and result == [True]
    assert policy.available
