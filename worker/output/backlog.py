"""Bounded background work: store one batch's images while the device generates the next.

The pool process generates on its main thread and hands each finished image to a few threads
that encode, upload and record it. ``reserve`` is the back-pressure: a batch is generated only
when the images already waiting leave room for it, so a slow S3 holds the device back instead of
growing memory without limit, and an S3 outage (whose uploads wait to be retried, holding their
places) stops generation once the backlog is full.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Generic, TypeVar

T = TypeVar("T")


class Backlog(Generic[T]):
    """At most ``limit`` items reserved or running; their results wait for ``collect``.

    A reservation larger than ``limit`` is granted once nothing else is pending, so a batch bigger
    than the backlog still runs (alone).
    """

    def __init__(self, threads: int, limit: int) -> None:
        if threads < 1 or limit < 1:
            raise ValueError(f"threads and limit must be at least 1, got {threads} and {limit}")
        self.limit = limit
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="deepqueue-store")
        self._changed = threading.Condition()
        self._pending = 0  # reserved, submitted or running, not yet finished
        self._results: list[T] = []

    @property
    def pending(self) -> int:
        with self._changed:
            return self._pending

    def reserve(self, count: int, timeout: float | None = None) -> bool:
        """Wait for room for ``count`` more items; False if ``timeout`` passed first."""
        with self._changed:
            if not self._changed.wait_for(lambda: not self._pending or self._pending + count <= self.limit, timeout):
                return False
            self._pending += count
            return True

    def release(self, count: int) -> None:
        """Give back reserved room that no item will use (a batch that failed to generate)."""
        with self._changed:
            self._pending -= count
            self._changed.notify_all()

    def submit(self, work: Callable[[], T], on_error: Callable[[BaseException], T]) -> None:
        """Run ``work`` on a thread, in one reserved place; if it raises, ``on_error`` gives its result."""
        self._pool.submit(work).add_done_callback(partial(self._finished, on_error))

    def collect(self, wait: bool = False, timeout: float | None = None) -> list[T]:
        """The results finished since the last call; with ``wait``, once nothing is pending."""
        with self._changed:
            if wait:
                self._changed.wait_for(lambda: not self._pending, timeout)
            results, self._results = self._results, []
            return results

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _finished(self, on_error: Callable[[BaseException], T], future: Future[T]) -> None:
        error = future.exception()
        result = future.result() if error is None else on_error(error)
        with self._changed:
            self._results.append(result)
            self._pending -= 1
            self._changed.notify_all()
