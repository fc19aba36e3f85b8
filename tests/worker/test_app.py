"""worker.app: the worker's Celery settings extend the base it shares with producers."""

from __future__ import annotations

from producer.contract import TASK_NAME, celery_config
from worker.app import create_app, worker_config
from worker.settings import WorkerSettings


def test_worker_config_extends_the_shared_base() -> None:
    settings = WorkerSettings(broker_url="rediss://:pw@h:6380/0", queue="q", visibility_timeout_s=7200)
    config = worker_config(settings)
    assert {name: config[name] for name in celery_config(settings)} == celery_config(settings)
    assert config["broker_transport"] == "worker.delivery.transport:Transport" and "broker_use_ssl" in config
    assert config["worker_concurrency"] == 1 and config["worker_prefetch_multiplier"] == settings.prefetch_count


def test_the_task_acknowledges_late_and_keeps_no_result() -> None:
    task = create_app(WorkerSettings(broker_url="redis://127.0.0.1:6379/3")).tasks[TASK_NAME]
    assert task.acks_late is True and task.ignore_result is True and task.typing is False
