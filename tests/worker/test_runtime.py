"""worker.runtime: the state a worker's first bootstep makes, and what pool processes start from."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from celery import signals

from worker.app import create_app
from worker.pipeline import pool
from worker.runtime import Runtime, WorkerRuntime
from worker.settings import WorkerSettings

SETTINGS = WorkerSettings(broker_url="redis://127.0.0.1:6379/9", queue="q1")


def test_the_runtime_holds_leases_and_metrics_for_this_worker() -> None:
    runtime = WorkerRuntime.create(SETTINGS, "gpu0@host")
    assert runtime.name.startswith("gpu0@host:") and runtime.leases.name == runtime.name
    assert runtime.leases.queue == "q1" and not runtime.serving and runtime.report_fd is None
    assert any(sample.labels.get("queue") == "q1" for sample in runtime.metrics.info.collect()[0].samples)


def test_pool_processes_start_from_what_the_main_process_holds_when_they_fork() -> None:
    runtime = WorkerRuntime.create(SETTINGS, "gpu0@host")
    runtime.report_fd = 7
    first = runtime.pool_process()
    assert (first.settings, first.name, first.report_fd, first.check_storage) == (SETTINGS, runtime.name, 7, True)
    runtime.serving = True  # a process forked now replaces one that died: storage has taken writes
    assert runtime.pool_process().check_storage is False


def test_the_bootstep_gives_the_worker_its_runtime_and_starts_pool_processes_from_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[pool.PoolProcess] = []
    monkeypatch.setattr(pool, "start_process", started.append)
    worker = SimpleNamespace(hostname="gpu0@host", app=create_app(SETTINGS))
    Runtime(worker)
    assert isinstance(worker.deepqueue, WorkerRuntime) and worker.deepqueue.settings is SETTINGS
    signals.worker_process_init.send(sender=None)  # what a pool process just forked sends
    assert worker.deepqueue.name in [process.name for process in started]
