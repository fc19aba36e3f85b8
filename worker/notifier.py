"""Completion webhooks from a worker: a background thread that delivers the notifications of the
runs whose end this process recorded, and sweeps those left pending by others.

The executor's reporter is wrapped (``ObservedReporter``): a job that moves to a final state
(done, failed, cancelled) hands its run id to ``Notifier.observe``, which only adds it to a set
and wakes the thread. The thread asks Redis whether the run has ended and, if so, claims its
one delivery (``producer.notify_state``) and POSTs it (``producer.notify_send``), retries and all.
Nothing of it runs on the thread that generates or stores images, and nothing it does can fail a
job: every error is logged and the thread goes on.

``sweep_s`` (the main process's notifier only): every so often the thread also looks at the
runs listed pending whose claim or hold has run out (a worker or a submit that died mid-way) and
delivers them. Stopping gives back a claim between tries, so a sweep elsewhere delivers it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from producer.notify_send import notify_if_due
from producer.notify_state import NotifyStore
from producer.settings import ClientSettings
from producer.state import JobResult, JobState, RunStore

logger = logging.getLogger(__name__)

#: States that may end a run.
FINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
#: How often the main process looks at pending notifications whose claim or hold ran out.
SWEEP_S = 15.0


class Notifier:
    """One background thread per process; started on the first ``observe`` (or ``start``)."""

    def __init__(self, settings: ClientSettings, *, sweep_s: float | None = None) -> None:
        self.settings = settings
        self.sweep_s = sweep_s
        self._runs: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._notify: NotifyStore | None = None
        self._store: RunStore | None = None

    def observe(self, run_id: str) -> None:
        """A job of ``run_id`` became final here: see (in the background) whether the run ended."""
        with self._lock:
            self._runs.add(run_id)
        self.start()
        self._wake.set()

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._loop, name="deepqueue-notifier", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread: a delivery waiting between tries gives its claim back at once; one in a
        POST finishes it within ``timeout`` or is abandoned (its claim's lease runs out)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        next_sweep = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(self.sweep_s)
            self._wake.clear()
            with self._lock:
                runs, self._runs = self._runs, set()
            for run_id in sorted(runs):
                self._attempt(run_id)
            if self.sweep_s is not None and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.sweep_s
                self._sweep()

    def _sweep(self) -> None:
        try:
            due = self._stores()[0].due()
        except redis.RedisError as error:
            logger.warning("could not read pending notifications: %r", error)
            return
        for run_id in due:
            if self._attempt(run_id) in ("none", "settled", "running"):
                self._stores()[0].forget_pending(run_id)

    def _attempt(self, run_id: str) -> str | None:
        if self._stop.is_set():
            return None
        notify, store = self._stores()
        try:
            return notify_if_due(notify, store, self.settings, run_id, "end", wait=self._stop.wait)
        except Exception as error:  # Redis down, a bad stored URL...: never the jobs' problem
            logger.warning("run %s: could not notify its end: %r", run_id, error, exc_info=True)
            return None

    def _stores(self) -> tuple[NotifyStore, RunStore]:
        """Made in the thread's process, on first use (a forked process makes its own)."""
        if self._notify is None or self._store is None:
            self._notify = NotifyStore.from_url(self.settings.result_backend)
            self._store = RunStore.from_url(self.settings.result_backend)
        return self._notify, self._store


class ObservedReporter:
    """A reporter (``worker.pipeline.executor.Reporter``) that tells ``notifier`` of every job
    that became final, and counts GPU time without ever failing a job for it."""

    def __init__(self, inner: Any, notifier: Notifier) -> None:
        self.inner = inner
        self.notifier = notifier

    def mark(self, run_id: str, job_id: str, state: JobState, **details: Any) -> bool:
        moved = self.inner.mark(run_id, job_id, state, **details)
        if moved and state in FINAL:
            self.notifier.observe(run_id)
        return moved

    def get(self, run_id: str, job_id: str) -> JobResult | None:
        return self.inner.get(run_id, job_id)

    def deleted(self, run_id: str) -> bool:
        return self.inner.deleted(run_id)

    def add_gpu_seconds(self, run_id: str, seconds: float) -> None:
        try:
            self.inner.add_gpu_seconds(run_id, seconds)
        except redis.RedisError as error:  # a figure of the summary, not the job's outcome
            logger.warning("run %s: could not count %.3f GPU seconds: %r", run_id, seconds, error)
