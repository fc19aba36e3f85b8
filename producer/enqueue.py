"""Send jobs to the queue: Celery task messages in kombu's Redis format, hundreds per round trip.

Celery's ``send_task`` builds every message through kombu's producer (about 250 µs a job, most
of a submit's time). Here each message is one JSON string, written the way kombu's Redis
transport stores a message (an envelope with ``body``, ``headers`` and ``properties``, LPUSHed on
the queue's list) and read back by kombu and Celery unchanged:

- the body is Celery's protocol 2 ``[args, kwargs, embed]`` as JSON text, not base64 (kombu
  reads a message without ``body_encoding`` as is): the job appears once, at its own size;
- the headers are the two a worker needs, ``task`` and ``id`` (the job id); no ``argsrepr`` or
  ``kwargsrepr``, so prompts never reach task events or Flower;
- the properties are kombu's delivery tag and routing (default exchange, the queue's name).

A producer that uses Celery itself (``app.send_task``) still works: workers read both.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence

import redis
from celery import Celery

from producer.contract import TASK_NAME, celery_config
from producer.job import Job
from producer.layout import model_queue
from producer.settings import ClientSettings

#: Messages per LPUSH (and per pipeline flush).
PUBLISH_BATCH = 500

_COMPACT = {"separators": (",", ":"), "ensure_ascii": False}


def producer_app(settings: ClientSettings) -> Celery:
    """A Celery app that only sends (hand-made messages in tests, the benchmark's baseline)."""
    app = Celery("deepqueue-producer", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def message_args(job: Job, enqueued_at: float) -> tuple[list, dict]:
    """The task's positional and keyword arguments for one job."""
    return [job.model_dump(mode="json", exclude_none=True)], {"enqueued_at": enqueued_at}


def queue_message(job: Job, *, queue: str, enqueued_at: float) -> str:
    """One job as kombu's Redis transport stores a Celery task message."""
    args, kwargs = message_args(job, enqueued_at)
    return json.dumps(
        {
            "body": json.dumps([args, kwargs, {}], **_COMPACT),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"task": TASK_NAME, "id": job.job_id},
            "properties": {
                "delivery_tag": secrets.token_hex(8),
                "delivery_info": {"exchange": "", "routing_key": queue},
            },
        },
        **_COMPACT,
    )


def publish(broker: redis.Redis, queue: str, jobs: Sequence[Job]) -> None:
    """Put one message per job on its model's queue (``queue`` for jobs that name no model), the
    first job first out; the task id is the job id.

    Raises redis-py's errors if a flush fails (the messages of earlier flushes are queued).
    """
    now = time.time()
    by_queue: dict[str, list[Job]] = {}
    for job in jobs:
        by_queue.setdefault(model_queue(queue, job.model), []).append(job)
    pipe = broker.pipeline(transaction=False)
    for name, queued in by_queue.items():
        for start in range(0, len(queued), PUBLISH_BATCH):
            batch = queued[start : start + PUBLISH_BATCH]
            pipe.lpush(name, *(queue_message(job, queue=name, enqueued_at=now) for job in batch))
            if len(pipe) >= 8:
                pipe.execute()
    pipe.execute()
