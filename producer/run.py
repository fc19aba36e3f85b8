"""A handle on one run (``Run``): its counts, its end, its per-job results, read from the run's
state in Redis (``producer.state``). ``Client`` hands them out; it needs no broker or storage."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from producer.errors import WaitTimeoutError
from producer.progress import LINE_EVERY_S, Progress
from producer.spill import Buckets, sort_key
from producer.state import JobResult, JobState, RunStatus, RunStore

#: Job indexes per temporary file when results are read in order (one file in memory at a time).
RESULTS_SPAN = 50_000


class Run:
    """A handle on one run: its counts, its end, its per-job results."""

    def __init__(self, run_id: str, store: RunStore, *, submitted: int = 0, skipped: int = 0) -> None:
        self.run_id = run_id
        self.submitted = submitted  #: jobs sent by the submit that made this handle
        #: jobs not sent: running or done (submit), or not done but not kept to send again (retry:
        #: submitted before deepqueue kept jobs; submit their file again)
        self.skipped = skipped
        self._store = store

    def __repr__(self) -> str:
        return f"Run({self.run_id!r})"

    def status(self) -> RunStatus:
        """Counts per state and the rate (lately while it runs, overall once finished)."""
        return self._store.status(self.run_id)

    def wait(
        self,
        *,
        progress: bool = False,
        timeout: float | None = None,
        poll_s: float = 0.5,
        stream: TextIO | None = None,
        line_every_s: float = LINE_EVERY_S,
    ) -> RunStatus:
        """Block until every job is final (done, failed or cancelled); raise WaitTimeoutError
        after ``timeout`` s. ``progress``: a bar on a terminal, else a line every ``line_every_s``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        status = self.status()
        with Progress(status, enabled=progress, stream=stream, line_every_s=line_every_s) as shown:
            while True:
                shown.show(status)
                if status.is_finished:
                    return status
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeoutError(f"run {self.run_id} not finished after {timeout} s: {status}")
                time.sleep(poll_s)
                status = self.status()

    def cancel(self) -> int:
        """Cancel the run: queued jobs end ``cancelled`` without being generated (workers drop
        their messages), running ones finish. Returns how many jobs were cancelled now."""
        return self._store.cancel(self.run_id)

    def span(self) -> tuple[float, float] | None:
        """When its first job started and its last one finished, done or failed (None: none
        started yet)."""
        meta = self._store.meta(self.run_id)
        started = meta.get("first_started_at")
        return (
            None
            if started is None
            else (started, max(meta.get(f"last_{end}_at", started) for end in ("done", "failed")))
        )

    def results(self, state: JobState | None = None, *, ordered: bool = False) -> Iterator[JobResult]:
        """Per-job state, storage key or failure reason, streamed; optionally one state only.
        ``ordered``: by job index, through temporary files on local disk (memory stays flat
        whatever the run's size); else in Redis' order, at once."""
        results = (result for result in self._store.results(self.run_id) if state is None or result.state == state)
        if not ordered:
            yield from results
            return
        with tempfile.TemporaryDirectory(prefix="deepqueue-results-") as folder:
            buckets = Buckets(Path(folder), RESULTS_SPAN)
            for result in results:
                buckets.add(
                    "r", result.job_id, json.dumps([result.state.value, result.key, result.reason, result.details])
                )
            for bucket in buckets.ids():
                for _, job_id, payload in sorted(buckets.read(bucket), key=lambda line: sort_key(line[1])):
                    state_value, key, reason, details = json.loads(payload)
                    yield JobResult(job_id, JobState(state_value), key, reason, details)
