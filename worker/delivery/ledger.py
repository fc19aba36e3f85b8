"""What one worker owes Redis for the messages it holds: the one place that decides which
message goes back on the queue, which is acknowledged, and that each is settled once.

A message a worker holds is leased (``worker.delivery.leases``): buffered, or *working* once a pool
process took its batch. It ends settled exactly once: acknowledged, or put back on the queue.
Three parties used to put messages back on their own: kombu's channel when it closed (every
message it had delivered, including batches still running), the strategy after a lost
connection (what it had not started) and the lease keeper; after a Redis blip that sent the
same message back twice and ran a batch again. Now each asks the ledger, which hands a message
to the lease keeper's next beat at most once and never puts back one that is working.

No Redis, kombu or Celery here: the lease keeper does the I/O and reports what it sent.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: (raw message, exchange, routing key): enough to put a message back when Redis lost its record.
Copy = tuple[Any, str, str]

#: Settled tags remembered, so that a late second request for one is ignored (a tag is one
#: message's; only a new delivery of it, ``hold``, brings it back).
SETTLED_MEMORY = 100_000


def message_copy(message: Any) -> Copy:
    """What it takes to put a delivered kombu message back without Redis's record of it."""
    info = message.delivery_info
    return message._raw, info["exchange"], info["routing_key"]


@dataclass(frozen=True)
class Due:
    """What the next beat owes Redis: leases to renew (``jobs``: the jobs their messages carry),
    messages to put back, tags to acknowledge."""

    held: frozenset[str] = frozenset()
    returns: dict[str, Copy] = field(default_factory=dict)
    acks: frozenset[str] = frozenset()
    jobs: int = 0


class DeliveryLedger:
    """The delivery tags one worker holds and what is owed for each; safe across threads."""

    def __init__(self, settled_memory: int = SETTLED_MEMORY) -> None:
        self._held: dict[str, int] = {}  # tag -> jobs its message carries
        self._working: set[str] = set()
        self._returns: dict[str, Copy] = {}
        self._claimed: set[str] = set()  # being put back by one party right now
        self._acks: set[str] = set()
        self._settled: OrderedDict[str, None] = OrderedDict()
        self._memory = settled_memory
        self._lock = threading.Lock()

    def hold(self, tag: str, jobs: int = 1) -> None:
        """A message carrying ``jobs`` jobs still to run was delivered to the worker: lease it.
        A message put back keeps its tag (kombu restores the same payload), so a settled tag
        held again is that message delivered again, here: leased anew."""
        with self._lock:
            if tag in self._returns or tag in self._acks:
                return
            self._settled.pop(tag, None)
            self._held[tag] = jobs

    def working(self, tags: Iterable[str]) -> None:
        """A pool process took these messages' batch: they finish here, whatever the connection does."""
        with self._lock:
            self._working.update(tag for tag in tags if tag in self._held)

    def idle(self, tags: Iterable[str]) -> None:
        """These messages are back in the worker's hands (their process died, or the batch failed)."""
        with self._lock:
            self._working.difference_update(tags)

    def settled_here(self, tag: str) -> None:
        """The worker acknowledged or rejected this message itself, on its channel."""
        with self._lock:
            self._forget(tag)

    def give_back(self, tag: str, copy: Copy) -> bool:
        """Put a message back on the queue at the next beat: False when it is already settled
        (or on its way), so that a message goes back once however many parties ask."""
        with self._lock:
            if self._owed(tag):
                return False
            self._held.pop(tag, None)
            self._working.discard(tag)
            self._returns[tag] = copy
            return True

    def acknowledge(self, tag: str) -> bool:
        """Acknowledge a message at the next beat (its channel is gone); False when already settled."""
        with self._lock:
            if self._owed(tag):
                return False
            self._held.pop(tag, None)
            self._working.discard(tag)
            self._acks.add(tag)
            return True

    def not_working(self, tags: Iterable[str]) -> list[str]:
        """Of these tags, the ones no pool process is working on (and not settled yet)."""
        with self._lock:
            return [tag for tag in tags if tag not in self._working and tag not in self._settled]

    def claim(self, tag: str) -> Copy | None:
        """Take a message owed back to put it back now: its copy, or None when another party
        claimed it or it is settled. Then ``sent(returned=...)``, or ``unclaim`` if that failed."""
        with self._lock:
            copy = self._returns.get(tag)
            if copy is None or tag in self._claimed:
                return None
            self._claimed.add(tag)
            return copy

    def unclaim(self, tag: str) -> None:
        """Putting it back failed: it stays owed, for the next beat."""
        with self._lock:
            self._claimed.discard(tag)

    def due(self) -> Due:
        with self._lock:
            return Due(frozenset(self._held), dict(self._returns), frozenset(self._acks), sum(self._held.values()))

    def sent(self, *, returned: Iterable[str] = (), acked: Iterable[str] = ()) -> None:
        """The beat put these back on the queue, or acknowledged them: they are settled."""
        with self._lock:
            for tag in (*returned, *acked):
                self._returns.pop(tag, None)
                self._claimed.discard(tag)
                self._acks.discard(tag)
                self._forget(tag)

    def held(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def is_working(self, tag: str) -> bool:
        with self._lock:
            return tag in self._working

    def _owed(self, tag: str) -> bool:
        """Settled, or on its way to be."""
        return tag in self._settled or tag in self._returns or tag in self._acks

    def _forget(self, tag: str) -> None:
        """Settled: no longer held, and remembered so that nothing settles it again."""
        self._held.pop(tag, None)
        self._working.discard(tag)
        self._settled[tag] = None
        while len(self._settled) > self._memory:
            self._settled.popitem(last=False)
