"""A Celery consumer that no message can stop.

Celery's own task handler raises on some malformed messages before any task strategy runs (a
``task`` header that is a list: ``unhashable type: 'list'``), and such an exception stops the
worker; the message comes back and stops the next worker too. ``GuardedConsumer`` wraps that
handler: a message it cannot handle is dropped (rejected, not requeued) with one log line naming
its task id and why. Nothing is deserialised beyond what Celery does (JSON only), and nothing runs.
``message_fields`` reads a request's job and enqueue time just as warily, whatever a hand-made
message holds.

It also survives losing Redis with messages reserved: closing the broken connection makes kombu
restore those messages to a Redis that is not there, and a second close then fails inside kombu
(``'NoneType' object has no attribute 'hostname'``), which Celery reports as an unrecoverable
error, stopping the worker. The consumer discards the broken connection anyway, so that failure is
logged and the consumer reconnects; the messages stay in Redis's unacked set, where the worker's
leases put them back (see ``worker.delivery.leases``). It reconnects every few seconds, not kombu's up to 30.

A consumer that loses its connection again and again as soon as it has one (a proxy or network
that drops it, a fault that kombu reports as a lost connection on every read) serves nothing while
the process looks alive: ``ReconnectLoop`` counts the losses, and ``/livez`` turns unhealthy with
the reason while they go on (``worker.health``), so an orchestrator restarts the worker and an
operator sees why. One outage, however long, is one loss: the reconnect attempts are not counted.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections import deque
from functools import partial
from numbers import Real
from typing import Any

from celery.exceptions import CPendingDeprecationWarning
from celery.worker.consumer import Consumer

from worker.delivery.deadletters import dead_letter, headers_task_id, push_dead_letter
from worker.delivery.transport import LEASES_OPTION

logger = logging.getLogger(__name__)

#: Reconnect attempts 1 s apart at first, then at most every RECONNECT_MAX_S: kombu's default
#: (2 s, 4 s, ... up to 30 s) would leave a worker idle up to 30 s after Redis is back.
RECONNECT_MAX_S = 3.0

#: A reconnect loop: at least LOOP_LOSSES losses within LOOP_WINDOW_S, the last one at most
#: LOOP_RECENT_S ago (so a past burst of losses stops counting within seconds of its end).
LOOP_LOSSES = 5
LOOP_WINDOW_S = 60.0
LOOP_RECENT_S = 15.0


class ReconnectLoop:
    """Losses of the broker connection after it was up, for the liveness probe (thread-safe:
    the consumer records, the health server's thread asks)."""

    def __init__(self) -> None:
        self._losses: deque[float] = deque()
        self._last_error = ""
        self._lock = threading.Lock()

    def lost(self, now: float, error: BaseException) -> None:
        with self._lock:
            self._losses.append(now)
            self._last_error = f"{type(error).__name__}: {error}"[:300]
            self._forget_before(now - LOOP_WINDOW_S)

    def problem(self, now: float) -> str | None:
        """Why the consumer is stuck reconnecting, or None."""
        with self._lock:
            self._forget_before(now - LOOP_WINDOW_S)
            if len(self._losses) < LOOP_LOSSES or now - self._losses[-1] > LOOP_RECENT_S:
                return None
            return (
                f"stuck reconnecting to the broker: the connection was lost {len(self._losses)} times "
                f"in the last {LOOP_WINDOW_S:.0f} s (last: {self._last_error})"
            )

    def _forget_before(self, since: float) -> None:
        while self._losses and self._losses[0] < since:
            self._losses.popleft()


#: Enqueue times further in the future than this are not believed (clock skew allowance).
FUTURE_SLACK_S = 86400.0


def plausible_time(value: Any, now: float) -> float | None:
    """A Unix time a producer could have stamped, or None (NaN, infinities, 1e308, booleans)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return value if math.isfinite(value) and 0 < value <= now + FUTURE_SLACK_S else None


def message_fields(req: Any) -> tuple[Any, float | None]:
    """``(job payload, enqueued_at)`` from a request, whatever shape a hand-made message has."""
    args = req.args if isinstance(req.args, (list, tuple)) else ()
    kwargs = req.kwargs if isinstance(req.kwargs, dict) else {}
    return (args[0] if args else None), plausible_time(kwargs.get("enqueued_at"), time.time())


def task_id_of(message: Any) -> str:
    """The message's task id if its headers hold a readable one, for the log line."""
    return headers_task_id(getattr(message, "headers", None))


def drop_message(message: Any, why: BaseException | str, connection_errors: tuple[type[BaseException], ...]) -> None:
    """Reject ``message`` for good, logging one line with its task id and the reason."""
    reason = why if isinstance(why, str) else f"{type(why).__name__}: {why}"
    logger.error("dropping malformed message %s: %s", task_id_of(message), reason[:500])
    keep_dead_letter(message, reason)
    message.reject_log_error(logger, connection_errors, requeue=False)


def keep_dead_letter(message: Any, reason: str) -> None:
    """Push the message's dead letter on the broker's capped list; never raises (best effort)."""
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    record = dead_letter(
        task_id=task_id_of(message),
        reason=reason,
        body=body,
        content_type=getattr(message, "content_type", None),
        now=time.time(),
    )
    try:
        push_dead_letter(message.channel.client.pipeline(), record).execute()
    except Exception as error:  # the drop itself matters more than its record
        logger.warning("could not keep the dead letter of %s: %r", task_id_of(message), error)


class GuardedConsumer(Consumer):
    """Celery's consumer, with a task handler that cannot raise on what a message holds, and a
    reconnect that a failing cleanup of the broken connection cannot stop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.reconnect_loop = ReconnectLoop()
        super().__init__(*args, **kwargs)

    def connection_for_read(self, heartbeat: float | None = None) -> Any:
        """Celery's consuming connection, whose channels take and put back through the worker's
        leases (``worker.delivery.transport``; ``worker.runtime``: the worker's ``deepqueue``)."""
        options = {LEASES_OPTION: self.controller.deepqueue.leases}
        return self.ensure_connected(self.app.connection_for_read(heartbeat=heartbeat, transport_options=options))

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = partial(
            conn.ensure_connection, interval_start=1.0, interval_step=1.0, interval_max=RECONNECT_MAX_S
        )
        return super().ensure_connected(conn)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        self.reconnect_loop.lost(time.monotonic(), exc)
        try:
            with warnings.catch_warnings():  # Celery's 20-line notice of a setting deepqueue keeps off on purpose
                warnings.simplefilter("ignore", CPendingDeprecationWarning)
                super().on_connection_error_after_connected(exc)
        except Exception as error:  # cleanup of a connection already dropped: reconnect regardless
            logger.warning("closing the lost broker connection failed (%r); reconnecting anyway", error)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """A message kombu could not decode (its compression, its body's encoding): dropped to the
        dead letters, not only logged and acknowledged as Celery does."""
        drop_message(message, exc, self.connection_errors)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """No Celery task message (no ``task`` header): dead-lettered, not only logged and dropped."""
        drop_message(message, "not a Celery task message: no 'task' header", self.connection_errors)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A task this worker does not run, on deepqueue's queue: dead-lettered, without Celery's
        traceback and its failure record in a result backend deepqueue does not use."""
        task = (getattr(message, "headers", None) or {}).get("task")
        drop_message(message, f"task {task!r} is not deepqueue's ({exc!r})", self.connection_errors)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A task message Celery cannot read (its headers, its body): dead-lettered."""
        drop_message(message, exc, self.connection_errors)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)
        broker_errors = tuple(self.connection_errors) + tuple(self.channel_errors)

        def on_task_received(message: Any) -> Any:
            try:
                return handle(message)
            except broker_errors:
                raise  # the connection's problem, not the message's: Celery reconnects
            except Exception as error:  # any: a malformed message costs itself, not the worker
                drop_message(message, error, self.connection_errors)

        return on_task_received
