"""The batching strategy's book of the requests it holds: where each one is, and which go where
next. Pure: no Celery, kombu or Redis, so every decision is tested in milliseconds.

A request the strategy accepts is in exactly one place: waiting in the batch buffer, in a pool
call (sent, maybe taken by a pool process), or *held* after its call returned while that process
still stores its image. It leaves the book once: reported final by a pool call, failed with its
call, lost with the process that was storing it, given back when the strategy retires, or failed
after ``MAX_LOSSES`` lost batches. The strategy (``worker.delivery.strategy``) does the I/O the
book asks for: sending calls, acknowledging, sending back, leasing; the delivery ledger
(``worker.delivery.ledger``) then makes sure each message is settled once with Redis.

``Held`` outlives a strategy: after a lost connection Celery builds a new one, and a pool process
reports the images it stored in whichever call comes next, so the consumer keeps one ``Held`` for
all of its strategies.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from producer.job import Job
from worker.delivery.batching import BatchBuffer

#: Times a job may be in a batch whose process died or timed out before it fails for good.
MAX_LOSSES = 2


class Request(Protocol):
    """What the book needs of a Celery request: its task id. Requests are told apart by identity
    (a message redelivered meanwhile is another request with the same task id)."""

    id: str


R = TypeVar("R", bound=Request)


@dataclass(eq=False)
class PoolCall(Generic[R]):
    """One call handed to the pool and the requests it carries (none: a collect call)."""

    requests: list[R]
    accepted: bool = False  # a pool process took it (Celery drops the others on a lost connection)


@dataclass(eq=False)
class _Entry(Generic[R]):
    request: R
    pid: int | None = None  # the pool process that took its last call
    in_call: bool = True  # its call has not come back: the call's own error reports a dead process


class Held(Generic[R]):
    """Requests handed to the pool and not final yet, by task id, with the process of each."""

    def __init__(self) -> None:
        self._by_task: defaultdict[str, deque[_Entry[R]]] = defaultdict(deque)

    def __len__(self) -> int:
        return sum(map(len, list(self._by_task.values())))

    def __bool__(self) -> bool:
        return bool(self._by_task)

    def add(self, request: R) -> None:
        self._by_task[request.id].append(_Entry(request))

    def taken(self, requests: Iterable[R], pid: int) -> None:
        """A pool process took these requests' call: it generates them, then stores them."""
        for request in requests:
            entry = self._find(request)
            if entry is not None:
                entry.pid = pid

    def returned(self, requests: Iterable[R]) -> None:
        """These requests' call came back: their process stores their images now."""
        for request in requests:
            entry = self._find(request)
            if entry is not None:
                entry.in_call = False

    def final(self, task_id: str) -> R | None:
        """The pool reported ``task_id`` final: its oldest held request, or None when none is."""
        entries = self._by_task.get(task_id)
        if not entries:
            return None
        entry = entries.popleft()
        if not entries:
            del self._by_task[task_id]
        return entry.request

    def release(self, requests: Iterable[R]) -> None:
        """The pool no longer has these requests (their call failed, or they go elsewhere)."""
        for request in requests:
            entries = self._by_task.get(request.id)
            entry = self._find(request)
            if entries is not None and entry is not None:
                entries.remove(entry)
                if not entries:
                    del self._by_task[request.id]

    def storing(self, alive: Callable[[int], bool]) -> list[R]:
        """Requests whose call returned and whose process is gone: the images it was still
        storing are lost. Requests still in a call, this strategy's or a retired one's, are
        left to that call's error."""
        return [
            entry.request
            for entries in self._by_task.values()
            for entry in entries
            if entry.pid is not None and not entry.in_call and not alive(entry.pid)
        ]

    def _find(self, request: R) -> _Entry[R] | None:
        return next((entry for entry in self._by_task.get(request.id, ()) if entry.request is request), None)


def loss_failure(losses: int, died: bool) -> str | None:
    """Why a job whose batch was lost ``losses`` times (counting this one) fails now, or None
    while it may run again alone. ``died``: its process died, rather than timing out."""
    if losses < MAX_LOSSES:
        return None
    reason = "its pool process died" if died else "it timed out"
    return f"generation failed: {reason} {MAX_LOSSES} times while running this job"


@dataclass(eq=False)
class Book(Generic[R]):
    """One strategy's requests: buffered, in pool calls, held (shared), or waiting to be dropped
    as messages of stopped runs. ``slots``: the pool's processes; ``drop_chunk``: stopped-run
    messages settled together."""

    held: Held[R]
    buffer: BatchBuffer[R]
    slots: int
    drop_chunk: int
    calls: list[PoolCall[R]] = field(default_factory=list)  # handed to the pool, not returned
    dropping: list[tuple[R, Job]] = field(default_factory=list)  # of runs believed stopped
    retired: bool = False

    def buffered(self, key: Hashable, request: R, now: float, rank: int = 0) -> bool:
        """Buffer a request (``rank``: its priority class's, lower first); True when it opened a
        batch (pump again once it is due)."""
        return self.buffer.add(key, request, now, rank)

    def hand_over(self, requests: list[R]) -> PoolCall[R]:
        """A call to send now with these requests, held until reported."""
        for request in requests:
            self.held.add(request)
        return self._open(requests)

    def next_batch(self, now: float) -> PoolCall[R] | None:
        """The next call to send: partial batches only while a pool slot is idle, full ones also
        one ahead, so the next batch starts the moment a slot frees."""
        if self.retired or len(self.calls) > self.slots:
            return None
        taken = self.buffer.take(now, allow_partial=len(self.calls) < self.slots)
        return None if taken is None else self.hand_over(taken[1])

    def collect(self) -> PoolCall[R] | None:
        """A call for the outcomes of images still being stored, when nothing else will bring them
        (no call in flight, and requests held)."""
        if self.retired or self.calls or not self.held:
            return None
        return self._open([])

    def taken(self, call: PoolCall[R], pid: int) -> None:
        """Pool process ``pid`` took ``call``."""
        call.accepted = True
        self.held.taken(call.requests, pid)

    def returned(self, call: PoolCall[R]) -> None:
        """``call`` came back with outcomes (then ``held.final`` for each)."""
        self.calls.remove(call)
        self.held.returned(call.requests)

    def failed(self, call: PoolCall[R]) -> list[R]:
        """``call`` came back with an error: its requests, no longer held."""
        self.calls.remove(call)
        self.held.release(call.requests)
        return call.requests

    def lost_stores(self, alive: Callable[[int], bool]) -> list[R]:
        """Requests a dead process was still storing, no longer held: they run again. None once
        retired: its successor finds them in the shared ``Held``."""
        if self.retired:
            return []
        lost = self.held.storing(alive)
        self.held.release(lost)
        return lost

    def again(self, key: Hashable, request: R, since: float, rank: int = 0) -> bool:
        """Buffer a request again; False once retired (it goes back to the queue instead)."""
        if self.retired:
            return False
        self.buffer.add(key, request, since, rank)
        return True

    def defer(self, request: R, job: Job) -> bool:
        """Keep the message of a run believed stopped; True when a chunk is full (settle them)."""
        self.dropping.append((request, job))
        return len(self.dropping) >= self.drop_chunk

    def deferred(self) -> dict[str, list[tuple[R, Job]]]:
        """The kept messages of stopped runs by run, taken out of the book."""
        waiting, self.dropping = self.dropping, []
        by_run: defaultdict[str, list[tuple[R, Job]]] = defaultdict(list)
        for request, job in waiting:
            by_run[job.run_id].append((request, job))
        return dict(by_run)

    def retire(self) -> list[R]:
        """The consumer made a new strategy: what this one buffers, keeps for stopped runs, or
        handed to the pool in calls no process took (Celery dropped them), no longer held; it goes
        back to the queue. Calls already taken finish and report here."""
        self.retired = True
        dropped = [call for call in self.calls if not call.accepted]
        self.calls = [call for call in self.calls if call.accepted]
        returned = [request for _, requests in self.buffer.drain() for request in requests]
        returned += [request for call in dropped for request in call.requests]
        returned += [request for request, _ in self.dropping]  # dropped by whichever worker takes them next
        self.dropping = []
        self.held.release(returned)
        return returned

    def _open(self, requests: list[R]) -> PoolCall[R]:
        call = PoolCall(requests)
        self.calls.append(call)
        return call
