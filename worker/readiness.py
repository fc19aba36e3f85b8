"""A worker is ready only once its pool process has built the pipeline, and its main process
stays fork-safe.

CUDA cannot be used in a process forked from one that imported diffusers (measured on an H200:
``Cannot re-initialize CUDA in forked subprocess``), so the main process of a prefork worker must
never import torch, diffusers or transformers; the pipeline lives in the pool process only.
``PipelineGate`` is a worker bootstep that runs after the pool has forked and before the consumer
takes any message: it refuses to start a main process that imported them, and waits for the pool
process to report whether its pipeline is built, so a broken model or device stops the worker
before it says ``ready``, with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import time
from typing import Any

from celery import bootsteps

from worker import runtime

logger = logging.getLogger(__name__)

#: Modules whose import in the main process would poison the pool's CUDA (or pull in torch).
FORK_UNSAFE_MODULES = ("torch", "diffusers", "transformers", "DeepCache", "accelerate")


class StartupError(SystemExit):
    """The worker cannot serve: Celery stops it with this exit code (70, EX_SOFTWARE)."""

    def __init__(self, message: str) -> None:
        logger.critical("%s", message)
        super().__init__(os.EX_SOFTWARE)


def fork_unsafe_imports(modules: dict[str, Any] | None = None) -> list[str]:
    """The modules of FORK_UNSAFE_MODULES imported in this process."""
    modules = sys.modules if modules is None else modules
    return [name for name in FORK_UNSAFE_MODULES if name in modules]


def is_forking_pool(pool: Any) -> bool:
    return type(pool).__module__ == "celery.concurrency.prefork"


class PipelineGate(bootsteps.StartStopStep):
    """Worker bootstep between the pool and the consumer (see the module's docstring)."""

    # The metrics server answers /livez and /readyz (503) while this step waits for the pipeline.
    requires = ("celery.worker.components:Pool", "worker.metrics:MetricsServer")
    label = "PipelineGate"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        # Steps are all built before the pool step forks, so every pool process has the pipe. Its
        # write end stays open here: processes forked later write into a closed pipe, harmlessly.
        self.read_fd, write_fd = os.pipe()
        runtime.report_to(write_fd)
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        try:
            if is_forking_pool(worker.pool):
                self._check_fork_safety()
                report = self._wait_for_pool(worker.pool, runtime.settings().load_timeout_s)
            else:  # solo or threads: the pipeline lives in this process, nothing forks
                runtime.init_process()
                report = runtime.pipeline_report()
        finally:
            os.close(self.read_fd)  # later pool processes report nothing (their writes are ignored)
        if report.get("error"):
            raise StartupError(f"cannot build the pipeline: {report['error']}; stopping before taking any job")
        logger.info("pipeline ready in pool process %s: %s", report.get("pid", os.getpid()), report.get("worker"))
        runtime.metrics().describe_worker(runtime.settings(), report)
        runtime.mark_serving()

    def _check_fork_safety(self) -> None:
        unsafe = fork_unsafe_imports()
        if unsafe:
            raise StartupError(
                f"the worker's main process imported {', '.join(unsafe)} before forking its pool: CUDA "
                "would fail in the pool process. This is a bug: the main process must stay torch-free."
            )
        logger.info("main process is fork-safe: none of %s imported", ", ".join(FORK_UNSAFE_MODULES))

    def _wait_for_pool(self, pool: Any, timeout: float) -> dict[str, Any]:
        """The first pool process's report, or an error if it dies or hangs while loading."""
        deadline = time.monotonic() + timeout
        buffer = b""
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.read_fd], [], [], 1.0)
            if readable:
                buffer += os.read(self.read_fd, 65536)
                if b"\n" in buffer:
                    return json.loads(buffer.split(b"\n", 1)[0])
            dead = [code for code in _pool_exit_codes(pool) if code is not None]
            if dead:
                return {"error": f"the pool process exited with code {dead[0]} while loading the pipeline"}
        return {"error": f"no pipeline in the pool process after {timeout:.0f} s (DEEPQUEUE_LOAD_TIMEOUT_S)"}


def _pool_exit_codes(pool: Any) -> list[int | None]:
    processes = getattr(getattr(pool, "_pool", None), "_pool", None) or []
    return [getattr(process, "exitcode", None) for process in processes]
