"""Settings, the shared Celery contract and the public surface of ``producer``."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

import producer
from producer.contract import TASK_NAME, celery_config
from producer.enqueue import message_args, producer_app
from producer.entries import entries_of, make_jobs
from producer.job import JobDefaults
from producer.settings import ClientSettings


def test_public_surface():
    assert sorted(producer.__all__) == [
        "Client",
        "ClientSettings",
        "DeepQueueError",
        "InvalidJobError",
        "Job",
        "JobDefaults",
        "JobResult",
        "JobState",
        "PromptFileError",
        "RecipeMismatchError",
        "Run",
        "RunNotFoundError",
        "RunStatus",
        "WaitTimeoutError",
    ]
    for name in producer.__all__:
        assert getattr(producer, name) is not None


def test_error_tree():
    for name in ["InvalidJobError", "PromptFileError", "RecipeMismatchError", "RunNotFoundError", "WaitTimeoutError"]:
        assert issubclass(getattr(producer, name), producer.DeepQueueError)
    assert issubclass(producer.InvalidJobError, ValueError) and issubclass(producer.PromptFileError, ValueError)
    assert issubclass(producer.RecipeMismatchError, ValueError)
    assert issubclass(producer.RunNotFoundError, LookupError)
    assert issubclass(producer.WaitTimeoutError, TimeoutError)


def test_settings_defaults():
    settings = ClientSettings()
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert settings.result_backend == "redis://127.0.0.1:6379/1"
    assert settings.queue == "deepqueue"
    assert settings.visibility_timeout_s == 3600.0


def test_settings_read_from_environment_when_called(monkeypatch):
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", "redis://broker:6379/3")
    monkeypatch.setenv("DEEPQUEUE_QUEUE", "gpu")
    monkeypatch.setenv("DEEPQUEUE_VISIBILITY_TIMEOUT_S", "90")
    monkeypatch.setenv("DEEPQUEUE_SOMETHING_FOR_THE_WORKER", "ignored")
    settings = ClientSettings()
    assert (settings.broker_url, settings.queue, settings.visibility_timeout_s) == (
        "redis://broker:6379/3",
        "gpu",
        90.0,
    )


@pytest.mark.parametrize("value", [0, -1])
def test_visibility_timeout_must_be_positive(value):
    with pytest.raises(ValidationError, match="visibility_timeout_s"):
        ClientSettings(visibility_timeout_s=value)


def test_celery_config_shared_with_the_worker():
    config = celery_config(ClientSettings(broker_url="redis://b/0", queue="q", visibility_timeout_s=120))
    assert config["broker_url"] == "redis://b/0"
    assert config["task_default_queue"] == "q"
    assert config["task_serializer"] == "json" and config["accept_content"] == ["json"]
    assert config["task_acks_late"] is True and config["task_reject_on_worker_lost"] is True
    assert config["task_ignore_result"] is True
    assert config["broker_transport_options"]["visibility_timeout"] == 120


def test_producer_app_uses_the_settings_without_connecting():
    app = producer_app(ClientSettings(broker_url="redis://127.0.0.1:1/0", queue="q"))
    try:
        assert app.conf.broker_url == "redis://127.0.0.1:1/0"
        assert app.conf.task_default_queue == "q"
        assert TASK_NAME not in app.tasks  # it only sends
    finally:
        app.close()


def test_message_args_are_the_job_as_json():
    [job] = make_jobs([("i", {"prompt": "a fox", "negative_prompt": "blur"})], run_id="r", defaults=JobDefaults())
    args, kwargs = message_args(entries_of([job]), 1.8e9)
    assert args == [json.loads(job.model_dump_json(exclude_none=True))]  # None: the worker's default
    assert json.loads(json.dumps(args)) == args  # plain JSON types only
    assert kwargs == {"enqueued_at": 1.8e9}
