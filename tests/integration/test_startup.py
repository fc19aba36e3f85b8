"""Worker start-up, with real worker processes: the main process stays torch-free (CUDA does not
survive a fork after ``import diffusers``), and a worker that cannot build its pipeline, reach its
storage or Redis, or get ready in time says so and exits (70) before it reports ready or takes a
job."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from ops.localstack import client_for, deepqueue_command, moto_s3_client, start_worker, stop, wait_for
from producer import JobState
from tests.helpers import queued_jobs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run_worker_to_exit(command: list[str], env: dict[str, str], log_path, timeout: float = 180) -> int:
    with log_path.open("w") as log:
        return subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie waiting for its reaper counts as ended)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def test_main_process_stays_torch_free_and_ready_means_a_built_pipeline(s3_worker_env, tmp_path):
    """Also: once ready, a worker outlives its load timeout (the deadline is for start-up only)."""
    log = tmp_path / "worker.log"
    load_timeout = 60
    started = time.monotonic()
    env = {**s3_worker_env, "DEEPQUEUE_LOAD_TIMEOUT_S": str(load_timeout), "DEEPQUEUE_STARTUP_RETRY_S": "10"}
    worker = start_worker(env, log)
    try:
        text = log.read_text()
        # The lines come before Celery's "ready.": the gate runs between pool and consumer.
        assert "main process is fork-safe: none of torch, diffusers" in text
        assert "waiting for storage s3://" in text and "waiting for the model" in text
        assert "pipeline ready in pool process" in text
        assert text.index("pipeline ready in pool process") < text.index("ready.", text.index("pipeline ready"))
        time.sleep(max(0.0, started + load_timeout + 5 - time.monotonic()))
        assert worker.poll() is None, log.read_text()[-3000:]
        with client_for(s3_worker_env) as client:
            run = client.submit(["after start-up"], run="startup", steps=2, width=64, height=64)
            assert run.wait(timeout=120).counts[JobState.DONE] == 1
    finally:
        stop(worker)
    text = log.read_text()
    assert "Traceback" not in text, "a clean start, job and stop log no error"
    assert "requires torchvision" not in text, "transformers' harmless image-processor fallback warnings are dropped"


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
    with client_for(s3_worker_env) as client:
        client.submit(["a", "b"], run="nogpu", steps=2, width=64, height=64)
    log = tmp_path / "worker.log"
    code = run_worker_to_exit([*deepqueue_command(), "worker"], {**s3_worker_env, "DEEPQUEUE_DEVICE": "cuda"}, log)
    text = log.read_text()
    assert code == 70, text[-3000:]  # EX_SOFTWARE
    assert "cannot build the pipeline" in text and "stopping before taking any job" in text
    assert "ready." not in text
    broker = redis.Redis.from_url(s3_worker_env["DEEPQUEUE_BROKER_URL"])
    assert len(queued_jobs(broker)) == 2 and broker.hlen("unacked") == 0, "the jobs must stay queued"


def test_a_missing_model_is_refused_before_anything_starts(s3_worker_env, tmp_path):
    log = tmp_path / "worker.log"
    code = run_worker_to_exit(
        [*deepqueue_command(), "worker"], {**s3_worker_env, "DEEPQUEUE_MODEL": str(tmp_path / "nothing")}, log
    )
    assert code == 70  # a worker that cannot serve (README, "Exit codes")
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


def test_storage_that_never_answers_stops_the_worker_with_the_reason(s3_worker_env, silent_port, tmp_path):
    """Each start-up call to S3 times out, is retried with a line saying what the worker waits
    for, and once DEEPQUEUE_STARTUP_RETRY_S is spent the worker exits 70 naming the storage."""
    log = tmp_path / "worker.log"
    bucket = s3_worker_env["DEEPQUEUE_S3_BUCKET"]
    env = {
        **s3_worker_env,
        "DEEPQUEUE_S3_ENDPOINT_URL": f"http://127.0.0.1:{silent_port}",
        "DEEPQUEUE_STARTUP_TIMEOUT_S": "1",
        "DEEPQUEUE_STARTUP_RETRY_S": "4",
        "DEEPQUEUE_LOAD_TIMEOUT_S": "120",
    }
    code = run_worker_to_exit([*deepqueue_command(), "worker"], env, log, timeout=240)
    text = log.read_text()
    assert code == 70, text[-3000:]
    where = f"storage s3://{bucket} at http://127.0.0.1:{silent_port}"
    assert f"waiting for {where}: StorageError: cannot reach s3://{bucket}: Read timeout" in text
    assert f"{where} did not answer within 4 s (DEEPQUEUE_STARTUP_RETRY_S" in text
    assert "ready." not in text


def test_a_worker_not_ready_within_the_load_timeout_exits_70_saying_what_it_waited_for(
    s3_worker_env, silent_port, tmp_path
):
    """The backstop: a call that blocks past DEEPQUEUE_LOAD_TIMEOUT_S (here S3 calls given an
    hour each) ends the worker at the deadline, with what it waited for, and its pool process too."""
    log = tmp_path / "worker.log"
    bucket = s3_worker_env["DEEPQUEUE_S3_BUCKET"]
    env = {
        **s3_worker_env,
        "DEEPQUEUE_S3_ENDPOINT_URL": f"http://127.0.0.1:{silent_port}",
        "DEEPQUEUE_STARTUP_TIMEOUT_S": "3600",
        "DEEPQUEUE_LOAD_TIMEOUT_S": "30",
        "DEEPQUEUE_STARTUP_RETRY_S": "20",
    }
    code = run_worker_to_exit([*deepqueue_command(), "worker"], env, log, timeout=30 + 120)
    text = log.read_text()
    assert code == 70, text[-3000:]
    reason = re.search(
        rf"not ready after 30 s \(DEEPQUEUE_LOAD_TIMEOUT_S\): still waiting for storage s3://{bucket} at "
        rf"http://127.0.0.1:{silent_port} to take the write check object \(pool process (\d+)\); "
        rf"stopping before taking",
        text,
    )
    assert reason, text[-3000:]
    # Killed, not left blocked for an hour: it ends as soon as the kernel has delivered SIGKILL.
    wait_for(lambda: gone(int(reason[1])), 60, "the end of the worker's pool process")
    assert "ready." not in text


def test_a_broker_that_never_answers_stops_the_worker_with_the_reason(s3_worker_env, silent_port, tmp_path):
    log = tmp_path / "worker.log"
    env = {
        **s3_worker_env,
        "DEEPQUEUE_BROKER_URL": f"redis://127.0.0.1:{silent_port}/0",
        "DEEPQUEUE_STARTUP_TIMEOUT_S": "1",
        "DEEPQUEUE_STARTUP_RETRY_S": "3",
    }
    code = run_worker_to_exit([*deepqueue_command(), "worker"], env, log)
    text = log.read_text()
    assert code == 70, text[-3000:]
    assert f"waiting for Redis (broker redis://127.0.0.1:{silent_port}/0): TimeoutError: Timeout reading from" in text
    assert f"Redis (broker redis://127.0.0.1:{silent_port}/0) did not answer within 3 s" in text
    assert "ready." not in text


def test_worker_flags_override_the_environment(s3_worker_env, tmp_path):
    """``deepqueue worker --max-batch 2 --scheduler euler --cache-interval 2`` against DEEPQUEUE_*
    saying 8, ddim and 3: the flags decide how its pool process batches and generates."""
    env = {
        **s3_worker_env,
        "DEEPQUEUE_MAX_BATCH": "8",
        "DEEPQUEUE_SCHEDULER": "ddim",
        "DEEPQUEUE_CACHE_INTERVAL": "3",
    }
    flags = ["--max-batch", "2", "--max-wait-s", "0.5", "--scheduler", "euler", "--cache-interval", "2"]
    worker = start_worker(env, tmp_path / "worker.log", *flags)
    try:
        with client_for(env) as client:
            run = client.submit(["a", "b", "c", "d"], run="flags", steps=2, width=64, height=64)
            assert run.wait(timeout=120).counts[JobState.DONE] == 4
    finally:
        stop(worker)
    s3 = moto_s3_client(env["DEEPQUEUE_S3_ENDPOINT_URL"])
    bucket = env["DEEPQUEUE_S3_BUCKET"]
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="flags/images/")["Contents"]
    keys = [item["Key"] for item in listed if item["Key"].endswith(".json")]
    sidecars = [json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read()) for key in keys]
    assert len(sidecars) == 4
    assert {sidecar["batch"]["size"] for sidecar in sidecars} <= {1, 2}
    assert {sidecar["scheduler"] for sidecar in sidecars} == {"euler"}
    assert {sidecar["deepcache"]["interval"] for sidecar in sidecars} == {2}
