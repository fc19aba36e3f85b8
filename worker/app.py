"""The Celery app of a worker: JSON only, acks late, one batching task; its bootsteps make and hold
the worker's state (``worker.runtime``)."""

from __future__ import annotations

from functools import cache
from typing import Any

from celery import Celery, Task, signals

from producer.contract import TASK_NAME, celery_config
from producer.message import unpack
from worker import logs
from worker.delivery.transport import worker_broker_settings
from worker.health import MetricsServer
from worker.pipeline import pool
from worker.readiness import PipelineGate
from worker.runtime import Runtime
from worker.settings import WorkerSettings


class GenerateTask(Task):
    """``deepqueue.generate``: a worker batches its messages (see worker.delivery.strategy)."""

    name = TASK_NAME
    Strategy = "worker.delivery.strategy:batching_strategy"
    # acks_late and ignore_result come from the shared settings (task_acks_late, task_ignore_result).
    typing = False  # the worker validates the job itself, with field-level reasons

    def run(self, job: Any, enqueued_at: float | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """Called directly (not through a worker), in this process: the job's outcome, or for a
        prompt batch (``producer.message``) each job's."""
        task_id = self.request.id or "direct"
        entries = unpack(job)
        if entries is None:
            delivery = {"task_id": task_id, "payload": job, "enqueued_at": enqueued_at}
            return pool.execute_now(self.app.settings, [delivery])[0]
        deliveries = [
            {"task_id": f"{task_id}#{position}", "payload": entry, "enqueued_at": enqueued_at}
            for position, entry in enumerate(entries)
        ]
        return pool.execute_now(self.app.settings, deliveries)


class WorkerApp(Celery):
    """Celery's app, holding the worker's settings: its bootsteps build the worker from them."""

    settings: WorkerSettings


def worker_config(settings: WorkerSettings) -> dict[str, Any]:
    """The worker's Celery settings: the base it shares with producers
    (``producer.contract.celery_config``), extended with its transport and what only a worker reads."""
    return {
        **celery_config(settings),
        **worker_broker_settings(settings.broker_url),  # BLMOVE: no message lost between taking and recording it
        "worker_concurrency": 1,  # one pipeline per process; one worker per GPU
        "worker_prefetch_multiplier": settings.prefetch_count,
        "worker_send_task_events": True,
        "worker_consumer": "worker.delivery.consumer:GuardedConsumer",  # no message can stop the worker
        # Pool processes load the pipeline before reporting up: Celery's 4 s default would
        # kill every replacement process of a real model, again and again.
        "worker_proc_alive_timeout": settings.load_timeout_s,
        # A process holds a warm multi-GB pipeline: never recycle it.
        "worker_max_tasks_per_child": None,
    }


def create_app(settings: WorkerSettings) -> WorkerApp:
    app = WorkerApp("deepqueue", set_as_current=False)
    app.settings = settings
    app.conf.update(worker_config(settings))
    app.register_task(GenerateTask())
    app.steps["worker"].add(Runtime)  # the worker's state, before the pool forks; its leases
    app.steps["worker"].add(MetricsServer)  # /metrics, /livez, /readyz from before the pipeline loads
    app.steps["worker"].add(PipelineGate)
    # Celery sets its log handlers up before the pool forks; their lines then carry ids as fields.
    for logging_set_up in (signals.after_setup_logger, signals.after_setup_task_logger):
        logging_set_up.connect(lambda logger, **_: logs.install(settings.log_format, logger), weak=False)
    signals.worker_process_shutdown.connect(pool.shutdown_process, weak=False)
    return app


@cache
def default_app() -> WorkerApp:
    """The app for ``DEEPQUEUE_*`` settings of this environment, built once on first use."""
    return create_app(WorkerSettings())


def __getattr__(name: str) -> Any:
    """``worker.app.app``: what Celery's own tools look for (``celery -A worker.app inspect
    active``, ``celery -A worker.app events``, Flower). Importing the module builds nothing."""
    if name == "app":
        return default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
