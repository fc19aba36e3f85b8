"""What producer and worker agree on besides the job schema and the run's layout
(``producer.layout``): the task name, how long a silent worker counts as alive, and the Celery
settings both sides share (the worker adds its own on top, in ``worker.app``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from producer.settings import ClientSettings

TASK_NAME = "deepqueue.generate"

#: A worker that has not renewed its leases (``producer.layout.WORKERS_KEY``) for this long is
#: gone; the jobs it was running can be sent again.
WORKER_GONE_S = 60.0
#: Dead letters kept (``producer.layout.DEAD_LETTERS_KEY``): JSON records with task id, reason,
#: time and the body's first bytes as text.
DEAD_LETTERS_KEPT = 1000
#: Seconds a restore mutex outlives a holder that died (see ``celery_config``).
UNACKED_MUTEX_EXPIRE_S = 30


def serving_workers(
    renewed: Mapping[bytes, bytes], queues: Mapping[bytes, bytes], since: float, queue: str | None = None
) -> set[str]:
    """Workers whose last lease renewal (``producer.layout.WORKERS_KEY``, as HGETALL returns it)
    is after ``since``; with ``queue``, only those that say they serve it (``WORKER_QUEUES_KEY``)."""
    return {
        name.decode()
        for name, at in renewed.items()
        if float(at) > since and (queue is None or queues.get(name) == queue.encode())
    }


def celery_config(settings: ClientSettings) -> dict[str, Any]:
    """Celery settings (Celery's own names) both sides must share."""
    return {
        "broker_url": settings.broker_url,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_default_queue": settings.queue,
        # Per-job state lives in our own Redis hashes (see producer.state), not in one
        # result key per task: the run's counts must be O(1) for million-job runs.
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # kombu's defaults restore unacked messages only every few minutes.
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # Restore passes (kombu's, and the leases' sweeps) take a mutex for milliseconds.
            # kombu keeps one whose holder was SIGKILLed for 5 minutes by default, blocking
            # every worker's restores and sweeps meanwhile; WATCH/MULTI in restore_by_tag
            # already keeps two passes from restoring one message twice.
            "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE_S,
        },
    }
