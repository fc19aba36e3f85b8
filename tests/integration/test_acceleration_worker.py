"""Real `deepqueue worker` processes at each acceleration level (tiny model, CPU, a private Redis,
moto's S3 server): the level in every sidecar, and warm shapes traced before the worker says
ready with their kernels read back from the compile cache."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ops.localstack import client_for, deepqueue_command, free_port, moto_s3_client, stop
from producer import JobState
from tests.helpers import get
from tests.integration.test_metrics_endpoint import scrape

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Compiling the tiny model's steps takes minutes on 2 busy cores; generous, never a speed claim.
READY_TIMEOUT_S = 1500


def start(env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        return subprocess.Popen([*deepqueue_command(), "worker"], env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(worker: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and worker.poll() is None:
        if get(f"{base}/readyz")[0] == 200:
            return
        time.sleep(0.5)
    raise AssertionError(f"worker not ready (exit {worker.poll()}):\n{log.read_text()[-4000:]}")


def run_jobs(env: dict[str, str], run_id: str, count: int) -> list[dict[str, Any]]:
    """Submit ``count`` 64x64 jobs, wait for them, return their sidecars."""
    with client_for(env) as client:
        prompts = [f"accelerated {i}" for i in range(count)]
        run = client.submit(prompts, run=run_id, steps=4, width=64, height=64)
        assert run.wait(timeout=READY_TIMEOUT_S).counts[JobState.DONE] == count
    s3 = moto_s3_client(env["DEEPQUEUE_S3_ENDPOINT_URL"])
    listed = s3.list_objects_v2(Bucket=env["DEEPQUEUE_S3_BUCKET"], Prefix=f"{run_id}/images/")
    keys = [item["Key"] for item in listed.get("Contents", []) if item["Key"].endswith(".json")]
    sidecars = [json.loads(s3.get_object(Bucket=env["DEEPQUEUE_S3_BUCKET"], Key=key)["Body"].read()) for key in keys]
    return [sidecar for sidecar in sidecars if "job_id" in sidecar]


def compiles(base: str) -> dict[str, float]:
    families = scrape(base)
    return {dict(labels)["kind"]: count for (_, labels), count in families["deepqueue_compiles"].items()}


def test_a_fused_worker_records_its_level_in_every_sidecar(s3_worker_env, tmp_path) -> None:
    env = {**s3_worker_env, "DEEPQUEUE_ACCELERATION": "fuse"}
    worker = start(env, tmp_path / "worker.log")
    try:
        sidecars = run_jobs(env, "fused", 3)
    finally:
        stop(worker)
    assert len(sidecars) == 3
    assert {sidecar["worker"]["acceleration"] for sidecar in sidecars} == {"fuse"}


def test_a_compiled_worker_warms_its_shape_from_the_compile_cache(s3_worker_env, compiled_tiny, tmp_path) -> None:
    """``graphs`` on CPU runs as ``compile`` (said once); the warm shape is traced before ready and
    its kernels are read back from the cache a worker with this model filled (``compiled_tiny``
    loads the Engine as the pool process does): a restarted worker compiles nothing."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **s3_worker_env,
        "DEEPQUEUE_ACCELERATION": "graphs",
        "DEEPQUEUE_WARM_SHAPES": "64x64:2",
        "DEEPQUEUE_MAX_BATCH": "2",  # batches of 1 run padded to the warm 2: no compile mid-run
        "DEEPQUEUE_COMPILE_CACHE": str(compiled_tiny),
        "DEEPQUEUE_LOAD_TIMEOUT_S": str(READY_TIMEOUT_S),
        "DEEPQUEUE_METRICS_PORT": str(port),
        "DEEPQUEUE_METRICS_HOST": "127.0.0.1",
    }
    log = tmp_path / "worker.log"
    worker = start(env, log)
    try:
        wait_ready(worker, base, log)
        warmed = compiles(base)
        assert scrape(base)["deepqueue_warmup_seconds"][("deepqueue_warmup_seconds", ())] > 0
        sidecars = run_jobs(env, "compiled", 3)
        after = compiles(base)
    finally:
        stop(worker)
    assert {sidecar["worker"]["acceleration"] for sidecar in sidecars} == {"compile"}
    assert {sidecar["batch"]["size"] for sidecar in sidecars} <= {1, 2}
    assert log.read_text().count("acceleration graphs needs CUDA; cpu runs it as compile") == 1
    # The warm-up traced its graphs but compiled no kernel: all read back from the cache.
    assert warmed["graphs"] > 0 and warmed.get("cache_misses", 0) == 0 and warmed["cache_hits"] > 0, warmed
    # After it, the run's batches (2 + 1 padded to 2) trace nothing.
    assert after == warmed, (warmed, after)
