"""A worker is ready only once its pool process has built the pipeline, and its main process
stays fork-safe.

CUDA cannot be used in a process forked from one that imported diffusers (measured on an H200:
``Cannot re-initialize CUDA in forked subprocess``), so the main process of a prefork worker must
never import torch, diffusers or transformers; the pipeline lives in the pool process only.
``PipelineGate`` is a worker bootstep that runs after the pool has forked and before the consumer
takes any message: it refuses to start a main process that imported them, waits for Redis (the
broker and the result backend) to answer, and waits for the pool process to report whether its
pipeline is built, so a broken model or device, or a storage or Redis that does not answer, stops
the worker before it says ``ready``, with the reason. Its ``ReadyDeadline`` (``worker.startup``)
ends a worker still not ready after ``load_timeout_s``, naming the step the pool process last
reported.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
from typing import Any

from celery import bootsteps, signals

from producer.settings import redact_url
from worker.health import MetricsServer
from worker.pipeline.pool import start_process
from worker.runtime import Runtime, WorkerRuntime
from worker.startup import ReadyDeadline, StartupCheckFailed, StartupError, wait_for_redis

logger = logging.getLogger(__name__)

#: Modules whose import in the main process would poison the pool's CUDA (or pull in torch).
FORK_UNSAFE_MODULES = ("torch", "diffusers", "transformers", "DeepCache", "accelerate")


def fork_unsafe_imports(modules: dict[str, Any] | None = None) -> list[str]:
    """The modules of FORK_UNSAFE_MODULES imported in this process."""
    modules = sys.modules if modules is None else modules
    return [name for name in FORK_UNSAFE_MODULES if name in modules]


def is_forking_pool(pool: Any) -> bool:
    return type(pool).__module__ == "celery.concurrency.prefork"


class PipelineGate(bootsteps.StartStopStep):
    """Worker bootstep between the pool and the consumer (see the module's docstring)."""

    # The metrics server answers /livez and /readyz (503) while this step waits for the pipeline.
    requires = ("celery.worker.components:Pool", Runtime, MetricsServer)
    label = "PipelineGate"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        # Steps are all built before the pool step forks, so every pool process has the pipe. Its
        # write end stays open here: processes forked later write into a closed pipe, harmlessly.
        runtime: WorkerRuntime = worker.deepqueue
        self.read_fd, runtime.report_fd = os.pipe()
        # Counted from here, before the pool forks; watched from start(), after it has.
        self.deadline = ReadyDeadline(runtime.settings.load_timeout_s, self._give_up)
        self.pool: Any = None
        signals.worker_ready.connect(self._ready)  # weak: this step lives as long as its worker
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        runtime: WorkerRuntime = worker.deepqueue
        settings = runtime.settings
        self.pool = worker.pool
        self.deadline.start()
        try:
            if is_forking_pool(worker.pool):
                self._check_fork_safety()
            self.deadline.waiting_for("Redis (the broker and the result backend) to answer")
            try:
                wait_for_redis(settings)
            except StartupCheckFailed as error:
                raise StartupError(f"{error}; stopping before taking any job") from error
            if is_forking_pool(worker.pool):
                report = self._wait_for_pool(worker.pool)
            else:  # solo or threads: the pipeline lives in this process, nothing forks
                self.deadline.waiting_for("the pipeline to build in this process")
                report = start_process(runtime.pool_process()).report
        finally:
            os.close(self.read_fd)  # later pool processes report nothing (their writes are ignored)
        if report.get("error"):
            raise StartupError(f"cannot build the pipeline: {report['error']}; stopping before taking any job")
        logger.info("pipeline ready in pool process %s: %s", report.get("pid", os.getpid()), report.get("worker"))
        runtime.metrics.describe_worker(settings, report)
        runtime.serving = True  # pool processes forked from now on replace one that died
        self.deadline.waiting_for(f"the consumer to connect to the broker ({redact_url(settings.broker_url)})")

    def _ready(self, **_: Any) -> None:
        """``worker_ready``: Celery's consumer is connected and says ``ready.``."""
        self.deadline.ready()

    def _give_up(self, reason: str) -> None:
        """The deadline passed (its thread): say why, end the pool processes, exit 70 at once,
        since the main thread may be blocked in a call that never returns."""
        logger.critical("%s; stopping before taking any job", reason)
        for process in _pool_processes(self.pool):
            try:
                os.kill(process.pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):  # gone already, or never started (pid None)
                pass
        logging.shutdown()  # flush the log handlers: os._exit skips that
        os._exit(os.EX_SOFTWARE)

    def _check_fork_safety(self) -> None:
        unsafe = fork_unsafe_imports()
        if unsafe:
            raise StartupError(
                f"the worker's main process imported {', '.join(unsafe)} before forking its pool: CUDA "
                "would fail in the pool process. This is a bug: the main process must stay torch-free."
            )
        logger.info("main process is fork-safe: none of %s imported", ", ".join(FORK_UNSAFE_MODULES))

    def _wait_for_pool(self, pool: Any) -> dict[str, Any]:
        """The first pool process's report, or an error if it dies while loading; the stages it
        reports on the way go to the deadline, which ends a pool process that hangs."""
        buffer = b""
        stage = "the pool process to start"
        while True:
            self.deadline.waiting_for(stage)
            readable, _, _ = select.select([self.read_fd], [], [], 1.0)
            if readable:
                buffer += os.read(self.read_fd, 65536)
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    message = json.loads(line)
                    if "stage" not in message:
                        return message
                    stage = f"{message['stage']} (pool process {message['pid']})"
                    logger.info("waiting for %s", stage)
                continue
            dead = [process.exitcode for process in _pool_processes(pool) if process.exitcode is not None]
            if dead:
                return {"error": f"the pool process exited with code {dead[0]} while waiting for {stage}"}


def _pool_processes(pool: Any) -> list[Any]:
    """The prefork pool's processes (none for other pools, or before the pool has started)."""
    return list(getattr(getattr(pool, "_pool", None), "_pool", None) or [])
