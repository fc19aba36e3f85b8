"""Per-process worker state: the settings (set before the pool forks) and the warm executor.

The pipeline is built in each pool process after it starts: CUDA does not survive fork, and
neither do boto3 clients.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from producer.state import RunStore
from worker.executor import BatchExecutor, Delivery
from worker.settings import WorkerSettings
from worker.storage import LocalStorage, S3Storage, Storage

logger = logging.getLogger(__name__)

_settings: WorkerSettings | None = None
_executor: BatchExecutor | None = None


def configure(settings: WorkerSettings) -> None:
    global _settings
    _settings = settings


def settings() -> WorkerSettings:
    if _settings is None:
        raise RuntimeError("worker settings not configured: build the app with worker.app.create_app")
    return _settings


def make_storage(settings: WorkerSettings) -> Storage:
    if settings.storage == "s3":
        return S3Storage.connect(settings.s3_bucket, settings.s3_endpoint_url)
    return LocalStorage(settings.output_dir)


def build_executor(settings: WorkerSettings) -> BatchExecutor:
    from worker.engine import Engine

    return BatchExecutor(
        Engine.load(settings), make_storage(settings), RunStore.from_url(settings.result_backend), settings
    )


class PipelineUnavailable(RuntimeError):
    """This process could not build its pipeline, storage or state client: no batch can run."""


_init_error: str | None = None


def init_process(**_: Any) -> None:
    """``worker_process_init`` handler: warm the pipeline before the first batch arrives.

    Celery swallows exceptions of signal handlers, so a failure is kept and reported by the
    first batch (the consumer then stops this worker).
    """
    global _executor, _init_error
    try:
        _executor = build_executor(settings())
    except Exception as error:  # any: the cause goes back with the first batch
        logger.critical("cannot build the pipeline: %r", error, exc_info=True)
        _init_error = f"{type(error).__name__}: {error}"


def execute_batch(deliveries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run in a pool process: one batch in, one outcome per delivery out (picklable both ways)."""
    if _executor is None and _init_error is None:  # pools that send no worker_process_init (solo)
        init_process()
    if _executor is None:
        raise PipelineUnavailable(_init_error)
    outcomes = _executor.execute([Delivery(**delivery) for delivery in deliveries])
    return [asdict(outcome) for outcome in outcomes]
