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

import secrets
import time
from collections.abc import Sequence
from json.encoder import encode_basestring
from typing import NamedTuple

import redis
from celery import Celery

from producer.contract import TASK_NAME, celery_config
from producer.entries import Entry
from producer.fair import FairQueue
from producer.layout import model_queue
from producer.packing import batch_task_id, pack, payload_json, prompt_batches
from producer.settings import ClientSettings

#: Messages per enqueue script call (eight calls per pipeline flush).
PUBLISH_BATCH = 500

#: kombu's Redis envelope of a Celery task message (the strings go in as JSON: ``_json``).
_ENVELOPE = (
    '{"body":%s,"content-encoding":"utf-8","content-type":"application/json","headers":{"task":%s,"id":%s},'
    '"properties":{"delivery_tag":"%s","delivery_info":{"exchange":"","routing_key":%s}}}'
)
_json = encode_basestring  # a str as JSON text, as json.dumps(ensure_ascii=False) writes it


class Message(NamedTuple):
    """One task message, built: what goes on the queue, and the jobs it carries as JSON."""

    queue: str  #: the list it goes on (its jobs' model's queue)
    run_id: str
    envelope: str  #: as kombu's Redis transport stores it
    payload: str  #: the job argument (``producer.packing.pack``), also what ``producer.sent`` keeps
    jobs: int


def producer_app(settings: ClientSettings) -> Celery:
    """A Celery app that only sends (hand-made messages in tests, the benchmark's baseline)."""
    app = Celery("deepqueue-producer", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def message_args(entries: Sequence[Entry], enqueued_at: float) -> tuple[list, dict]:
    """The task's positional and keyword arguments for one message's jobs."""
    return [pack(entries)], {"enqueued_at": enqueued_at}


def envelope(payload: str, *, task_id: str, queue: str, enqueued_at: float) -> str:
    """A message's job argument as kombu's Redis transport stores a Celery task message."""
    body = f'[[{payload}],{{"enqueued_at":{enqueued_at!r}}},{{}}]'  # message_args, as JSON
    return _ENVELOPE % (_json(body), _json(TASK_NAME), _json(task_id), secrets.token_hex(8), _json(queue))


def queue_message(entries: Sequence[Entry], *, queue: str, enqueued_at: float) -> str:
    """One message's jobs as kombu's Redis transport stores a Celery task message."""
    return envelope(payload_json(entries), task_id=batch_task_id(entries), queue=queue, enqueued_at=enqueued_at)


def messages(entries: Sequence[Entry], queue: str, *, per_message: int = 1) -> list[Message]:
    """``entries`` as messages of up to ``per_message`` neighbours of one run, model and shape
    (``producer.packing.prompt_batches``), the first job first, each for its model's queue
    (``queue`` for jobs that name no model)."""
    now = time.time()
    built = []
    for batch in prompt_batches(entries, per_message):
        kind = batch[0].kind
        name = model_queue(queue, kind.model)
        payload = payload_json(batch)
        body = envelope(payload, task_id=batch_task_id(batch), queue=name, enqueued_at=now)
        built.append(Message(name, kind.run_id, body, payload, len(batch)))
    return built


def push(broker: redis.Redis, built: Sequence[Message]) -> None:
    """Put messages on their queues, first out first, each run's in its own list of that queue
    (``producer.fair``: workers take them by the runs' classes and weights).

    Raises redis-py's errors if a flush fails (the messages of earlier flushes are queued).
    """
    lists: dict[tuple[str, str], list[Message]] = {}
    for message in built:
        lists.setdefault((message.queue, message.run_id), []).append(message)
    pipe = broker.pipeline(transaction=False)
    fair = {name: FairQueue(broker, name) for name, _ in lists}
    for (name, run_id), listed in lists.items():
        for start in range(0, len(listed), PUBLISH_BATCH):
            part = listed[start : start + PUBLISH_BATCH]
            fair[name].enqueue(run_id, [m.envelope for m in part], sum(m.jobs for m in part), client=pipe)
            if len(pipe) >= 8:
                pipe.execute()
    pipe.execute()


def publish(broker: redis.Redis, queue: str, entries: Sequence[Entry], *, per_message: int = 1) -> None:
    """Put ``entries`` (jobs: ``producer.entries.entries_of`` makes them of Jobs) on their queues
    as messages (``messages``, ``push``)."""
    push(broker, messages(entries, queue, per_message=per_message))
