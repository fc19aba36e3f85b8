"""What producer and worker agree on besides the job schema: task name, Celery settings and
where a run's files are."""

from __future__ import annotations

from typing import Any

from producer.settings import ClientSettings

TASK_NAME = "deepqueue.generate"

#: Broker Redis hash: worker name -> time of its last lease renewal (see worker.leases). A worker
#: that has not renewed for WORKER_GONE_S is gone; the jobs it was running can be sent again.
WORKERS_KEY = "deepqueue:workers"
WORKER_GONE_S = 60.0

#: Broker Redis list of the messages workers dropped as unreadable (newest first, JSON records
#: with task id, reason, time and the body's first bytes as text), for ``deepqueue dead-letters``.
DEAD_LETTERS_KEY = "deepqueue:dead-letters"
DEAD_LETTERS_KEPT = 1000


def run_key(prefix: str, run_id: str, *parts: str) -> str:
    """``{prefix}/{run}/{parts...}``: where a run's objects live (no leading slash when prefix is empty)."""
    return "/".join(part for part in (prefix.strip("/"), run_id, *parts) if part)


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
        },
    }
