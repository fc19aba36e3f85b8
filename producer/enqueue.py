"""Send jobs to the queue: many publishes per Redis round trip through kombu's batch producer.

Celery copies a text form of a task's arguments into each message's headers (``argsrepr``,
``kwargsrepr``), and workers send it on in their task events, which Flower shows and stores.
Left to Celery that text is the whole job, prompt included: here it is ``run=... job=...``, so
prompts stay in the message body only (and each message carries the job once, not twice).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from celery import Celery

from producer.contract import TASK_NAME, celery_config
from producer.job import Job
from producer.settings import ClientSettings

#: Publishes per Redis pipeline flush.
PUBLISH_BATCH = 500


def producer_app(settings: ClientSettings) -> Celery:
    """A Celery app that only sends: no tasks, no worker settings, no torch."""
    app = Celery("deepqueue-producer", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def message_args(job: Job) -> tuple[list, dict]:
    """The task's positional and keyword arguments for one job."""
    return [job.model_dump(mode="json")], {"enqueued_at": time.time()}


def message_reprs(job: Job) -> tuple[str, str]:
    """What task events and Flower show of a job's arguments: where it is, never its prompt."""
    return f"run={job.run_id} job={job.job_id}", ""


def publish(app: Celery, jobs: Sequence[Job]) -> None:
    """Publish one message per job; the Celery task id is the job id.

    Raises ``kombu.exceptions.BatchPublishError`` if a pipeline flush fails.
    """
    with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH):
        for job in jobs:
            args, kwargs = message_args(job)
            argsrepr, kwargsrepr = message_reprs(job)
            app.send_task(
                TASK_NAME,
                args=args,
                kwargs=kwargs,
                task_id=job.job_id,
                producer=producer,
                argsrepr=argsrepr,
                kwargsrepr=kwargsrepr,
            )
