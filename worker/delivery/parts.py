"""The jobs of one message, each handled on its own, the message settled once for all of them.

A message carries one job, or a prompt batch of several (``producer.message``). Each job is a
``Part``: what the batch buffer groups, the pool runs and the book tracks
(``worker.delivery.book``), so parts of one message may run in different batches, merged with
other messages' parts. The message is what Redis knows: one delivery tag, leased, then
acknowledged or sent back once. ``Message`` joins the two:

- its lease is *working* while a pool process has any of its parts, so it never goes back to the
  queue while one of them runs, even with another still buffered;
- it settles when its last part ends: acknowledged when every part ended final (done, failed,
  cancelled), sent back when any was sent back. A message sent back and delivered again runs
  only its jobs that are not final (the strategy ends the others at once, from their states).

Pure: the strategy (``worker.delivery.strategy``) does the I/O that these answers ask for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

from producer.fair import priority_rank
from producer.job import Job
from producer.message import unpack
from worker.pipeline.executor import parse_job

M = TypeVar("M")


class Settle(str, Enum):
    """How a message whose last part ended settles."""

    ACK = "ack"
    BACK = "back"


@dataclass(eq=False)
class Message(Generic[M]):
    """One delivered message (``request``: Celery's request for it) and its parts' tally."""

    request: M
    tag: str
    enqueued_at: float | None
    received_at: float
    open: int = 0  # parts not ended
    working: int = 0  # parts a pool process has
    back: bool = False  # a part was sent back: the message goes back
    started: bool = False  # a pool process took a part (its task-started event was sent)
    failures: list[str] = field(default_factory=list)  # why parts failed
    rank: int = priority_rank(None)  # its priority class's (producer.fair): lower goes first


@dataclass(eq=False)
class Part(Generic[M]):
    """One job of a message: ``id`` is the task id of a one-job message, else the job's id (or,
    for an entry that is no job or a job the message already had, ``{task id}#{position}``)."""

    id: str
    payload: Any
    job: Job | None
    message: Message[M]
    working: bool = False
    ended: bool = False

    @property
    def enqueued_at(self) -> float | None:
        return self.message.enqueued_at

    @property
    def received_at(self) -> float:
        return self.message.received_at

    def take(self) -> bool:
        """A pool process took this part: True when its message's lease turns working."""
        if self.working or self.ended:
            return False
        self.working = True
        self.message.working += 1
        return self.message.working == 1

    def release(self) -> bool:
        """No pool process has this part any more: True when its message's lease turns idle
        (while parts of it are left to run)."""
        if not self.working:
            return False
        self.working = False
        self.message.working -= 1
        return self.message.working == 0

    def end(self, *, back: bool = False, failure: str | None = None) -> Settle | None:
        """This part is final (``failure``: it failed so), or goes back to the queue (``back``):
        how its message settles when it was the last open part, else None (also for a part that
        had ended)."""
        if self.ended:
            return None
        self.release()
        self.ended = True
        message = self.message
        message.open -= 1
        message.back |= back
        if failure is not None:
            message.failures.append(failure)
        if message.open:
            return None
        return Settle.BACK if message.back else Settle.ACK


def split(
    request: M,
    task_id: str,
    payload: Any,
    *,
    tag: str,
    enqueued_at: float | None,
    now: float,
    priority: str | None = None,
) -> list[Part[M]]:
    """A message's parts, each with its job (None: the entry is no job; the pool fails it with
    the reason), of the class the message was taken in (``priority``; None: normal). Raises
    ``producer.message.PromptBatchError`` for a batch that cannot be one."""
    entries = unpack(payload)
    message = Message(request, tag, enqueued_at, now, rank=priority_rank(priority))
    if entries is None:
        parts = [Part(task_id, payload, parse_job(payload)[0], message)]
    else:
        parts, ids = [], set()
        for position, entry in enumerate(entries):
            job = parse_job(entry)[0]
            # A job twice in one message runs twice (its outputs are written once): each needs
            # its own id, so that the pool's outcome ends the part it belongs to.
            part_id = job.job_id if job and job.job_id not in ids else f"{task_id}#{position}"
            ids.add(part_id)
            parts.append(Part(part_id, entry, job, message))
    message.open = len(parts)
    return parts


def settled_together(parts: Iterable[Part[M]], *, back: bool = False) -> list[tuple[Message[M], Settle]]:
    """End ``parts`` alike: the messages that settle, each with how."""
    settled = []
    for part in parts:
        if (settle := part.end(back=back)) is not None:
            settled.append((part.message, settle))
    return settled
