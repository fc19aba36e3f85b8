"""Send jobs to the queue: Celery task messages in kombu's Redis format, hundreds per round trip,
each carrying a prompt batch of up to ``DEEPQUEUE_PROMPT_BATCH`` jobs (``producer.message``).

Celery's ``send_task`` builds every message through kombu's producer (about 250 µs a job, most
of a submit's time). Here each message is one JSON string, written the way kombu's Redis
transport stores a message (an envelope with ``body``, ``headers`` and ``properties``, LPUSHed on
its run's list of the queue: ``producer.fair``) and read back by kombu and Celery unchanged:

- the body is Celery's protocol 2 ``[args, kwargs, embed]`` as JSON text, not base64 (kombu
  reads a message without ``body_encoding`` as is): the jobs appear once, at their own size;
- the headers are the two a worker needs, ``task`` and ``id`` (``producer.message.batch_task_id``);
  no ``argsrepr`` or ``kwargsrepr``, so prompts never reach task events or Flower;
- the properties are kombu's delivery tag and routing (default exchange, the queue's name).

A producer that uses Celery itself (``app.send_task``, one job per message) still works: workers
read both.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence

import redis
from celery import Celery

from producer.contract import TASK_NAME, celery_config
from producer.entries import Entry
from producer.fair import FairQueue
from producer.layout import model_queue
from producer.message import batch_task_id, pack, prompt_batches
from producer.settings import ClientSettings

#: Messages per enqueue script call (eight calls per pipeline flush).
PUBLISH_BATCH = 500

_COMPACT = {"separators": (",", ":"), "ensure_ascii": False}


def producer_app(settings: ClientSettings) -> Celery:
    """A Celery app that only sends (hand-made messages in tests, the benchmark's baseline)."""
    app = Celery("deepqueue-producer", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def message_args(entries: Sequence[Entry], enqueued_at: float) -> tuple[list, dict]:
    """The task's positional and keyword arguments for one message's jobs."""
    return [pack(entries)], {"enqueued_at": enqueued_at}


def queue_message(entries: Sequence[Entry], *, queue: str, enqueued_at: float) -> str:
    """One message's jobs as kombu's Redis transport stores a Celery task message."""
    args, kwargs = message_args(entries, enqueued_at)
    return json.dumps(
        {
            "body": json.dumps([args, kwargs, {}], **_COMPACT),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"task": TASK_NAME, "id": batch_task_id(entries)},
            "properties": {
                "delivery_tag": secrets.token_hex(8),
                "delivery_info": {"exchange": "", "routing_key": queue},
            },
        },
        **_COMPACT,
    )


def publish(broker: redis.Redis, queue: str, entries: Sequence[Entry], *, per_message: int = 1) -> None:
    """Put ``entries`` (jobs: ``producer.entries.entries_of`` makes them of Jobs) on their
    model's queue (``queue`` for jobs that name no model), the first job first out, as messages
    of up to ``per_message`` neighbours of one run and shape (``producer.message.prompt_batches``),
    each run's in its own list of that queue (``producer.fair``: workers take them by the runs'
    classes and weights).

    Raises redis-py's errors if a flush fails (the messages of earlier flushes are queued).
    """
    now = time.time()
    lists: dict[tuple[str, str], tuple[list[str], list[int]]] = {}
    for batch in prompt_batches(entries, per_message):
        kind = batch[0].kind
        name = model_queue(queue, kind.model)
        messages, sizes = lists.setdefault((name, kind.run_id), ([], []))
        messages.append(queue_message(batch, queue=name, enqueued_at=now))
        sizes.append(len(batch))
    pipe = broker.pipeline(transaction=False)
    fair = {name: FairQueue(broker, name) for name, _ in lists}
    for (name, run_id), (messages, sizes) in lists.items():
        for start in range(0, len(messages), PUBLISH_BATCH):
            end = start + PUBLISH_BATCH
            fair[name].enqueue(run_id, messages[start:end], sum(sizes[start:end]), client=pipe)
            if len(pipe) >= 8:
                pipe.execute()
    pipe.execute()
