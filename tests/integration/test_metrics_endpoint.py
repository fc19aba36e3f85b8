"""A real `deepqueue worker` process serves /metrics, /livez and /readyz: not ready until its
pool process has built the pipeline, and every metric family there after a small run (tiny
model on CPU, a private Redis, moto's S3 server)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops.localstack import client_for, deepqueue_command, free_port, stop
from producer import JobState
from tests.helpers import get

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Family names as the parser gives them (counters without ``_total``).
FAMILIES = {
    "deepqueue_images",
    "deepqueue_batches",
    "deepqueue_batch_size",
    "deepqueue_stage_seconds",
    "deepqueue_errors",
    "deepqueue_batch_failures",
    "deepqueue_model_load_seconds",
    "deepqueue_warmup_seconds",
    "deepqueue_compiles",
    "deepqueue_worker_info",
    "deepqueue_jobs_in_flight",
    "deepqueue_jobs_buffered",
    "deepqueue_ready",
    "deepqueue_queue_jobs",
}


def scrape(base: str) -> dict[str, Any]:
    """family name -> {(sample name, sorted labels): value}."""
    status, text = get(f"{base}/metrics")
    assert status == 200, text
    return {
        family.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        for family in text_string_to_metric_families(text)
    }


def value(families: dict[str, Any], family: str, name: str, **labels: str) -> float:
    return families[family][(name, tuple(sorted(labels.items())))]


def test_a_workers_probes_and_metrics_after_a_small_run(s3_worker_env, tmp_path):
    port = free_port()
    env = {
        **s3_worker_env,
        "DEEPQUEUE_METRICS_PORT": str(port),
        "DEEPQUEUE_METRICS_HOST": "127.0.0.1",
        "DEEPQUEUE_LOG_FORMAT": "json",
    }
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen([*deepqueue_command(), "worker"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # 1. Start-up: nothing listening, then 503 "loading pipeline" (and /livez 200) while the
        #    pool process loads the model, then 200 for good.
        seen: list[tuple[int | None, str]] = []
        live_while_loading: set[tuple[int | None, str]] = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and worker.poll() is None:
            answer = get(f"{base}/readyz")
            if not seen or seen[-1] != answer:
                seen.append(answer)
            if answer[0] == 503:
                live_while_loading.add(get(f"{base}/livez"))
            if answer[0] == 200:
                break
            time.sleep(0.05)
        assert worker.poll() is None, log.read_text()[-3000:]
        order = {None: 0, 503: 1, 200: 2}
        assert [order[status] for status, _ in seen] == sorted(order[status] for status, _ in seen), seen
        assert seen[-1] == (200, "ready\n"), seen
        assert (503, "loading pipeline\n") in seen, seen
        assert live_while_loading == {(200, "ok\n")}
        text = log.read_text()
        assert text.index("metrics and health on") < text.index("pipeline ready in pool process")

        # 2. A small run.
        with client_for(env) as client:
            run = client.submit([f"metrics {i}" for i in range(6)], run="metrics", steps=2, width=64, height=64)
            assert run.wait(timeout=120).counts[JobState.DONE] == 6

        # 3. The main process counts an outcome when the pool process returns it, just after the
        #    job's state is written: wait for the last ones (and their acknowledgements).
        deadline = time.monotonic() + 20
        while True:
            families = scrape(base)
            settled = (
                value(families, "deepqueue_images", "deepqueue_images_total", outcome="done") == 6
                and value(families, "deepqueue_queue_jobs", "deepqueue_queue_jobs", queue="deepqueue", state="reserved")
                == 0
            )
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        stop(worker)
        print(log.read_text()[-5000:])  # shown by pytest when the test failed

    # Log lines are JSON objects, batch lines with the run, the batch and its jobs as fields.
    batch_lines = [json.loads(line) for line in log.read_text().splitlines() if '"batch_id"' in line]
    assert batch_lines and all(entry["run_id"] == "metrics" and entry["batch_size"] >= 1 for entry in batch_lines)
    assert sum(len(entry["jobs"].split(",")) for entry in batch_lines) == 6

    assert FAMILIES <= families.keys(), FAMILIES - families.keys()
    images = {labels[0][1]: count for (_, labels), count in families["deepqueue_images"].items()}
    assert images == {"done": 6, "failed": 0, "skipped": 0, "cancelled": 0}
    batches = value(families, "deepqueue_batches", "deepqueue_batches_total")
    assert batches >= 1
    assert value(families, "deepqueue_batch_size", "deepqueue_batch_size_count") == batches
    assert value(families, "deepqueue_batch_size", "deepqueue_batch_size_sum") == 6
    stages = {"queue_wait": 6, "inference": batches, "encode": 6, "upload": 6}
    for stage, count in stages.items():
        assert value(families, "deepqueue_stage_seconds", "deepqueue_stage_seconds_count", stage=stage) == count
        assert value(families, "deepqueue_stage_seconds", "deepqueue_stage_seconds_sum", stage=stage) > 0
    assert sum(families["deepqueue_errors"].values()) == 0
    assert value(families, "deepqueue_model_load_seconds", "deepqueue_model_load_seconds") > 0
    assert value(families, "deepqueue_warmup_seconds", "deepqueue_warmup_seconds") == 0  # nothing to compile
    assert sum(families["deepqueue_compiles"].values()) == 0
    ((_, labels), info) = next(iter(families["deepqueue_worker_info"].items()))
    assert info == 1 and len(families["deepqueue_worker_info"]) == 1
    assert dict(labels) == {
        "model": env["DEEPQUEUE_MODEL"],
        "device": "cpu",
        "dtype": "float32",
        "acceleration": "off",
        "cache_interval": "3",
        "cache_branch": "0",
        "max_batch": "8",
        "queue": "deepqueue",
    }
    assert value(families, "deepqueue_jobs_in_flight", "deepqueue_jobs_in_flight") == 0
    assert value(families, "deepqueue_jobs_buffered", "deepqueue_jobs_buffered") == 0
    assert value(families, "deepqueue_ready", "deepqueue_ready") == 1
    assert value(families, "deepqueue_queue_jobs", "deepqueue_queue_jobs", queue="deepqueue", state="waiting") == 0
    assert value(families, "deepqueue_queue_jobs", "deepqueue_queue_jobs", queue="deepqueue", state="reserved") == 0
    assert "Traceback" not in log.read_text()


def test_a_taken_metrics_port_stops_the_worker_before_ready(s3_worker_env, tmp_path):
    """Two workers on one host with the same port: the second says so and exits (70), rather than
    running with probes that would answer for the first."""
    log = tmp_path / "worker.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            **s3_worker_env,
            "DEEPQUEUE_METRICS_HOST": "127.0.0.1",
            "DEEPQUEUE_METRICS_PORT": str(taken.getsockname()[1]),
        }
        with log.open("w") as out:
            code = subprocess.run(
                [*deepqueue_command(), "worker"], env=env, stdout=out, stderr=subprocess.STDOUT, timeout=120
            ).returncode
    text = log.read_text()
    assert code == 70, text[-3000:]
    assert "cannot serve metrics on 127.0.0.1" in text and "DEEPQUEUE_METRICS_PORT" in text
    assert "ready." not in text
