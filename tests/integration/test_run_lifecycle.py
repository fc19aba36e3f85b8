"""Cancel, resume and delete a run while a real worker serves it (issue 14): a run deleted while
its batch is in flight keeps no object once the worker is done with it, a deleted run's files can
still be deleted, and a cancelled run resumed runs all its jobs."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from ops.localstack import moto_s3_client, start_worker, stop
from producer import Client, JobState
from producer.cli import cli
from tests.helpers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def objects(env: dict[str, str], run_id: str) -> list[str]:
    s3 = moto_s3_client(env["DEEPQUEUE_S3_ENDPOINT_URL"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=env["DEEPQUEUE_S3_BUCKET"], Prefix=f"{run_id}/")
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def use_env(monkeypatch, env: dict[str, str]) -> None:
    """The worker's settings and S3 credentials, as a user's shell has them."""
    for name, value in env.items():
        if name.startswith(("DEEPQUEUE_", "AWS_")):
            monkeypatch.setenv(name, value)


@pytest.fixture
def env(s3_worker_env, monkeypatch) -> dict[str, str]:
    """A worker's environment with runs at the bucket's top level, also set for the client."""
    env = {**s3_worker_env, "DEEPQUEUE_S3_PREFIX": ""}
    use_env(monkeypatch, env)
    return env


def test_a_run_deleted_while_its_batch_runs_keeps_no_object(env, tmp_path):
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        with Client() as client:
            run = client.submit([f"doomed {i}" for i in range(32)], run="doomed", steps=30, width=128, height=128)
            wait_until(lambda: run.status().counts[JobState.DONE] > 0, 180, "a stored image")
            wait_until(lambda: run.status().counts[JobState.RUNNING] > 0, 180, "a batch in flight")
            client.delete("doomed", outputs=True, force=True)
    finally:
        stop(worker)  # a warm shutdown: the batch in flight ends, its images are stored (or not)
    assert objects(env, "doomed") == [], "objects stored for a deleted run"
    again = CliRunner().invoke(cli, ["delete", "doomed", "--outputs"])
    assert again.exit_code == 0 and "run doomed was deleted before, 0 objects deleted" in again.output, again.output


def test_a_cancelled_run_resumed_runs_all_its_jobs(env, tmp_path):
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        with Client() as client:
            run = client.submit([f"paused {i}" for i in range(48)], run="paused", steps=4, width=64, height=64)
            wait_until(lambda: run.status().counts[JobState.DONE] > 0, 180, "a done job")
            assert run.cancel() > 0
            cancelled = run.wait(timeout=180).counts[JobState.CANCELLED]
            assert cancelled > 0
            result = CliRunner().invoke(cli, ["resume", "paused", "--wait", "--timeout", "300"])
            assert result.exit_code == 0, result.output
            assert f"run paused resumed: {cancelled} cancelled jobs sent again" in result.output
            counts = run.status().counts
        assert counts[JobState.DONE] == 48 and counts[JobState.FAILED] == 0, counts
        assert worker.poll() is None
    finally:
        stop(worker)
    assert len([key for key in objects(env, "paused") if key.endswith(".png")]) == 48
