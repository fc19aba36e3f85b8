"""Embedded mode: the worker's batching and executor in one process, no servers, local files."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from producer.job import Job
from producer.layout import EXTENSIONS, image_key, sidecar_key
from producer.state import JobResult, JobState
from producer.storage import LocalStorage
from worker.delivery.batching import BatchBuffer, batch_key
from worker.pipeline.engine import Engine, load_engine
from worker.pipeline.executor import BatchExecutor, Delivery, Outcome
from worker.settings import WorkerSettings


class MemoryReporter:
    """Job states in a dict: what the Redis store does for the queue."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], JobResult] = {}

    def mark(
        self,
        run_id: str,
        job_id: str,
        state: JobState,
        *,
        key: str | None = None,
        reason: str | None = None,
        worker: str | None = None,
    ) -> bool:
        current = self.states.get((run_id, job_id))
        if current is not None and current.state is JobState.DONE:
            return False  # done is final, as in the Redis store
        details = {} if worker is None else {"worker": worker}
        self.states[run_id, job_id] = JobResult(job_id, state, key, reason, details)
        return True

    def get(self, run_id: str, job_id: str) -> JobResult | None:
        return self.states.get((run_id, job_id))

    def deleted(self, run_id: str) -> bool:
        return False  # embedded runs have no delete

    def add_gpu_seconds(self, run_id: str, seconds: float) -> None:
        pass  # embedded mode's summary times the whole run itself


@dataclass
class Summary:
    out_dir: Path
    seconds: float = 0.0
    skipped: int = 0  #: already in the output folder from an earlier run
    images: int = 0
    failed: list[Outcome] = field(default_factory=list)
    batch_sizes: Counter[int] = field(default_factory=Counter)  # size -> number of batches

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        sizes = ", ".join(f"{count} of {size}" for size, count in sorted(self.batch_sizes.items(), reverse=True))
        lines = [
            f"{self.images} images in {sum(self.batch_sizes.values())} batches ({sizes or 'none'}) "
            f"in {self.seconds:.1f} s: {self.images_per_s:.2f} images/s",
            f"files: {self.out_dir}",
        ]
        if self.skipped:
            lines.append(f"skipped {self.skipped} jobs already in {self.out_dir}")
        lines += [f"failed {outcome.job_id or outcome.task_id}: {outcome.reason}" for outcome in self.failed]
        return lines


def run_embedded(
    jobs: Sequence[Job], settings: WorkerSettings, *, progress: bool = True, engine: Engine | None = None
) -> Summary:
    """Generate ``jobs`` into ``settings.output_dir`` with the same code the workers run
    (``engine``: an already loaded one for ``settings.model``, as benchmarks pass)."""
    storage = LocalStorage(settings.output_dir)
    executor = BatchExecutor(engine or load_engine(settings), storage, MemoryReporter(), settings)
    summary = Summary(out_dir=settings.output_dir)
    buffer: BatchBuffer[Job] = BatchBuffer(settings.max_batch, 0.0)
    for job in jobs:
        if storage.exists(sidecar_key(image_key(settings.s3_prefix, job.run_id, job.job_id, EXTENSIONS[job.format]))):
            summary.skipped += 1
        else:
            buffer.add(batch_key(job, executor.defaults), job, 0.0)
    started = time.perf_counter()
    with tqdm(total=len(buffer), unit="img", desc="generate", disable=not progress) as bar:

        def count(outcomes: list[Outcome]) -> None:
            for outcome in outcomes:
                if outcome.ok:
                    summary.images += 1
                else:
                    summary.failed.append(outcome)
            bar.update(len(outcomes))

        # Each batch's images are stored in the background while the next one generates.
        for _, batch in buffer.drain():
            now = time.time()
            deliveries = [Delivery(job.job_id, job.model_dump(mode="json"), now, now) for job in batch]
            count(executor.submit(deliveries) + executor.collect())
            summary.batch_sizes.update({len(batch): 1})
        count(executor.collect(wait=True))
    executor.close()
    summary.seconds = time.perf_counter() - started
    return summary
