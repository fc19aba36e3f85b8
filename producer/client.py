"""The Python client: submit runs of prompts, follow them, read their results."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

from producer.enqueue import producer_app, publish
from producer.errors import RunNotFoundError, WaitTimeoutError
from producer.job import Job, make_jobs, run_defaults
from producer.settings import ClientSettings
from producer.sources import Source, read_rows
from producer.state import JobResult, JobState, RunStatus, RunStore

#: Jobs marked queued and published per chunk: bounds memory and round trips alike.
SUBMIT_CHUNK = 5000


def new_run_id() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def run_id_or_new(run: str | None) -> str:
    """``run``, or a generated name when none is given. An empty name is not "none": it is
    refused by the job contract, so an unset shell variable cannot start a new run."""
    return new_run_id() if run is None else run


class Run:
    """A handle on one run: its counts, its end, its per-job results."""

    def __init__(self, run_id: str, store: RunStore, *, submitted: int = 0, skipped: int = 0) -> None:
        self.run_id = run_id
        self.submitted = submitted  #: jobs sent by the submit that made this handle
        self.skipped = skipped  #: jobs not sent again because they were running or done
        self._store = store

    def __repr__(self) -> str:
        return f"Run({self.run_id!r})"

    def status(self) -> RunStatus:
        return RunStatus(self.run_id, self._store.counts(self.run_id))

    def wait(self, *, progress: bool = False, timeout: float | None = None, poll_s: float = 0.5) -> RunStatus:
        """Block until every job is done or failed; raise WaitTimeoutError after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        status = self.status()
        with tqdm(total=status.total, unit="img", desc=self.run_id, disable=not progress) as bar:
            while True:
                bar.total = status.total
                bar.set_postfix(failed=status.counts[JobState.FAILED], refresh=False)
                bar.update(status.finished - bar.n)
                if status.is_finished:
                    return status
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeoutError(f"run {self.run_id} not finished after {timeout} s: {status}")
                time.sleep(poll_s)
                status = self.status()

    def results(self, state: JobState | None = None) -> Iterator[JobResult]:
        """Per-job state, storage key or failure reason, streamed; optionally one state only."""
        for result in self._store.results(self.run_id):
            if state is None or result.state == state:
                yield result


class Client:
    """Submit jobs to the deepqueue workers and follow them.

    >>> client = Client("redis://localhost:6379/0")
    >>> run = client.submit(["a red fox", "a blue heron"], height=512, width=768, steps=25)
    >>> run.wait(progress=True)
    """

    def __init__(
        self,
        broker_url: str | None = None,
        result_backend: str | None = None,
        *,
        queue: str | None = None,
        settings: ClientSettings | None = None,
    ) -> None:
        overrides = {"broker_url": broker_url, "result_backend": result_backend, "queue": queue}
        base = settings or ClientSettings()
        self.settings = base.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        self._app = producer_app(self.settings)
        self._store = RunStore.from_url(self.settings.result_backend)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._app.close()

    def prepare(self, source: Source, *, run: str | None = None, seed: int | None = None, **defaults: Any) -> list[Job]:
        """Validate ``source`` into jobs without sending anything (raises InvalidJobError)."""
        return make_jobs(read_rows(source), run_id=run_id_or_new(run), defaults=run_defaults(defaults), run_seed=seed)

    def submit(
        self,
        source: Source,
        *,
        run: str | None = None,
        seed: int | None = None,
        progress: bool = False,
        resend_queued: bool = False,
        **defaults: Any,
    ) -> Run:
        """Validate every job, then enqueue them; nothing is sent if any job is invalid.

        ``source`` is a prompt file (.txt/.jsonl/.csv) or a list of prompts, dicts or Jobs;
        ``defaults`` are run-wide Job fields (height, width, steps, guidance, ...) that rows
        may override. Submitting a run again sends only its new and failed jobs, and with
        ``resend_queued`` also the queued ones (after the queue itself was lost).
        """
        jobs = self.prepare(source, run=run, seed=seed, **defaults)
        run_id = jobs[0].run_id
        resend = {None, JobState.FAILED} | ({JobState.QUEUED} if resend_queued else set())
        sent = 0
        with tqdm(total=len(jobs), unit="job", desc="enqueue", disable=not progress) as bar:
            for start in range(0, len(jobs), SUBMIT_CHUNK):
                chunk = jobs[start : start + SUBMIT_CHUNK]
                states = self._store.states(run_id, [job.job_id for job in chunk])
                to_send = [job for job, state in zip(chunk, states, strict=True) if state in resend]
                # Publish first, then mark: a chunk that fails to publish is not marked, so
                # submitting again sends it (and never a job that did reach the queue twice,
                # but for the part of a failed chunk that was flushed before the failure).
                publish(self._app, to_send)
                self._store.mark_queued(run_id, [job.job_id for job in to_send])
                sent += len(to_send)
                bar.update(len(chunk))
        return Run(run_id, self._store, submitted=sent, skipped=len(jobs) - sent)

    def run(self, run_id: str) -> Run:
        """A handle on an earlier run (raises RunNotFoundError if it was never submitted)."""
        if not self._store.exists(run_id):
            raise RunNotFoundError(f"no run named {run_id!r} in {self.settings.result_backend}")
        return Run(run_id, self._store)

    def runs(self) -> list[str]:
        return self._store.runs()
