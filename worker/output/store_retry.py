"""Storage outages make jobs wait, not fail: the retry policy of the storing step.

An upload that fails for a reason that passes (connection refused or reset, a timeout, an
unreachable endpoint, a 5xx, throttling, a conflicting write in progress) is tried again after a
pause that doubles from 0.5 s to at most 30 s, with full jitter (uniform between 0 and that), until
the job has been failing for ``store_retry_s`` (DEEPQUEUE_STORE_RETRY_S) since its first failed
attempt; then it fails with the reason. Any other error (access denied, no such bucket, bad
credentials, another 4xx, a local disk error) fails the job at once, as before.

While an upload waits, its job's message stays unacknowledged and its image keeps its place in the
executor's bounded backlog, so once the backlog is full no new batch is generated: the worker
pauses and stays up. One warning says that storage became unavailable and one line that it is back,
not one per attempt; the first upload that succeeds wakes the waiting ones at once. ``stop()`` (a
shutdown) ends every wait: those jobs are neither done nor failed, and their messages go back to
the queue.

botocore retries inside each attempt too (its own few tries, then an error at once once its retry
quota is spent): this layer is what spans an outage of minutes.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from producer.errors import StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: First pause before a retry, and the longest one.
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0

#: S3 error codes that say "try again later" whatever their HTTP status.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",  # 409: a conflicting conditional operation is in progress
        "ConditionalRequestConflict",  # 409: another write of this key is under way
    }
)
#: HTTP statuses that pass: request timeout, too many requests (and every 5xx).
TRANSIENT_STATUSES = frozenset({408, 429})


class RetriesExhausted(StorageError):
    """A job's uploads kept failing for its whole retry budget; the message ends with the cause."""


class StoreInterrupted(StorageError):
    """The worker shut down while a job's upload waited to be retried: the job is not finished."""


def backoff_delay(
    retry: int,
    *,
    first_s: float = FIRST_DELAY_S,
    max_s: float = MAX_DELAY_S,
    jitter: Callable[[], float] = random.random,
) -> float:
    """Pause before retry number ``retry`` (0 = the first): full jitter, uniform in
    ``[0, min(max_s, first_s * 2**retry))``."""
    return jitter() * min(max_s, first_s * 2.0 ** min(retry, 64))


def is_transient(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, is one that passes: worth retrying."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if _transient_alone(current):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


def _transient_alone(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)):  # refused, reset, aborted, timed out
        return True
    try:
        from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
        from botocore.exceptions import ConnectionError as EndpointUnreachable
    except ImportError:  # local storage only: no botocore errors to meet
        return False
    if isinstance(error, (EndpointUnreachable, HTTPClientError, IncompleteReadError)):
        return True  # could not connect, connect/read timeout, connection closed, truncated body
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in TRANSIENT_CODES or status in TRANSIENT_STATUSES:
            return True
        return isinstance(status, int) and status >= 500
    return False


class StoreRetry:
    """The retry policy the store threads share; ``job()`` gives each job its own budget.

    ``clock``, ``sleep`` and ``jitter`` are for tests: with ``sleep`` given, waits call it instead
    of waiting on the policy (and then neither a recovery nor ``stop()`` cuts them short).
    """

    def __init__(
        self,
        budget_s: float,
        *,
        first_delay_s: float = FIRST_DELAY_S,
        max_delay_s: float = MAX_DELAY_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.budget_s = budget_s
        self.first_delay_s, self.max_delay_s = first_delay_s, max_delay_s
        self._clock, self._sleep, self._jitter = clock, sleep, jitter
        self._changed = threading.Condition()
        self._stopping = False
        self._down_since: float | None = None  # set while storage is unavailable
        self._recoveries = 0

    @property
    def available(self) -> bool:
        """False from a transient failure until the next successful upload."""
        return self._down_since is None

    def job(self) -> JobRetry:
        return JobRetry(self)

    def stop(self) -> None:
        """Shutting down: waiting uploads give up now, and failing ones are not retried."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def _failed(self, error: BaseException) -> int:
        """Note a transient failure; returns the recovery count, for ``_pause``."""
        with self._changed:
            if self._down_since is None:
                self._down_since = self._clock()
                logger.warning("storage unavailable (%s): retrying, new batches wait", error)
            return self._recoveries

    def _succeeded(self) -> None:
        if self._down_since is None:  # the usual case: no lock
            return
        with self._changed:
            if self._down_since is not None:
                logger.info("storage available again after %.1f s", self._clock() - self._down_since)
                self._down_since = None
                self._recoveries += 1
                self._changed.notify_all()  # the others retry now, not after their pause

    def _pause(self, seconds: float, recoveries: int) -> bool:
        """Wait before the next attempt, or less if storage came back since the failure that
        returned ``recoveries``; False if stopping."""
        if self._sleep is not None:
            self._sleep(seconds)
            return not self._stopping
        with self._changed:
            self._changed.wait_for(lambda: self._stopping or self._recoveries != recoveries, seconds)
            return not self._stopping


class JobRetry:
    """One job's uploads: their retries share one budget, counted from the first failure."""

    def __init__(self, policy: StoreRetry) -> None:
        self._policy = policy
        self._first_failure: float | None = None
        self._retries = 0

    def call(self, upload: Callable[[], T]) -> T:
        """``upload()``, retried while it fails transiently and the budget lasts.

        Raises the error of a permanent failure as it is, RetriesExhausted once the budget is
        spent, StoreInterrupted when the policy is stopped.
        """
        policy = self._policy
        while True:
            try:
                result = upload()
            except Exception as error:  # classified below; a permanent one goes on as it is
                if not is_transient(error):
                    raise
                recoveries = policy._failed(error)
                now = policy._clock()
                if self._first_failure is None:
                    self._first_failure = now
                left = policy.budget_s - (now - self._first_failure)
                if left <= 0:
                    raise RetriesExhausted(f"after {policy.budget_s:g} s of retries: {error}") from error
                delay = backoff_delay(
                    self._retries, first_s=policy.first_delay_s, max_s=policy.max_delay_s, jitter=policy._jitter
                )
                self._retries += 1
                if not policy._pause(min(delay, left), recoveries):
                    raise StoreInterrupted(f"interrupted by shutdown while retrying: {error}") from error
            else:
                policy._succeeded()
                return result
