"""The Python client: submit runs of prompts, follow them, read their results."""

from __future__ import annotations

import difflib
import itertools
import json
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import redis
from tqdm import tqdm

from producer import fair
from producer.checked import CheckedJobs
from producer.contract import WORKER_GONE_S, serving_workers
from producer.enqueue import Message, messages, push
from producer.entries import Entry, entries, entries_of, make_jobs
from producer.errors import (
    InvalidJobError,
    RecipeMismatchError,
    RunBusyError,
    RunCancelledError,
    RunNotFoundError,
    ShareError,
    export_extra,
)
from producer.job import Job, recipe_differences, run_defaults, run_recipe
from producer.layout import DEAD_LETTERS_KEY, WORKER_QUEUES_KEY, WORKERS_KEY, images_prefix, model_queue, run_prefix
from producer.notify import checked_url
from producer.notify_send import notify_if_due, storage_url
from producer.notify_state import NotifyState, NotifyStore
from producer.packing import grouped_by_shape
from producer.run import Run
from producer.sent import SentJobs, prompts, write_sent
from producer.settings import ClientSettings, redact_url, redis_client
from producer.sources import Rows, Source
from producer.state import JobState, RunStore
from producer.storage import Storage, make_storage
from producer.templates import run_expansion

if TYPE_CHECKING:
    from producer.export import ExportResult

#: Jobs marked queued and published per chunk: bounds memory and round trips alike.
SUBMIT_CHUNK = 5000


def new_run_id() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def chunked(items: Iterable[Entry], size: int) -> Iterator[list[Entry]]:
    """``items`` in lists of ``size``."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def live_workers(broker: redis.Redis, since: float, queue: str | None = None) -> set[str]:
    """Workers that renewed their leases after ``since`` (see worker.delivery.leases); with
    ``queue``, only those that say they serve it."""
    queues = broker.hgetall(WORKER_QUEUES_KEY) if queue else {}
    return serving_workers(broker.hgetall(WORKERS_KEY), queues, since, queue)


def run_id_or_new(run: str | None) -> str:
    """``run``, or a generated name when none is given. An empty name is not "none": it is
    refused by the job contract, so an unset shell variable cannot start a new run."""
    return new_run_id() if run is None else run


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
        self._storage_client: Storage | None = None
        self._notify_client: NotifyStore | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._broker_client is not None:
            self._broker_client.close()
        if self._notify_client is not None:
            self._notify_client.close()
        self._store.close()

    def prepare(
        self,
        source: Source,
        *,
        run: str | None = None,
        seed: int | None = None,
        samples: int | None = None,
        wildcards: str | os.PathLike | None = None,
        **defaults: Any,
    ) -> list[Job]:
        """Validate ``source`` into jobs without sending anything (raises InvalidJobError)."""
        run_id = run_id_or_new(run)
        rows = Rows(source, run_expansion(run_id, seed, samples, wildcards))
        return make_jobs(rows, run_id=run_id, defaults=run_defaults(defaults), run_seed=seed)

    def submit(
        self,
        source: Source,
        *,
        run: str | None = None,
        seed: int | None = None,
        progress: bool = False,
        resend_queued: bool = False,
        allow_recipe_change: bool = False,
        priority: str | None = None,
        weight: float | None = None,
        max_queued: int | None = None,
        samples: int | None = None,
        wildcards: str | os.PathLike | None = None,
        notify: str | None = None,
        **defaults: Any,
    ) -> Run:
        """Validate every job, then enqueue them; nothing is sent if any job is invalid.

        ``source`` is a prompt file (.txt, .jsonl, .csv, .tsv, .json, .parquet; the text ones
        also .gz) or an iterable of prompts, dicts or Jobs; ``defaults`` are run-wide Job fields
        (height, width, steps, guidance, ...) that rows may override. Memory stays constant
        whatever the size: the rows are read once, every job checked before any is sent and kept
        meanwhile in a temporary file about the input's size (``producer.checked``), then sent
        from it in chunks.
        Within a chunk, jobs of one shape are sent together, so workers fill their batches.
        Submitting a run again sends only its new and failed jobs, and with ``resend_queued``
        also the queued ones (after the queue itself was lost).

        A row with a ``template`` (``{"template": "a {red|blue} car at __times__"}``) stands
        for every prompt it expands to, or ``samples`` of them drawn from the run seed;
        ``wildcards`` is the folder of the ``__name__.txt`` files (``producer.templates``).

        A run keeps the recipe it was first submitted with (``defaults`` and ``seed``): a later
        submit of the same run with other ones raises RecipeMismatchError naming each
        difference, since its jobs would be a second set beside the first rather than the same
        jobs again. ``allow_recipe_change=True`` adds them to the run all the same (a sweep of
        settings under one run name). New rows with the same recipe are always welcome.

        ``priority`` (high, normal, low) and ``weight`` set the run's share of the workers
        against other runs (``producer.fair``; ``set_share`` changes them later); None keeps
        what the run has (normal and 1 for a new one). ``max_queued`` caps the run's jobs
        waiting in the queue: the submit sends more as workers take them (Redis holds at most
        that many of its jobs, however large the run).

        ``notify`` (an http or https URL) gets one signed JSON POST when the run ends, finished or
        cancelled (``producer.notify``), from whoever sees the end: a worker, ``cancel``, or this
        submit if the run has ended by the time it is done sending (it then delivers before it
        returns). A run submitted again without ``notify`` keeps the URL it has.
        """
        url = None if notify is None else checked_url(notify)
        fair.checked_share(priority, weight)
        if max_queued is not None and max_queued < 1:
            raise ShareError(f"max_queued must be at least 1, got {max_queued}")
        run_id, run_wide = run_id_or_new(run), run_defaults(defaults)
        rows = Rows(source, run_expansion(run_id, seed, samples, wildcards))
        # With a cap, half of it at a time: the next half is sent while workers take the first.
        chunk_size = min(SUBMIT_CHUNK, max(1, max_queued // 2) if max_queued else SUBMIT_CHUNK)
        with CheckedJobs(entries(rows, run_id=run_id, defaults=run_wide, run_seed=seed)) as checked:
            self._check_not_cancelled(run_id)
            recipe = run_recipe(run_wide, run_id=run_id, run_seed=seed)
            new_recipe = self._check_recipe(run_id, recipe, allow_recipe_change)
            fair.set_share(self._broker(), run_id, priority=priority, weight=weight)
            # The run's end is not notified while this submit sends (its end would come too soon).
            held = self._notify().hold(run_id, url)
            sent = 0
            try:
                with tqdm(total=checked.count, unit="job", desc="enqueue", disable=not progress) as bar:
                    for chunk in chunked(checked, chunk_size):
                        if max_queued is not None:
                            self._wait_for_room(run_id, max_queued - len(chunk), bar)
                        if held and sent:
                            self._notify().hold(run_id)
                        sent += self._claim_and_send(run_id, chunk, resend_queued=resend_queued)
                        bar.update(len(chunk))
            except BaseException:
                if new_recipe and not sent:  # nothing of it was sent: a corrected resubmit may choose again
                    self._store.forget_recipe(run_id, recipe)
                # The hold stays (``HOLD_S``): the end of what was sent is no end while a resubmit may
                # follow; past the hold, a worker's sweep notifies what the run then is.
                raise
        if held:  # workers may have ended the run while it was held: then it is this submit's to notify
            self._notify().unhold(run_id)
            notify_if_due(self._notify(), self._store, self.settings, run_id, "end")
        return Run(run_id, self._store, submitted=sent, skipped=checked.count - sent)

    def retry(self, run_id: str, *, progress: bool = False, gone_after_s: float = WORKER_GONE_S) -> Run:
        """Send again every job of ``run_id`` that is not done: queued (its message may have been
        lost: a purged queue, a Redis restarted without its data), failed, or running on a worker
        that is gone (no lease renewal for ``gone_after_s``). Jobs running on a live worker are
        left to it. A queued job whose message is still in the queue runs once all the same: a
        worker skips a job that is already done, and outputs are written once.
        """
        self.run(run_id)  # RunNotFoundError if there is no such run
        self._check_not_cancelled(run_id)
        alive = live_workers(self._broker(), time.time() - gone_after_s)
        chosen = [
            result.job_id
            for result in self._store.results(run_id)
            if result.state is not JobState.DONE
            and not (result.state is JobState.RUNNING and result.details.get("worker") in alive)
        ]
        return self._resend(run_id, chosen, progress=progress)

    def resume(self, run_id: str, *, progress: bool = False) -> Run:
        """Take back ``cancel``: the run takes jobs again and its cancelled jobs are sent again
        (each as it was first sent), so they run; done, failed and running jobs stay as they are.
        A message of such a job still in the queue runs it once all the same (a worker skips a
        done job; outputs are written once). Raises RunNotFoundError, or RunBusyError for a run
        that is not cancelled."""
        self.run(run_id)
        if not self._store.resume(run_id):
            raise RunBusyError(
                f"run {run_id!r} is not cancelled: nothing to resume (deepqueue retry sends failed jobs)"
            )
        return self._resend(run_id, list(self._store.job_ids(run_id, JobState.CANCELLED)), progress=progress)

    def _resend(self, run_id: str, chosen: list[str], *, progress: bool) -> Run:
        """Send ``chosen`` jobs again as they were first sent (those kept: see ``producer.sent``)."""
        sent = unkept = 0
        kept = self._sent_jobs(run_id)
        with tqdm(total=len(chosen), unit="job", desc="resend", disable=not progress) as bar:
            for start in range(0, len(chosen), SUBMIT_CHUNK):
                chunk = chosen[start : start + SUBMIT_CHUNK]
                found = kept.find(chunk)
                jobs = entries_of(found[job_id] for job_id in chunk if job_id in found)
                self._send(run_id, jobs)
                sent, unkept = sent + len(jobs), unkept + len(chunk) - len(jobs)
                bar.update(len(chunk))
        return Run(run_id, self._store, submitted=sent, skipped=unkept)

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The messages workers dropped as unreadable (not a task, not JSON, ...), newest first:
        task id, reason, time, content type and the body's first bytes as text."""
        return [json.loads(raw) for raw in self._broker().lrange(DEAD_LETTERS_KEY, 0, limit - 1)]

    def _notify(self) -> NotifyStore:
        if self._notify_client is None:
            self._notify_client = NotifyStore.from_url(self.settings.result_backend)
        return self._notify_client

    def notify_state(self, run_id: str) -> NotifyState | None:
        """Where ``run_id``'s completion webhook stands (None: it asked for none)."""
        return self._notify().state(run_id)

    def _broker(self) -> redis.Redis:
        if self._broker_client is None:
            self._broker_client = redis_client(self.settings.broker_url)
        return self._broker_client

    def _wait_for_room(self, run_id: str, most: int, bar: tqdm, poll_s: float = 0.5) -> None:
        """Until at most ``most`` jobs of the run wait in the queue."""
        while (waiting := fair.run_waiting(self._broker(), run_id)) > most:
            bar.set_postfix_str(f"{waiting} queued: waiting for room", refresh=True)
            time.sleep(poll_s)
        bar.set_postfix_str("")

    def _claim_and_send(self, run_id: str, chunk: list[Entry], *, resend_queued: bool) -> int:
        """Claim the chunk's new and failed jobs (and queued ones, with ``resend_queued``), keep
        them in the run's storage (``producer.sent``), then publish what was claimed: of
        producers submitting one run at once, each job is sent once. A write or publish that
        fails gives its claims back, so submitting again sends them (and a
        job whose message was flushed before the failure runs once all the same); where Redis
        is gone for that too, the error says to submit again with ``resend_queued``. Returns
        how many were sent."""
        ids = [entry.job_id for entry in chunk]
        claimed = self._store.claim_queued(run_id, ids, resend_queued=resend_queued)
        to_send = chunk if len(claimed) == len(chunk) else [e for e, i in zip(chunk, ids, strict=True) if i in claimed]
        if not to_send:
            return 0
        try:
            built = self._messages(to_send)
            indexes = [entry.own["index"] for entry in to_send]
            payloads = [message.payload for message in built]
            write_sent(self._storage(), self.settings.s3_prefix, run_id, payloads, min(indexes), max(indexes))
            push(self._broker(), built)
        except BaseException as error:
            try:
                self._store.unclaim(run_id, claimed)
            except redis.RedisError:
                raise redis.ConnectionError(
                    f"{error}; {len(claimed)} jobs of run {run_id!r} are marked queued but may not have been "
                    f"sent: once Redis answers, submit again with --resend-queued (or deepqueue retry {run_id})"
                ) from error
            raise
        return len(to_send)

    def _send(self, run_id: str, jobs: list[Entry]) -> None:
        """Publish ``jobs``, then mark them queued. A chunk that fails to publish is not marked,
        so sending again sends it (and never a job that did reach the queue twice, but for the
        part of a failed chunk that was flushed before the failure)."""
        push(self._broker(), self._messages(jobs))
        self._store.mark_queued(run_id, [entry.job_id for entry in jobs])

    def _messages(self, jobs: list[Entry]) -> list[Message]:
        """``jobs`` as prompt batches (``DEEPQUEUE_PROMPT_BATCH``), each shape's jobs together."""
        return messages(grouped_by_shape(jobs), self.settings.queue, per_message=self.settings.prompt_batch)

    def _check_not_cancelled(self, run_id: str) -> None:
        """A cancelled run takes no more jobs (new or sent again); a deleted one's name starts a new run."""
        meta = self._store.meta(run_id)
        if "deleted_at" in meta:
            self._store.reuse_deleted(run_id)
        elif "cancelled_at" in meta:
            raise RunCancelledError(
                f"run {run_id!r} was cancelled: its jobs would be dropped; resume it first (deepqueue resume "
                f"{run_id}), use another run name, or delete the run (deepqueue delete {run_id})"
            )

    def _check_recipe(self, run_id: str, recipe: dict[str, Any], allow_change: bool) -> bool:
        """Record the run's recipe at its first submit; refuse another one unless allowed.
        True when this call recorded it."""
        before = self._store.recipes(run_id)
        recorded = self._store.claim_recipe(run_id, recipe, add=allow_change)
        if recorded is None or recipe in recorded:  # a run from before recipes were recorded, or the same
            return recorded is not None and recipe not in before
        closest = min(recorded, key=lambda earlier: len(recipe_differences(earlier, recipe)))
        raise RecipeMismatchError(run_id, recipe_differences(closest, recipe))

    def run(self, run_id: str) -> Run:
        """A handle on an earlier run (raises RunNotFoundError if it was never submitted)."""
        if not self._store.exists(run_id):
            close = difflib.get_close_matches(run_id, self._store.runs(), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else " (deepqueue runs lists them)"
            raise RunNotFoundError(f"no run named {run_id!r} in {redact_url(self.settings.result_backend)}{hint}")
        return Run(run_id, self._store)

    def runs(self) -> list[str]:
        return self._store.runs()

    def cancel(self, run_id: str) -> int:
        """Cancel ``run_id`` (see ``Run.cancel``), and drop its messages still waiting in the
        queue (``producer.fair``), which freed their Redis memory; returns how many jobs were
        cancelled now. A run submitted with ``notify`` is notified (event ``cancelled``) before
        this returns, unless its notification was sent already."""
        cancelled = self.run(run_id).cancel()
        fair.drop_run(self._broker(), run_id)
        notify_if_due(self._notify(), self._store, self.settings, run_id, "cancel")
        return cancelled

    def delete(self, run_id: str, *, outputs: bool = False, force: bool = False) -> int:
        """Forget ``run_id``: its state in Redis, and with ``outputs`` its objects in storage
        (returns how many). A run with queued or running jobs is refused unless ``force``, which
        cancels it first; its messages still queued are dropped by the workers, and a batch in
        flight stores nothing that stays (see ``RunStore.delete``). The name can then be
        submitted again as a new run. A run deleted before (for 7 days) is not an error: with
        ``outputs``, its files are removed (again)."""
        if self._store.deleted(run_id):
            return self._delete_outputs(run_id) if outputs else 0
        status = self.run(run_id).status()
        busy = status.counts[JobState.QUEUED] + status.counts[JobState.RUNNING]
        if busy and not force:
            raise RunBusyError(
                f"run {run_id!r} has {busy} queued or running jobs: cancel it first (deepqueue cancel), "
                f"or pass force=True (--force)"
            )
        self.cancel(run_id)  # no job of it starts from now on
        # The tombstone before the files: an image stored after this is removed by its worker,
        # one stored before is listed below.
        self._store.delete(run_id)
        fair.forget_share(self._broker(), run_id)
        return self._delete_outputs(run_id) if outputs else 0

    def set_share(self, run_id: str, *, priority: str | None = None, weight: float | None = None) -> fair.Share:
        """Change a run's priority class or weight while it runs: workers use them from the
        next message they take. Raises RunNotFoundError, or ShareError for a value no run can have."""
        fair.checked_share(priority, weight)
        self.run(run_id)
        return fair.set_share(self._broker(), run_id, priority=priority, weight=weight)

    def share(self, run_id: str) -> fair.Share:
        """A run's priority class and weight (normal and 1 unless set)."""
        return fair.share(self._broker(), run_id)

    def deleted(self, run_id: str) -> bool:
        """Whether ``run_id`` was deleted (and not submitted again since; tombstones last 7 days)."""
        return self._store.deleted(run_id)

    def _delete_outputs(self, run_id: str) -> int:
        return self._storage().delete_prefix(run_prefix(self.settings.s3_prefix, run_id))

    def prune(self, older_than_s: float, *, outputs: bool = False, dry_run: bool = False) -> list[str]:
        """Delete finished runs first submitted more than ``older_than_s`` ago; returns their
        names. With ``outputs``, also the files of such runs deleted earlier (their tombstones
        last 7 days), whatever their deletion left behind."""
        cutoff = time.time() - older_than_s
        chosen = [
            run_id
            for run_id, since in self._store.runs_since()
            if since < cutoff and self._store.status(run_id).is_finished
        ]
        if outputs:
            chosen += [run_id for run_id, since in self._store.deleted_since() if since < cutoff]
        if not dry_run:
            for run_id in chosen:
                self.delete(run_id, outputs=outputs)
        return chosen

    def outputs_url(self, run_id: str) -> str:
        """Where the run's images and sidecars are: ``s3://bucket/prefix/run/images/`` or a folder."""
        return storage_url(self.settings, images_prefix(self.settings.s3_prefix, run_id))

    def _storage(self) -> Storage:
        """The run's storage, made once per client (a boto3 client takes ~0.1 s to make)."""
        if self._storage_client is None:
            self._storage_client = make_storage(self.settings, check=False)
        return self._storage_client

    def _sent_jobs(self, run_id: str) -> SentJobs:
        return SentJobs(self._storage(), self.settings.s3_prefix, run_id)

    def prompts(self, run_id: str, job_ids: list[str]) -> list[str | None]:
        """The prompts of these jobs, from the jobs as a submit kept them (``producer.sent``);
        None for a job no submit of this client's kind sent (a plain Celery producer's)."""
        return prompts(self._sent_jobs(run_id).find(job_ids), job_ids)

    def workers(self, *, queue: str | None = None, gone_after_s: float = WORKER_GONE_S) -> set[str]:
        """The workers that renewed their leases in the last ``gone_after_s`` (serving now); with
        ``queue``, those serving it (``model_queue``)."""
        return live_workers(self._broker(), time.time() - gone_after_s, queue)

    def model_queue(self, model: str | None) -> str:
        """The queue of the workers serving model alias ``model`` (None: the plain queue)."""
        return model_queue(self.settings.queue, model)

    def run_queue(self, run_id: str) -> str:
        """The queue of the workers that serve ``run_id``: its model's, as its first recipe names it."""
        recipes = self._store.recipes(run_id)
        return self.model_queue(recipes[0].get("model") if recipes else None)

    def run_times(self) -> dict[str, float]:
        """Every run and the time of its first submit (or, for a run no client submitted, of its
        first job's start), oldest first."""
        return dict(self._store.runs_since())

    def manifest(self, run_id: str, *, progress: bool = False) -> dict[str, Any]:
        """Compact ``run_id``'s manifest from the workers' parts, its sidecars and its job states:
        Parquet shards ``{prefix}/{run}/manifest/manifest-00000.parquet`` ... (one row per done
        image, every sidecar field) and ``{prefix}/{run}/stats.json``, which it returns. Memory
        stays flat whatever the run's size (see ``producer.manifest``). Needs the ``export`` extra."""
        self.run(run_id)  # RunNotFoundError if there is no such run
        with export_extra():
            from producer.manifest import compact

            storage = self._storage()
            return compact(
                self._store,
                storage,
                self.settings.s3_prefix,
                run_id,
                progress=progress,
                duplicate_threshold=self.settings.duplicate_threshold,
            )

    def export(
        self,
        run_id: str,
        format: str,
        to: str | os.PathLike | None = None,
        *,
        shard_size: int = 10_000,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = False,
    ) -> ExportResult:
        """Export ``run_id`` as ``format`` (``parquet``, ``imagefolder`` or ``webdataset``) to
        ``to``: ``s3://bucket/prefix`` (on the run's S3 endpoint), a folder, or by default
        ``{prefix}/{run}/exports/{format}/`` beside the run. Streamed shard by shard from the
        manifest, which is compacted first when it is missing or stale; ``shard_size`` images
        per shard. The target must be empty unless ``overwrite``, or hold this export stopped
        half-way with ``resume`` (its complete shards are kept). Needs the ``export`` extra."""
        self.run(run_id)
        with export_extra():
            from producer.export import export
            from producer.export_target import resolve_target

            storage, prefix = self._storage(), self.settings.s3_prefix
            target = resolve_target(
                to, format, run_id=run_id, storage=storage, prefix=prefix, endpoint_url=self.settings.s3_endpoint_url
            )
            return export(
                self._store,
                storage,
                prefix,
                run_id,
                format,
                target,
                shard_size=shard_size,
                overwrite=overwrite,
                resume=resume,
                progress=progress,
                duplicate_threshold=self.settings.duplicate_threshold,
            )

    def audit(self, run_id: str, *, sample: int = 16, timeout: float | None = None, progress: bool = False) -> dict:
        """Regenerate ``sample`` of ``run_id``'s done images with DeepCache off, same seeds and
        settings (the twin run ``{run}.audit``, on the workers), compare each pair by PSNR and
        SSIM, and write them into the run's manifest (``audit_*`` columns) and ``audit.json``,
        whose summary it returns. Waits for the twins (``timeout``: WaitTimeoutError). Needs the
        ``export`` extra (numpy, pillow, pyarrow). See ``producer.audit``."""
        run = self.run(run_id)
        if sample < 1:
            raise InvalidJobError([("audit", f"sample: at least 1 job, got {sample}")])
        with export_extra():
            from producer.audit import audit_run

            summary = audit_run(
                run,
                self._storage(),
                self.settings.s3_prefix,
                lambda rows, name: self.submit(rows, run=name),
                size=sample,
                timeout=timeout,
                progress=progress,
            )
        self.manifest(run_id, progress=progress)
        return summary
