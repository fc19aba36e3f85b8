"""Manifest parts: every stored image's row, written by the worker that stored it.

A row (``producer.manifest_parts.manifest_row``) is the image's full sidecar plus where it is
and its size. ``ManifestWriter`` buffers rows per run and writes them as one gzipped JSON-lines
object per flush::

    {prefix}/{run}/manifest-parts/{worker}-{time_ns}-{random}.jsonl.gz

when a run's buffer holds ``max_rows`` rows, when its oldest row is ``max_age_s`` old (a timer
thread checks), and at ``close``. Names are unique, so parts are written create-only and never
replaced; S3 takes thousands of such objects without trouble, where one appended file would
need a read-modify-write per flush.

A run deleted meanwhile (``deleted``: its tombstone is there) gets no part: its rows are dropped
before a write, and a part written as the tombstone came is removed again.

Parts are an optimisation, never the truth: a worker killed before it flushed loses its buffered
rows, and a part that could not be written is retried at the next flush, then dropped once the
buffer is ``max_rows * RETRY_FACTOR`` rows long (memory stays bounded through an outage).
Compaction (``producer.manifest``) checks the run's done jobs in Redis and reads the sidecars of
those missing from the parts, so the compacted manifest is complete either way.

The part's key and encoding are the contract's (``producer.layout``, ``producer.manifest_parts``).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from producer.layout import part_key
from producer.manifest_parts import PART_CONTENT_TYPE, encode_part

logger = logging.getLogger(__name__)

#: A run's unwritten rows are kept through failed writes up to this many times ``max_rows``.
RETRY_FACTOR = 10


class PartSink(Protocol):
    """What the writer needs of ``producer.storage.Storage``: a create-only put, and a delete."""

    def put(self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str]) -> bool: ...

    def delete(self, key: str) -> None: ...


def never_deleted(run_id: str) -> bool:
    return False


@dataclass
class _Buffer:
    since: float  # clock time of the oldest row (or of the last failed write)
    rows: list[dict[str, Any]] = field(default_factory=list)
    hold_until: float = float("-inf")  # after a failed write, a full buffer waits for the timer


class ManifestWriter:
    """Thread-safe: the store threads add rows; writes happen outside the lock."""

    def __init__(
        self,
        storage: PartSink,
        prefix: str,
        worker: str,
        *,
        max_rows: int = 1000,
        max_age_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        timer: bool = True,
        deleted: Callable[[str], bool] = never_deleted,
    ) -> None:
        if max_rows < 1 or max_age_s <= 0:
            raise ValueError(f"max_rows must be >= 1 and max_age_s > 0, got {max_rows} and {max_age_s}")
        self.storage = storage
        self.prefix = prefix
        self.worker = worker
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self._clock = clock
        self._deleted = deleted
        self._lock = threading.Lock()
        self._buffers: dict[str, _Buffer] = {}
        self._use_timer = timer
        self._timer: threading.Thread | None = None
        self._stop = threading.Event()
        self.parts_written = 0
        self.rows_dropped = 0

    def add(self, run_id: str, row: dict[str, Any]) -> None:
        """Buffer one row; writes the run's part at once if it is full."""
        with self._lock:
            buffer = self._buffers.get(run_id)
            if buffer is None:
                buffer = self._buffers[run_id] = _Buffer(self._clock())
            buffer.rows.append(row)
            full = len(buffer.rows) >= self.max_rows and self._clock() >= buffer.hold_until
            if full:  # taken under the lock: a part holds max_rows rows, however many threads add
                del self._buffers[run_id]
            if self._use_timer and self._timer is None and not self._stop.is_set():
                self._timer = threading.Thread(target=self._tick, name="manifest-flush", daemon=True)
                self._timer.start()
        if full:
            self._write(run_id, buffer.rows)

    def flush(self, *, due_only: bool = False) -> int:
        """Write every run's buffered rows (``due_only``: only those whose oldest row is
        ``max_age_s`` old); returns how many parts were written."""
        now = self._clock()
        with self._lock:
            runs = [
                run for run, buffer in self._buffers.items() if not due_only or now - buffer.since >= self.max_age_s
            ]
        return sum(self._write(run_id, self._take(run_id)) for run_id in runs)

    def close(self) -> None:
        """Stop the timer and write what is buffered (a failed write is logged, not raised)."""
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=30)
        self.flush()

    def pending(self) -> int:
        with self._lock:
            return sum(len(buffer.rows) for buffer in self._buffers.values())

    def _take(self, run_id: str) -> list[dict[str, Any]]:
        with self._lock:
            buffer = self._buffers.pop(run_id, None)
        return buffer.rows if buffer else []

    def _write(self, run_id: str, rows: list[dict[str, Any]]) -> bool:
        if not rows:
            return False
        key = part_key(self.prefix, run_id, self.worker, time.time_ns(), secrets.token_hex(3))
        try:
            if self._deleted(run_id):
                logger.debug("run %s was deleted: its %d manifest rows are dropped", run_id, len(rows))
                return False
            self.storage.put(key, encode_part(rows), content_type=PART_CONTENT_TYPE, metadata={})
            if self._deleted(run_id):  # deleted while it was written: its delete may have listed the files before
                self.storage.delete(key)
                return False
        except Exception as error:  # any storage or Redis failure: the rows wait for the next flush, or are dropped
            self._put_back(run_id, rows, error)
            return False
        self.parts_written += 1
        return True

    def _put_back(self, run_id: str, rows: list[dict[str, Any]], error: Exception) -> None:
        with self._lock:
            now = self._clock()
            buffer = self._buffers.setdefault(run_id, _Buffer(now))
            buffer.rows[:0] = rows
            buffer.since, buffer.hold_until = now, now + self.max_age_s  # the timer tries again
            kept = len(buffer.rows) <= self.max_rows * RETRY_FACTOR and not self._stop.is_set()
            if not kept:
                dropped = len(buffer.rows)
                del self._buffers[run_id]
                self.rows_dropped += dropped
        if kept:
            logger.warning("writing a manifest part of run %s failed (%s); retrying at the next flush", run_id, error)
        else:
            logger.warning(
                "writing a manifest part of run %s failed (%s); dropped %d rows: compaction reads their sidecars",
                run_id,
                error,
                dropped,
            )

    def _tick(self) -> None:
        interval = max(0.05, min(self.max_age_s / 2, 5.0))
        while not self._stop.wait(interval):
            try:
                self.flush(due_only=True)
            except Exception:  # never let the timer die: the next tick or close() writes the rows
                logger.exception("manifest flush failed")
