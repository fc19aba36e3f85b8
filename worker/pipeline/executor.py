"""The body of a batch, shared by the Celery worker and embedded mode.

check -> skip finished -> group -> generate -> (background) encode + upload -> report. Every job
ends with its own outcome: one bad job never fails the others in its batch. ``submit`` returns
once the device is free again; the images are stored by a bounded ``Backlog`` while the next
batch generates, and their outcomes come from ``collect`` only after image, sidecar and state
are all written.

A batch that fails runs again in parts: in halves after an out-of-memory error (the allocator
emptied first), down to single images, else one job at a time. Uploads that fail for a reason
that passes are retried in the background (``worker.output.store_retry``) for up to ``store_retry_s``;
meanwhile the full backlog holds the next batch back.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from pydantic import ValidationError

from producer.job import Job, format_errors, is_run_id
from producer.layout import CONTENT_TYPES, EXTENSIONS, image_key, sidecar_key
from producer.loras import describe
from producer.manifest_parts import manifest_row
from producer.state import JobResult, JobState
from producer.storage import Storage
from worker.delivery.batching import BatchBuffer, BatchKey, batch_key
from worker.output.backlog import Backlog
from worker.output.encode import encode_image
from worker.output.manifest_writer import ManifestWriter
from worker.output.sidecar import BatchInfo, build_sidecar, s3_metadata
from worker.output.store_retry import RetriesExhausted, StoreInterrupted, StoreRetry
from worker.pipeline.engine import Engine, is_out_of_memory
from worker.pipeline.generated import Generated
from worker.pipeline.scores import BatchScores, ScoreModels, Scorer, wanted
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


class Reporter(Protocol):
    """Where job states go: ``producer.state.RunStore`` in the worker."""

    def mark(
        self,
        run_id: str,
        job_id: str,
        state: JobState,
        *,
        key: str | None = None,
        reason: str | None = None,
        worker: str | None = None,
    ) -> bool: ...

    def get(self, run_id: str, job_id: str) -> JobResult | None: ...

    def deleted(self, run_id: str) -> bool: ...

    def add_gpu_seconds(self, run_id: str, seconds: float) -> None: ...


@dataclass(frozen=True)
class Delivery:
    """One job as it arrived: the raw fields are validated here, not trusted."""

    task_id: str
    payload: Any
    enqueued_at: float | None = None
    received_at: float | None = None


@dataclass(frozen=True)
class Outcome:
    task_id: str
    ok: bool
    job_id: str | None = None
    key: str | None = None  # the image's URL when ok
    reason: str | None = None  # why it failed
    batch_size: int = 0  # images in the pipeline call that made it (0: none ran)
    retry: bool = False  # not decided here (its state could not be recorded): deliver it again
    skipped: str | None = None  # why nothing was generated: "done" (an earlier delivery) or "cancelled"
    error: str | None = None  # the kind of error that failed it or sends it back (worker.metrics.ERROR_KINDS)
    seconds: dict[str, float] = field(default_factory=dict, compare=False)  # its image's stage times, for metrics


@dataclass(frozen=True)
class BatchCall:
    """One pipeline call, for metrics: its size and seconds, or the kind of error it raised
    (the batch then ran again in parts)."""

    size: int
    seconds: float | None = None
    error: str | None = None
    compiles: dict[str, int] = field(default_factory=dict)  # compile counts it caused (worker.pipeline.acceleration)


#: Pipeline calls kept for ``take_calls`` at most (embedded mode never takes them).
KEPT_CALLS = 1024


def stage_seconds(timing: dict[str, Any]) -> dict[str, float]:
    """A sidecar's timing as the per-image stage times of ``worker.metrics`` (queue wait when known)."""
    stages = {"queue_wait": timing["queue_wait_s"], "encode": timing["encode_s"], "upload": timing["upload_s"]}
    return {stage: seconds for stage, seconds in stages.items() if seconds is not None}


def ids(job: Job, batch: BatchInfo | None = None) -> dict[str, str]:
    """The fields a log line about ``job`` carries (see ``worker.logs``)."""
    return {"run_id": job.run_id, "job_id": job.job_id, **({"batch_id": batch.id} if batch else {})}


def parse_job(payload: Any) -> tuple[Job | None, str | None]:
    """``(job, None)`` or ``(None, reason)``."""
    try:
        return Job.model_validate(payload), None
    except ValidationError as error:
        return None, "invalid job: " + "; ".join(format_errors(error))


def model_problem(job: Job, alias: str | None) -> str | None:
    """Why a worker serving model ``alias`` must not run ``job``, or None: a job that names a
    model runs only on its workers (it reached this one by hand, not through its model's queue)."""
    if job.model is None or job.model == alias:
        return None
    serves = f"model {alias!r}" if alias else "no model alias (the plain queue)"
    return f"the job asks for model {job.model!r}; this worker serves {serves}"


def score_models(settings: WorkerSettings, engine: Any) -> ScoreModels:
    """Where the score models come from and the device they run on: the pipeline's (CPU for a
    simulated engine), in float16 on CUDA."""
    device = getattr(engine, "device", "cpu")
    device = device if device.startswith(("cuda", "cpu", "mps", "xpu")) else "cpu"
    dtype = None
    if device.startswith("cuda"):
        import torch

        dtype = torch.float16
    return ScoreModels(settings.clip_model, settings.safety_checker, device=device, dtype=dtype)


def _score_keys(request: frozenset[str]) -> list[str]:
    from worker.pipeline.scores import SCORE_KEYS

    return [SCORE_KEYS[name] for name in request]


class BatchExecutor:
    def __init__(
        self, engine: Engine, storage: Storage, reporter: Reporter, settings: WorkerSettings, *, name: str | None = None
    ) -> None:
        self.engine = engine
        self.storage = storage
        self.reporter = reporter
        self.settings = settings
        self.defaults = settings.recipe_defaults()
        # name: the worker in running records (whether it is alive) and sidecars (which one made it)
        self.name = name or socket.gethostname()
        self.worker = {"hostname": socket.gethostname(), "name": self.name, **engine.describe()}
        # The sidecar's model: the fingerprint, and the alias runs name it by.
        self.model = {**engine.model, "alias": settings.model_alias}
        self.backlog: Backlog[Outcome] = Backlog(settings.store_threads, settings.store_backlog_count)
        self.store_retry = StoreRetry(settings.store_retry_s)
        self.manifest = ManifestWriter(
            storage,
            settings.s3_prefix,
            self.name,
            max_rows=settings.manifest_part_rows,
            max_age_s=settings.manifest_part_age_s,
            deleted=reporter.deleted,
        )
        self.calls: deque[BatchCall] = deque(maxlen=KEPT_CALLS)
        self.scorer = Scorer(score_models(settings, engine), blackout=settings.nsfw_blackout)
        self.scorer.preload(settings.score_set)  # the worker's own scores load with it; a job's on first use

    def execute(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        """Generate and store ``deliveries``, then return their outcomes in order (no overlap)."""
        if self.backlog.pending:
            raise RuntimeError("execute() needs an idle executor: collect() what submit() started first")
        outcomes = {outcome.task_id: outcome for outcome in [*self.submit(deliveries), *self.collect(wait=True)]}
        return [outcomes[delivery.task_id] for delivery in deliveries]

    def submit(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        """Generate ``deliveries`` and queue their images for storing; returns as soon as the
        device is done. The outcomes returned are those decided without storing (invalid,
        already done, refused, failed); every other delivery's comes from ``collect``."""
        outcomes: list[Outcome] = []
        # 1. Check every job again: not every producer is ours.
        ready: list[tuple[Delivery, Job]] = []
        for delivery in deliveries:
            job, problem = parse_job(delivery.payload)
            if job is None:
                outcomes.append(self._fail_unparsed(delivery, problem or "invalid job"))
            elif problem := model_problem(job, self.settings.model_alias):
                outcomes.append(self._fail(delivery, job, problem, kind="unsupported"))
            else:
                ready.append((delivery, job))
        # 2. Skip jobs a previous delivery finished and jobs of cancelled or deleted runs; mark
        #    the rest running.
        pending = []
        for delivery, job in ready:
            if self.reporter.mark(job.run_id, job.job_id, JobState.RUNNING, worker=self.name):
                pending.append((delivery, job))
            else:  # refused: a final job (done, cancelled) or a deleted run's (no record)
                outcomes.append(self._skipped(delivery, job))
        # 3. Group by batch key: the consumer already did, direct callers may not have.
        groups = BatchBuffer[tuple[Delivery, Job]](self.settings.max_batch, 0.0)
        for delivery, job in pending:
            groups.add(batch_key(job, self.defaults), (delivery, job), 0.0)
        for key, items in groups.drain():
            assert isinstance(key, BatchKey)
            outcomes += self._run_group(key, items)
        return outcomes

    def collect(self, wait: bool = False, timeout: float | None = None) -> list[Outcome]:
        """Outcomes of the images stored since the last call (``wait``: until none is pending)."""
        return self.backlog.collect(wait, timeout)

    def take_calls(self) -> list[BatchCall]:
        """The pipeline calls made since the last call (for the worker's metrics)."""
        taken = list(self.calls)
        self.calls.clear()
        return taken

    def close(self) -> None:
        """Finish storing what was generated, without waiting out a storage outage: uploads
        waiting to be retried give up, and their jobs come back with ``retry`` (not failed)."""
        self.store_retry.stop()
        self.backlog.close()
        self.manifest.close()  # the rows of every image stored: a part per run

    def _run_group(self, key: BatchKey, items: list[tuple[Delivery, Job]]) -> list[Outcome]:
        """Generate one batch and queue its images; returns the outcomes decided here."""
        problem = self.engine.check(key)
        if problem:
            return [self._fail(delivery, job, problem, kind="unsupported") for delivery, job in items]
        # Back-pressure: generate only when the images waiting to be stored leave room (while
        # storage is down, they wait until it is back: no new batch runs meanwhile).
        self.backlog.reserve(len(items))
        # 4. Generate; if the batch fails, run it again in parts so only a bad job fails: halves
        #    after running out of memory (8 -> 4 + 4 -> 2 + 2 ...), single jobs after any other error.
        started_at = time.time()
        try:
            generated = self.engine.generate(key, [job for _, job in items])
        except Exception as error:  # any failure of one call: isolate it, keep the cause
            self.backlog.release(len(items))
            out_of_memory = is_out_of_memory(error)
            kind = "out_of_memory" if out_of_memory else "generation"
            self.calls.append(BatchCall(len(items), error=kind))
            if len(items) == 1:
                logger.warning("job %s failed: %r", items[0][1].job_id, error, exc_info=True, extra=ids(items[0][1]))
                what = "out of memory with this job alone" if out_of_memory else "generation failed"
                return [self._fail(items[0][0], items[0][1], f"{what}: {error!r}", kind=kind)]
            if out_of_memory:
                half = (len(items) + 1) // 2
                parts = [items[:half], items[half:]]
                logger.warning(
                    "batch of %d ran out of memory; retrying it as %d + %d",
                    len(items),
                    half,
                    len(items) - half,
                    extra={"jobs": ",".join(job.job_id for _, job in items)},
                )
            else:
                parts = [[item] for item in items]
                logger.warning(
                    "batch of %d failed (%r); retrying its jobs one by one",
                    len(items),
                    error,
                    extra={"jobs": ",".join(job.job_id for _, job in items)},
                )
        else:
            self.calls.append(BatchCall(len(items), generated.seconds, compiles=generated.compiles))
            scores = self._score(items, generated)
            self._queue_stores(key, items, generated, started_at, scores)
            return []
        # Out of the except block, the failed call's frames (and the tensors they held) are gone.
        if out_of_memory:
            self.engine.free_memory()
        return [outcome for part in parts for outcome in self._run_group(key, part)]

    def _score(self, items: list[tuple[Delivery, Job]], generated: Generated) -> BatchScores:
        """4b. The quality scores each job (or this worker) asks for, on the decoded images, in
        one batched pass per score; a failure gives None scores, never a failed job."""
        requests = [wanted(job.scores, self.settings.score_set) for _, job in items]
        try:
            return self.scorer.score(generated.images, [job.prompt for _, job in items], requests)
        except Exception as error:  # Scorer catches per score; this is the last guard for the images
            logger.error("scoring a batch of %d failed: %r; its scores are null", len(items), error, exc_info=True)
            return BatchScores([{name: None for name in _score_keys(request)} for request in requests])

    def _queue_stores(
        self,
        key: BatchKey,
        items: list[tuple[Delivery, Job]],
        generated: Generated,
        started_at: float,
        scores: BatchScores | None = None,
    ) -> None:
        """5. In the background: encode, upload image then sidecar, report."""
        scores = scores or BatchScores([{} for _ in items])
        batch = BatchInfo(
            id=uuid.uuid4().hex[:12],
            job_ids=tuple(job.job_id for _, job in items),
            inference_s=generated.seconds,
            started_at=started_at,
            loras=tuple(generated.loras),
            lora_timing=generated.lora_timing,
            scores_s=scores.seconds,
        )
        logger.info(
            "batch %s: %d x %dx%d, %d steps, deepcache %s: %.2f s%s",
            batch.id,
            batch.size,
            key.width,
            key.height,
            key.steps,
            f"{key.cache_interval}/{key.cache_branch}" if key.deepcache else "off",
            generated.seconds,
            f", scores {scores.seconds:.2f} s" if scores.seconds else "",
            extra={
                "run_id": ",".join(sorted({job.run_id for _, job in items})),
                "batch_id": batch.id,
                "batch_size": batch.size,
                "inference_s": round(generated.seconds, 4),
                "scores_s": round(scores.seconds, 4),
                "jobs": ",".join(batch.job_ids),
                **({"loras": describe(key.loras)} if key.loras else {}),
            },
        )
        for (delivery, job), image, image_scores in zip(items, generated.images, scores.images, strict=True):
            self.backlog.submit(
                partial(self._store, delivery, job, key, image, batch, image_scores),
                partial(self._unrecorded, delivery, job),
            )

    def _store(
        self,
        delivery: Delivery,
        job: Job,
        key: BatchKey,
        image: Any,
        batch: BatchInfo,
        scores: dict[str, Any] | None = None,
    ) -> Outcome:
        """Encode and upload one image and its sidecar, then record it done. A run deleted
        meanwhile keeps nothing: nothing is stored once its tombstone is there, and what was
        stored as it came is removed (its delete lists the files only after the tombstone)."""
        if self.reporter.deleted(job.run_id):
            return self._skipped(delivery, job)
        # The image's share of its pipeline call, counted before its state (a run's last job
        # recorded has its share in the run's total).
        self.reporter.add_gpu_seconds(job.run_id, batch.inference_s / batch.size)
        retry = self.store_retry.job()  # both uploads share the job's retry budget

        def upload(at: str, body: bytes, content_type: str, metadata: dict[str, str]) -> bool:
            return retry.call(partial(self.storage.put, at, body, content_type=content_type, metadata=metadata))

        try:
            began = time.perf_counter()
            data = encode_image(
                image, job.format, webp_quality=self.settings.webp_quality, jpeg_quality=self.settings.jpeg_quality
            )
            encoded = time.perf_counter()
            image_at = image_key(self.settings.s3_prefix, job.run_id, job.job_id, EXTENSIONS[job.format])
            url = self.storage.url(image_at)
            metadata = s3_metadata(job, self.model)
            wrote = upload(image_at, data, CONTENT_TYPES[job.format], metadata)
            uploaded = time.perf_counter()
            timing = {
                "enqueued_at": delivery.enqueued_at,
                "received_at": delivery.received_at,
                "started_at": batch.started_at,
                "finished_at": time.time(),
                "queue_wait_s": None if delivery.enqueued_at is None else batch.started_at - delivery.enqueued_at,
                "batch_inference_s": batch.inference_s,
                "inference_s": batch.inference_s / batch.size,
                "encode_s": encoded - began,
                "upload_s": uploaded - encoded,
                **batch.lora_timing,  # lora_load_s, lora_switch_s: where adapters were loaded in this process
                "batch_scores_s": batch.scores_s,
                "scores_s": batch.scores_s / batch.size,
            }
            sidecar = build_sidecar(
                job=job,
                key=key,
                image_url=url,
                image_reused=not wrote,
                batch=batch,
                model=self.model,
                worker=self.worker,
                timing=timing,
                scores=scores,
            )
            body = json.dumps(sidecar, indent=1, ensure_ascii=False).encode()
            sidecar_written = upload(sidecar_key(image_at), body, "application/json", metadata)
        except StoreInterrupted as error:  # shutting down during an outage: deliver it again
            logger.warning("job %s: storing %s; it will be delivered again", job.job_id, error, extra=ids(job, batch))
            return Outcome(delivery.task_id, False, job.job_id, reason=f"storing {error}", retry=True, error="storage")
        except RetriesExhausted as error:
            logger.error("storing job %s failed %s", job.job_id, error, extra=ids(job, batch))
            return self._fail(delivery, job, f"storing failed {error}", kind="storage")
        except Exception as error:  # encode or upload: this job alone fails, with the cause
            logger.error("storing job %s failed: %r", job.job_id, error, exc_info=True, extra=ids(job, batch))
            return self._fail(delivery, job, f"storing failed: {error}", kind="storage")
        recorded = self.reporter.mark(job.run_id, job.job_id, JobState.DONE, key=url)
        if not recorded and self.reporter.deleted(job.run_id):
            self._remove(
                [at for at, written in ((image_at, wrote), (sidecar_key(image_at), sidecar_written)) if written]
            )
            return self._skipped(delivery, job)
        # The manifest row, unless the run was deleted meanwhile (not recorded) or an earlier
        # delivery's sidecar stands (compaction reads that one).
        if recorded and sidecar_written:
            row = manifest_row(sidecar, image_at, sidecar_key(image_at), len(data) if wrote else None)
            self.manifest.add(job.run_id, row)
        return Outcome(delivery.task_id, True, job.job_id, url, batch_size=batch.size, seconds=stage_seconds(timing))

    def _remove(self, keys: list[str]) -> None:
        """Remove what this worker stored for a run deleted meanwhile (best effort: a failure is
        logged; ``deepqueue delete RUN --outputs`` removes what is left)."""
        for key in keys:
            try:
                self.storage.delete(key)
            except Exception as error:  # storage trouble: the object stays, the job is dropped all the same
                logger.warning("could not remove %s of a deleted run: %r", key, error)

    def _skipped(self, delivery: Delivery, job: Job) -> Outcome:
        final = self.reporter.get(job.run_id, job.job_id)
        if final is not None and final.state is JobState.DONE:
            return Outcome(delivery.task_id, True, job.job_id, final.key, skipped="done")
        # debug: cancelling a run of millions drops millions of messages
        logger.debug("job %s: its run %s is cancelled or deleted: dropped", job.job_id, job.run_id, extra=ids(job))
        return Outcome(delivery.task_id, True, job.job_id, reason="run cancelled", skipped="cancelled")

    def _unrecorded(self, delivery: Delivery, job: Job, error: BaseException) -> Outcome:
        """A stored job whose state could not be written (Redis down): its message goes back."""
        logger.error(
            "job %s: recording its state failed: %r; it will be delivered again", job.job_id, error, extra=ids(job)
        )
        reason = f"recording state failed: {error!r}"
        return Outcome(delivery.task_id, False, job.job_id, reason=reason, retry=True, error="state")

    def _fail(self, delivery: Delivery, job: Job, reason: str, *, kind: str) -> Outcome:
        self.reporter.mark(job.run_id, job.job_id, JobState.FAILED, reason=reason)
        return Outcome(delivery.task_id, False, job.job_id, reason=reason, error=kind)

    def _fail_unparsed(self, delivery: Delivery, reason: str) -> Outcome:
        """Record a job that is not a Job under its task id, if it names a usable run."""
        run_id = delivery.payload.get("run_id") if isinstance(delivery.payload, dict) else None
        if is_run_id(run_id):
            self.reporter.mark(run_id, delivery.task_id, JobState.FAILED, reason=reason)
        else:
            logger.error("task %s: %s (no run to record it in)", delivery.task_id, reason)
        return Outcome(delivery.task_id, False, None, reason=reason, error="invalid_job")
