"""The Python client: submit runs of prompts, follow them, read their results."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from tqdm import tqdm

from producer.contract import DEAD_LETTERS_KEY, WORKER_GONE_S, WORKERS_KEY
from producer.enqueue import publish
from producer.errors import PromptFileError, RecipeMismatchError, RunNotFoundError, WaitTimeoutError
from producer.job import (
    Job,
    check_rows,
    grouped_by_shape,
    make_jobs,
    recipe_differences,
    run_defaults,
    run_recipe,
    validated,
)
from producer.settings import ClientSettings, redact_url
from producer.sources import Rows, Source
from producer.state import JobResult, JobState, RunStatus, RunStore

#: Jobs marked queued and published per chunk: bounds memory and round trips alike.
SUBMIT_CHUNK = 5000


def new_run_id() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def chunked(items: Iterable[Job | list[tuple[str, str]]], size: int) -> Iterator[list[Job]]:
    """Checked jobs in lists of ``size``; a problem here means the source changed since it was checked."""
    chunk: list[Job] = []
    for item in items:
        if not isinstance(item, Job):
            where, message = item[0]
            raise PromptFileError(f"{where}: {message}: the input changed while it was being submitted")
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def live_workers(broker: redis.Redis, since: float) -> set[str]:
    """Workers that renewed their leases after ``since`` (see worker.leases)."""
    return {name.decode() for name, at in broker.hgetall(WORKERS_KEY).items() if float(at) > since}


def run_id_or_new(run: str | None) -> str:
    """``run``, or a generated name when none is given. An empty name is not "none": it is
    refused by the job contract, so an unset shell variable cannot start a new run."""
    return new_run_id() if run is None else run


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
        return RunStatus(self.run_id, self._store.counts(self.run_id))

    def wait(self, *, progress: bool = False, timeout: float | None = None, poll_s: float = 0.5) -> RunStatus:
        """Block until every job is done or failed; raise WaitTimeoutError after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        status = self.status()
        # initial: the rate counts what finishes while waiting, not what had finished before.
        with tqdm(
            total=status.total, initial=status.finished, unit="img", desc=self.run_id, disable=not progress
        ) as bar:
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
        self._store = RunStore.from_url(self.settings.result_backend)
        self._broker_client: redis.Redis | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._broker_client is not None:
            self._broker_client.close()
        self._store.close()

    def prepare(self, source: Source, *, run: str | None = None, seed: int | None = None, **defaults: Any) -> list[Job]:
        """Validate ``source`` into jobs without sending anything (raises InvalidJobError)."""
        return make_jobs(Rows(source), run_id=run_id_or_new(run), defaults=run_defaults(defaults), run_seed=seed)

    def submit(
        self,
        source: Source,
        *,
        run: str | None = None,
        seed: int | None = None,
        progress: bool = False,
        resend_queued: bool = False,
        allow_recipe_change: bool = False,
        **defaults: Any,
    ) -> Run:
        """Validate every job, then enqueue them; nothing is sent if any job is invalid.

        ``source`` is a prompt file (.txt, .jsonl, .csv, .tsv, .json, .parquet; the text ones
        also .gz) or an iterable of prompts, dicts or Jobs; ``defaults`` are run-wide Job fields
        (height, width, steps, guidance, ...) that rows may override. Memory stays constant
        whatever the size: the rows are read twice, once to check them all and once to send
        them in chunks (an iterable that can be read only once is spooled to a temporary file).
        Within a chunk, jobs of one shape are sent together, so workers fill their batches.
        Submitting a run again sends only its new and failed jobs, and with ``resend_queued``
        also the queued ones (after the queue itself was lost).

        A run keeps the recipe it was first submitted with (``defaults`` and ``seed``): a later
        submit of the same run with other ones raises RecipeMismatchError naming each
        difference, since its jobs would be a second set beside the first rather than the same
        jobs again. ``allow_recipe_change=True`` adds them to the run all the same (a sweep of
        settings under one run name). New rows with the same recipe are always welcome.
        """
        run_id, run_wide = run_id_or_new(run), run_defaults(defaults)
        rows = Rows(source)
        total = check_rows(rows, run_id=run_id, defaults=run_wide, run_seed=seed)
        self._check_recipe(run_id, run_recipe(run_wide, run_id=run_id, run_seed=seed), allow_recipe_change)
        resend = {None, JobState.FAILED} | ({JobState.QUEUED} if resend_queued else set())
        sent = 0
        with tqdm(total=total, unit="job", desc="enqueue", disable=not progress) as bar:
            for chunk in chunked(validated(rows, run_id=run_id, defaults=run_wide, run_seed=seed), SUBMIT_CHUNK):
                states = self._store.states(run_id, [job.job_id for job in chunk])
                to_send = [job for job, state in zip(chunk, states, strict=True) if state in resend]
                self._send(run_id, grouped_by_shape(to_send))
                sent += len(to_send)
                bar.update(len(chunk))
        return Run(run_id, self._store, submitted=sent, skipped=total - sent)

    def retry(self, run_id: str, *, progress: bool = False, gone_after_s: float = WORKER_GONE_S) -> Run:
        """Send again every job of ``run_id`` that is not done: queued (its message may have been
        lost: a purged queue, a Redis restarted without its data), failed, or running on a worker
        that is gone (no lease renewal for ``gone_after_s``). Jobs running on a live worker are
        left to it. A queued job whose message is still in the queue runs once all the same: a
        worker skips a job that is already done, and outputs are written once.
        """
        self.run(run_id)  # RunNotFoundError if there is no such run
        alive = live_workers(self._broker(), time.time() - gone_after_s)
        chosen = [
            result.job_id
            for result in self._store.results(run_id)
            if result.state is not JobState.DONE
            and not (result.state is JobState.RUNNING and result.details.get("worker") in alive)
        ]
        sent = unkept = 0
        with tqdm(total=len(chosen), unit="job", desc="resend", disable=not progress) as bar:
            for start in range(0, len(chosen), SUBMIT_CHUNK):
                chunk = chosen[start : start + SUBMIT_CHUNK]
                payloads = self._store.pending(run_id, chunk)
                jobs = [Job.model_validate_json(payload) for payload in payloads if payload is not None]
                self._send(run_id, jobs)
                sent, unkept = sent + len(jobs), unkept + len(chunk) - len(jobs)
                bar.update(len(chunk))
        return Run(run_id, self._store, submitted=sent, skipped=unkept)

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The messages workers dropped as unreadable (not a task, not JSON, ...), newest first:
        task id, reason, time, content type and the body's first bytes as text."""
        return [json.loads(raw) for raw in self._broker().lrange(DEAD_LETTERS_KEY, 0, limit - 1)]

    def _broker(self) -> redis.Redis:
        if self._broker_client is None:
            self._broker_client = redis.Redis.from_url(
                self.settings.broker_url, socket_timeout=30, socket_connect_timeout=10
            )
        return self._broker_client

    def _send(self, run_id: str, jobs: list[Job]) -> None:
        """Publish ``jobs``, then mark them queued. A chunk that fails to publish is not marked,
        so sending again sends it (and never a job that did reach the queue twice, but for the
        part of a failed chunk that was flushed before the failure)."""
        publish(self._broker(), self.settings.queue, jobs)
        self._store.mark_queued(run_id, {job.job_id: job.model_dump_json(exclude_none=True) for job in jobs})

    def _check_recipe(self, run_id: str, recipe: dict[str, Any], allow_change: bool) -> None:
        """Record the run's recipe at its first submit; refuse another one unless allowed."""
        recorded = self._store.claim_recipe(run_id, recipe, add=allow_change)
        if recorded is None or recipe in recorded:  # a run from before recipes were recorded, or the same
            return
        closest = min(recorded, key=lambda earlier: len(recipe_differences(earlier, recipe)))
        raise RecipeMismatchError(run_id, recipe_differences(closest, recipe))

    def run(self, run_id: str) -> Run:
        """A handle on an earlier run (raises RunNotFoundError if it was never submitted)."""
        if not self._store.exists(run_id):
            raise RunNotFoundError(f"no run named {run_id!r} in {redact_url(self.settings.result_backend)}")
        return Run(run_id, self._store)

    def runs(self) -> list[str]:
        return self._store.runs()

    def workers(self, *, gone_after_s: float = WORKER_GONE_S) -> set[str]:
        """The workers that renewed their leases in the last ``gone_after_s`` (serving now)."""
        return live_workers(self._broker(), time.time() - gone_after_s)

    def run_times(self) -> dict[str, float]:
        """Every submitted run and the time of its first submit, oldest first."""
        return dict(self._store.runs_since())
