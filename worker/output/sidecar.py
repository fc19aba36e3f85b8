"""The JSON sidecar written next to every image: its full recipe and timings. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from producer.job import Job
from worker.delivery.batching import BatchKey

SIDECAR_VERSION = 1


@dataclass(frozen=True)
class BatchInfo:
    id: str
    job_ids: tuple[str, ...]  # the composition: the same seed can differ at another batch size
    inference_s: float
    started_at: float
    #: The LoRA adapters the call applied: ``{"id", "scale", "sha256"}`` each (none: the base model).
    loras: tuple[dict[str, Any], ...] = ()
    #: Seconds spent loading and switching them before the call (``worker.pipeline.lora``).
    lora_timing: dict[str, float] = field(default_factory=dict)
    scores_s: float = 0.0  # scoring the batch's images (worker.pipeline.scores), after the pipeline call

    @property
    def size(self) -> int:
        return len(self.job_ids)


def build_sidecar(
    *,
    job: Job,
    key: BatchKey,
    image_url: str,
    image_reused: bool = False,
    batch: BatchInfo,
    model: dict[str, Any],
    worker: dict[str, Any],
    timing: dict[str, float | None],
    scores: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "sidecar_version": SIDECAR_VERSION,
        "job_id": job.job_id,
        "run_id": job.run_id,
        "index": job.index,
        "image": image_url,
        # True when an earlier delivery of this job stored the image (objects are write-once):
        # its pixels may differ slightly from what this batch made.
        "image_reused": image_reused,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "template": job.template,
        "variables": job.variables,
        "seed": job.seed,
        "generator": "torch.Generator('cpu').manual_seed(seed), one per image",
        "height": job.height,
        "width": job.width,
        "steps": job.steps,
        "guidance": job.guidance,
        "scheduler": key.scheduler,
        "format": job.format,
        "model": model,
        "deepcache": {
            "enabled": key.deepcache,
            "interval": key.cache_interval,
            "branch": key.cache_branch if key.deepcache else None,
        },
        "batch": {
            "id": batch.id,
            "size": batch.size,
            "index": batch.job_ids.index(job.job_id),
            "job_ids": list(batch.job_ids),
        },
        "timing": timing,
        "worker": worker,
        "loras": [dict(lora) for lora in batch.loras],
        # What the job (or the worker) asked for: phash, clip_score, nsfw; None where scoring failed.
        "scores": scores or {},
    }


def s3_metadata(job: Job, model: dict[str, Any]) -> dict[str, str]:
    """A few ASCII keys for S3 user metadata (2 KB limit, immutable); never the prompt."""
    return {
        "job-id": job.job_id,
        "run-id": job.run_id,
        "seed": str(job.seed),
        "size": f"{job.width}x{job.height}",
        "model": str(model.get("hash") or model.get("revision") or "")[:64],
    }
