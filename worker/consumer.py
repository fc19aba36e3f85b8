"""A Celery consumer that no message can stop.

Celery's own task handler raises on some malformed messages before any task strategy runs (a
``task`` header that is a list: ``unhashable type: 'list'``), and such an exception stops the
worker; the message comes back and stops the next worker too. ``GuardedConsumer`` wraps that
handler: a message it cannot handle is dropped (rejected, not requeued) with one log line naming
its task id and why. Nothing is deserialised beyond what Celery does (JSON only), and nothing runs.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer

logger = logging.getLogger(__name__)


def task_id_of(message: Any) -> str:
    """The message's task id if its headers hold a readable one, for the log line."""
    headers = getattr(message, "headers", None)
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) else "(no id)"


def drop_message(message: Any, why: BaseException | str, connection_errors: tuple[type[BaseException], ...]) -> None:
    """Reject ``message`` for good, logging one line with its task id and the reason."""
    reason = why if isinstance(why, str) else f"{type(why).__name__}: {why}"
    logger.error("dropping malformed message %s: %s", task_id_of(message), reason[:500])
    message.reject_log_error(logger, connection_errors, requeue=False)


class GuardedConsumer(Consumer):
    """Celery's consumer, with a task handler that cannot raise on what a message holds."""

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
