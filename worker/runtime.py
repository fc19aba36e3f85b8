"""What a worker's main process holds from start to stop, in one object handed to its parts.

``Runtime`` is the worker's first own bootstep. Steps are all built before the pool step forks,
so its ``WorkerRuntime`` (settings, worker name, leases, metrics) is made before any pool
process exists, and every pool process inherits it; the worker keeps it as ``worker.deepqueue``,
where the other steps (``worker.health``, ``worker.readiness``) and the strategy
(``consumer.controller.deepqueue``) find it. The consumer hands the leases to its broker
channels (``worker.delivery.consumer``, ``worker.delivery.transport``).

A pool process builds its own state (``worker.pipeline.pool.PoolProcess``) in the ``worker_process_init``
handler, from what it inherited: the settings, the name, where to report, and whether the worker
was already serving when it forked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from celery import bootsteps, signals

from producer.contract import celery_config
from worker.delivery.leases import Leases
from worker.metrics import QueueDepth, WorkerMetrics
from worker.notifier import SWEEP_S, Notifier
from worker.pipeline import pool
from worker.settings import WorkerSettings


@dataclass(eq=False)
class WorkerRuntime:
    """The state of a worker's main process. ``serving`` and ``report_fd`` are set by
    ``PipelineGate`` (``worker.readiness``), the one step that learns them."""

    settings: WorkerSettings
    #: this worker in job records, leases and taking lists: node name, main pid, a random part
    name: str
    leases: Leases
    metrics: WorkerMetrics
    #: its first pool process built the pipeline; processes forked from now on replace one that died
    serving: bool = False
    #: where pool processes report their pipeline's build (``worker.pipeline.pool.PoolProcess``)
    report_fd: int | None = None
    #: completion webhooks of runs whose end this process records, and the sweep of pending ones
    notifier: Notifier | None = None

    @classmethod
    def create(cls, settings: WorkerSettings, hostname: str) -> WorkerRuntime:
        """A worker's runtime; the name is unique even where two hosts' containers share a node
        name and a pid."""
        name = f"{hostname}:{os.getpid()}:{os.urandom(3).hex()}"
        transport_options = celery_config(settings)["broker_transport_options"]
        leases = Leases(
            settings.broker_url,
            transport_options,
            queue=settings.serving_queue,
            plain_queue=settings.queue,
            name=name,
            renew_s=settings.lease_renew_s,
            expiry_s=settings.lease_expiry_s,
        )
        metrics = WorkerMetrics()
        metrics.describe_worker(settings, {})
        metrics.registry.register(QueueDepth(settings.broker_url, settings.serving_queue, transport_options))
        return cls(settings, name, leases, metrics, notifier=Notifier(settings, sweep_s=SWEEP_S))

    def pool_process(self) -> pool.PoolProcess:
        """The state a pool process starts from, as this process holds it now."""
        return pool.PoolProcess(self.settings, name=self.name, report_fd=self.report_fd, check_storage=not self.serving)

    def start_pool_process(self, **_: Any) -> None:
        """``worker_process_init`` handler, run in a pool process just forked: build its pipeline."""
        pool.start_process(self.pool_process())


class Runtime(bootsteps.StartStopStep):
    """Worker bootstep: makes the ``WorkerRuntime`` (see the module's docstring) and runs its
    lease and notifier threads from after the pool has forked until the worker stops.

    The thread starts after the fork: a thread importing a module while a process forks leaves
    that module's import lock held in the child, which then hangs on its first import of the
    module (seen as a pool process stuck before its storage check, one worker start in ten on a
    loaded machine). The thread's own imports are at module level, so a replacement process forked
    later finds no import in progress."""

    requires = ("celery.worker.components:Pool",)
    label = "Runtime"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        worker.deepqueue = runtime = WorkerRuntime.create(worker.app.settings, worker.hostname)
        signals.worker_process_init.connect(runtime.start_pool_process)  # weak: it lives as long as its worker
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        worker.deepqueue.leases.start()
        worker.deepqueue.notifier.start()

    def stop(self, worker: Any) -> None:
        worker.deepqueue.leases.stop()
        worker.deepqueue.notifier.stop()
