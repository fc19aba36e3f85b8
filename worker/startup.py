"""Start-up: a worker is ready within ``DEEPQUEUE_LOAD_TIMEOUT_S`` or exits with code 70, saying why.

Before it is ready a worker calls Redis (its main process pings the broker and the result backend)
and S3 (its pool process writes the storage check object). Each of those calls has a short connect
and read timeout (``DEEPQUEUE_STARTUP_TIMEOUT_S``) and is tried once by its client, so a server
that accepts connections but never answers fails the call instead of hanging it. ``wait_for``
retries a failure that passes (refused, timed out, a 5xx, Redis still loading its data) with
backoff for up to ``DEEPQUEUE_STARTUP_RETRY_S``, one warning per try naming what it waits for and
why. A failure that does not pass (no such bucket, access denied, a wrong password) stops it at
once, a budget spent after the last try: either raises ``StartupCheckFailed`` naming the service
and the reason, and the worker exits with code 70.

``ReadyDeadline`` is the backstop for whatever else can block (a model download, a library call
without a timeout, a pool process that deadlocked): a worker still not ready ``load_timeout_s``
after it started logs what it was waiting for and exits with code 70 at once. Before ready the
worker has started no batch, so the hard exit loses nothing: at worst a message reserved in the
last instant returns to the queue through the leases, as a killed worker's do.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from producer.errors import DeepQueueError
from producer.settings import redact_url
from producer.storage import make_storage
from worker.output.store_retry import backoff_delay, is_transient
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: First pause between start-up tries, and the longest (full jitter below either).
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 5.0


class StartupCheckFailed(DeepQueueError, RuntimeError):
    """S3 or Redis refused, or did not answer within the start-up retry budget; the message says
    which (as ``wait_for`` was told) and why."""


class StartupError(SystemExit):
    """The worker cannot serve: Celery stops it with this exit code (70, EX_SOFTWARE)."""

    def __init__(self, message: str) -> None:
        logger.critical("%s", message)
        super().__init__(os.EX_SOFTWARE)


def wait_for(
    what: str,
    call: Callable[[], T],
    *,
    retry_s: float,
    passes: Callable[[BaseException], bool] = is_transient,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    jitter: Callable[[], float] = random.random,
) -> T:
    """``call()``'s result, retrying a failure that ``passes`` for up to ``retry_s`` seconds
    (counted from the first try). StartupCheckFailed naming ``what`` for a failure that does not
    pass, or once the budget is spent."""
    started = clock()
    tries = 0
    while True:
        try:
            return call()
        except Exception as error:  # any: ``passes`` sorts them, each ends in a retry or the reason
            if not passes(error):
                raise StartupCheckFailed(f"{what}: {_reason(error)}") from error
            tries += 1
            left = retry_s - (clock() - started)
            if left <= 0:
                raise StartupCheckFailed(
                    f"{what} did not answer within {retry_s:g} s (DEEPQUEUE_STARTUP_RETRY_S; {tries} tries): "
                    f"{_reason(error)}"
                ) from error
            delay = min(left, backoff_delay(tries - 1, first_s=FIRST_DELAY_S, max_s=MAX_DELAY_S, jitter=jitter))
            logger.warning(
                "waiting for %s: %s; trying again in %.1f s (%.0f s left of DEEPQUEUE_STARTUP_RETRY_S)",
                what,
                _reason(error),
                delay,
                left,
            )
            sleep(delay)


def _reason(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())  # one line, whatever the library wrote


def redis_failure_passes(error: BaseException) -> bool:
    """Refused, reset, timed out or still loading; not a wrong password."""
    from redis.exceptions import AuthenticationError, ConnectionError, TimeoutError

    return isinstance(error, (ConnectionError, TimeoutError)) and not isinstance(error, AuthenticationError)


def ping_redis(url: str, timeout_s: float) -> None:
    """One PING, with ``timeout_s`` to connect and to read, no retry by the client."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )
    try:
        client.ping()
    finally:
        client.close()


def wait_for_redis(settings: WorkerSettings) -> None:
    """Until the broker and the result backend answer a PING (StartupCheckFailed if they do not)."""
    for role, url in (("broker", settings.broker_url), ("result backend", settings.result_backend)):
        wait_for(
            f"Redis ({role} {redact_url(url)})",
            lambda url=url: ping_redis(url, settings.startup_timeout_s),
            retry_s=settings.startup_retry_s,
            passes=redis_failure_passes,
        )


def storage_name(settings: WorkerSettings) -> str:
    """The storage as a log line names it: ``s3://bucket at http://endpoint`` or ``local folder out``."""
    if settings.storage == "local":
        return f"local folder {settings.output_dir}"
    endpoint = f" at {settings.s3_endpoint_url}" if settings.s3_endpoint_url else ""
    return f"s3://{settings.s3_bucket}{endpoint}"


def wait_for_storage(settings: WorkerSettings) -> None:
    """Until the storage check object is written (``make_storage``'s check, short timeouts)."""
    wait_for(
        f"storage {storage_name(settings)}",
        lambda: make_storage(settings, timeout_s=settings.startup_timeout_s),
        retry_s=settings.startup_retry_s,
    )


class ReadyDeadline:
    """Calls ``on_expiry(reason)`` from its own thread unless ``ready()`` comes within
    ``timeout_s`` of this object's creation; ``waiting_for`` names what the worker waits for."""

    def __init__(self, timeout_s: float, on_expiry: Callable[[str], None]) -> None:
        self.timeout_s = timeout_s
        self._ends = time.monotonic() + timeout_s
        self._on_expiry = on_expiry
        self._ready = threading.Event()
        self._waiting_for = "the worker's start-up steps"

    def waiting_for(self, what: str) -> None:
        self._waiting_for = what

    def start(self) -> None:
        threading.Thread(target=self._watch, name="deepqueue-ready-deadline", daemon=True).start()

    def ready(self) -> None:
        """The worker is ready: the deadline no longer applies."""
        self._ready.set()

    def _watch(self) -> None:
        if not self._ready.wait(max(0.0, self._ends - time.monotonic())):
            waited = f"not ready after {self.timeout_s:g} s (DEEPQUEUE_LOAD_TIMEOUT_S)"
            self._on_expiry(f"{waited}: still waiting for {self._waiting_for}")
