"""A Celery consumer that no message can stop.

Celery's own task handler raises on some malformed messages before any task strategy runs (a
``task`` header that is a list: ``unhashable type: 'list'``), and such an exception stops the
worker; the message comes back and stops the next worker too. ``GuardedConsumer`` wraps that
handler: a message it cannot handle is dropped (rejected, not requeued) with one log line naming
its task id and why. Nothing is deserialised beyond what Celery does (JSON only), and nothing runs.

It also survives losing Redis with messages reserved: closing the broken connection makes kombu
restore those messages to a Redis that is not there, and a second close then fails inside kombu
(``'NoneType' object has no attribute 'hostname'``), which Celery reports as an unrecoverable
error, stopping the worker. The consumer discards the broken connection anyway, so that failure is
logged and the consumer reconnects; the messages stay in Redis's unacked set, where the worker's
leases put them back (see ``worker.leases``). It reconnects every few seconds, not kombu's up to 30.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from typing import Any

from celery.worker.consumer import Consumer

from producer.contract import DEAD_LETTERS_KEPT, DEAD_LETTERS_KEY

logger = logging.getLogger(__name__)

#: Reconnect attempts 1 s apart at first, then at most every RECONNECT_MAX_S: kombu's default
#: (2 s, 4 s, ... up to 30 s) would leave a worker idle up to 30 s after Redis is back.
RECONNECT_MAX_S = 3.0


def task_id_of(message: Any) -> str:
    """The message's task id if its headers hold a readable one, for the log line."""
    headers = getattr(message, "headers", None)
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) else "(no id)"


def drop_message(message: Any, why: BaseException | str, connection_errors: tuple[type[BaseException], ...]) -> None:
    """Reject ``message`` for good, logging one line with its task id and the reason."""
    reason = why if isinstance(why, str) else f"{type(why).__name__}: {why}"
    logger.error("dropping malformed message %s: %s", task_id_of(message), reason[:500])
    keep_dead_letter(message, reason)
    message.reject_log_error(logger, connection_errors, requeue=False)


def dead_letter(message: Any, reason: str, now: float) -> dict[str, Any]:
    """What is kept of a dropped message: enough to find its sender, never deserialised."""
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    return {
        "task_id": task_id_of(message),
        "reason": reason[:2000],
        "at": now,
        "content_type": getattr(message, "content_type", None),
        "body": body[:4096].decode("utf-8", errors="replace"),
    }


def keep_dead_letter(message: Any, reason: str) -> None:
    """Push the message's dead letter on the broker's capped list; never raises (best effort)."""
    try:
        record = json.dumps(dead_letter(message, reason, time.time()))
        message.channel.client.pipeline().lpush(DEAD_LETTERS_KEY, record).ltrim(
            DEAD_LETTERS_KEY, 0, DEAD_LETTERS_KEPT - 1
        ).execute()
    except Exception as error:  # the drop itself matters more than its record
        logger.warning("could not keep the dead letter of %s: %r", task_id_of(message), error)


class GuardedConsumer(Consumer):
    """Celery's consumer, with a task handler that cannot raise on what a message holds, and a
    reconnect that a failing cleanup of the broken connection cannot stop."""

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = partial(
            conn.ensure_connection, interval_start=1.0, interval_step=1.0, interval_max=RECONNECT_MAX_S
        )
        return super().ensure_connected(conn)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except Exception as error:  # cleanup of a connection already dropped: reconnect regardless
            logger.warning("closing the lost broker connection failed (%r); reconnecting anyway", error)

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
