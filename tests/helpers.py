"""What several test modules check against: the sidecar's required fields, a local worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The sidecar fields the job contract promises (issue #2), and its timing fields.
SIDECAR_FIELDS = frozenset(
    {"job_id", "run_id", "prompt", "negative_prompt", "seed", "height", "width", "steps", "guidance",
     "scheduler", "model", "deepcache", "batch", "timing", "worker"}
)  # fmt: skip
TIMING_FIELDS = frozenset(
    {"enqueued_at", "started_at", "finished_at", "queue_wait_s", "batch_inference_s", "inference_s",
     "encode_s", "upload_s"}
)  # fmt: skip


def local_worker_settings(model: Path, out: Path, **overrides: Any) -> Any:
    """WorkerSettings for the tiny model on CPU, local storage, independent of DEEPQUEUE_* vars."""
    from worker.settings import WorkerSettings

    fields: dict[str, Any] = dict(
        model=str(model),
        device="cpu",
        max_batch=4,
        scheduler="ddim",
        cache_interval=3,
        cache_branch=0,
        storage="local",
        output_dir=out,
        s3_prefix="",
    )
    return WorkerSettings(**{**fields, **overrides})
