"""Per-process worker state: the settings (set before the pool forks) and the warm executor.

The pipeline is built in each pool process after it starts: CUDA does not survive a fork, and
neither do boto3 clients. The main process never imports torch or diffusers (see
``worker.readiness``); this module only names the engine, it does not import it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from producer.errors import DeepQueueError
from producer.state import RunStore
from producer.storage import make_storage
from worker import startup
from worker.executor import BatchExecutor, Delivery, Outcome
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.leases import Leases
    from worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

#: Longest a ``collect_stored`` call holds the pool process while images are still being stored:
#: short, since a partial batch that comes due meanwhile waits for it.
COLLECT_WAIT_S = 0.25

_settings: WorkerSettings | None = None
_executor: BatchExecutor | None = None
_init_error: str | None = None
_report_fd: int | None = None  # where a pool process says whether its pipeline is built
_worker_name: str | None = None  # this worker in job records and leases: node name and main pid
_leases: Leases | None = None  # the main process's leases, for what its broker transport could not deliver
_serving = False  # set in the main process once its first pool process is ready; forks inherit it
_pipeline_report: dict[str, Any] = {}  # what this process reported on building its pipeline
_metrics: WorkerMetrics | None = None  # the main process's metrics (worker.metrics)


def configure(settings: WorkerSettings) -> None:
    """Called in the main process before the pool forks."""
    global _settings
    _settings = settings


def report_to(fd: int) -> None:
    """Pool processes write whether their pipeline is built to ``fd`` (one JSON line each)."""
    global _report_fd
    _report_fd = fd


def name_worker(name: str) -> None:
    """Called in the main process before the pool forks: how job records name this worker."""
    global _worker_name
    _worker_name = name


def worker_name() -> str | None:
    return _worker_name


def keep_leases(leases: Leases) -> None:
    """Called in the main process: the leases that put back what a failed delivery took."""
    global _leases
    _leases = leases


def leases() -> Leases | None:
    return _leases


def mark_serving() -> None:
    """Called in the main process once the worker is ready: pool processes forked from now on
    replace one that died, on a worker whose storage has already shown that it takes writes."""
    global _serving
    _serving = True


def serving() -> bool:
    """Whether the worker is ready: its first pool process built the pipeline (main process)."""
    return _serving


def keep_metrics(metrics: WorkerMetrics) -> None:
    """Called in the main process: the metrics its server exposes."""
    global _metrics
    _metrics = metrics


def metrics() -> WorkerMetrics:
    """The main process's metrics: the served ones, or an unserved set where none were kept."""
    global _metrics
    if _metrics is None:
        from worker.metrics import WorkerMetrics

        _metrics = WorkerMetrics()
    return _metrics


def pipeline_report() -> dict[str, Any]:
    """What ``init_process`` reported: pid, error, worker description and load seconds."""
    return dict(_pipeline_report)


def init_error() -> str | None:
    """Why this process could not build its pipeline, or None."""
    return _init_error


def settings() -> WorkerSettings:
    if _settings is None:
        raise RuntimeError("worker settings not configured: build the app with worker.app.create_app")
    return _settings


def build_executor(settings: WorkerSettings) -> BatchExecutor:
    """Storage first: a missing bucket is found in a second, not after minutes of model loading.
    A process that replaces one that died skips that check: its worker's storage took writes,
    and an outage now (the reason it died, perhaps) is for the uploads' retries to wait out, not
    a reason to stop the worker. Each step is reported to the main process before it begins, so
    a start-up that times out names the step it hung in."""
    from worker.engine import load_engine

    if not _serving:
        _report_stage(f"storage {startup.storage_name(settings)} to take the write check object")
        startup.wait_for_storage(settings)
    _report_stage(f"the model {settings.model} to load")
    engine = load_engine(settings)
    storage = make_storage(settings, check=False)
    return BatchExecutor(engine, storage, RunStore.from_url(settings.result_backend), settings, name=_worker_name)


def warm_up(executor: BatchExecutor, settings: WorkerSettings) -> dict[str, Any]:
    """Compile DEEPQUEUE_WARM_SHAPES before the worker says ready: their seconds and compile counts."""
    from producer.job import Job
    from worker.engine import WarmRecipe

    shapes = settings.warm_shape_list
    if not shapes:
        return {}
    _report_stage(f"the warm shapes {settings.warm_shapes} to compile")
    recipe = WarmRecipe(
        scheduler=settings.scheduler,
        cache_interval=settings.cache_interval,
        cache_branch=settings.cache_branch,
        guidance=Job.model_fields["guidance"].default,
    )
    return executor.engine.warm_up(shapes, recipe)


class PipelineUnavailable(DeepQueueError, RuntimeError):
    """This process could not build its pipeline, storage or state client: no batch can run."""


def init_process(**_: Any) -> None:
    """``worker_process_init`` handler: warm the pipeline before the first batch arrives.

    Celery swallows exceptions of signal handlers, so a failure is kept: it is reported to the
    main process (which refuses to start) and again by any batch sent here.
    """
    global _executor, _init_error, _pipeline_report
    started = time.monotonic()
    warm: dict[str, Any] = {}
    try:
        _executor = build_executor(settings())
        warm = warm_up(_executor, settings())
    except Exception as error:  # any: the cause goes to the main process and back with each batch
        logger.critical("cannot build the pipeline: %r", error, exc_info=True)
        _init_error = f"{type(error).__name__}: {error}"
    _pipeline_report = {
        "pid": os.getpid(),
        "error": _init_error,
        "worker": _executor.worker if _executor else None,
        "load_s": time.monotonic() - started - warm.get("warm_s", 0.0),  # deepqueue_model_load_seconds
        **warm,
    }
    _report(_pipeline_report)


def shutdown_process(**_: Any) -> None:
    """``worker_process_shutdown`` handler: store what was generated before the process exits.

    Those jobs end ``done`` in the state store; their messages, never acknowledged, come back to a
    worker that sees them done and only acknowledges them.
    """
    if _executor is not None:
        _executor.close()


def _report(message: dict[str, Any]) -> None:
    if _report_fd is None:
        return
    try:
        os.write(_report_fd, json.dumps(message).encode() + b"\n")
    except OSError:  # the main process stopped listening (a replacement process): nothing to tell
        pass


def _report_stage(waiting_for: str) -> None:
    """Tell the main process what this process waits for now (named if start-up times out)."""
    _report({"pid": os.getpid(), "stage": waiting_for})


def _ready_executor() -> BatchExecutor:
    if _executor is None and _init_error is None:  # pools that send no worker_process_init (solo)
        init_process()
    if _executor is None:
        raise PipelineUnavailable(_init_error)
    return _executor


def _progress(outcomes: list[Outcome], executor: BatchExecutor) -> dict[str, Any]:
    """What a pool call returns: final outcomes, and the pipeline calls made since (for metrics)."""
    return {
        "finished": [asdict(outcome) for outcome in outcomes],
        "batches": [asdict(call) for call in executor.take_calls()],
    }


def execute_batch(deliveries: list[dict[str, Any]]) -> dict[str, Any]:
    """Run in a pool process: generate one batch, leave its images to the background stores.

    Returns (picklable) the outcomes final so far, this batch's and earlier ones';
    ``collect_stored`` fetches the rest.
    """
    executor = _ready_executor()
    decided = executor.submit([Delivery(**delivery) for delivery in deliveries])
    return _progress(decided + executor.collect(), executor)


def collect_stored() -> dict[str, Any]:
    """Run in a pool process with nothing to generate: the outcomes of images stored since."""
    executor = _ready_executor()
    return _progress(executor.collect(wait=True, timeout=COLLECT_WAIT_S), executor)


def execute_now(deliveries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Generate and store in this process, waiting for every outcome (direct task calls)."""
    outcomes = _ready_executor().execute([Delivery(**delivery) for delivery in deliveries])
    return [asdict(outcome) for outcome in outcomes]
