"""A pool process's side of the worker: its warm pipeline, and the calls the strategy sends it.

The pipeline is built in each pool process after it starts: CUDA does not survive a fork, and
neither do boto3 clients. The main process never imports torch or diffusers (see
``worker.readiness``); this module only names the engine, it does not import it.

The strategy (``worker.delivery.strategy``) sends ``execute_batch`` and ``collect_stored`` through
``pool.apply_async``, which pickles a function by its name: a call arrives with its arguments
only, so each process keeps its one ``PoolProcess`` in ``_process``, set by ``start_process`` (from the
``worker_process_init`` handler, ``worker.runtime.WorkerRuntime.start_pool_process``) and read
by nothing but the calls below. That is the only process state of the worker outside objects
handed to its parts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any

from producer.errors import DeepQueueError
from producer.state import RunStore
from producer.storage import make_storage
from worker import startup
from worker.notifier import Notifier, ObservedReporter
from worker.pipeline.executor import BatchExecutor, Delivery, Outcome
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

#: Longest a ``collect_stored`` call holds the pool process while images are still being stored:
#: short, since a partial batch that comes due meanwhile waits for it.
COLLECT_WAIT_S = 0.25


class PipelineUnavailable(DeepQueueError, RuntimeError):
    """This process could not build its pipeline, storage or state client: no batch can run."""


class PoolProcess:
    """What one process needs to run batches: its executor, or why it has none.

    ``name``: how job records name the worker (None outside a worker); ``report_fd``: where the
    main process listens for the stages and the outcome of the build (``worker.readiness``);
    ``check_storage``: False for a process that replaces one that died, on a worker whose storage
    has already taken writes (an outage now is for the uploads' retries to wait out, not a reason
    to stop the worker).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        name: str | None = None,
        report_fd: int | None = None,
        check_storage: bool = True,
    ) -> None:
        self.settings = settings
        self.name = name
        self.report_fd = report_fd
        self.check_storage = check_storage
        self.executor: BatchExecutor | None = None
        #: delivers the completion webhooks of runs whose last job this process records
        self.notifier = Notifier(settings)
        self.error: str | None = None
        #: what ``build`` reported: pid, error, worker description and load seconds
        self.report: dict[str, Any] = {}

    def build(self) -> None:
        """Build the pipeline before the first batch arrives, and report how it went.

        Celery swallows exceptions of signal handlers, so a failure is kept: it is reported to
        the main process (which refuses to start) and again by any batch sent here.
        """
        started = time.monotonic()
        warm: dict[str, Any] = {}
        try:
            self.executor = self._build_executor()
            warm = self._warm_up(self.executor)
        except Exception as error:  # any: the cause goes to the main process and back with each batch
            logger.critical("cannot build the pipeline: %r", error, exc_info=True)
            self.error = f"{type(error).__name__}: {error}"
        self.report = {
            "pid": os.getpid(),
            "error": self.error,
            "worker": self.executor.worker if self.executor else None,
            "load_s": time.monotonic() - started - warm.get("warm_s", 0.0),  # deepqueue_model_load_seconds
            **warm,
        }
        self._report(self.report)

    def ready_executor(self) -> BatchExecutor:
        if self.executor is None:
            raise PipelineUnavailable(self.error)
        return self.executor

    def close(self) -> None:
        """Store what was generated before the process exits.

        Those jobs end ``done`` in the state store; their messages, never acknowledged, come back
        to a worker that sees them done and only acknowledges them.
        """
        if self.executor is not None:
            self.executor.close()
        self.notifier.stop()

    def _build_executor(self) -> BatchExecutor:
        """Storage first: a missing bucket is found in a second, not after minutes of model
        loading. Each step is reported to the main process before it begins, so a start-up that
        times out names the step it hung in."""
        from worker.pipeline.engine import load_engine  # torch: pool processes only

        settings = self.settings
        if self.check_storage:
            self._report_stage(f"storage {startup.storage_name(settings)} to take the write check object")
            startup.wait_for_storage(settings)
        self._report_stage(f"the model {settings.model} to load")
        engine = load_engine(settings)
        storage = make_storage(settings, check=False)
        reporter = ObservedReporter(RunStore.from_url(settings.result_backend), self.notifier)
        return BatchExecutor(engine, storage, reporter, settings, name=self.name)

    def _warm_up(self, executor: BatchExecutor) -> dict[str, Any]:
        """Compile DEEPQUEUE_WARM_SHAPES before the worker says ready: their seconds and compile counts."""
        from producer.job import Job
        from worker.pipeline.engine import WarmRecipe  # torch: pool processes only

        settings = self.settings
        shapes = settings.warm_shape_list
        if not shapes:
            return {}
        self._report_stage(f"the warm shapes {settings.warm_shapes} to compile")
        recipe = WarmRecipe(
            scheduler=settings.scheduler,
            cache_interval=settings.cache_interval,
            cache_branch=settings.cache_branch,
            guidance=Job.model_fields["guidance"].default,
        )
        return executor.engine.warm_up(shapes, recipe)

    def _report(self, message: dict[str, Any]) -> None:
        if self.report_fd is None:
            return
        try:
            os.write(self.report_fd, json.dumps(message).encode() + b"\n")
        except OSError:  # the main process stopped listening (a replacement process): nothing to tell
            pass

    def _report_stage(self, waiting_for: str) -> None:
        """Tell the main process what this process waits for now (named if start-up times out)."""
        self._report({"pid": os.getpid(), "stage": waiting_for})


_process: PoolProcess | None = None  # this process's, once started (see the module's docstring)


def start_process(process: PoolProcess) -> PoolProcess:
    """Build ``process`` and make it the one this process's pool calls use."""
    global _process
    _process = process
    process.build()
    return process


def shutdown_process(**_: Any) -> None:
    """``worker_process_shutdown`` handler: store what was generated before the process exits."""
    if _process is not None:
        _process.close()


def _ready_executor() -> BatchExecutor:
    if _process is None:
        raise PipelineUnavailable("no pipeline was started in this process")
    return _process.ready_executor()


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


def execute_now(settings: WorkerSettings, deliveries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Generate and store in this process, waiting for every outcome (direct task calls: the
    pipeline is built on the first)."""
    process = _process or start_process(PoolProcess(settings))
    outcomes = process.ready_executor().execute([Delivery(**delivery) for delivery in deliveries])
    return [asdict(outcome) for outcome in outcomes]
