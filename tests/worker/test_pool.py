"""worker.pipeline.pool: a pool process builds its pipeline once, reports how, and keeps why it could not."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from producer.job import Job
from tests.helpers import local_worker_settings
from worker.pipeline import pool
from worker.pipeline.pool import PipelineUnavailable, PoolProcess


@pytest.fixture(autouse=True)
def no_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a process that no worker has started."""
    monkeypatch.setattr(pool, "_process", None)


def reported(read_fd: int) -> list[dict]:
    return [json.loads(line) for line in os.read(read_fd, 65536).splitlines()]


def delivery(index: int) -> dict:
    job = Job(run_id="pool", index=index, prompt=f"cat {index}", seed=index, height=64, width=64, steps=2)
    return {"task_id": job.job_id, "payload": job.model_dump(mode="json"), "enqueued_at": time.time()}


def test_a_process_reports_each_stage_then_its_pipeline(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    settings = local_worker_settings("simulated:a=0,b=0", tmp_path / "out")
    process = pool.start_process(PoolProcess(settings, name="w@h:1:abc", report_fd=write_fd))
    try:
        *stages, report = reported(read_fd)
        assert [stage["stage"].split()[0] for stage in stages] == ["storage", "the"]  # storage, then the model
        assert report == process.report and report["error"] is None and report["pid"] == os.getpid()
        assert process.ready_executor() is process.executor
    finally:
        process.close()
        os.close(read_fd)
        os.close(write_fd)


def test_a_replacement_process_skips_the_storage_check(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    settings = local_worker_settings("simulated:a=0,b=0", tmp_path / "out")
    process = pool.start_process(PoolProcess(settings, report_fd=write_fd, check_storage=False))
    try:
        stages = [message["stage"] for message in reported(read_fd) if "stage" in message]
        assert stages == [f"the model {settings.model} to load"]
    finally:
        process.close()
        os.close(read_fd)
        os.close(write_fd)


def test_a_process_that_could_not_build_says_why_with_every_batch(tmp_path: Path) -> None:
    settings = local_worker_settings(tmp_path / "no-such-model", tmp_path / "out")
    process = pool.start_process(PoolProcess(settings))
    assert process.executor is None and process.report["error"] == process.error
    with pytest.raises(PipelineUnavailable, match=process.error):
        pool.execute_batch([delivery(0)])
    with pytest.raises(PipelineUnavailable):
        pool.collect_stored()


def test_a_batch_sent_to_a_process_no_worker_started_is_refused() -> None:
    with pytest.raises(PipelineUnavailable, match="no pipeline was started"):
        pool.execute_batch([delivery(0)])


def test_a_direct_call_builds_the_pipeline_once(tmp_path: Path) -> None:
    settings = local_worker_settings("simulated:a=0,b=0", tmp_path / "out")
    [first] = pool.execute_now(settings, [delivery(0)])
    started = pool._process
    [second] = pool.execute_now(settings, [delivery(1)])
    try:
        assert first["ok"] and second["ok"] and pool._process is started
    finally:
        started.close()
