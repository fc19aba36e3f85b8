"""Worker start-up, with real worker processes: the main process stays torch-free (CUDA does not
survive a fork after ``import diffusers``), and a worker that cannot build its pipeline says so
and exits before it reports ready or takes a job."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis

from ops.localstack import deepqueue_command, start_worker, stop
from producer import Client, JobState

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run_worker_to_exit(command: list[str], env: dict[str, str], log_path) -> int:
    with log_path.open("w") as log:
        return subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=180).returncode


def test_main_process_stays_torch_free_and_ready_means_a_built_pipeline(s3_worker_env, tmp_path):
    log = tmp_path / "worker.log"
    worker = start_worker(s3_worker_env, log)
    try:
        text = log.read_text()
        # Both lines come before Celery's "ready.": the gate runs between pool and consumer.
        assert "main process is fork-safe: none of torch, diffusers" in text
        assert "pipeline ready in pool process" in text
        assert text.index("pipeline ready in pool process") < text.index("ready.", text.index("pipeline ready"))
        with Client(s3_worker_env["DEEPQUEUE_BROKER_URL"], s3_worker_env["DEEPQUEUE_RESULT_BACKEND"]) as client:
            run = client.submit(["after start-up"], run="startup", steps=2, width=64, height=64)
            assert run.wait(timeout=120).counts[JobState.DONE] == 1
    finally:
        stop(worker)
    assert "Traceback" not in log.read_text(), "a clean start, job and stop log no error"


def test_a_main_process_that_imported_diffusers_refuses_to_start(s3_worker_env, tmp_path):
    """The regression that broke the GPU worker, caused on purpose: diffusers imported in the
    main process before the pool forks. On a GPU every pool process would fail; here the
    worker must refuse to start, on any machine."""
    log = tmp_path / "worker.log"
    wrapper = "import diffusers; from producer.cli import main; main()"
    code = run_worker_to_exit([sys.executable, "-c", wrapper, "worker"], s3_worker_env, log)
    text = log.read_text()
    assert code == 70, text[-3000:]
    assert "imported torch, diffusers" in text and "before forking its pool" in text
    assert "ready." not in text


def test_a_worker_without_a_pipeline_says_so_before_ready_and_takes_no_job(s3_worker_env, tmp_path):
    """A pool process that cannot build its pipeline (here: CUDA asked for on a CPU machine)."""
    with Client(s3_worker_env["DEEPQUEUE_BROKER_URL"], s3_worker_env["DEEPQUEUE_RESULT_BACKEND"]) as client:
        client.submit(["a", "b"], run="nogpu", steps=2, width=64, height=64)
    log = tmp_path / "worker.log"
    code = run_worker_to_exit([*deepqueue_command(), "worker"], {**s3_worker_env, "DEEPQUEUE_DEVICE": "cuda"}, log)
    text = log.read_text()
    assert code == 70, text[-3000:]  # EX_SOFTWARE
    assert "cannot build the pipeline" in text and "stopping before taking any job" in text
    assert "ready." not in text
    broker = redis.Redis.from_url(s3_worker_env["DEEPQUEUE_BROKER_URL"])
    assert broker.llen("deepqueue") == 2 and broker.hlen("unacked") == 0, "the jobs must stay queued"


def test_a_missing_model_is_refused_before_anything_starts(s3_worker_env, tmp_path):
    log = tmp_path / "worker.log"
    code = run_worker_to_exit(
        [*deepqueue_command(), "worker"], {**s3_worker_env, "DEEPQUEUE_MODEL": str(tmp_path / "nothing")}, log
    )
    assert code == 1
    assert "cannot read model" in log.read_text()


def test_a_missing_bucket_stops_the_worker_before_ready(s3_worker_env, tmp_path):
    """Found at start-up, before the model loads, not after each image is generated."""
    log = tmp_path / "worker.log"
    code = run_worker_to_exit(
        [*deepqueue_command(), "worker"], {**s3_worker_env, "DEEPQUEUE_S3_BUCKET": "no-such-bucket"}, log
    )
    text = log.read_text()
    assert code == 70, text[-3000:]
    assert "bucket s3://no-such-bucket does not exist" in text and "ready." not in text
