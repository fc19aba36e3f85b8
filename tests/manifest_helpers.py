"""A run's outputs without a pipeline: images, sidecars, job states and manifest parts written the
way the executor writes them (same sidecar builder, same ManifestWriter), for manifest and export
tests that need no torch."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from producer.job import Job
from producer.layout import CONTENT_TYPES, EXTENSIONS, image_key, sidecar_key
from producer.manifest_parts import manifest_row
from producer.state import JobState, RunStore
from producer.storage import Storage
from worker.delivery.batching import RecipeDefaults, batch_key
from worker.output.manifest_writer import ManifestWriter
from worker.output.sidecar import BatchInfo, build_sidecar, s3_metadata

DEFAULTS = RecipeDefaults(model="tiny-test-model", scheduler="ddim", cache_interval=3, cache_branch=0)
MODEL = {"id": "tiny-test-model", "revision": None, "hash": "sha256:0123456789abcdef"}
WORKER = {"hostname": "test-host", "name": "test@host", "device": "cpu", "dtype": "float32"}


def make_jobs(run_id: str, count: int, **fields: Any) -> list[Job]:
    """``count`` jobs of 64x64; every other one with a negative prompt, every third without DeepCache."""
    return [
        Job(
            run_id=run_id,
            index=index,
            prompt=f"a photo of a cat, number {index}",
            seed=1000 + index,
            height=64,
            width=64 + 8 * (index % 2),
            steps=2,
            negative_prompt="blurry" if index % 2 else None,
            cache_interval=1 if index % 3 == 0 else None,
            **fields,
        )
        for index in range(count)
    ]


def png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (width, height), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def store_outputs(
    storage: Storage,
    store: RunStore,
    jobs: Sequence[Job],
    *,
    prefix: str = "",
    part_rows: int = 4,
    image_size: tuple[int, int] | None = None,
    batch_size: int = 2,
    scores: Callable[[Job], dict[str, Any]] | None = None,
) -> ManifestWriter:
    """Store every job's image and sidecar, mark it done, and write its manifest row as the
    executor does (batches of ``batch_size``; ``scores``: each job's sidecar scores); returns the
    closed writer."""
    store.mark_queued(jobs[0].run_id, {job.job_id: job.model_dump_json(exclude_none=True) for job in jobs})
    writer = ManifestWriter(storage, prefix, "test@host", max_rows=part_rows, timer=False)
    for start in range(0, len(jobs), batch_size):
        batch_jobs = jobs[start : start + batch_size]
        began = time.time()
        batch = BatchInfo(f"batch{start:07d}", tuple(job.job_id for job in batch_jobs), 0.5 * len(batch_jobs), began)
        for job in batch_jobs:
            width, height = image_size or (job.width, job.height)
            data = png(width, height, job.seed)
            at = image_key(prefix, job.run_id, job.job_id, EXTENSIONS[job.format])
            storage.put(at, data, content_type=CONTENT_TYPES[job.format], metadata=s3_metadata(job, MODEL))
            timing = {
                "enqueued_at": began - 1.0,
                "received_at": began - 0.5,
                "started_at": began,
                "finished_at": began + 0.5,
                "queue_wait_s": 1.0,
                "batch_inference_s": batch.inference_s,
                "inference_s": batch.inference_s / batch.size,
                "encode_s": 0.01,
                "upload_s": 0.02,
            }
            sidecar = build_sidecar(
                job=job,
                key=batch_key(job, DEFAULTS),
                image_url=storage.url(at),
                batch=batch,
                model=MODEL,
                worker=WORKER,
                timing=timing,
                scores=scores(job) if scores else None,
            )
            body = json.dumps(sidecar, indent=1, ensure_ascii=False).encode()
            storage.put(sidecar_key(at), body, content_type="application/json", metadata={})
            store.mark(job.run_id, job.job_id, JobState.DONE, key=storage.url(at))
            writer.add(job.run_id, manifest_row(sidecar, at, sidecar_key(at), len(data)))
    writer.close()
    return writer
